//! Mesh control plane figures: enrolment rate, network-map fan-out to many
//! connected devices, and the control server's memory with them.
//!
//! `cargo bench --bench control [-- DEVICES]` (default 1,000; 50 when run
//! by `cargo test`). It starts the
//! real `runewarp control` binary on loopback, enrols DEVICES devices over
//! the API, opens one map stream per device, then changes the
//! organisation's policy and times how long until every device has the
//! new map. The baseline in the same run is the same change in an
//! organisation of two devices, so the printed ratio says what the
//! organisation's size costs.
//!
//! With `RUNEWARP_BENCH_POSTGRES=1` the control server stores its state in
//! a throwaway PostgreSQL cluster (Debian's server binaries, as the tests
//! use) instead of SQLite.

#[path = "../tests/common/postgres.rs"]
mod postgres_cluster;
#[path = "../tests/common/run.rs"]
mod run;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;

const BIN: &str = env!("CARGO_BIN_EXE_runewarp");

struct Control {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Control {
    fn admin(&self, args: &[&str]) -> String {
        let out = run::succeeded(
            &format!("runewarp control {args:?}"),
            Command::new(BIN)
                .current_dir(&self.dir)
                .args(["control", "-c", "control.toml"])
                .args(args),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn setup_key(&self, user: &str) -> String {
        let out = self.admin(&["setup-key", "create", "--user", user, "--reusable"]);
        out.lines().last().unwrap_or("").trim().to_string()
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

fn raise_nofile() {
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn start(dir: &Path, database: &str) -> Control {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    std::fs::write(
        dir.join("control.toml"),
        format!(
            "log-level = \"warn\"\n[control]\nlisten-address = \"127.0.0.1:{port}\"\n\
             hostname = \"localhost\"\nstate-dir = \"state\"\n{database}"
        ),
    )
    .expect("write config");
    let child = Command::new(BIN)
        .current_dir(dir)
        .args(["control", "-c", "control.toml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start control");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let ca = dir.join("state/tls/server-ca.crt");
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() || !ca.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "control did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&ca).expect("read CA");
    for c in rustls_pemfile_certs(&pem) {
        roots.add(c).expect("add CA");
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Control {
        child,
        dir: dir.to_path_buf(),
        addr,
        tls: Arc::new(tls),
    }
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A TLS connection to the control API from loopback address `from`.
async fn connect(c: &Control, from: std::net::IpAddr) -> Sender {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind source");
    let tcp = socket.connect(c.addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(c.tls.clone())
        .connect(name, tcp)
        .await
        .expect("TLS");
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    sender
}

/// Enrol one device; its bearer token.
async fn register(c: &Control, from: std::net::IpAddr, key: &str, n: usize) -> String {
    use base64::Engine;
    let mut sender = connect(c, from).await;
    let public: [u8; 32] = rand::random();
    let body = serde_json::json!({
        "setup_key": key,
        "public_key": base64::engine::general_purpose::STANDARD.encode(public),
        "hostname": format!("d{n}"),
    });
    let req = Request::post("/v1/register")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = sender.send_request(req).await.expect("register");
    assert!(resp.status().is_success(), "register: {}", resp.status());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    v["token"].as_str().expect("token").to_string()
}

/// Follow one map stream; report every map's serial with its arrival time.
async fn follow(
    c: &Control,
    token: String,
    from: std::net::IpAddr,
    id: usize,
    report: tokio::sync::mpsc::UnboundedSender<(usize, u64, Instant)>,
) {
    let mut sender = connect(c, from).await;
    let req = Request::get("/v1/map")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("map");
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            // Maps open with `{"serial":N,`: read just that, so the bench's
            // own parsing does not take the server's CPU.
            let serial = line
                .strip_prefix(b"{\"serial\":")
                .and_then(|r| r.split(|b| *b == b',').next())
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| d.parse::<u64>().ok());
            if let Some(serial) = serial {
                let _ = report.send((id, serial, Instant::now()));
            }
        }
    }
}

fn source(n: usize) -> std::net::IpAddr {
    // 20 registrations per source address per minute: spread them.
    std::net::IpAddr::from([127, 0, 1 + (n / 250) as u8, 1 + (n % 250) as u8])
}

/// Set `policy` for `org`; wait until every device in `ids` saw a map
/// newer than the newest before; the time from the command's start.
async fn fan_out(
    c: &Control,
    org: &str,
    policy: &str,
    ids: std::ops::Range<usize>,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, u64, Instant)>,
    latest: &mut [u64],
) -> Duration {
    let before = latest.iter().copied().max().unwrap_or(0);
    std::fs::write(c.dir.join("policy.json"), policy).expect("write policy");
    let started = Instant::now();
    c.admin(&["policy", "set", "--org", org, "policy.json"]);
    let mut waiting = ids.len();
    let mut last = started;
    while waiting > 0 {
        let Ok(Some((id, serial, at))) =
            tokio::time::timeout(Duration::from_secs(60), rx.recv()).await
        else {
            panic!("{waiting} devices did not get the change within 60 s");
        };
        if ids.contains(&id) && latest[id] <= before && serial > before {
            waiting -= 1;
            last = at;
        }
        latest[id] = latest[id].max(serial);
    }
    last.duration_since(started)
}

async fn run(devices: usize, database: &str) {
    raise_nofile();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Arc::new(start(dir.path(), database));
    let key = c.setup_key("bench@acme.com");
    let solo_key = c.setup_key("solo@globex.com");

    let t = Instant::now();
    let mut tokens = Vec::with_capacity(devices);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..devices {
        let (c, key) = (c.clone(), key.clone());
        tasks.spawn(async move { (n, register(&c, source(n), &key, n).await) });
        if tasks.len() >= 8
            && let Some(Ok(r)) = tasks.join_next().await
        {
            tokens.push(r);
        }
    }
    while let Some(Ok(r)) = tasks.join_next().await {
        tokens.push(r);
    }
    let enrol = t.elapsed();
    let pair = [
        register(&c, source(devices + 1), &solo_key, 0).await,
        register(&c, source(devices + 2), &solo_key, 1).await,
    ];

    let rss_idle = c.rss_kib();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    for (n, token) in tokens {
        let (c, tx) = (c.clone(), tx.clone());
        tokio::spawn(async move { follow(&c, token, source(n), n, tx).await });
    }
    let mut latest = vec![0u64; devices + 2];
    let mut connected = 0;
    while connected < devices {
        let (id, serial, _) = rx.recv().await.expect("first maps");
        if latest[id] == 0 {
            connected += 1;
        }
        latest[id] = serial;
    }
    let first_maps = t.elapsed();
    for (i, token) in pair.into_iter().enumerate() {
        let (c, tx) = (c.clone(), tx.clone());
        let id = devices + i;
        tokio::spawn(async move { follow(&c, token, source(id + 1), id, tx).await });
    }
    while latest[devices] == 0 || latest[devices + 1] == 0 {
        let (id, serial, _) = rx.recv().await.expect("baseline maps");
        latest[id] = serial;
    }
    let rss_streams = c.rss_kib();

    // Baseline: the same change in an organisation of two devices.
    let narrow = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:db:5432"]}]}"#;
    let wide = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
    let solo = devices..devices + 2;
    let mut one = Duration::ZERO;
    for p in [narrow, wide] {
        let d = fan_out(&c, "globex.com", p, solo.clone(), &mut rx, &mut latest).await;
        one = one.max(d);
    }
    let narrowed = fan_out(&c, "acme.com", narrow, 0..devices, &mut rx, &mut latest).await;
    let widened = fan_out(&c, "acme.com", wide, 0..devices, &mut rx, &mut latest).await;

    println!("control plane, {devices} devices in one organisation (loopback, 2 cores):");
    println!(
        "  enrolment: {:.0} devices/s ({devices} in {:.2} s, 8 at a time)",
        devices as f64 / enrol.as_secs_f64(),
        enrol.as_secs_f64()
    );
    println!(
        "  first maps on {devices} new streams: {:.2} s",
        first_maps.as_secs_f64()
    );
    println!(
        "  ACL change reaching every device: {} ms when maps shrink to 0 peers, {} ms when they grow to {} peers",
        narrowed.as_millis(),
        widened.as_millis(),
        devices - 1
    );
    println!(
        "  baseline, the same change in an organisation of 2 devices: {} ms (ratio {:.1} / {:.1})",
        one.as_millis(),
        narrowed.as_secs_f64() / one.as_secs_f64().max(1e-6),
        widened.as_secs_f64() / one.as_secs_f64().max(1e-6)
    );
    println!(
        "  control server RSS: {} MiB with the devices enrolled, {} MiB with {devices} map streams open",
        rss_idle / 1024,
        rss_streams / 1024
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // too, without it: then a quick pass that only proves it works.
    let quick = !args.iter().any(|a| a == "--bench");
    let devices = args
        .iter()
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(if quick { 50 } else { 1000 });
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Outside the runtime: the cluster's readiness check blocks.
    let pg = (std::env::var("RUNEWARP_BENCH_POSTGRES").as_deref() == Ok("1"))
        .then(postgres_cluster::Postgres::start);
    let database = match &pg {
        Some(pg) => format!("database-url = \"{}\"\n", pg.create_db("bench")),
        None => String::new(),
    };
    println!(
        "storage: {}",
        if pg.is_some() { "postgres" } else { "sqlite" }
    );
    rt.block_on(run(devices, &database));
}
