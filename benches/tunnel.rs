//! Runewarp performance bench: `cargo bench --bench tunnel`.
//!
//! One run compares three paths on 127.0.0.1:
//! - direct: a TLS Visitor straight to the in-process TLS backend;
//! - passthrough: Visitor TLS → Server → QUIC → Client → the same TLS backend;
//! - terminate: Visitor TLS → Server → QUIC → Client (terminates TLS) →
//!   an in-process plaintext backend.
//!
//! The Server and the Client are separate `runewarp` processes started from
//! config files in a temporary directory, so their CPU time and memory can be
//! read from `/proc/<pid>`. All three paths use leaves from the same Public
//! hostname CA (ECDSA P-256), the same rustls provider and TLS 1.3, and the
//! Visitor never resumes sessions, so every connection is a full handshake.
//!
//! Backend protocol, after the TLS handshake: the Visitor sends a command
//! byte and a big-endian u64. `D n`: the backend sends n bytes and closes.
//! `U n`: the Visitor sends n bytes, the backend answers with the count as
//! 8 bytes and closes. `R`: the backend answers 1 KiB and closes.
//!
//! Quick mode (`RUNEWARP_BENCH_QUICK=1`, `--quick`, or any run without
//! cargo's `--bench` flag, e.g. `cargo test --benches`) uses smaller sizes
//! and shorter phases. Targets are informational: a miss never fails the
//! bench; only a broken setup or transfer exits non-zero.
//!
//! `RUNEWARP_BENCH_WORKERS=n` sets `TOKIO_WORKER_THREADS` for the Server
//! and the Client (default: one worker per core).
//!
//! `RUNEWARP_BENCH_CC=bbr|cubic` sets `congestion-control` on the Server
//! and the Client (default: the config default, `bbr`).
//!
//! `RUNEWARP_BENCH_LOG=debug` sets the Server's and Client's `RUNEWARP_LOG`
//! (default `warn`); `RUNEWARP_BENCH_KEEP=1` keeps the temporary directory
//! with configs and logs (it is always kept when the bench fails).

use std::fmt::Display;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use runewarp::hostname::{PublicHostname, ServerHostname};
use runewarp::tls::material;

const SERVER_HOST: &str = "localhost";
const PASS_HOST: &str = "pass.bench.test";
const TERM_HOST: &str = "term.bench.test";
const MIB: u64 = 1024 * 1024;
const CHUNK: usize = 64 * 1024;
const REPLY: usize = 1024;
/// Upper bound for any single phase, so a stuck path cannot hang the run.
const PHASE_LIMIT: Duration = Duration::from_secs(90);
const UP_WITHIN: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Times a Visitor saw a TCP EOF without a TLS close_notify (tolerated once
/// every expected byte arrived; reported in the notes).
static EOF_WITHOUT_CLOSE_NOTIFY: AtomicU64 = AtomicU64::new(0);
static SOURCE: [u8; CHUNK] = [0xa5; CHUNK];

type Res<T> = Result<T, String>;

trait Ctx<T> {
    fn ctx(self, what: impl Display) -> Res<T>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl Display) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

// ---------------------------------------------------------------- plan

struct Plan {
    quick: bool,
    /// Bytes for the single-stream phases and (in total) the 8-stream phase.
    bulk: u64,
    streams: usize,
    latency_conns: usize,
    rate_workers: usize,
    rate_for: Duration,
    idle: usize,
    /// Bulk phases run this many times, the three paths interleaved, and
    /// each figure is the median: drift in the machine's speed (other
    /// tenants, frequency) then hits direct and tunnel alike.
    rounds: usize,
}

impl Plan {
    fn from_env() -> Self {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let env_quick =
            std::env::var("RUNEWARP_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let quick = env_quick
            || args.iter().any(|a| a == "--quick")
            || !args.iter().any(|a| a == "--bench");
        if quick {
            Plan {
                quick,
                bulk: 64 * MIB,
                streams: 8,
                latency_conns: 100,
                rate_workers: 64,
                rate_for: Duration::from_secs(2),
                // Under the ~896 streams a 1024-stream QUIC window always
                // grants (quinn re-announces credit in 1/8 steps).
                idle: 500,
                rounds: 1,
            }
        } else {
            Plan {
                quick,
                bulk: 512 * MIB,
                streams: 8,
                latency_conns: 500,
                rate_workers: 64,
                rate_for: Duration::from_secs(5),
                idle: 1000,
                rounds: 3,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Direct,
    Passthrough,
    Terminate,
}

const ROUTES: [Route; 3] = [Route::Direct, Route::Passthrough, Route::Terminate];

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Passthrough => "passthrough",
            Route::Terminate => "terminate",
        }
    }

    fn index(self) -> usize {
        match self {
            Route::Direct => 0,
            Route::Passthrough => 1,
            Route::Terminate => 2,
        }
    }
}

// ---------------------------------------------------------------- Visitor

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

#[derive(Clone)]
struct Visitor {
    connector: TlsConnector,
    addr: SocketAddr,
    name: ServerName<'static>,
}

impl Visitor {
    fn new(config: &Arc<rustls::ClientConfig>, addr: SocketAddr, sni: &str) -> Res<Self> {
        let name = ServerName::try_from(sni.to_string()).ctx(format!("SNI {sni}"))?;
        Ok(Self {
            connector: TlsConnector::from(config.clone()),
            addr,
            name,
        })
    }

    async fn connect(&self) -> io::Result<Tls> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        self.connector.connect(self.name.clone(), tcp).await
    }

    async fn download(&self, n: u64) -> io::Result<()> {
        let mut s = self.connect().await?;
        command(&mut s, b'D', n).await?;
        let got = drain(&mut s, CHUNK).await?;
        expect_count("download", got, n)?;
        close(&mut s).await
    }

    async fn upload(&self, n: u64) -> io::Result<()> {
        let mut s = self.connect().await?;
        command(&mut s, b'U', n).await?;
        let mut left = n;
        while left > 0 {
            let k = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            s.write_all(&SOURCE[..k]).await?;
            left -= k as u64;
        }
        s.flush().await?;
        let mut ack = [0u8; 8];
        s.read_exact(&mut ack).await?;
        expect_count("upload ack", u64::from_be_bytes(ack), n)?;
        close(&mut s).await
    }

    /// A fresh connection, full handshake, `R`, 1 KiB back, closed.
    async fn request(&self) -> io::Result<()> {
        let mut s = self.connect().await?;
        ask(&mut s).await?;
        close(&mut s).await
    }
}

/// An orderly TLS close (close_notify, then FIN), as a well-behaved
/// Visitor does. The peer may already be gone: that is not an error.
async fn close(s: &mut Tls) -> io::Result<()> {
    let _ = s.shutdown().await;
    Ok(())
}

async fn command(s: &mut Tls, cmd: u8, n: u64) -> io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = cmd;
    head[1..].copy_from_slice(&n.to_be_bytes());
    s.write_all(&head).await?;
    s.flush().await
}

