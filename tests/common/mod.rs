//! Shared end-to-end harness: material, an in-process Server and Client on
//! loopback, echo backends and TLS Visitors. Everything binds 127.0.0.1:0
//! and is stopped by the test that started it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use runewarp::client::{Client, ClientStatus};
use runewarp::config::*;
use runewarp::hostname::{PublicHostname, ServerHostname};
use runewarp::identity::ClientIdentity;
use runewarp::server::admission::Limits;
use runewarp::server::tunnels::Route;
use runewarp::server::{Registry, Server};
use runewarp::shutdown::{self, Trigger};
use runewarp::tls::material;

pub const SERVER_HOSTNAME: &str = "localhost";

pub fn init() {
    runewarp::tls::install_crypto_provider();
    raise_open_files_limit();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUNEWARP_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// The load tests hold thousands of sockets in this process: raise the
/// soft open-files limit to the hard one. A login session's soft limit is
/// often 1024 (as for the unprivileged user of `.ci/check_phase`), which
/// the slowloris test exceeds.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Server material in `dir/server`; returns (cert dir, CA file).
pub fn server_material(dir: &Path) -> (PathBuf, PathBuf) {
    let cert_dir = dir.join("server");
    let host = ServerHostname::parse(SERVER_HOSTNAME).unwrap();
    material::init_server_cert(&cert_dir, &host, false).unwrap();
    let ca = cert_dir.join("server-ca.crt");
    (cert_dir, ca)
}

/// A Client identity in `dir/<name>`; returns (identity dir, pin).
pub fn identity(dir: &Path, name: &str) -> (PathBuf, ClientIdentity) {
    let d = dir.join(name);
    material::init_client_identity(&d, false).unwrap();
    let pin = material::show_client_identity(&d).unwrap();
    (d, pin)
}

/// A new temporary directory with Server material and the Client identity
/// `name`; returns (directory, cert dir, CA file, identity dir, pin).
pub fn material(name: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf, ClientIdentity) {
    let dir = tempfile::tempdir().unwrap();
    let (cert_dir, ca) = server_material(dir.path());
    let (id_dir, pin) = identity(dir.path(), name);
    (dir, cert_dir, ca, id_dir, pin)
}

/// Terminate-mode material for `hosts` in `dir/public`; returns (dir, CA).
pub fn public_certs(dir: &Path, hosts: &[&str]) -> (PathBuf, CertificateDer<'static>) {
    let d = dir.join("public");
    material::init_public_certs(&d, &hostnames(hosts), false).unwrap();
    let ca = material::load_ca_bundle(&d.join("public-ca.crt"))
        .unwrap()
        .remove(0);
    (d, ca)
}

/// `hosts` parsed as Public hostnames.
pub fn hostnames(hosts: &[&str]) -> Vec<PublicHostname> {
    let parse = |h: &&str| PublicHostname::parse(h).unwrap();
    hosts.iter().map(parse).collect()
}

pub fn tunnel(index: usize, hosts: &[&str], pins: &[ClientIdentity]) -> TunnelConfig {
    TunnelConfig {
        index,
        public_hostnames: hostnames(hosts),
        client_identities: pins.to_vec(),
    }
}

pub fn service(index: usize, hosts: &[&str], backend: SocketAddr, mode: TlsMode) -> ServiceConfig {
    ServiceConfig {
        index,
        public_hostnames: hostnames(hosts),
        backend_address: BackendAddress {
            host: backend.ip().to_string(),
            port: backend.port(),
        },
        tls_mode: mode,
        proxy_protocol: false,
    }
}

/// The set-up most end-to-end tests share: Server material, one Client
/// identity pinned for Tunnel 0 serving `host`, a TLS echo backend, an
/// in-process Server and a Client with one passthrough Service.
pub struct Rig {
    /// Holds the material; deleted when the rig is dropped.
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub backend: EchoBackend,
    pub server: TestServer,
    pub client: TestClient,
}

impl Rig {
    /// Started with default limits, and the tunnel up for `host`.
    pub async fn up(host: &str) -> Self {
        let rig = Self::start_with_limits(host, Limits::default()).await;
        rig.server.wait_active(host, Duration::from_secs(10)).await;
        rig
    }

    /// The material directory, backend, Server and Client.
    pub fn parts(self) -> (tempfile::TempDir, EchoBackend, TestServer, TestClient) {
        (self.dir, self.backend, self.server, self.client)
    }

    /// Started with `limits`, without waiting for the tunnel.
    pub async fn start_with_limits(host: &str, limits: Limits) -> Self {
        Self::start_full(host, limits, false).await
    }

    /// Started with `limits` and a readiness listener, the tunnel up for
    /// `host`.
    pub async fn up_with_readiness(host: &str, limits: Limits) -> Self {
        let rig = Self::start_full(host, limits, true).await;
        rig.server.wait_active(host, Duration::from_secs(10)).await;
        rig
    }

    async fn start_full(host: &str, limits: Limits, readiness: bool) -> Self {
        let (dir, cert_dir, ca, id_dir, pin) = material("client");
        let backend = EchoBackend::tls(&[host]).await;
        let mut config = server_config(&cert_dir, vec![tunnel(0, &[host], &[pin])]);
        if readiness {
            config.readiness_bind_address = Some(free_tcp_addr());
        }
        let server = TestServer::start_config(config, limits).await;
        let client = TestClient::passthrough(server.tunnel, &ca, &id_dir, host, backend.addr);
        Self {
            dir,
            ca,
            backend,
            server,
            client,
        }
    }
}

/// A loopback address with a TCP port that was free a moment ago.
pub fn free_tcp_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ports::free_tcp()))
}

