//! The Client instance: keeps one Tunnel connection to the Server (dialer,
//! reconnect backoff), accepts the streams the Server opens, selects a
//! Service by SNI and forwards to its Local backend, passing TLS through or
//! terminating it.

pub mod backoff;
pub mod dialer;
pub mod reload;
pub mod service;
pub mod status;
mod stream;
pub mod terminate;

use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;

use crate::config::{ClientConfig, PublicCertSource, StreamTimeouts, TlsMode};
use crate::identity::ClientIdentity;
use crate::logging::RateLimit;
use crate::notify;
use crate::shutdown::Shutdown;
use crate::tls::acme::{AcmeManager, AcmeSetupError};
use crate::tls::material::{self, MaterialError};
use crate::tls::trust::{self, TrustError};
use crate::tunnel::transport::{self, TransportError, close_code, stream_code};

use backoff::Backoff;
use dialer::{DialError, Dialer};
use service::ServiceTable;
use terminate::{CertificateTable, TerminateError};

pub use stream::BACKEND_CONNECT_DEADLINE;
/// After being replaced by a newer connection with the same identity, wait
/// this long before dialing again, so two instances sharing an identity do
/// not flap the Tunnel back and forth.
pub const REPLACED_PAUSE: Duration = Duration::from_secs(60);
/// Visitor streams one Client instance handles at once: the stream credit
/// it grants the Server (so this only guards against handlers outliving
/// their streams).
pub const STREAM_HANDLERS: usize = transport::STREAM_CREDIT as usize;
/// After closing the tunnel on shutdown, wait at most this long for the
/// close to reach the Server.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
/// Why a Client instance could not start.
pub enum ClientError {
    #[error("{0}")]
    /// The identity or terminate certificates could not be loaded.
    Material(#[from] MaterialError),
    #[error("{0}")]
    /// The Server trust (`server-trust`, CA file, pin) is unusable.
    Trust(#[from] TrustError),
    #[error("tunnel TLS: {0}")]
    /// The Tunnel TLS or QUIC configuration could not be built.
    Transport(#[from] TransportError),
    #[error("terminate: {0}")]
    /// The terminate certificates could not be made into a TLS config.
    Terminate(#[from] TerminateError),
    #[error("{0}")]
    /// `[client.acme]` could not be set up.
    Acme(#[from] AcmeSetupError),
    #[error("{0}")]
    /// A `[client.services.gate]` could not be opened (state dir, SMTP).
    Gate(#[from] crate::gate::server::GateError),
    #[error("cannot bind the readiness listener (TCP) on {addr}: {error}")]
    /// `readiness-bind-address` could not be bound.
    Readiness {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the bind returned.
        error: std::io::Error,
    },
    #[error("cannot bind metrics listener (TCP) {addr}: {error}")]
    /// `metrics-bind-address` could not be bound.
    MetricsBind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the bind returned.
        error: std::io::Error,
    },
}

/// What the stream handlers share.
struct Context {
    /// Replaced whole on reload.
    services: std::sync::RwLock<Arc<ServiceTable>>,
    /// `public-cert-dir`: re-read on reload.
    certs: Option<Arc<terminate::SwappableCerts>>,
    handlers: Arc<tokio::sync::Semaphore>,
    acceptor: Option<terminate::Acceptor>,
    /// One `backend_unreachable` line per backend per interval.
    backend_errors: RateLimit<String>,
    metrics: Arc<crate::metrics::ClientMetrics>,
    /// The config and identity the Tunnel connection uses now: a reload
    /// that changes the tunnel keys replaces both.
    running: std::sync::RwLock<(Arc<ClientConfig>, ClientIdentity)>,
    /// Runegate on terminate Services (`[client.services.gate]`).
    gates: terminate::Gates,
}

impl Context {
    /// Deadlines of every relayed stream, as of the last (re)load.
    fn stream_timeouts(&self) -> StreamTimeouts {
        self.running().0.stream_timeouts
    }

    /// The config and identity in effect.
    fn running(&self) -> (Arc<ClientConfig>, ClientIdentity) {
        crate::sync::read(&self.running).clone()
    }

    /// The Services as of the last (re)load.
    fn services(&self) -> Arc<ServiceTable> {
        crate::sync::read(&self.services).clone()
    }
}

/// Backend failures are logged at most once per backend per this interval.
const BACKEND_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a Client instance's Tunnel connection is doing, observable through
/// [`Client::status`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStatus {
    /// An authenticated Tunnel connection is up.
    pub connected: bool,
    /// Authenticated connections established so far.
    pub connections: u64,
    /// Why the last Tunnel connection ended, if one did.
    pub last_end: Option<TunnelEnd>,
}

/// How a Tunnel connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Local shutdown.
    Shutdown,
    /// The Server replaced it with a newer connection for the same Tunnel.
    Replaced,
    /// Lost: closed by the Server, timed out, reset.
    Lost(quinn::ConnectionError),
    /// Closed by this Client because a reload changed where or as whom it
    /// connects (`server-address`, trust, identity, congestion control).
    Reconfigured,
}

/// A Client instance ready to run.
pub struct Client {
    config: Arc<ClientConfig>,
    identity: ClientIdentity,
    dialer: Dialer,
    context: Arc<Context>,
    status: tokio::sync::watch::Sender<ClientStatus>,
    /// `[client.acme]`: started by `run` once the first Tunnel connection
    /// is up, never awaited.
    acme: Option<AcmeManager>,
    /// `readiness-bind-address`, bound at start so a bad address fails it.
    readiness: Option<std::net::TcpListener>,
    /// `metrics-bind-address`, bound; served by `run`.
    metrics_listener: Option<std::net::TcpListener>,
    /// `control-socket`, bound; served by `run`.
    control: Option<crate::control_socket::ControlSocket>,
    /// Re-reads the config on SIGHUP.
    reloader: Option<reload::Reloader>,
}

/// The dialer and identity a config's tunnel keys describe: the Client
/// identity, the Server trust and the QUIC settings.
fn tunnel_dialer(config: &ClientConfig) -> Result<(Dialer, ClientIdentity), ClientError> {
    let (identity_material, identity) = material::load_client_identity(&config.identity_dir)?;
    let verifier = trust::server_verifier(
        &config.server_trust,
        Arc::new(rustls::crypto::ring::default_provider()),
    )?;
    let quic = transport::client_config_with_verifier(
        verifier,
        identity_material,
        config.congestion_control,
    )?;
    Ok((
        Dialer::new(config.server_address.clone(), &config.server_trust, quic),
        identity,
    ))
}

impl Client {
    /// Load the identity, Server trust and terminate certificates.
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        let (dialer, identity) = tunnel_dialer(&config)?;
        let mut acme = None;
        let mut swappable = None;
        let metrics = Arc::new(crate::metrics::ClientMetrics::new(&config.services));
        let metrics_listener = config
            .metrics_bind_address
            .map(crate::metrics::bind)
            .transpose()
            .map_err(|(addr, error)| ClientError::MetricsBind { addr, error })?;
        let acceptor = match &config.public_certs {
            None => None,
            Some(PublicCertSource::Acme(acme_config)) => {
                let manager = AcmeManager::new(
                    "client",
                    "client.acme",
                    acme_config,
                    &terminate_hostnames(&config),
                )?;
                let acceptor = terminate::acme_acceptor(manager.resolver())?;
                acme = Some(manager);
                Some(acceptor)
            }
            Some(PublicCertSource::Manual { dir }) => {
                let certs = material::load_public_certs(dir)?;
                for (host, m) in &certs {
                    if let Some(t) = m.chain.first().and_then(|c| crate::metrics::not_after(c)) {
                        metrics.certificate_expiry(host.as_str(), t);
                    }
                }
                let table = Arc::new(terminate::SwappableCerts::new(CertificateTable::new(
                    certs,
                )?));
                for s in config
                    .services
                    .iter()
                    .filter(|s| s.tls_mode == TlsMode::Terminate)
                {
                    for h in s.public_hostnames.iter().filter(|h| !table.contains(h)) {
                        tracing::warn!(
                            event = "terminate_certificate_missing",
                            hostname = %h,
                            dir = %dir.display(),
                            hint = "run runewarp client public-cert init --hostname <hostname>",
                        );
                    }
                }
                swappable = Some(table.clone());
                Some(terminate::acceptor(table)?)
            }
        };
        let readiness = config
            .readiness_bind_address
            .map(|addr| {
                std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|error| ClientError::Readiness { addr, error })
            })
            .transpose()?;
        let certs = swappable;
        let config = Arc::new(config);
        let context = Arc::new(Context {
            running: std::sync::RwLock::new((config.clone(), identity)),
            services: std::sync::RwLock::new(Arc::new(ServiceTable::new(&config.services))),
            certs,
            handlers: Arc::new(tokio::sync::Semaphore::new(STREAM_HANDLERS)),
            acceptor,
            backend_errors: RateLimit::new(BACKEND_ERROR_LOG_INTERVAL),
            metrics,
            gates: terminate::Gates::open(&config)?,
        });
        let control = config
            .control_socket
            .as_deref()
            .and_then(|path| crate::control_socket::ControlSocket::bind(path, "client"));
        Ok(Self {
            dialer,
            config,
            identity,
            context,
            status: tokio::sync::watch::Sender::new(ClientStatus::default()),
            acme,
            readiness,
            metrics_listener,
            control,
            reloader: None,
        })
    }

    /// Re-read the config with `reloader` on SIGHUP.
    pub fn with_reloader(mut self, reloader: reload::Reloader) -> Self {
        self.reloader = Some(reloader);
        self
    }

    /// The pin of the identity this instance presents (as of start).
    pub fn identity(&self) -> ClientIdentity {
        self.identity
    }

    /// Follow the Tunnel connection's state.
    pub fn status(&self) -> tokio::sync::watch::Receiver<ClientStatus> {
        self.status.subscribe()
    }

    fn set_status(&self, connected: bool, end: Option<TunnelEnd>) {
        self.status.send_modify(|s| {
            if connected {
                s.connections += 1;
            }
            s.connected = connected;
            if end.is_some() {
                s.last_end = end;
            }
        });
    }

    /// Keep the Tunnel connection up until `shutdown` fires.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut acme_tasks = None;
        let mut backoff = Backoff::default();
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let mut server = self.config.server_address.to_string();
        let _metrics_task = self.metrics_listener.take().and_then(|l| {
            let m = self.context.metrics.clone();
            crate::metrics::spawn_std_listener(l, Arc::new(move || m.render()))
        });
        let (redial_tx, mut redial) = tokio::sync::mpsc::unbounded_channel();
        let _reload = self.reloader.take().map(|r| {
            crate::sync::AbortOnDrop::new(tokio::spawn(reload::on_sighup(
                r,
                self.context.clone(),
                redial_tx,
            )))
        });
        let _control = self.control.take().and_then(|c| {
            let context = self.context.clone();
            let status = self.status.subscribe();
            let started = std::time::SystemTime::now();
            c.serve(Arc::new(move || {
                let (config, identity) = context.running();
                let services = context.services();
                status::snapshot(
                    &config,
                    services.services(),
                    &identity,
                    &context.metrics,
                    &status.borrow(),
                    started,
                )
            }))
        });
        // Ready means running and dialling, not connected: a Server that is
        // down, or does not know this pin yet (a first deploy), must not
        // hold up the service manager. "Connected" is the `tunnel_connected`
        // event and `readiness-bind-address`.
        notify::notify(notify::READY);
        let readiness = self.readiness.take().and_then(|l| {
            let addr = l.local_addr().ok();
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => Some(tokio::spawn(crate::readiness::serve(
                    l,
                    self.status.subscribe(),
                    |s: &ClientStatus| s.connected,
                ))),
                Err(error) => {
                    tracing::warn!(event = "readiness_bind_failed", addr = addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()), error = ?error.to_string());
                    None
                }
            }
        });
        tracing::info!(event = "client_started", server = %server, identity = %self.identity, services = self.config.services.len(), congestion_control = %self.config.congestion_control);
        loop {
            let dialed = tokio::select! {
                _ = shutdown.wait() => break,
                Some(r) = redial.recv() => {
                    server = self.switch(r, &mut redial).await;
                    backoff.reset();
                    continue;
                }
                dialed = self.dialer.dial() => dialed,
            };
            let delay = match dialed {
                Ok(conn) => {
                    backoff.reset();
                    let peer = canonical(conn.remote_address());
                    tracing::info!(event = "tunnel_connected", server = %server, %peer, identity = %self.identity);
                    self.set_status(true, None);
                    self.context.metrics.set_connection(Some(conn.clone()));
                    if acme_tasks.is_none() {
                        // TLS-ALPN-01 validations reach us through the
                        // tunnel: order only once it is up, so a CA does
                        // not count failed validations against us.
                        acme_tasks = self.acme.take().map(AcmeManager::spawn);
                    }
                    let mut next = None;
                    let ended = serve(
                        &conn,
                        self.context.clone(),
                        &mut shutdown,
                        &mut redial,
                        &mut next,
                    )
                    .await;
                    self.context.metrics.set_connection(None);
                    self.set_status(false, Some(ended.clone()));
                    match ended {
                        TunnelEnd::Shutdown => {
                            conn.close(close_code::SHUTDOWN, b"client shutting down");
                            break;
                        }
                        TunnelEnd::Replaced => {
                            tracing::warn!(
                                event = "tunnel_replaced",
                                server = %server,
                                identity = %self.identity,
                                retry_in_s = REPLACED_PAUSE.as_secs(),
                                hint = "another Client instance with this identity connected",
                            );
                            self.context.metrics.set_waiting(
                                "replaced",
                                "another Client instance with this identity took the Tunnel".into(),
                                REPLACED_PAUSE,
                            );
                            REPLACED_PAUSE
                        }
                        TunnelEnd::Reconfigured => {
                            conn.close(close_code::SHUTDOWN, b"client reconfigured");
                            if let Some(r) = next.take() {
                                server = self.switch(r, &mut redial).await;
                            }
                            backoff.reset();
                            continue;
                        }
                        TunnelEnd::Lost(error) => {
                            let delay = backoff.next_delay(&mut rng);
                            tracing::info!(event = "tunnel_closed", server = %server, %peer, detail = ?error.to_string(), retry_in_ms = delay.as_millis() as u64);
                            self.context
                                .metrics
                                .set_waiting("lost", error.to_string(), delay);
                            delay
                        }
                    }
                }
                Err(error) => {
                    let delay = match error {
                        DialError::Refused { .. } => backoff.next_refused_delay(&mut rng),
                        _ => backoff.next_delay(&mut rng),
                    };
                    log_dial_failure(&server, &self.identity, &error, delay);
                    self.context.metrics.dial_failed(error.reason());
                    self.context
                        .metrics
                        .set_waiting(error.reason(), error.to_string(), delay);
                    delay
                }
            };
            tokio::select! {
                _ = shutdown.wait() => break,
                Some(r) = redial.recv() => {
                    server = self.switch(r, &mut redial).await;
                    backoff.reset();
                }
                _ = tokio::time::sleep(delay) => {}
            }
        }
        notify::notify(notify::STOPPING);
        if let Some(task) = readiness {
            task.abort();
        }
        if let Ok(endpoint) = self.dialer.endpoint() {
            endpoint.close(close_code::SHUTDOWN, b"client shutting down");
            let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
        }
        tracing::info!(event = "client_stopped");
    }
}