async fn ask(s: &mut Tls) -> io::Result<()> {
    command(s, b'R', 0).await?;
    let got = drain(s, 4 * REPLY).await?;
    expect_count("reply", got, REPLY as u64)
}

async fn drain<S: AsyncRead + Unpin>(s: &mut S, buf_len: usize) -> io::Result<u64> {
    let mut buf = vec![0u8; buf_len];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return Ok(got),
            Ok(k) => got += k as u64,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                EOF_WITHOUT_CLOSE_NOTIFY.fetch_add(1, Ordering::Relaxed);
                return Ok(got);
            }
            Err(e) => return Err(e),
        }
    }
}

fn expect_count(what: &str, got: u64, want: u64) -> io::Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what}: got {got} bytes, expected {want}"
        )))
    }
}

// ---------------------------------------------------------------- backends

async fn backend(listener: TcpListener, tls: Option<TlsAcceptor>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                eprintln!("bench backend: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            // Errors here are the Visitor going away (idle streams, aborted
            // phases); the Visitor side reports what matters.
            let _ = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(s) => serve(s).await,
                    Err(e) => Err(e),
                },
                None => serve(tcp).await,
            };
        });
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<()> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..]);
    let n = u64::from_be_bytes(len);
    match head[0] {
        b'D' => {
            let mut left = n;
            while left > 0 {
                let k = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                s.write_all(&SOURCE[..k]).await?;
                left -= k as u64;
            }
        }
        b'U' => {
            let mut buf = vec![0u8; CHUNK];
            let mut left = n;
            while left > 0 {
                let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                let k = s.read(&mut buf[..want]).await?;
                if k == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                left -= k as u64;
            }
            s.write_all(&n.to_be_bytes()).await?;
        }
        b'R' => s.write_all(&SOURCE[..REPLY]).await?,
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown command byte {other:#04x}"),
            ));
        }
    }
    s.shutdown().await
}

// ---------------------------------------------------------------- processes

#[derive(Clone, Copy, Default)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
}

/// A `runewarp` child process, stopped (SIGTERM, then SIGKILL after 3 s)
/// when dropped, including on panic.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, exe: &Path, config: &Path, dir: &Path) -> Res<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).ctx(format!("create {}", log.display()))?;
        let err = out.try_clone().ctx("clone log file handle")?;
        let mut cmd = Command::new(exe);
        if let Ok(n) = std::env::var("RUNEWARP_BENCH_WORKERS") {
            cmd.env("TOKIO_WORKER_THREADS", n);
        }
        cmd.arg(name)
            .arg("--config")
            .arg(config)
            .env(
                "RUNEWARP_LOG",
                std::env::var("RUNEWARP_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
        // parent memory; it makes the child get SIGTERM if the bench is
        // killed before its Drop guards run.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .ctx(format!("start `{} {name}`", exe.display()))?;
        Ok(Self { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "the {} process exited ({status}); last log lines:\n{}",
                self.name,
                self.log_tail()
            )),
            Err(e) => Err(format!("cannot poll the {} process: {e}", self.name)),
        }
    }

    /// utime + stime in seconds.
    fn cpu_secs(&self) -> Res<f64> {
        let path = format!("/proc/{}/stat", self.pid());
        let text = fs::read_to_string(&path).ctx(format!("read {path}"))?;
        // Fields after the parenthesised command name start at field 3.
        let rest = text
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| format!("{path}: no ')'"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Res<u64> {
            fields
                .get(n - 3)
                .ok_or_else(|| format!("{path}: missing field {n}"))?
                .parse::<u64>()
                .ctx(format!("{path}: field {n}"))
        };
        let ticks = field(14)? + field(15)?;
        Ok(ticks as f64 / clock_ticks())
    }

    fn mem(&self) -> Res<Mem> {
        let path = format!("/proc/{}/status", self.pid());
        let text = fs::read_to_string(&path).ctx(format!("read {path}"))?;
        let kib = |key: &str| -> Res<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .ok_or_else(|| format!("{path}: no {key}"))?
                .parse::<u64>()
                .ctx(format!("{path}: {key}"))
        };
        Ok(Mem {
            rss_kib: kib("VmRSS:")?,
            hwm_kib: kib("VmHWM:")?,
        })
    }

    /// Reset VmHWM to the current RSS (Linux `clear_refs` value 5).
    fn reset_peak(&self) -> bool {
        fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").is_ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid with a valid signal.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        eprintln!("bench: {} did not stop within 3 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds (user + system) of this bench process: Visitors and backends.
fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `Udp: RcvbufErrors` from /proc/net/snmp (network-namespace wide).
fn udp_rcvbuf_errors() -> Res<u64> {
    let text = fs::read_to_string("/proc/net/snmp").ctx("read /proc/net/snmp")?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(head), Some(values)) = (udp.next(), udp.next()) else {
        return Err("/proc/net/snmp: no Udp lines".into());
    };
    let idx = head
        .split_whitespace()
        .position(|w| w == "RcvbufErrors")
        .ok_or("/proc/net/snmp: no RcvbufErrors column")?;
    values
        .split_whitespace()
        .nth(idx)
        .ok_or("/proc/net/snmp: short Udp line")?
        .parse::<u64>()
        .ctx("/proc/net/snmp RcvbufErrors")
}