/// The Server configuration the in-process tests start from: the manual
/// material in `cert_dir`, `tunnels`, listeners on loopback ports the
/// system picks, a 1 s grace period, and nothing else.
pub fn server_config(cert_dir: &Path, tunnels: Vec<TunnelConfig>) -> ServerConfig {
    let hostname = ServerHostname::parse(SERVER_HOSTNAME).unwrap();
    ServerConfig::loopback(hostname, cert_dir.to_path_buf(), tunnels)
}

/// Stop a Client, then its Server.
pub async fn stop(client: TestClient, server: TestServer) {
    client.stop().await;
    server.stop().await;
}

/// Fire `trigger` and wait for `task` (the role `what`) to end: within 5 s,
/// without a panic.
/// A Server or Client running in a task until its shutdown trigger fires.
struct RoleTask {
    trigger: Trigger,
    task: JoinHandle<()>,
}

impl RoleTask {
    fn spawn<F>(run: impl FnOnce(shutdown::Shutdown) -> F) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (trigger, stop) = shutdown::channel();
        let task = tokio::spawn(run(stop));
        Self { trigger, task }
    }

    /// Fire the trigger; panic naming `what` unless it stops within 5 s.
    async fn stop(self, what: &str) {
        self.trigger.fire();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap_or_else(|_| panic!("{what} stops within 5 s"))
            .unwrap();
    }
}

pub struct TestServer {
    pub public: SocketAddr,
    pub tunnel: SocketAddr,
    /// The readiness listener, when the configuration has one.
    pub readiness: Option<SocketAddr>,
    pub registry: Arc<Registry>,
    running: RoleTask,
}

impl TestServer {
    pub async fn start(cert_dir: &Path, tunnels: Vec<TunnelConfig>) -> Self {
        Self::start_on(
            cert_dir,
            tunnels,
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
    }

    pub async fn start_with_limits(
        cert_dir: &Path,
        tunnels: Vec<TunnelConfig>,
        limits: Limits,
    ) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Self::start_full(cert_dir, tunnels, any, any, limits).await
    }

