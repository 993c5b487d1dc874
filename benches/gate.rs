//! Runegate bench: `cargo bench --bench gate`.
//!
//! What the gate costs on a terminate Service, against the same Service
//! without a gate, in one run on 127.0.0.1: a Server and a Client
//! (`runewarp` processes) with two terminate Services on the same plaintext
//! HTTP backend (hyper, in process): `plain.bench.test` without a gate and
//! `gated.bench.test` with one. The bench signs in once (the mail comes to
//! the demo's mail catcher) and then, with the session cookie:
//!
//! - latency: small GETs over one kept-alive HTTPS connection per path,
//!   alternating the paths; p50/p99 per path and the p50 the gate adds
//!   (target ≤ 0.3 ms);
//! - throughput: a large download (1 GiB; 64 MiB in quick mode) per path,
//!   alternating, best of the rounds; the gated/plain ratio (target ≥ 0.9).
//!
//! Quick mode (`RUNEWARP_BENCH_QUICK=1` or any run without cargo's
//! `--bench` flag) uses fewer requests and a smaller download. Targets are
//! informational: a miss never fails the bench; a broken setup does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use runewarp::hostname::{PublicHostname, ServerHostname};
use runewarp::tls::material;

const PLAIN: &str = "plain.bench.test";
const GATED: &str = "gated.bench.test";
const EMAIL: &str = "bench@example.com";
const MIB: u64 = 1024 * 1024;
const CHUNK: usize = 64 * 1024;
static SOURCE: [u8; CHUNK] = [0x5a; CHUNK];
/// Upper bound for one download, so a stuck path cannot hang the run.
const PHASE_LIMIT: Duration = Duration::from_secs(60);

type Res<T> = Result<T, String>;

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn main() -> ExitCode {
    let quick = std::env::var("RUNEWARP_BENCH_QUICK").is_ok_and(|v| v == "1")
        || !std::env::args().any(|a| a == "--bench");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gate bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(quick)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gate bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The Server and Client processes, killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn bench(quick: bool) -> Res<()> {
    runewarp::tls::install_crypto_provider();
    let (requests, big) = if quick {
        (300, 64 * MIB)
    } else {
        (3000, 1024 * MIB)
    };
    eprintln!(
        "runewarp gate bench ({} mode): {requests} requests per path, {} MiB downloads",
        if quick { "quick" } else { "full" },
        big / MIB
    );
    let dir = tempfile::tempdir().map_err(|e| err("tempdir")(&e))?;
    let d = dir.path().to_path_buf();
    let result = measure(quick, requests, big, &d).await;
    if result.is_err() {
        // Keep the configs and logs of a failed run.
        eprintln!("configs and logs kept in {}", dir.keep().display());
    }
    result
}

async fn measure(quick: bool, requests: usize, big: u64, d: &Path) -> Res<()> {
    let backend = start_backend().await?;
    let mail = runewarp::demo::MailCatcher::start(false)
        .await
        .map_err(|e| err("mail catcher")(&e))?;
    let (procs, public) = start_tunnel(d, backend, mail.addr)?;
    let tls = client_tls(&d.join("public/public-ca.crt"))?;

    wait_up(public, &tls, PLAIN, "/small").await?;
    wait_up(public, &tls, GATED, "/small").await?;
    let cookie = sign_in(public, &tls, &mail).await?;

    // Latency: one kept-alive connection per path, alternating.
    let mut plain = Conn::open(public, &tls, PLAIN, None).await?;
    let mut gated = Conn::open(public, &tls, GATED, Some(cookie.clone())).await?;
    for i in 0..50 {
        plain
            .get("/small")
            .await
            .map_err(|e| format!("warm-up {i}: {e}"))?;
        gated.get("/small").await?;
    }
    let (mut tp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..requests {
        tp.push(plain.get("/small").await?.1);
        tg.push(gated.get("/small").await?.1);
    }
    drop((plain, gated));
    let (p50p, p99p) = percentiles(&mut tp);
    let (p50g, p99g) = percentiles(&mut tg);
    let added = p50g - p50p;

    // Throughput: fresh connections, alternating, best of the rounds.
    let path = format!("/big?{big}");
    let rounds = if quick { 2 } else { 3 };
    let (mut bp, mut bg) = (0f64, 0f64);
    for _ in 0..rounds {
        let mut c = Conn::open(public, &tls, PLAIN, None).await?;
        bp = bp.max(c.download(&path, big).await?);
        let mut c = Conn::open(public, &tls, GATED, Some(cookie.clone())).await?;
        bg = bg.max(c.download(&path, big).await?);
    }
    let ratio = bg / bp;
    drop(procs);

    println!("Runegate on a terminate Service vs the same Service without a gate (127.0.0.1)");
    println!(
        "  latency     plain p50 {:.3} ms  p99 {:.3} ms | gated p50 {:.3} ms  p99 {:.3} ms",
        p50p * 1e3,
        p99p * 1e3,
        p50g * 1e3,
        p99g * 1e3
    );
    println!(
        "  added p50   {:.3} ms (target <= 0.3 ms): {}",
        added * 1e3,
        if added <= 0.0003 { "met" } else { "missed" }
    );
    println!(
        "  throughput  {} MiB download: plain {:.0} MiB/s, gated {:.0} MiB/s",
        big / MIB,
        bp,
        bg
    );
    println!(
        "  ratio       {ratio:.3} (target >= 0.9): {}",
        if ratio >= 0.9 { "met" } else { "missed" }
    );
    Ok(())
}

fn percentiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}

/// `n` bytes of a fixed pattern, in 64 KiB frames, without buffering.
struct Pattern {
    left: u64,
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&SOURCE[..n])))))
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

type AnyBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The plaintext backend: `/small` answers 2 bytes, `/big?N` N bytes.
async fn start_backend() -> Res<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| err("backend bind")(&e))?;
    let addr = listener.local_addr().map_err(|e| err("backend")(&e))?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body: AnyBody = match req.uri().path() {
                        "/big" => {
                            let n = req.uri().query().and_then(|q| q.parse().ok()).unwrap_or(0);
                            Pattern { left: n }.boxed()
                        }
                        _ => Full::new(Bytes::from_static(b"ok")).boxed(),
                    };
                    Ok::<_, Infallible>(Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn free_port(udp: bool) -> Res<u16> {
    let port = if udp {
        std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr())
    } else {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|s| s.local_addr())
    };
    port.map(|a| a.port()).map_err(|e| err("free port")(&e))
}

/// Material, configs and the two processes; returns the public address.
fn start_tunnel(d: &Path, backend: SocketAddr, mail: SocketAddr) -> Res<(Procs, SocketAddr)> {
    let host = ServerHostname::parse("localhost").map_err(|e| err("hostname")(&e))?;
    material::init_server_cert(&d.join("server"), &host, false)
        .map_err(|e| err("server material")(&e))?;
    material::init_client_identity(&d.join("identity"), false).map_err(|e| err("identity")(&e))?;
    let pin =
        material::show_client_identity(&d.join("identity")).map_err(|e| err("identity")(&e))?;
    let names = [PLAIN, GATED]
        .iter()
        .map(|h| PublicHostname::parse(h))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("hostnames")(&e))?;
    material::init_public_certs(&d.join("public"), &names, false)
        .map_err(|e| err("public certs")(&e))?;
    let (public, tunnel) = (free_port(false)?, free_port(true)?);
    let write = |name: &str, text: String| {
        std::fs::write(d.join(name), text).map_err(|e| err("config")(&e))
    };
    write(
        "server.toml",
        format!(
            "[server]\nhostname = \"localhost\"\npublic-bind-address = \"127.0.0.1:{public}\"\n\
             tunnel-bind-address = \"127.0.0.1:{tunnel}\"\ncert-dir = \"server\"\n\
             [[server.tunnels]]\npublic-hostnames = [\"{PLAIN}\", \"{GATED}\"]\nclient-identity = \"{pin}\"\n"
        ),
    )?;
    write(
        "client.toml",
        format!(
            "[client]\nserver-address = \"localhost:{tunnel}\"\nserver-trust = \"ca-file\"\n\
             server-ca-file = \"server/server-ca.crt\"\nidentity-dir = \"identity\"\n\
             public-cert-dir = \"public\"\n\
             [[client.services]]\npublic-hostnames = [\"{PLAIN}\"]\nbackend-address = \"{backend}\"\n\
             tls-mode = \"terminate\"\n\
             [[client.services]]\npublic-hostnames = [\"{GATED}\"]\nbackend-address = \"{backend}\"\n\
             tls-mode = \"terminate\"\n\
             [client.services.gate]\nbase-url = \"https://{GATED}:{public}\"\n\
             allowed-emails = [\"{EMAIL}\"]\nstate-dir = \"gate\"\n\
             [client.smtp]\nhost = \"127.0.0.1\"\nport = \"{}\"\ntls = \"none\"\nfrom = \"bench@example.com\"\n",
            mail.port()
        ),
    )?;
    let exe = env!("CARGO_BIN_EXE_runewarp");
    let mut procs = Procs(Vec::new());
    for role in ["server", "client"] {
        let log = std::fs::File::create(d.join(format!("{role}.log")))
            .map_err(|e| err("log file")(&e))?;
        let child = Command::new(exe)
            .args([role, "-c"])
            .arg(d.join(format!("{role}.toml")))
            .env("HOME", d)
            .env(
                "RUNEWARP_LOG",
                std::env::var("RUNEWARP_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| err("spawn runewarp")(&e))?;
        procs.0.push(child);
    }
    Ok((procs, SocketAddr::from(([127, 0, 0, 1], public))))
}

fn client_tls(ca: &Path) -> Res<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in material::load_ca_bundle(ca).map_err(|e| err("CA")(&e))? {
        roots.add(cert).map_err(|e| err("CA")(&e))?;
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The whole body of `resp`.
async fn body_bytes(resp: Response<Incoming>) -> Res<Bytes> {
    let body = resp.into_body().collect().await;
    Ok(body.map_err(|e| err("body")(&e))?.to_bytes())
}

/// One kept-alive HTTPS connection to a Public hostname.
struct Conn {
    send: hyper::client::conn::http1::SendRequest<AnyBody>,
    host: String,
    cookie: Option<String>,
}

impl Conn {
    /// Connect, TLS and HTTP/1 handshake, within 10 s.
    async fn open(
        public: SocketAddr,
        tls: &tokio_rustls::TlsConnector,
        host: &str,
        cookie: Option<String>,
    ) -> Res<Conn> {
        let open = async {
            let tcp = TcpStream::connect(public)
                .await
                .map_err(|e| err("connect")(&e))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(host.to_string()).map_err(|e| err("name")(&e))?;
            let stream = tls.connect(name, tcp).await.map_err(|e| err("TLS")(&e))?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| err("HTTP handshake")(&e))?;
            let label = host.to_string();
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    eprintln!("gate bench: connection to {label} failed: {e:?}");
                }
            });
            Ok(Conn {
                send,
                host: format!("{host}:{}", public.port()),
                cookie,
            })
        };
        tokio::time::timeout(Duration::from_secs(10), open)
            .await
            .map_err(|_| format!("connecting to {host}: not done within 10 s"))?
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        form: Option<String>,
    ) -> Res<Response<Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        let body: AnyBody = match form {
            Some(f) => {
                req = req.header("content-type", "application/x-www-form-urlencoded");
                Full::new(Bytes::from(f)).boxed()
            }
            None => Empty::new().boxed(),
        };
        let req = req.body(body).map_err(|e| err("request")(&e))?;
        // HTTP/1.1: the previous exchange must be finished first.
        self.send
            .ready()
            .await
            .map_err(|e| format!("{method} {path} on {}: {e}", self.host))?;
        self.send
            .send_request(req)
            .await
            .map_err(|e| format!("{method} {path} on {}: {e}", self.host))
    }

    /// GET `path`; the body and the time to its last byte. Bounded, so a
    /// stuck path fails the bench instead of hanging it.
    async fn get(&mut self, path: &str) -> Res<(Bytes, f64)> {
        let host = self.host.clone();
        let get = async {
            let started = Instant::now();
            let resp = self.send("GET", path, None).await?;
            if resp.status() != 200 {
                return Err(format!("GET {path} on {host}: {}", resp.status()));
            }
            Ok((body_bytes(resp).await?, started.elapsed().as_secs_f64()))
        };
        tokio::time::timeout(Duration::from_secs(10), get)
            .await
            .map_err(|_| format!("GET {path} on {host}: no answer within 10 s"))?
    }

    /// GET `path`, expecting `n` bytes; MiB/s (bounded by [`PHASE_LIMIT`]).
    async fn download(&mut self, path: &str, n: u64) -> Res<f64> {
        let mut got = 0u64;
        let host = self.host.clone();
        tokio::time::timeout(PHASE_LIMIT, self.download_unbounded(path, n, &mut got))
            .await
            .map_err(|_| {
                format!("{host}: download not done within {PHASE_LIMIT:?} (stalled after {got} of {n} bytes)")
            })?
    }

    async fn download_unbounded(&mut self, path: &str, n: u64, got: &mut u64) -> Res<f64> {
        let started = Instant::now();
        let resp = self.send("GET", path, None).await?;
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(|e| err("download")(&e))?.into_data() {
                *got += data.len() as u64;
            }
        }
        let got = *got;
        if got != n {
            return Err(format!("{}: downloaded {got} of {n} bytes", self.host));
        }
        Ok(n as f64 / MIB as f64 / started.elapsed().as_secs_f64())
    }
}