// ---------------------------------------------------------------- setup

struct Setup {
    dir: tempfile::TempDir,
    server: Proc,
    client: Proc,
    tls_backend: StdTcpListener,
    plain_backend: StdTcpListener,
    backend_tls: Arc<rustls::ServerConfig>,
    visitor_tls: Arc<rustls::ClientConfig>,
    public: SocketAddr,
}

fn free_tcp_port() -> Res<u16> {
    let l = StdTcpListener::bind("127.0.0.1:0").ctx("bind a probe TCP port")?;
    Ok(l.local_addr().ctx("probe TCP address")?.port())
}

fn free_udp_port() -> Res<u16> {
    let s = StdUdpSocket::bind("127.0.0.1:0").ctx("bind a probe UDP port")?;
    Ok(s.local_addr().ctx("probe UDP address")?.port())
}

fn toml_str(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn setup() -> Res<Setup> {
    runewarp::tls::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("runewarp-bench-")
        .tempdir()
        .ctx("create temp dir")?;
    let root = dir.path();
    let cert_dir = root.join("server");
    let id_dir = root.join("client");
    let public_dir = root.join("public");

    let server_host = ServerHostname::parse(SERVER_HOST).ctx("server hostname")?;
    material::init_server_cert(&cert_dir, &server_host, false).ctx("init server cert")?;
    material::init_client_identity(&id_dir, false).ctx("init client identity")?;
    let pin = material::show_client_identity(&id_dir).ctx("read client identity")?;
    let hosts = [PASS_HOST, TERM_HOST]
        .iter()
        .map(|h| PublicHostname::parse(h).ctx(format!("hostname {h}")))
        .collect::<Res<Vec<_>>>()?;
    material::init_public_certs(&public_dir, &hosts, false).ctx("init public certs")?;

    // Every path presents a leaf from the same Public hostname CA: the TLS
    // backend uses the passthrough hostname's leaf, the Client the other.
    let ca = material::load_ca_bundle(&public_dir.join("public-ca.crt")).ctx("load public CA")?;
    let leaf = material::load_public_certs(&public_dir)
        .ctx("load public leaves")?
        .into_iter()
        .find(|(h, _)| h.as_str() == PASS_HOST)
        .map(|(_, m)| m)
        .ok_or("no leaf for the passthrough hostname")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let backend_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ctx("backend TLS versions")?
        .with_no_client_auth()
        .with_single_cert(leaf.chain, leaf.key)
        .ctx("backend TLS certificate")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots.add(c).ctx("add public CA to Visitor roots")?;
    }
    let mut visitor_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ctx("Visitor TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    visitor_tls.resumption = Resumption::disabled();

    let tls_backend = StdTcpListener::bind("127.0.0.1:0").ctx("bind TLS backend")?;
    let plain_backend = StdTcpListener::bind("127.0.0.1:0").ctx("bind plain backend")?;
    let tls_addr = tls_backend.local_addr().ctx("TLS backend address")?;
    let plain_addr = plain_backend.local_addr().ctx("plain backend address")?;
    let public_port = free_tcp_port()?;
    let tunnel_port = free_udp_port()?;
    let public: SocketAddr = ([127, 0, 0, 1], public_port).into();

    // RUNEWARP_BENCH_CC=bbr|cubic sets congestion-control on both ends
    // (default: the config default), to compare controllers run by run.
    let cc = std::env::var("RUNEWARP_BENCH_CC")
        .map(|c| format!("congestion-control = {}\n", toml_str(Path::new(&c))))
        .unwrap_or_default();
    let server_toml = root.join("server.toml");
    let server_cfg = format!(
        "log-level = \"warn\"\n\n[server]\nhostname = \"{SERVER_HOST}\"\n\
         public-bind-address = \"127.0.0.1:{public_port}\"\n\
         tunnel-bind-address = \"127.0.0.1:{tunnel_port}\"\n\
         graceful-shutdown-duration = \"0s\"\ncert-dir = {cert}\n{cc}\n\
         [[server.tunnels]]\npublic-hostnames = [\"{PASS_HOST}\", \"{TERM_HOST}\"]\n\
         client-identity = \"{pin}\"\n",
        cert = toml_str(&cert_dir),
    );
    fs::write(&server_toml, server_cfg).ctx("write server.toml")?;
    let client_toml = root.join("client.toml");
    let client_cfg = format!(
        "log-level = \"warn\"\n\n[client]\nserver-address = \"{SERVER_HOST}:{tunnel_port}\"\n\
         server-trust = \"ca-file\"\nserver-ca-file = {ca}\nidentity-dir = {id}\n\
         public-cert-dir = {public}\n{cc}\n\
         [[client.services]]\npublic-hostnames = [\"{PASS_HOST}\"]\n\
         backend-address = \"{tls_addr}\"\ntls-mode = \"passthrough\"\n\n\
         [[client.services]]\npublic-hostnames = [\"{TERM_HOST}\"]\n\
         backend-address = \"{plain_addr}\"\ntls-mode = \"terminate\"\n",
        ca = toml_str(&cert_dir.join("server-ca.crt")),
        id = toml_str(&id_dir),
        public = toml_str(&public_dir),
    );
    fs::write(&client_toml, client_cfg).ctx("write client.toml")?;

    let exe = Path::new(env!("CARGO_BIN_EXE_runewarp"));
    let server = Proc::spawn("server", exe, &server_toml, root)?;
    let client = Proc::spawn("client", exe, &client_toml, root)?;
    Ok(Setup {
        dir,
        server,
        client,
        tls_backend,
        plain_backend,
        backend_tls: Arc::new(backend_tls),
        visitor_tls: Arc::new(visitor_tls),
        public,
    })
}

// ---------------------------------------------------------------- phases

#[derive(Clone, Copy, Default)]
struct Cpu {
    server: f64,
    client: f64,
    bench: f64,
}

struct Procs<'a> {
    server: &'a mut Proc,
    client: &'a mut Proc,
}