impl Client {
    /// Take the dialer and identity a reload built (the newest, if several
    /// reloads came at once), closing the old endpoint; returns the new
    /// Server address for log lines. The caller dials at once.
    async fn switch(
        &mut self,
        mut r: reload::Redial,
        pending: &mut tokio::sync::mpsc::UnboundedReceiver<reload::Redial>,
    ) -> String {
        while let Ok(newer) = pending.try_recv() {
            r = newer;
        }
        if let Ok(endpoint) = self.dialer.endpoint() {
            endpoint.close(close_code::SHUTDOWN, b"client reconfigured");
            let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
        }
        let server = r.config.server_address.to_string();
        tracing::info!(
            event = "tunnel_reconnecting",
            server = %server,
            identity = %r.identity,
            changed = %r.changed.join(","),
        );
        self.dialer = r.dialer;
        self.identity = r.identity;
        self.config = r.config;
        server
    }
}

/// The Public hostnames of terminating Services (what `[client.acme]`
/// obtains certificates for).
fn terminate_hostnames(config: &ClientConfig) -> Vec<String> {
    config
        .services
        .iter()
        .filter(|s| s.tls_mode == TlsMode::Terminate)
        .flat_map(|s| s.public_hostnames.iter().map(|h| h.as_str().to_string()))
        .collect()
}

