//! The real `runewarp` binary as separate processes: material made by its
//! own commands, config files, a Visitor through passthrough, `config
//! check`, exit codes, and SIGTERM handling.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const BIN: &str = env!("CARGO_BIN_EXE_runewarp");
const APP: &str = "app.runewarp.test";

fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn runewarp(home: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("RUNEWARP_LOG", "info");
    c
}

fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        c,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Kills the child on drop so a failing test leaves nothing behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn sigterm_and_wait(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < within,
                "process did not exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(e) = self.0.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

struct Backend {
    addr: SocketAddr,
    cert: CertificateDer<'static>,
}

/// A blocking TLS backend answering one line per connection.
fn tls_backend() -> Backend {
    runewarp::tls::install_crypto_provider();
    let (cert_pem, key_pem) = runewarp::tls::material::generate_self_signed(&[APP]).unwrap();
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let mut tcp = tcp;
                let mut conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let mut buf = [0u8; 64];
                if let Ok(n) = std::io::Read::read(&mut tls, &mut buf) {
                    let reply = format!("backend got {:?}", String::from_utf8_lossy(&buf[..n]));
                    let _ = std::io::Write::write_all(&mut tls, reply.as_bytes());
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
            });
        }
    });
    Backend { addr, cert }
}

fn visit(public: SocketAddr, root: &CertificateDer<'static>) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from(APP).unwrap())
            .unwrap();
    let mut tcp = std::net::TcpStream::connect(public)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    std::io::Write::write_all(&mut tls, b"hello")?;
    let mut out = String::new();
    match tls.read_to_string(&mut out) {
        Ok(_) => Ok(out),
        // Some stacks end without close_notify; what arrived still counts.
        Err(_) if !out.is_empty() => Ok(out),
        Err(e) => Err(e),
    }
}

use std::io::Write as _;

#[test]
fn server_and_client_processes_carry_a_visitor_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (public, tunnel) = (free_tcp(), free_udp());
    let backend = tls_backend();

    // Material through the CLI, as an operator would.
    let mut init = runewarp(home);
    init.args(["server", "cert", "init", "--hostname", "localhost", "--dir"])
        .arg(home.join("server-certs"));
    ok(init);
    let mut id = runewarp(home);
    id.args(["client", "identity", "init", "--dir"])
        .arg(home.join("identity"));
    ok(id);
    let mut show = runewarp(home);
    show.args(["client", "identity", "show", "--dir"])
        .arg(home.join("identity"));
    let pin = ok(show).trim().to_string();
    assert_eq!(pin.len(), 64);

    std::fs::write(
        home.join("server.toml"),
        format!(
            "[server]\nhostname = \"localhost\"\npublic-bind-address = \"127.0.0.1:{public}\"\n\
             tunnel-bind-address = \"127.0.0.1:{tunnel}\"\ncert-dir = \"server-certs\"\n\
             graceful-shutdown-duration = \"1s\"\n\n[[server.tunnels]]\npublic-hostnames = [\"{APP}\"]\n\
             client-identity = \"{pin}\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        home.join("client.toml"),
        format!(
            "[client]\nserver-address = \"localhost:{tunnel}\"\nserver-trust = \"ca-file\"\n\
             server-ca-file = \"server-certs/server-ca.crt\"\nidentity-dir = \"identity\"\n\n\
             [[client.services]]\npublic-hostnames = [\"{APP}\"]\nbackend-address = \"{}\"\n",
            backend.addr
        ),
    )
    .unwrap();

    // `config check` prints the effective config with defaults filled in.
    let mut check = runewarp(home);
    check
        .args(["config", "check", "--role", "server", "-c"])
        .arg(home.join("server.toml"));
    let effective = ok(check);
    assert!(effective.contains("log-level = \"info\""), "{effective}");
    assert!(
        effective.contains(&home.join("server-certs").display().to_string()),
        "{effective}"
    );

    let mut server = runewarp(home);
    server
        .args(["server", "-c"])
        .arg(home.join("server.toml"))
        .stderr(Stdio::piped());
    let mut server = Running(server.spawn().unwrap());
    let mut client = runewarp(home);
    client
        .args(["client", "-c"])
        .arg(home.join("client.toml"))
        .stderr(Stdio::piped());
    let mut client = Running(client.spawn().unwrap());

    let public_addr: SocketAddr = format!("127.0.0.1:{public}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let reply = loop {
        match visit(public_addr, &backend.cert) {
            Ok(r) if r.contains("backend got") => break r,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("no reply through the tunnel: {other:?}"),
        }
    };
    assert_eq!(reply, "backend got \"hello\"");

    let (status, took) = client.sigterm_and_wait(Duration::from_secs(5));
    assert!(status.success(), "client exit {status:?}");
    assert!(took < Duration::from_secs(3), "client took {took:?}");
    let (status, took) = server.sigterm_and_wait(Duration::from_secs(5));
    assert!(status.success(), "server exit {status:?}");
    assert!(took < Duration::from_secs(3), "server took {took:?}");

    let client_log = client.stderr();
    let server_log = server.stderr();
    assert!(
        client_log.contains("event=\"tunnel_connected\"")
            || client_log.contains("event=tunnel_connected"),
        "{client_log}"
    );
    assert!(
        server_log.contains(&pin),
        "server logs the identity: {server_log}"
    );
    for log in [&client_log, &server_log] {
        assert!(
            !log.contains("hello"),
            "payload must never be logged: {log}"
        );
        assert!(!log.contains("PRIVATE KEY"));
    }
}

#[test]
fn an_invalid_config_exits_2_naming_key_and_value_before_binding_anything() {
    let dir = tempfile::tempdir().unwrap();
    let public = free_tcp();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhostname = \"localhost\"\npublic-bind-address = \"127.0.0.1:{public}\"\n\
             [[server.tunnels]]\npublic-hostnames = [\"*.example.com\"]\nclient-identity = \"{}\"\n",
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let mut c = runewarp(dir.path());
    c.args(["server", "-c"]).arg(&config);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.tunnels[0].public-hostnames[0]") && err.contains("*.example.com"),
        "{err}"
    );
    // Nothing was bound: the port is still free.
    TcpListener::bind(("127.0.0.1", public)).expect("the public port must still be free");

    let mut check = runewarp(dir.path());
    check
        .args(["config", "check", "--role", "server", "-c"])
        .arg(&config);
    assert_eq!(check.output().unwrap().status.code(), Some(2));
}

#[test]
fn a_client_without_identity_says_which_command_creates_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = runewarp(dir.path());
    c.args([
        "client",
        "--server-address",
        "localhost:4433",
        "--backend-address",
        "127.0.0.1:8443",
    ]);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runewarp client identity init"), "{err}");
}

#[test]
fn unknown_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = runewarp(dir.path());
    c.args(["server", "--no-such-flag"]);
    assert_eq!(c.output().unwrap().status.code(), Some(2));
}