impl Procs<'_> {
    fn check(&mut self) -> Res<()> {
        self.server.check_alive()?;
        self.client.check_alive()
    }

    fn cpu(&mut self) -> Res<Cpu> {
        self.check()?;
        Ok(Cpu {
            server: self.server.cpu_secs()?,
            client: self.client.cpu_secs()?,
            bench: self_cpu_secs(),
        })
    }

    fn mem(&self) -> Res<(Mem, Mem)> {
        Ok((self.server.mem()?, self.client.mem()?))
    }
}

#[derive(Clone, Copy)]
struct BulkRound {
    single_dl: f64,
    single_ul: f64,
    multi_dl: f64,
    cpu_per_gb: Cpu,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n => v[n / 2],
    }
}

impl Figures {
    /// Medians of the bulk rounds.
    fn settle(&mut self) {
        let of = |f: fn(&BulkRound) -> f64| median(self.rounds.iter().map(f).collect());
        self.single_dl = of(|r| r.single_dl);
        self.single_ul = of(|r| r.single_ul);
        self.multi_dl = of(|r| r.multi_dl);
        self.cpu_per_gb = Cpu {
            server: of(|r| r.cpu_per_gb.server),
            client: of(|r| r.cpu_per_gb.client),
            bench: of(|r| r.cpu_per_gb.bench),
        };
    }
}

#[derive(Default)]
struct Figures {
    single_dl: f64,
    single_ul: f64,
    multi_dl: f64,
    /// Per-round bulk figures, reduced to the medians above by `settle`.
    rounds: Vec<BulkRound>,
    /// CPU seconds per GB (10^9 payload bytes) in the single-stream download.
    cpu_per_gb: Cpu,
    udp_drops_bulk: u64,
    peak: Option<(Mem, Mem)>,
    lat_p50: f64,
    lat_p99: f64,
    conn_rate: f64,
    conn_failures: u64,
    /// CPU milliseconds per connection in the connection-rate phase.
    cpu_per_conn: Cpu,
    idle: Option<(Mem, Mem)>,
    idle_before: Option<(Mem, Mem)>,
    idle_held: usize,
    idle_ok: usize,
    idle_first_err: Option<String>,
}