fn log_dial_failure(server: &str, identity: &ClientIdentity, error: &DialError, delay: Duration) {
    let retry_in_ms = delay.as_millis() as u64;
    match error {
        DialError::Refused { .. } | DialError::Untrusted { .. } => tracing::error!(
            event = "tunnel_refused",
            server,
            %identity,
            reason = error.reason(),
            error = ?error.to_string(),
            retry_in_ms,
        ),
        _ => {
            tracing::warn!(event = "tunnel_dial_failed", server, reason = error.reason(), error = ?error.to_string(), retry_in_ms)
        }
    }
}

/// Hand the Visitor streams the Server opens on `conn` to stream handlers
/// until the connection ends; when a reload asks to dial again, its
/// [`reload::Redial`] is left in `next`.
async fn serve(
    conn: &quinn::Connection,
    context: Arc<Context>,
    shutdown: &mut Shutdown,
    redial: &mut tokio::sync::mpsc::UnboundedReceiver<reload::Redial>,
    next: &mut Option<reload::Redial>,
) -> TunnelEnd {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => return TunnelEnd::Shutdown,
            Some(r) = redial.recv() => {
                *next = Some(r);
                return TunnelEnd::Reconfigured;
            }
            accepted = conn.accept_bi() => accepted,
        };
        match accepted {
            Ok((mut send, mut recv)) => {
                let Ok(permit) = context.handlers.clone().try_acquire_owned() else {
                    context.metrics.stream_rejected("overloaded");
                    stream::reject(&mut send, &mut recv, stream_code::OVERLOADED);
                    continue;
                };
                let context = context.clone();
                tokio::spawn(async move {
                    stream::stream(send, recv, context).await;
                    drop(permit);
                });
            }
            Err(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code == close_code::REPLACED =>
            {
                return TunnelEnd::Replaced;
            }
            Err(e) => return TunnelEnd::Lost(e),
        }
    }
}

/// An address as people write it (no IPv4-mapped IPv6 form).
fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