    pub async fn start_on(
        cert_dir: &Path,
        tunnels: Vec<TunnelConfig>,
        public: SocketAddr,
        tunnel: SocketAddr,
    ) -> Self {
        Self::start_full(cert_dir, tunnels, public, tunnel, Limits::default()).await
    }

    async fn start_full(
        cert_dir: &Path,
        tunnels: Vec<TunnelConfig>,
        public: SocketAddr,
        tunnel: SocketAddr,
        limits: Limits,
    ) -> Self {
        let mut config = server_config(cert_dir, tunnels);
        config.public_bind_address = public;
        config.tunnel_bind_address = tunnel;
        Self::start_config(config, limits).await
    }

    /// Bind `config` with `limits` and run it until [`TestServer::stop`].
    pub async fn start_config(config: ServerConfig, limits: Limits) -> Self {
        let readiness = config.readiness_bind_address;
        let server = Server::bind_with_limits(config, limits)
            .await
            .expect("server binds");
        let public = server.public_addr().unwrap();
        let tunnel = server.tunnel_addr().unwrap();
        let registry = server.registry();
        Self {
            public,
            tunnel,
            readiness,
            registry,
            running: RoleTask::spawn(|stop| server.run(stop)),
        }
    }

    /// Whether the readiness listener accepts a connection.
    pub async fn ready(&self) -> bool {
        let addr = self.readiness.expect("a readiness listener");
        TcpStream::connect(addr).await.is_ok()
    }