async fn within<T>(what: &str, f: impl Future<Output = io::Result<T>>) -> Res<T> {
    match tokio::time::timeout(PHASE_LIMIT, f).await {
        Ok(r) => r.ctx(what),
        Err(_) => Err(format!("{what}: no result within {PHASE_LIMIT:?}")),
    }
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

async fn wait_up(v: &Visitor, procs: &mut Procs<'_>) -> Res<Duration> {
    let start = Instant::now();
    let mut last = String::from("no attempt");
    while start.elapsed() < UP_WITHIN {
        procs.check()?;
        match tokio::time::timeout(Duration::from_secs(2), v.request()).await {
            Ok(Ok(())) => return Ok(start.elapsed()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "request timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "the tunnel for {:?} was not up within {UP_WITHIN:?}: {last}",
        v.name
    ))
}

async fn bulk(
    plan: &Plan,
    route: Route,
    v: &Visitor,
    procs: &mut Procs<'_>,
    f: &mut Figures,
) -> Res<()> {
    let label = route.label();
    let tunnel = route != Route::Direct;
    let peak_reset = tunnel && procs.server.reset_peak() && procs.client.reset_peak();
    let drops_start = udp_rcvbuf_errors()?;

    let before = procs.cpu()?;
    let t = Instant::now();
    within(
        &format!("{label} single-stream download"),
        v.download(plan.bulk),
    )
    .await?;
    let took = t.elapsed();
    let after = procs.cpu()?;
    let gb = plan.bulk as f64 / 1e9;
    let mut round = BulkRound {
        single_dl: mb_per_s(plan.bulk, took),
        single_ul: 0.0,
        multi_dl: 0.0,
        cpu_per_gb: Cpu {
            server: (after.server - before.server) / gb,
            client: (after.client - before.client) / gb,
            bench: (after.bench - before.bench) / gb,
        },
    };
    eprintln!(
        "  {label}: single-stream download {:.1} MB/s",
        round.single_dl
    );

    let t = Instant::now();
    within(
        &format!("{label} single-stream upload"),
        v.upload(plan.bulk),
    )
    .await?;
    round.single_ul = mb_per_s(plan.bulk, t.elapsed());
    eprintln!(
        "  {label}: single-stream upload {:.1} MB/s",
        round.single_ul
    );

    let each = plan.bulk / plan.streams as u64;
    let t = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..plan.streams {
        let v = v.clone();
        set.spawn(async move { v.download(each).await });
    }
    let all = async {
        while let Some(r) = set.join_next().await {
            r.map_err(io::Error::other)??;
        }
        Ok(())
    };
    within(&format!("{label} {}-stream download", plan.streams), all).await?;
    round.multi_dl = mb_per_s(each * plan.streams as u64, t.elapsed());
    eprintln!(
        "  {label}: {}-stream download {:.1} MB/s",
        plan.streams, round.multi_dl
    );
    f.rounds.push(round);

    procs.check()?;
    f.udp_drops_bulk += udp_rcvbuf_errors()?.saturating_sub(drops_start);
    if tunnel && peak_reset {
        let (server, client) = procs.mem()?;
        let (max_server, max_client) = f.peak.unwrap_or_default();
        let higher = |a: Mem, b: Mem| if a.hwm_kib >= b.hwm_kib { a } else { b };
        f.peak = Some((higher(server, max_server), higher(client, max_client)));
    }
    Ok(())
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted_ms.len() as f64).ceil() as usize;
    sorted_ms[rank.clamp(1, sorted_ms.len()) - 1]
}

async fn latency(plan: &Plan, route: Route, v: &Visitor, f: &mut Figures) -> Res<()> {
    let mut ms = Vec::with_capacity(plan.latency_conns);
    let run = async {
        for _ in 0..plan.latency_conns {
            let t = Instant::now();
            v.request().await?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    };
    within(&format!("{} latency", route.label()), run).await?;
    ms.sort_by(f64::total_cmp);
    f.lat_p50 = percentile(&ms, 50.0);
    f.lat_p99 = percentile(&ms, 99.0);
    eprintln!(
        "  {}: new-connection latency p50 {:.3} ms, p99 {:.3} ms",
        route.label(),
        f.lat_p50,
        f.lat_p99
    );
    Ok(())
}

async fn conn_rate(
    plan: &Plan,
    route: Route,
    v: &Visitor,
    procs: &mut Procs<'_>,
    f: &mut Figures,
) -> Res<()> {
    let before = procs.cpu()?;
    let start = Instant::now();
    let deadline = start + plan.rate_for;
    let mut set = JoinSet::new();
    for _ in 0..plan.rate_workers {
        let v = v.clone();
        set.spawn(async move {
            let (mut ok, mut bad) = (0u64, 0u64);
            let mut first_err = None;
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(5), v.request()).await {
                    Ok(Ok(())) => ok += 1,
                    Ok(Err(e)) => {
                        bad += 1;
                        first_err.get_or_insert(e.to_string());
                    }
                    Err(_) => {
                        bad += 1;
                        first_err.get_or_insert("timed out after 5 s".into());
                    }
                }
            }
            (ok, bad, first_err)
        });
    }
    let (mut ok, mut bad, mut first_err) = (0u64, 0u64, None);
    while let Some(r) = set.join_next().await {
        let (o, b, e) = r.ctx("connection-rate worker")?;
        ok += o;
        bad += b;
        if first_err.is_none() {
            first_err = e;
        }
    }
    let took = start.elapsed();
    if ok == 0 {
        return Err(format!(
            "{} connection rate: every request failed: {}",
            route.label(),
            first_err.unwrap_or_default()
        ));
    }
    f.conn_rate = ok as f64 / took.as_secs_f64();
    f.conn_failures = bad;
    let after = procs.cpu()?;
    let per_conn = |a: f64, b: f64| (a - b) * 1e3 / ok as f64;
    f.cpu_per_conn = Cpu {
        server: per_conn(after.server, before.server),
        client: per_conn(after.client, before.client),
        bench: per_conn(after.bench, before.bench),
    };
    eprintln!(
        "  {}: {:.0} new connections/s ({} failed{})",
        route.label(),
        f.conn_rate,
        bad,
        first_err
            .map(|e| format!(", first: {e}"))
            .unwrap_or_default()
    );
    Ok(())
}

