//! Helpers for tests that run the real `runewarp` binary as processes:
//! a home directory with material made by the CLI, config files, logs in
//! files, and a blocking TLS Visitor.
#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;

pub const BIN: &str = env!("CARGO_BIN_EXE_runewarp");
pub const APP: &str = "app.runewarp.test";

pub use super::ports::{free_tcp, free_udp};

/// Poll `ok` every 20 ms until it holds; panic naming `what` once `within`
/// has passed. Returns how long it took.
pub fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    wait_for(within, || {
        ok().then_some(())
            .ok_or_else(|| format!("{what} within {within:?}"))
    });
    start.elapsed()
}

/// Poll `probe` every 20 ms until it gives `Ok`, and return that; once
/// `within` has passed, panic with its last `Err`: what it saw instead.
pub fn wait_for<T>(within: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(done) => return done,
            Err(seen) => assert!(start.elapsed() < within, "{seen}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The network map a mesh node whose state dir is `home/name` last wrote
/// (None: none yet).
pub fn netmap(home: &Home, name: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(home.path().join(name).join("netmap.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The peers' hostnames in that map, sorted (None: no map yet).
pub fn peers(home: &Home, name: &str) -> Option<Vec<String>> {
    let map = netmap(home, name)?;
    let mut v: Vec<String> = map["peers"]
        .as_array()?
        .iter()
        .filter_map(|p| p["hostname"].as_str().map(String::from))
        .collect();
    v.sort();
    Some(v)
}

/// The arguments that make Server material for `localhost` in `dir`.
pub fn server_cert_init(dir: &str) -> [&str; 7] {
    [
        "server",
        "cert",
        "init",
        "--hostname",
        "localhost",
        "--dir",
        dir,
    ]
}

/// A throw-away HOME holding material, configs and logs.
pub struct Home {
    pub dir: tempfile::TempDir,
    pub public: u16,
    pub tunnel: u16,
}

/// A failing test's home (its configs, state and logs) stays for a look
/// when `RUNEWARP_TEST_KEEP_FAILED` is set; its path goes to stderr.
impl Drop for Home {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("RUNEWARP_TEST_KEEP_FAILED").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept the failed test's home: {}", self.path().display());
        }
    }
}

/// Run `cmd` to completion, check it exited with `code`, return its stderr.
pub fn stderr_of(cmd: &mut std::process::Command, code: i32) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{err}");
    err
}

impl Home {
    pub fn new() -> Self {
        // Flood tests hold thousands of sockets in the test process.
        super::raise_open_files_limit();
        Self {
            dir: tempfile::tempdir().unwrap(),
            public: free_tcp(),
            tunnel: free_udp(),
        }
    }

    /// A new HOME with Server material and a Client identity in
    /// `identity/`; returns it and the identity's pin.
    pub fn with_identity() -> (Self, String) {
        let home = Self::new();
        home.server_material();
        let pin = home.identity("identity");
        (home, pin)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn public_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.public))
    }

    /// `runewarp` with a clean environment rooted here.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.path())
            .env(
                "RUNEWARP_LOG",
                std::env::var("RUNEWARP_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .current_dir(self.path());
        c
    }

    /// Run to completion; panic unless it succeeded; return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = super::run::succeeded(&format!("runewarp {args:?}"), self.cmd().args(args));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Server material for `localhost` in `server-certs/`.
    pub fn server_material(&self) {
        self.ok(&server_cert_init("server-certs"));
    }

    /// A Client identity in `dir`; returns its pin.
    pub fn identity(&self, dir: &str) -> String {
        self.ok(&["client", "identity", "init", "--dir", dir]);
        self.ok(&["client", "identity", "show", "--dir", dir])
            .trim()
            .to_string()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `server.toml`: one Tunnel for APP pinned to `pin`.
    pub fn server_config(&self, pin: &str) -> PathBuf {
        self.server_config_with(pin, "graceful-shutdown-duration = \"1s\"\n")
    }

    /// `server.toml` with `extra` lines in the `[server]` table.
    pub fn server_config_with(&self, pin: &str, extra: &str) -> PathBuf {
        self.write(
            "server.toml",
            &format!(
                "[server]\nhostname = \"localhost\"\npublic-bind-address = \"127.0.0.1:{}\"\n\
                 tunnel-bind-address = \"127.0.0.1:{}\"\ncert-dir = \"server-certs\"\n{extra}\n\
                 [[server.tunnels]]\npublic-hostnames = [\"{APP}\"]\nclient-identity = \"{pin}\"\n",
                self.public, self.tunnel
            ),
        )
    }

    /// `client.toml`: APP passed through to `backend`, trusting `ca`.
    pub fn client_config(
        &self,
        name: &str,
        identity_dir: &str,
        ca: &str,
        backend: SocketAddr,
    ) -> PathBuf {
        self.write(
            name,
            &format!(
                "[client]\nserver-address = \"localhost:{}\"\nserver-trust = \"ca-file\"\n\
                 server-ca-file = \"{ca}\"\nidentity-dir = \"{identity_dir}\"\n\n\
                 [[client.services]]\npublic-hostnames = [\"{APP}\"]\nbackend-address = \"{backend}\"\n",
                self.tunnel
            ),
        )
    }

    /// `client.toml` for the identity in `identity/`, trusting the Server
    /// material [`Home::server_material`] made: APP passed through to
    /// `backend`.
    pub fn default_client_config(&self, backend: SocketAddr) -> PathBuf {
        self.client_config(
            "client.toml",
            "identity",
            "server-certs/server-ca.crt",
            backend,
        )
    }

    /// A Client logging to `client.log`: APP passed through to `backend`,
    /// with the identity in `identity_dir`, trusting `ca`.
    pub fn spawn_client(&self, identity_dir: &str, ca: &str, backend: SocketAddr) -> Running {
        let config = self.client_config("client.toml", identity_dir, ca, backend);
        self.spawn("client", &config, "client.log")
    }

    /// Start `runewarp <role> -c <config>`, logging to `<log>`.
    pub fn spawn(&self, role: &str, config: &Path, log: &str) -> Running {
        self.spawn_env(role, config, log, &[])
    }

    /// [`Home::spawn`] with extra environment variables.
    pub fn spawn_env(
        &self,
        role: &str,
        config: &Path,
        log: &str,
        env: &[(&str, &Path)],
    ) -> Running {
        let file = std::fs::File::create(self.path().join(log)).unwrap();
        let mut cmd = self.cmd();
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .args([role, "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Running {
            child,
            log: self.path().join(log),
        }
    }
}

/// A running process, killed on drop so failing tests leave nothing behind.
pub struct Running {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Start `cmd` with stdin closed and stdout and stderr appended to
    /// `log`.
    pub fn spawn_logged(mut cmd: Command, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Stop as an operator's restart does (SIGTERM, so a Client closes its
    /// Tunnel connection cleanly), waiting up to 5 s; killed on drop after
    /// that.
    pub fn terminate(mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panic, with the log, if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("process exited ({status}); log:\n{}", self.log_text());
        }
    }

    /// Wait until a log line contains every one of `parts`; returns it.
    pub fn wait_line(&mut self, parts: &[&str], within: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self
                .log_text()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.to_string();
            }
            self.assert_running();
            assert!(
                start.elapsed() < within,
                "no log line with {parts:?} within {within:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// How many log lines contain every one of `parts`.
    pub fn count(&self, parts: &[&str]) -> usize {
        self.log_text()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Send `sig` and wait for the exit; panics after `within`.
    pub fn stop_with(&mut self, sig: i32, within: Duration) -> (ExitStatus, Duration) {
        self.signal(sig);
        self.wait_exit(within)
    }

    /// Wait for the process to exit by itself; panics after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < within,
                "process did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Lines of the log containing `event="<name>"`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory (KiB) and open file descriptors of the process.
    pub fn rss_kib_and_fds(&self) -> (u64, usize) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0);
        (rss, fds)
    }

    /// Wait until the log has `event="<event>"` lines and return them;
    /// panics, showing the log, after `within`.
    pub fn wait_event(&self, event: &str, within: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let lines = self.events(event);
            if !lines.is_empty() {
                return lines;
            }
            assert!(
                start.elapsed() < within,
                "no {event} within {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn events(&self, name: &str) -> Vec<String> {
        let needle = format!("event=\"{name}\"");
        self.log_text()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(String::from)
            .collect()
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    pub cert: CertificateDer<'static>,
}

/// A blocking TLS backend for APP answering one message per connection.
pub fn tls_backend() -> Backend {
    tls_backend_with(|tls| {
        let mut buf = [0u8; 64];
        if let Ok(n) = std::io::Read::read(tls, &mut buf) {
            let reply = format!("backend got {:?}", String::from_utf8_lossy(&buf[..n]));
            let _ = std::io::Write::write_all(tls, reply.as_bytes());
        }
    })
}

/// A TLS backend for APP that, after reading the request, sends `chunks`
/// KiB one every `every` (a slow download), then closes.
pub fn slow_tls_backend(chunks: usize, every: Duration) -> Backend {
    tls_backend_with(move |tls| {
        let mut buf = [0u8; 64];
        if std::io::Read::read(tls, &mut buf).is_ok() {
            for _ in 0..chunks {
                if std::io::Write::write_all(tls, &[b'x'; 1024]).is_err() {
                    return;
                }
                let _ = std::io::Write::flush(tls);
                std::thread::sleep(every);
            }
        }
    })
}

type TlsConn<'a> = rustls::Stream<'a, rustls::ServerConnection, std::net::TcpStream>;

fn tls_backend_with(serve: impl Fn(&mut TlsConn<'_>) + Send + Sync + Copy + 'static) -> Backend {
    let (cert, config) = super::tls::self_signed(&[APP]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let mut tcp = tcp;
                let mut conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                serve(&mut tls);
                tls.conn.send_close_notify();
                let _ = std::io::Write::flush(&mut tls);
            });
        }
    });
    Backend { addr, cert }
}

/// A TLS Visitor connection for APP that sent its request.
pub fn open_visit(
    public: SocketAddr,
    root: &CertificateDer<'static>,
) -> std::io::Result<(rustls::ClientConnection, std::net::TcpStream)> {
    let roots = std::slice::from_ref(root);
    let (mut conn, mut tcp) = super::tls::connect(public, APP, roots, Duration::from_secs(10))?;
    std::io::Write::write_all(&mut rustls::Stream::new(&mut conn, &mut tcp), b"hello")?;
    Ok((conn, tcp))
}

/// One TLS Visitor request for APP; returns the reply.
pub fn visit(public: SocketAddr, root: &CertificateDer<'static>) -> std::io::Result<String> {
    let roots = std::slice::from_ref(root);
    let (mut conn, mut tcp) = super::tls::connect(public, APP, roots, Duration::from_secs(5))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    std::io::Write::write_all(&mut tls, b"hello")?;
    let mut out = String::new();
    match tls.read_to_string(&mut out) {
        Ok(_) => Ok(out),
        Err(_) if !out.is_empty() => Ok(out),
        Err(e) => Err(e),
    }
}

/// Retry a Visitor request until it succeeds; returns how long it took.
pub fn visit_until_ok(
    public: SocketAddr,
    root: &CertificateDer<'static>,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        match visit(public, root) {
            Ok(r) if r.starts_with("backend got") => return start.elapsed(),
            other => {
                assert!(
                    start.elapsed() < within,
                    "no reply through the tunnel within {within:?}: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