async fn wait_up(
    public: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    host: &str,
    path: &str,
) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            let mut c = Conn::open(public, tls, host, None).await?;
            let r = c.send("GET", path, None).await?;
            Ok::<_, String>(r.status().as_u16())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .unwrap_or_else(|_| Err("no answer within 5 s".into()))
        {
            Ok(200 | 401) => return Ok(()),
            other if Instant::now() > deadline => {
                return Err(format!("{host} not up within 20 s: {other:?}"));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Sign in as a browser would: the sign-in page (state cookie, CSRF), the
/// request, the mailed link's page, its button. Returns the Cookie header.
async fn sign_in(
    public: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    mail: &runewarp::demo::MailCatcher,
) -> Res<String> {
    let mut jar: Vec<(String, String)> = Vec::new();
    let step =
        async |method: &str, path: &str, form: Option<String>, jar: &mut Vec<(String, String)>| {
            let cookie = (!jar.is_empty()).then(|| {
                jar.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            });
            let mut c = Conn::open(public, tls, GATED, cookie).await?;
            let resp = c.send(method, path, form).await?;
            for v in resp.headers().get_all("set-cookie") {
                let pair = v.to_str().unwrap_or("").split(';').next().unwrap_or("");
                if let Some((k, v)) = pair.split_once('=') {
                    jar.retain(|(name, _)| name != k);
                    jar.push((k.to_string(), v.to_string()));
                }
            }
            let status = resp.status().as_u16();
            let body = body_bytes(resp).await?;
            Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
        };
    let field = |page: &str, name: &str| -> Res<String> {
        let key = format!("name=\"{name}\" value=\"");
        let at = page.find(&key).ok_or(format!("no {name} in {page}"))? + key.len();
        let end = page[at..].find('"').ok_or("bad field")? + at;
        Ok(page[at..end].replace("&amp;", "&"))
    };
    let form = |pairs: &[(&str, &str)]| {
        let mut f = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            f.append_pair(k, v);
        }
        f.finish()
    };
    let (_, page) = step("GET", "/", None, &mut jar).await?;
    let csrf = field(&page, "csrf")?;
    step(
        "POST",
        "/_runewarp/gate/sign-in",
        Some(form(&[("email", EMAIL), ("csrf", &csrf), ("next", "/")])),
        &mut jar,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let token = loop {
        if let Some(t) = mail.mails().iter().find_map(|m| {
            let at = m.find("token=")? + 6;
            m.get(at..at + 43).map(str::to_string)
        }) {
            break t;
        }
        if Instant::now() > deadline {
            return Err("no sign-in mail within 15 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (_, page) = step(
        "GET",
        &format!("/_runewarp/gate/link?token={token}"),
        None,
        &mut jar,
    )
    .await?;
    let csrf = field(&page, "csrf")?;
    let (status, _) = step(
        "POST",
        "/_runewarp/gate/link",
        Some(form(&[("token", &token), ("csrf", &csrf)])),
        &mut jar,
    )
    .await?;
    if status != 303 {
        return Err(format!("signing in answered {status}"));
    }
    Ok(jar
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; "))
}