async fn idle_streams(
    plan: &Plan,
    route: Route,
    v: &Visitor,
    procs: &mut Procs<'_>,
    f: &mut Figures,
) -> Res<()> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.idle_before = Some(procs.mem()?);
    let mut held = Vec::with_capacity(plan.idle);
    let mut set = JoinSet::new();
    let mut started = 0;
    let mut failed = 0usize;
    let mut first_err = None;
    // A refused stream is a finding, not a broken bench: keep what opened,
    // record why the rest did not.
    let open = async {
        while started < plan.idle || !set.is_empty() {
            while started < plan.idle && set.len() < 32 {
                let v = v.clone();
                set.spawn(async move {
                    tokio::time::timeout(Duration::from_secs(10), v.connect()).await
                });
                started += 1;
            }
            let err = match set.join_next().await {
                Some(Ok(Ok(Ok(s)))) => {
                    held.push(s);
                    continue;
                }
                Some(Ok(Ok(Err(e)))) => e.to_string(),
                Some(Ok(Err(_))) => "connect + handshake timed out after 10 s".into(),
                Some(Err(e)) => e.to_string(),
                None => break,
            };
            failed += 1;
            first_err.get_or_insert(err);
        }
        Ok(())
    };
    within(&format!("{} opening idle streams", route.label()), open).await?;
    if held.is_empty() {
        return Err(format!(
            "{}: no idle stream could be opened: {}",
            route.label(),
            first_err.unwrap_or_default()
        ));
    }
    f.idle_held = held.len();
    f.idle_first_err = first_err;
    tokio::time::sleep(Duration::from_millis(500)).await;
    procs.check()?;
    f.idle = Some(procs.mem()?);
    // Each held stream must still answer: proof they are really open
    // end to end, not just accepted by the Server.
    let check = async {
        let mut ok = 0usize;
        for s in held.iter_mut() {
            if ask(s).await.is_ok() {
                ok += 1;
            }
            close(s).await?;
        }
        Ok(ok)
    };
    f.idle_ok = within(&format!("{} idle stream check", route.label()), check).await?;
    drop(held);
    eprintln!(
        "  {}: {} of {} idle streams opened ({failed} failed), {} answered afterwards",
        route.label(),
        f.idle_held,
        plan.idle,
        f.idle_ok
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

struct Outcome {
    figures: [Figures; 3],
    start_mem: (Mem, Mem),
    up_after: Duration,
    udp_drops_run: u64,
    peak_reset: bool,
}

async fn measure(plan: &Plan, s: &mut Setup) -> Res<Outcome> {
    let tls_backend = listener(&s.tls_backend)?;
    let plain_backend = listener(&s.plain_backend)?;
    let tls_addr = tls_backend.local_addr().ctx("TLS backend address")?;
    tokio::spawn(backend(
        tls_backend,
        Some(TlsAcceptor::from(s.backend_tls.clone())),
    ));
    tokio::spawn(backend(plain_backend, None));

    let visitors = [
        Visitor::new(&s.visitor_tls, tls_addr, PASS_HOST)?,
        Visitor::new(&s.visitor_tls, s.public, PASS_HOST)?,
        Visitor::new(&s.visitor_tls, s.public, TERM_HOST)?,
    ];
    let mut procs = Procs {
        server: &mut s.server,
        client: &mut s.client,
    };
    let up_after = wait_up(&visitors[1], &mut procs).await?;
    wait_up(&visitors[2], &mut procs).await?;
    let start_mem = procs.mem()?;
    let drops_start = udp_rcvbuf_errors()?;
    let peak_reset = procs.server.reset_peak() && procs.client.reset_peak();

    eprintln!("warm-up");
    for v in &visitors {
        within("warm-up download", v.download(8 * MIB)).await?;
        for _ in 0..20 {
            within("warm-up request", v.request()).await?;
        }
    }

    let mut figures: [Figures; 3] = Default::default();
    eprintln!(
        "bulk transfers ({} MiB, {} rounds)",
        plan.bulk / MIB,
        plan.rounds
    );
    for _ in 0..plan.rounds {
        for r in ROUTES {
            bulk(
                plan,
                r,
                &visitors[r.index()],
                &mut procs,
                &mut figures[r.index()],
            )
            .await?;
        }
    }
    for f in &mut figures {
        f.settle();
    }
    eprintln!("new-connection latency ({} sequential)", plan.latency_conns);
    for r in ROUTES {
        latency(plan, r, &visitors[r.index()], &mut figures[r.index()]).await?;
    }
    eprintln!(
        "connection rate ({} concurrent, {:?})",
        plan.rate_workers, plan.rate_for
    );
    for r in ROUTES {
        procs.check()?;
        conn_rate(
            plan,
            r,
            &visitors[r.index()],
            &mut procs,
            &mut figures[r.index()],
        )
        .await?;
    }
    eprintln!("idle streams ({})", plan.idle);
    for r in [Route::Passthrough, Route::Terminate] {
        idle_streams(
            plan,
            r,
            &visitors[r.index()],
            &mut procs,
            &mut figures[r.index()],
        )
        .await?;
    }
    procs.check()?;
    let udp_drops_run = udp_rcvbuf_errors()?.saturating_sub(drops_start);
    Ok(Outcome {
        figures,
        start_mem,
        up_after,
        udp_drops_run,
        peak_reset,
    })
}

fn listener(l: &StdTcpListener) -> Res<TcpListener> {
    let l = l.try_clone().ctx("clone backend listener")?;
    l.set_nonblocking(true)
        .ctx("non-blocking backend listener")?;
    TcpListener::from_std(l).ctx("register backend listener")
}

// ---------------------------------------------------------------- report

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn both(pt: bool, tm: bool) -> String {
    format!("pt {} / tm {}", verdict(pt), verdict(tm))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ratio(x: f64, base: f64) -> String {
    format!("{x:.1} ({:.2})", x / base)
}

fn report(plan: &Plan, o: &Outcome) {
    let [d, p, t] = &o.figures;
    let mut rows: Vec<[String; 6]> = Vec::new();
    let mut row = |cells: [&str; 6]| rows.push(cells.map(str::to_string));
    let dash = "-";

    let title = format!(
        "runewarp bench (loopback, {} cores{})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if plan.quick { ", QUICK" } else { "" }
    );
    row([
        &title,
        "direct",
        "passthrough (ratio)",
        "terminate (ratio)",
        "target",
        "verdict",
    ]);
    let min_ratio = 0.6;
    row([
        "single-stream download MB/s",
        &format!("{:.1}", d.single_dl),
        &ratio(p.single_dl, d.single_dl),
        &ratio(t.single_dl, d.single_dl),
        "pt >= 0.60x direct",
        verdict(p.single_dl / d.single_dl >= min_ratio),
    ]);
    row([
        "single-stream upload MB/s",
        &format!("{:.1}", d.single_ul),
        &ratio(p.single_ul, d.single_ul),
        &ratio(t.single_ul, d.single_ul),
        dash,
        dash,
    ]);
    row([
        &format!("{}-stream aggregate download MB/s", plan.streams),
        &format!("{:.1}", d.multi_dl),
        &ratio(p.multi_dl, d.multi_dl),
        &ratio(t.multi_dl, d.multi_dl),
        dash,
        dash,
    ]);
    let added = |x: &Figures| x.lat_p50 - d.lat_p50;
    row([
        "new-conn latency p50 ms (added)",
        &format!("{:.3}", d.lat_p50),
        &format!("{:.3} (+{:.3})", p.lat_p50, added(p)),
        &format!("{:.3} (+{:.3})", t.lat_p50, added(t)),
        "added p50 < 0.5 ms",
        &both(added(p) < 0.5, added(t) < 0.5),
    ]);
    row([
        "new-conn latency p99 ms",
        &format!("{:.3}", d.lat_p99),
        &format!("{:.3}", p.lat_p99),
        &format!("{:.3}", t.lat_p99),
        dash,
        dash,
    ]);
    row([
        &format!("new conns/s, {} concurrent", plan.rate_workers),
        &format!("{:.0}", d.conn_rate),
        &format!("{:.0} ({:.2})", p.conn_rate, p.conn_rate / d.conn_rate),
        &format!("{:.0} ({:.2})", t.conn_rate, t.conn_rate / d.conn_rate),
        ">= 0.90x direct",
        &both(
            p.conn_rate / d.conn_rate >= 0.9,
            t.conn_rate / d.conn_rate >= 0.9,
        ),
    ]);
    let per_conn = |x: &Figures| x.cpu_per_conn.server + x.cpu_per_conn.client;
    row([
        "CPU ms/conn in rate: Server+Client",
        dash,
        &format!(
            "{:.3} ({:.3}+{:.3})",
            per_conn(p),
            p.cpu_per_conn.server,
            p.cpu_per_conn.client
        ),
        &format!(
            "{:.3} ({:.3}+{:.3})",
            per_conn(t),
            t.cpu_per_conn.server,
            t.cpu_per_conn.client
        ),
        dash,
        dash,
    ]);
    row([
        "CPU ms/conn in rate: bench (Vis+backend)",
        &format!("{:.3}", d.cpu_per_conn.bench),
        &format!("{:.3}", p.cpu_per_conn.bench),
        &format!("{:.3}", t.cpu_per_conn.bench),
        "(reference)",
        dash,
    ]);
    row([
        "CPU s/GB 1-stream dl: Server",
        dash,
        &format!("{:.2}", p.cpu_per_gb.server),
        &format!("{:.2}", t.cpu_per_gb.server),
        dash,
        dash,
    ]);
    row([
        "CPU s/GB 1-stream dl: Client",
        dash,
        &format!("{:.2}", p.cpu_per_gb.client),
        &format!("{:.2}", t.cpu_per_gb.client),
        dash,
        dash,
    ]);
    let sum = |x: &Figures| x.cpu_per_gb.server + x.cpu_per_gb.client;
    row([
        "CPU s/GB 1-stream dl: Server+Client",
        dash,
        &format!("{:.2}", sum(p)),
        &format!("{:.2}", sum(t)),
        "< 3 s/GB",
        &both(sum(p) < 3.0, sum(t) < 3.0),
    ]);
    row([
        "CPU s/GB 1-stream dl: bench (Vis+backend)",
        &format!("{:.2}", d.cpu_per_gb.bench),
        &format!("{:.2}", p.cpu_per_gb.bench),
        &format!("{:.2}", t.cpu_per_gb.bench),
        "(reference)",
        dash,
    ]);
    let peak = |x: &Figures, server: bool| {
        x.peak
            .map(|(s, c)| mib(if server { s.hwm_kib } else { c.hwm_kib }))
    };
    let peak_cell = |x: &Figures, server: bool| {
        peak(x, server).map_or_else(|| "n/a".to_string(), |m| format!("{m:.1}"))
    };
    let peak_ok = |server: bool| {
        let pt = peak(p, server).is_some_and(|m| m < 32.0);
        let tm = peak(t, server).is_some_and(|m| m < 32.0);
        both(pt, tm)
    };
    row([
        "peak RSS MiB during bulk: Server",
        dash,
        &peak_cell(p, true),
        &peak_cell(t, true),
        "< 32 MiB",
        &peak_ok(true),
    ]);
    row([
        "peak RSS MiB during bulk: Client",
        dash,
        &peak_cell(p, false),
        &peak_cell(t, false),
        "< 32 MiB",
        &peak_ok(false),
    ]);
    let idle_cell = |x: &Figures, server: bool| {
        let short = if x.idle_held < plan.idle {
            format!(" ({} held!)", x.idle_held)
        } else {
            String::new()
        };
        x.idle.map_or_else(
            || "n/a".to_string(),
            |(s, c)| {
                let kib = if server { s.rss_kib } else { c.rss_kib };
                format!("{:.1}{short}", mib(kib))
            },
        )
    };
    row([
        &format!("RSS MiB, {} idle streams: Server", plan.idle),
        dash,
        &idle_cell(p, true),
        &idle_cell(t, true),
        dash,
        dash,
    ]);
    row([
        &format!("RSS MiB, {} idle streams: Client", plan.idle),
        dash,
        &idle_cell(p, false),
        &idle_cell(t, false),
        dash,
        dash,
    ]);
    let drops = d.udp_drops_bulk + p.udp_drops_bulk + t.udp_drops_bulk;
    row([
        "UDP RcvbufErrors during bulk (delta)",
        &d.udp_drops_bulk.to_string(),
        &p.udp_drops_bulk.to_string(),
        &t.udp_drops_bulk.to_string(),
        "0",
        verdict(drops == 0),
    ]);

    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    println!();
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
        if n == 0 {
            println!("{}", "-".repeat(widths.iter().sum::<usize>() + 2 * 5));
        }
    }

    println!();
    println!("notes:");
    println!(
        "  MB = 10^6 bytes, GB = 10^9 payload bytes; single-stream = {} MiB, {}-stream = {} MiB each",
        plan.bulk / MIB,
        plan.streams,
        plan.bulk / MIB / plan.streams as u64
    );
    println!(
        "  bulk figures and CPU per GB: median of {} rounds, paths interleaved; peak RSS: highest round",
        plan.rounds
    );
    println!("  CPU ms/conn: Server and Client CPU in the rate phase per completed connection");
    println!(
        "  latency = fresh TCP + full TLS 1.3 handshake + 1 KiB reply, {} sequential; rate over {:?}",
        plan.latency_conns, plan.rate_for
    );
    println!(
        "  tunnel up {:.0} ms after start; RSS at start: Server {:.1} MiB, Client {:.1} MiB",
        o.up_after.as_secs_f64() * 1e3,
        mib(o.start_mem.0.rss_kib),
        mib(o.start_mem.1.rss_kib)
    );
    for (label, x) in [("passthrough", p), ("terminate", t)] {
        if let Some((s, c)) = x.idle_before {
            println!(
                "  {label}: RSS before opening idle streams: Server {:.1} MiB, Client {:.1} MiB; {} of {} opened, {} answered afterwards",
                mib(s.rss_kib),
                mib(c.rss_kib),
                x.idle_held,
                plan.idle,
                x.idle_ok,
            );
            if let Some(e) = &x.idle_first_err {
                println!(
                    "  {label}: WARNING only {} of {} idle streams opened; first error: {e}",
                    x.idle_held, plan.idle
                );
            }
        }
    }
    for (label, x) in [("direct", d), ("passthrough", p), ("terminate", t)] {
        if x.conn_failures > 0 {
            println!(
                "  {label}: {} failed requests in the connection-rate phase",
                x.conn_failures
            );
        }
    }
    if !o.peak_reset || p.peak.is_none() || t.peak.is_none() {
        println!("  peak RSS could not be reset per phase (clear_refs); values may be n/a");
    }
    let eof = EOF_WITHOUT_CLOSE_NOTIFY.load(Ordering::Relaxed);
    if eof > 0 {
        println!("  {eof} Visitor reads ended with TCP EOF but no TLS close_notify");
    }
    println!(
        "  UDP RcvbufErrors over the whole run: {} (counter is namespace-wide)",
        o.udp_drops_run
    );
}

fn main() -> ExitCode {
    let plan = Plan::from_env();
    let started = Instant::now();
    eprintln!(
        "runewarp tunnel bench ({} mode)",
        if plan.quick { "quick" } else { "full" }
    );
    let mut s = match setup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench setup failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(measure(&plan, &mut s));
    // Stop the Visitors and backends before the Server and Client.
    rt.shutdown_timeout(Duration::from_secs(2));
    let failed = match outcome {
        Ok(o) => {
            report(&plan, &o);
            false
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            for p in [&s.server, &s.client] {
                eprintln!("--- last {} log lines ---\n{}", p.name, p.log_tail());
            }
            true
        }
    };
    let Setup {
        dir,
        server,
        client,
        ..
    } = s;
    drop(client);
    drop(server);
    if failed || std::env::var_os("RUNEWARP_BENCH_KEEP").is_some() {
        eprintln!("configs and logs kept in {}", dir.keep().display());
    }
    eprintln!("bench finished in {:.1} s", started.elapsed().as_secs_f64());
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