    /// Wait until `host` routes to an active connection; returns its id.
    pub async fn wait_active(&self, host: &str, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Route::Active(tc) = self.registry.route(host) {
                return tc.id;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no active tunnel for {host} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until `host` routes to an active connection other than `old`.
    pub async fn wait_replaced(&self, host: &str, old: u64, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.active_id(host) {
                Some(id) if id != old => return id,
                _ => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{host} still routes to connection {old} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn active_id(&self, host: &str) -> Option<u64> {
        match self.registry.route(host) {
            Route::Active(tc) => Some(tc.id),
            _ => None,
        }
    }

    pub async fn stop(self) {
        self.running.stop("server").await;
    }
}

pub struct TestClient {
    pub status: tokio::sync::watch::Receiver<ClientStatus>,
    running: RoleTask,
}

pub struct ClientSetup<'a> {
    pub tunnel: SocketAddr,
    pub ca: &'a Path,
    pub identity_dir: &'a Path,
    pub public_cert_dir: Option<&'a Path>,
    pub services: Vec<ServiceConfig>,
}

impl TestClient {
    /// A Client with one passthrough Service for `host` to `backend`.
    pub fn passthrough(
        tunnel: SocketAddr,
        ca: &Path,
        identity_dir: &Path,
        host: &str,
        backend: SocketAddr,
    ) -> Self {
        Self::start(ClientSetup {
            tunnel,
            ca,
            identity_dir,
            public_cert_dir: None,
            services: vec![service(0, &[host], backend, TlsMode::Passthrough)],
        })
    }

    pub fn start(s: ClientSetup<'_>) -> Self {
        let config = ClientConfig {
            source: None,
            log_level: LogLevel::Info,
            server_address: ServerAddress {
                host: ServerHostname::parse(SERVER_HOSTNAME).unwrap(),
                port: s.tunnel.port(),
            },
            server_trust: ServerTrust::CaFile(s.ca.to_path_buf()),
            identity_dir: s.identity_dir.to_path_buf(),
            public_certs: s.public_cert_dir.map(|d| PublicCertSource::Manual {
                dir: d.to_path_buf(),
            }),
            readiness_bind_address: None,
            metrics_bind_address: None,
            control_socket: None,
            services: s.services,
            gates: Default::default(),
            stream_timeouts: StreamTimeouts::default(),
            congestion_control: Default::default(),
        };
        let client = Client::new(config).expect("client starts");
        Self {
            status: client.status(),
            running: RoleTask::spawn(|stop| client.run(stop)),
        }
    }

    /// Wait until the status satisfies `f`.
    pub async fn wait_for(
        &mut self,
        within: Duration,
        f: impl Fn(&ClientStatus) -> bool,
    ) -> ClientStatus {
        let r = tokio::time::timeout(within, self.status.wait_for(|s| f(s))).await;
        r.expect("client status condition within time")
            .unwrap()
            .clone()
    }

    pub async fn stop(self) {
        self.running.stop("client").await;
    }
}

/// A backend that echoes every byte until EOF, then half-closes. TLS when
/// `tls` is given. Records the first bytes of each connection.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub cert: Option<CertificateDer<'static>>,
    pub connections: Arc<AtomicUsize>,
    pub first_bytes: Arc<Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoBackend {
    pub async fn plain() -> Self {
        Self::start(None, false).await
    }

    /// Plaintext, expecting a PROXY v2 header first (recorded, not echoed).
    pub async fn plain_with_proxy_header() -> Self {
        Self::start(None, true).await
    }

    pub async fn tls(hosts: &[&str]) -> Self {
        let (cert, config) = tls::self_signed(hosts);
        let mut b = Self::start(Some(tokio_rustls::TlsAcceptor::from(config)), false).await;
        b.cert = Some(cert);
        b
    }

    async fn start(tls: Option<tokio_rustls::TlsAcceptor>, proxy_header: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let first_bytes = Arc::new(Mutex::new(Vec::new()));
        let (c, fb) = (connections.clone(), first_bytes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let tls = tls.clone();
                let fb = fb.clone();
                tokio::spawn(async move {
                    if proxy_header {
                        let mut fixed = [0u8; 16];
                        if tcp.read_exact(&mut fixed).await.is_err() {
                            return;
                        }
                        let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
                        let mut rest = vec![0u8; len];
                        if tcp.read_exact(&mut rest).await.is_err() {
                            return;
                        }
                        let mut all = fixed.to_vec();
                        all.extend_from_slice(&rest);
                        fb.lock().unwrap().push(all);
                    } else if tls.is_none() {
                        let mut peek = [0u8; 64];
                        if let Ok(n) = tcp.peek(&mut peek).await {
                            fb.lock().unwrap().push(peek[..n].to_vec());
                        }
                    }
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(tcp).await {
                                echo(s).await;
                            }
                        }
                        None => echo(tcp).await,
                    }
                });
            }
        });
        Self {
            addr,
            cert: None,
            connections,
            first_bytes,
            task,
        }
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: S) {
    let (mut r, mut w) = tokio::io::split(s);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// A TLS Visitor trusting exactly `roots`, with SNI `sni`.
pub async fn visitor(
    public: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(roots));
    let tcp = TcpStream::connect(public).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    connector.connect(name, tcp).await
}

/// Send `data`, half-close, and read everything back.
pub async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    data: &[u8],
) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(s);
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let read = async {
        let mut out = Vec::with_capacity(data.len());
        r.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let (_, out) = tokio::try_join!(write, read)?;
    Ok(out)
}

/// The leaf certificate the Visitor saw.
pub fn peer_leaf(s: &tokio_rustls::client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

pub fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// Whether the peer closes `tcp` (EOF or reset) within `within`; returns the
/// time it took.
pub async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(start + within, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

pub mod mesh;
pub mod netns;
pub mod opt_in;
pub mod ports;
pub mod postgres;
pub mod proc;
pub mod run;
pub mod tls;
pub mod webdriver;

/// A TCP connection to `to` from the loopback address `127.0.0.<last>`, so
/// tests can act as many source IPs.
pub async fn connect_from(last: u8, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, last], 0)))?;
    socket.connect(to).await
}

/// A TLS Visitor for `sni` from the loopback address `127.0.0.<last>`,
/// trusting exactly `roots` (8 s handshake deadline).
pub async fn visitor_from(
    last: u8,
    public: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = tls::client_config(roots);
    let tcp = connect_from(last, public).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(Duration::from_secs(8), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}
