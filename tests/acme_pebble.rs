//! ACME (TLS-ALPN-01) end to end against a real ACME server: Pebble, with
//! `pebble-challtestsrv` as its DNS (every name resolves to 127.0.0.1).
//! The Runewarp Server and Client run as real processes of our binary, so
//! restarts and logs are the real thing. See `pebble/ACME-TESTS.md`.
//!
//! Opt-in: these tests run only with `RUNEWARP_TEST_EXTERNAL=1` (as
//! `.ci/test` sets). They need `pebble` and `pebble-challtestsrv` (Debian:
//! `apt-get install pebble`) and `curl` on PATH, and read
//! `pebble/pebble-config-loopback.json` from the repository, none of which
//! the Nix build sandbox has. With the variable set and a program missing,
//! they fail, saying so.

mod common;
use common::opt_in;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::ports::{free_tcp, free_udp_tcp};
use common::proc::{BIN, Running as Proc};
use common::run::succeeded;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

const SERVER_HOST: &str = "tunnel.runewarp.test";
const APP: &str = "app.runewarp.test";
const LATE: &str = "late.runewarp.test";
const REPLY: &str = "hello from the plaintext backend";
/// Upper bound for any single wait on issuance or connection.
const WAIT: Duration = Duration::from_secs(60);

fn need(binary: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(binary).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{binary}` is not on PATH: the ACME tests need Pebble. Install it with \
         `apt-get install pebble` (Debian's package ships both pebble and pebble-challtestsrv; \
         elsewhere: `apt-get install pebble pebble-challtestsrv`)"
    );
}

/// Pebble + pebble-challtestsrv on loopback.
struct Pebble {
    dir: PathBuf,
    directory_url: String,
    directory_ca: PathBuf,
    mgmt: u16,
    config: PathBuf,
    dns: u16,
    cts_mgmt: u16,
    pebble: Option<Proc>,
    _challtestsrv: Proc,
}

impl Pebble {
    /// Prepare Pebble (config, HTTPS certificate, DNS) for a Server whose
    /// public listener is on `tls_port`; `start` launches it.
    fn prepare(dir: &Path, tls_port: u16) -> Self {
        need("pebble");
        need("pebble-challtestsrv");
        let dir = dir.join("pebble");
        fs::create_dir_all(&dir).unwrap();
        // Pebble's own HTTPS (directory and management API): a test CA and
        // a leaf for 127.0.0.1. The CA is Runewarp's directory-ca-file.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "runewarp test: Pebble HTTPS CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let directory_ca = dir.join("pebble-https-ca.pem");
        fs::write(&directory_ca, ca_cert.pem()).unwrap();
        fs::write(dir.join("pebble-https.crt"), leaf.pem()).unwrap();
        fs::write(dir.join("pebble-https.key"), leaf_key.serialize_pem()).unwrap();

        let listen = free_tcp();
        let mgmt = free_tcp();
        let template = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/pebble/pebble-config-loopback.json"
        );
        let mut config: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(template).unwrap()).unwrap();
        let p = &mut config["pebble"];
        p["listenAddress"] = format!("127.0.0.1:{listen}").into();
        p["managementListenAddress"] = format!("127.0.0.1:{mgmt}").into();
        p["certificate"] = dir.join("pebble-https.crt").display().to_string().into();
        p["privateKey"] = dir.join("pebble-https.key").display().to_string().into();
        p["tlsPort"] = tls_port.into();
        p["httpPort"] = free_tcp().into();
        let config_path = dir.join("pebble-config.json");
        fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();

        let dns = free_udp_tcp();
        let cts_mgmt = free_tcp();
        let mut cts = Command::new("pebble-challtestsrv");
        cts.args([
            "-dns01",
            &format!("127.0.0.1:{dns}"),
            "-management",
            &format!("127.0.0.1:{cts_mgmt}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ]);
        let challtestsrv = Proc::spawn_logged(cts, &dir.join("challtestsrv.log"));
        Self {
            directory_url: format!("https://127.0.0.1:{listen}/dir"),
            directory_ca,
            mgmt,
            config: config_path,
            dns,
            cts_mgmt,
            pebble: None,
            _challtestsrv: challtestsrv,
            dir,
        }
    }

    fn start(&mut self) {
        let mut cmd = Command::new("pebble");
        cmd.args([
            "-config",
            &self.config.display().to_string(),
            "-dnsserver",
            &format!("127.0.0.1:{}", self.dns),
            "-strict",
            "false",
        ])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_VA_ALWAYS_VALID", "0")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .env("PEBBLE_AUTHZREUSE", "0");
        let mut p = Proc::spawn_logged(cmd, &self.dir.join("pebble.log"));
        p.wait_line(&["ACME directory available"], Duration::from_secs(20));
        self.pebble = Some(p);
    }

    fn proc(&self) -> &Proc {
        self.pebble.as_ref().expect("pebble started")
    }

    /// Orders Pebble has accepted so far (from its own log).
    fn orders(&self) -> usize {
        self.proc().count(&["Added order"])
    }

    /// Pebble's issuing root, from its management API.
    fn root(&self) -> PathBuf {
        let path = self.dir.join("pebble-root.pem");
        let out = succeeded(
            "curl, fetching Pebble's root,",
            Command::new("curl")
                .args(["-sSf", "--max-time", "10", "--cacert"])
                .arg(&self.directory_ca)
                .arg(format!("https://127.0.0.1:{}/roots/0", self.mgmt)),
        );
        fs::write(&path, &out.stdout).unwrap();
        path
    }
}

/// A plaintext backend answering each connection with an HTTP response;
/// counts connections.
struct Backend {
    port: u16,
    connections: Arc<AtomicUsize>,
}

fn backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = write!(
                    tcp,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{REPLY}",
                    REPLY.len()
                );
            });
        }
    });
    Backend { port, connections }
}

/// One test's world: temp dir, ports, Pebble, identity.
struct World {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    public: u16,
    tunnel: u16,
    pebble: Pebble,
    identity_dir: PathBuf,
    pin: String,
}

impl World {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let public = free_tcp();
        let tunnel = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pebble = Pebble::prepare(&dir, public);
        let identity_dir = dir.join("identity");
        succeeded(
            "client identity init",
            runewarp(&dir)
                .args(["client", "identity", "init", "--dir"])
                .arg(&identity_dir),
        );
        let out = runewarp(&dir)
            .args(["client", "identity", "show", "--dir"])
            .arg(&identity_dir)
            .output()
            .unwrap();
        let pin = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Self {
            _tmp: tmp,
            dir,
            public,
            tunnel,
            pebble,
            identity_dir,
            pin,
        }
    }

    fn acme_table(&self, section: &str, state: &str) -> String {
        format!(
            "[{section}.acme]\nemail = \"ops@runewarp.test\"\nstate-dir = \"{}\"\n\
             directory-url = \"{}\"\ndirectory-ca-file = \"{}\"\n",
            self.dir.join(state).display(),
            self.pebble.directory_url,
            self.pebble.directory_ca.display()
        )
    }

    /// Pebble up, a backend, and a Server holding its ACME certificate.
    fn serving() -> (Self, Backend, Proc) {
        let mut w = Self::new();
        w.pebble.start();
        let backend = backend();
        let mut server = w.server();
        server.wait_line(&parts(&issued(SERVER_HOST)), WAIT);
        (w, backend, server)
    }

    fn server(&self) -> Proc {
        let config = self.dir.join("server.toml");
        fs::write(
            &config,
            format!(
                "[server]\nhostname = \"{SERVER_HOST}\"\n\
                 public-bind-address = \"127.0.0.1:{}\"\ntunnel-bind-address = \"127.0.0.1:{}\"\n\
                 graceful-shutdown-duration = \"0s\"\n{}\n\
                 [[server.tunnels]]\npublic-hostnames = [\"{APP}\", \"{LATE}\"]\nclient-identity = \"{}\"\n",
                self.public,
                self.tunnel,
                self.acme_table("server", "server-acme"),
                self.pin
            ),
        )
        .unwrap();
        let mut cmd = runewarp(&self.dir);
        cmd.args(["server", "--config"]).arg(&config);
        Proc::spawn_logged(cmd, &self.dir.join("server.log"))
    }

    fn client(&self, root: &Path, backend: &Backend, hostnames: &[&str]) -> Proc {
        let config = self.dir.join("client.toml");
        let list = hostnames
            .iter()
            .map(|h| format!("\"{h}\""))
            .collect::<Vec<_>>()
            .join(", ");
        fs::write(
            &config,
            format!(
                "[client]\nserver-address = \"{SERVER_HOST}:{}\"\nserver-trust = \"ca-file\"\n\
                 server-ca-file = \"{}\"\nidentity-dir = \"{}\"\n{}\n\
                 [[client.services]]\npublic-hostnames = [{list}]\n\
                 backend-address = \"127.0.0.1:{}\"\ntls-mode = \"terminate\"\n",
                self.tunnel,
                root.display(),
                self.identity_dir.display(),
                self.acme_table("client", "client-acme"),
                backend.port
            ),
        )
        .unwrap();
        let mut cmd = runewarp(&self.dir);
        cmd.args(["client", "--config"])
            .arg(&config)
            .env("RUNEWARP_RESOLVE", format!("{SERVER_HOST}=127.0.0.1"));
        Proc::spawn_logged(cmd, &self.dir.join("client.log"))
    }

    /// A Visitor: curl over TLS to `host` through the Server's public
    /// listener, trusting only Pebble's root.
    /// A Visitor request for APP trusting `root` reaches the backend;
    /// `when` names the moment in the failure message.
    fn assert_serves(&self, root: &Path, when: &str) {
        let out = self.curl(APP, root);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(REPLY),
            "{when}: {out:?}"
        );
    }

    fn curl(&self, host: &str, root: &Path) -> std::process::Output {
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(root)
            .arg("--resolve")
            .arg(format!("{host}:{}:127.0.0.1", self.public))
            .arg(format!("https://{host}:{}/", self.public))
            .output()
            .expect("curl is needed for the Visitor")
    }

    fn state_cert(&self, state: &str, host: &str) -> PathBuf {
        runewarp::tls::acme::StateDirCache::cert_path(
            &self.dir.join(state),
            &[host.to_string()],
            &self.pebble.directory_url,
        )
    }
}

fn runewarp(home: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("RUNEWARP_LOG", "warn,runewarp=debug");
    c
}

/// Whether the test named `test` runs (see the module docs).
fn enabled(test: &str) -> bool {
    opt_in::enabled(
        opt_in::EXTERNAL,
        test,
        "pebble, pebble-challtestsrv and curl",
    )
}

fn issued(host: &str) -> [String; 2] {
    ["acme_certificate_issued".into(), format!("hostname={host}")]
}

fn parts(v: &[String; 2]) -> [&str; 2] {
    [v[0].as_str(), v[1].as_str()]
}

/// A stored-certificate file (key PEM, then chain PEM) whose certificate
/// expired long ago.
fn expired_cert_pem(host: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![host.to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 4, 1);
    let cert = params.self_signed(&key).unwrap();
    // rustls-acme wants at least two PEM blocks: the key and a chain.
    format!("{}\n{}", key.serialize_pem(), cert.pem())
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Server hostname and terminate Service certificates issued by Pebble,
/// used by the QUIC tunnel and by a Visitor; a restart reuses both without
/// a new order; a deleted certificate is ordered again.
#[test]
fn issue_reuse_and_reorder() {
    if !enabled("issue_reuse_and_reorder") {
        return;
    }
    let started = Instant::now();
    let (w, backend, server) = World::serving();
    assert!(
        server.log_text().contains("acme_public_port"),
        "warns about a public port other than 443"
    );
    let root = w.pebble.root();

    // The Client validates the ACME certificate of the tunnel endpoint
    // with server-trust = "ca-file" (Pebble's root) alone.
    let mut client = w.client(&root, &backend, &[APP]);
    client.wait_line(&["tunnel_connected"], WAIT);
    // The terminate certificate is validated through the tunnel.
    client.wait_line(&parts(&issued(APP)), WAIT);
    client.wait_line(&["acme_challenge_answered", APP], WAIT);
    let out = w.curl(APP, &root);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(REPLY),
        "Visitor over TLS with the ACME certificate: {:?}\n{}",
        out,
        client.log_text()
    );
    assert_eq!(w.pebble.orders(), 2, "one order per hostname");

    // State: files 0600 in a 0700 state-dir.
    for state in ["server-acme", "client-acme"] {
        let dir = w.dir.join(state);
        assert_eq!(mode(&dir), 0o700, "{state}");
        let files: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
        assert!(
            files.len() >= 2,
            "{state}: account key and certificate: {files:?}"
        );
        for f in files {
            assert_eq!(mode(&f.path()), 0o600, "{}", f.path().display());
        }
    }
    assert!(w.state_cert("client-acme", APP).is_file());

    // Restart both: stored certificates are reused, Pebble sees no order.
    client.terminate();
    drop(server);
    let _ = fs::remove_file(w.dir.join("server.log"));
    let _ = fs::remove_file(w.dir.join("client.log"));
    let mut server = w.server();
    server.wait_line(
        &[
            "acme_certificate_loaded",
            &format!("hostname={SERVER_HOST}"),
        ],
        WAIT,
    );
    let mut client = w.client(&root, &backend, &[APP]);
    client.wait_line(
        &["acme_certificate_loaded", &format!("hostname={APP}")],
        WAIT,
    );
    client.wait_line(&["tunnel_connected"], WAIT);
    w.assert_serves(&root, "after restart");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.pebble.orders(), 2, "a restart must not order again");
    assert_eq!(server.count(&["acme_certificate_issued"]), 0);
    assert_eq!(client.count(&["acme_certificate_issued"]), 0);

    // Stop the Client, `change` its stored certificate and start it again:
    // it places Pebble's order number `n` and serves with the new one.
    let reorder = |client: Proc, change: &dyn Fn(&Path), n: usize, why: &str| {
        client.terminate();
        let _ = fs::remove_file(w.dir.join("client.log"));
        change(&w.state_cert("client-acme", APP));
        let mut client = w.client(&root, &backend, &[APP]);
        client.wait_line(&parts(&issued(APP)), WAIT);
        assert_eq!(w.pebble.orders(), n, "{why}");
        w.assert_serves(&root, why);
        client
    };
    let deleted = |cert: &Path| fs::remove_file(cert).unwrap();
    let client = reorder(
        client,
        &deleted,
        3,
        "the deleted certificate is ordered again",
    );
    let expired = |cert: &Path| fs::write(cert, expired_cert_pem(APP)).unwrap();
    let _client = reorder(
        client,
        &expired,
        4,
        "the expired certificate is ordered again",
    );

    assert!(backend.connections.load(Ordering::SeqCst) >= 4);
    server.assert_running();
    eprintln!("issue_reuse_and_reorder took {:?}", started.elapsed());
}

/// A hostname whose certificate is not issued (Pebble's validation cannot
/// reach it) fails closed at the handshake: no passthrough, no backend.
/// The CA's problem detail is logged and the order retried.
#[test]
fn not_yet_issued_hostname_fails_closed() {
    if !enabled("not_yet_issued_hostname_fails_closed") {
        return;
    }
    let started = Instant::now();
    let (w, backend, mut server) = World::serving();
    let root = w.pebble.root();
    // Pebble resolves LATE to an address where nothing listens.
    set_a_record(&w, LATE, "127.0.0.2");
    let mut client = w.client(&root, &backend, &[APP, LATE]);
    client.wait_line(&["tunnel_connected"], WAIT);
    client.wait_line(&parts(&issued(APP)), WAIT);
    let failed = client.wait_line(&["acme_order_failed", &format!("hostname={LATE}")], WAIT);
    assert!(
        failed.contains("problem_type=\"urn:ietf:params:acme:error:"),
        "problem type logged: {failed}"
    );
    assert!(failed.contains("retry_in_s="), "{failed}");

    let before = backend.connections.load(Ordering::SeqCst);
    let out = w.curl(LATE, &root);
    assert!(
        !out.status.success(),
        "no certificate yet: the handshake must fail: {out:?}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(REPLY));
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        before,
        "nothing reached the backend"
    );
    // The issued hostname keeps working next to it.
    let out = w.curl(APP, &root);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(REPLY),
        "{out:?}"
    );
    server.assert_running();
    client.assert_running();
    eprintln!(
        "not_yet_issued_hostname_fails_closed took {:?}",
        started.elapsed()
    );
}

/// Pebble down at startup: the Server starts anyway, logs the problem, and
/// gets its certificate once Pebble is up.
#[test]
fn acme_server_down_at_startup() {
    if !enabled("acme_server_down_at_startup") {
        return;
    }
    let started = Instant::now();
    let mut w = World::new();
    let mut server = w.server();
    server.wait_line(&["server_started"], WAIT);
    let failed = server.wait_line(
        &["acme_order_failed", &format!("hostname={SERVER_HOST}")],
        WAIT,
    );
    assert!(failed.contains("error="), "{failed}");
    server.assert_running();
    w.pebble.start();
    server.wait_line(&parts(&issued(SERVER_HOST)), WAIT);
    let root = w.pebble.root();
    let backend = backend();
    let mut client = w.client(&root, &backend, &[APP]);
    client.wait_line(&["tunnel_connected"], WAIT);
    eprintln!("acme_server_down_at_startup took {:?}", started.elapsed());
}

/// Point `host` at `ip` in challtestsrv's DNS (its management API).
fn set_a_record(w: &World, host: &str, ip: &str) {
    let port = w.pebble.cts_mgmt;
    succeeded(
        "challtestsrv add-a",
        Command::new("curl")
            .args(["-sSf", "--max-time", "10", "-X", "POST", "-d"])
            .arg(format!("{{\"host\":\"{host}.\",\"addresses\":[\"{ip}\"]}}"))
            .arg(format!("http://127.0.0.1:{port}/add-a")),
    );
}
