//! The Client instance: keeps one Tunnel connection to the Server (dialer,
//! reconnect backoff), accepts the streams the Server opens, selects a
//! Service by SNI and forwards to its Local backend, passing TLS through or
//! terminating it.

pub mod backoff;
pub mod dialer;
pub mod reload;
pub mod service;
pub mod status;
pub mod terminate;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use rand::SeedableRng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{ClientConfig, PublicCertSource, ServiceConfig, StreamTimeouts, TlsMode};
use crate::hostname::wire_lookup_key;
use crate::logging::RateLimit;
use crate::notify;
use crate::proxy;
use crate::shutdown::Shutdown;
use crate::tls::acme::{AcmeManager, AcmeSetupError};
use crate::tls::client_identity::ClientIdentity;
use crate::tls::material::{self, MaterialError};
use crate::tls::sni::{self, CLIENT_HELLO_DEADLINE};
use crate::tls::trust::{self, TrustError};
use crate::tunnel::framing::{self, ProxyHeader};
use crate::tunnel::transport::{self, TransportError, close_code, stream_code};

use backoff::Backoff;
use dialer::{DialError, Dialer};
use service::ServiceTable;
use terminate::{Accepted, CertificateTable, TerminateError, TunnelStream};

/// The Local backend must accept the TCP connection within this time.
pub const BACKEND_CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// The PROXY header of a new stream must arrive within this time.
const STREAM_HEADER_DEADLINE: Duration = Duration::from_secs(10);
/// Terminate mode: the Visitor's TLS handshake must finish within this time.
const TLS_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
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
pub enum ClientError {
    #[error("{0}")]
    Material(#[from] MaterialError),
    #[error("{0}")]
    Trust(#[from] TrustError),
    #[error("tunnel TLS: {0}")]
    Transport(#[from] TransportError),
    #[error("terminate: {0}")]
    Terminate(#[from] TerminateError),
    #[error("{0}")]
    Acme(#[from] AcmeSetupError),
    #[error("{0}")]
    Gate(#[from] crate::gate::server::GateError),
    #[error("cannot bind the readiness listener (TCP) on {addr}: {error}")]
    Readiness {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot bind metrics listener (TCP) {addr}: {error}")]
    MetricsBind {
        addr: std::net::SocketAddr,
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
    /// Deadlines of every relayed stream.
    stream_timeouts: StreamTimeouts,
    metrics: Arc<crate::metrics::ClientMetrics>,
    /// Runegate on terminate Services (`[client.services.gate]`).
    gates: terminate::Gates,
}

impl Context {
    /// The Services as of the last (re)load.
    fn services(&self) -> Arc<ServiceTable> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Local shutdown.
    Shutdown,
    /// The Server replaced it with a newer connection for the same Tunnel.
    Replaced,
    /// Lost: closed by the Server, timed out, reset.
    Lost,
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
    control: Option<crate::control::ControlSocket>,
    /// Re-reads the config on SIGHUP.
    reloader: Option<reload::Reloader>,
}

/// How a Tunnel connection ended.
enum Ended {
    Shutdown,
    Replaced,
    Lost(quinn::ConnectionError),
}

impl Client {
    /// Load the identity, Server trust and terminate certificates.
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
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
        let context = Arc::new(Context {
            services: std::sync::RwLock::new(Arc::new(ServiceTable::new(&config.services))),
            certs,
            handlers: Arc::new(tokio::sync::Semaphore::new(STREAM_HANDLERS)),
            acceptor,
            backend_errors: RateLimit::new(BACKEND_ERROR_LOG_INTERVAL),
            stream_timeouts: config.stream_timeouts,
            metrics,
            gates: terminate::Gates::open(&config)?,
        });
        let control = config
            .control_socket
            .as_deref()
            .and_then(|path| crate::control::ControlSocket::bind(path, "client"));
        Ok(Self {
            dialer: Dialer::new(config.server_address.clone(), &config.server_trust, quic),
            config: Arc::new(config),
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
        let server = self.config.server_address.to_string();
        let _metrics_task = self.metrics_listener.take().and_then(|l| {
            let m = self.context.metrics.clone();
            crate::metrics::spawn_std_listener(l, Arc::new(move || m.render()))
        });
        let _reload = self.reloader.take().map(|r| {
            crate::metrics::AbortOnDrop::new(tokio::spawn(reload::on_sighup(
                r,
                self.config.clone(),
                self.context.clone(),
            )))
        });
        let _control = self.control.take().and_then(|c| {
            let (config, identity, context) =
                (self.config.clone(), self.identity, self.context.clone());
            let status = self.status.subscribe();
            let started = std::time::SystemTime::now();
            c.serve(Arc::new(move || {
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
                    let ended = serve(&conn, self.context.clone(), &mut shutdown).await;
                    self.context.metrics.set_connection(None);
                    self.set_status(
                        false,
                        Some(match &ended {
                            Ended::Shutdown => TunnelEnd::Shutdown,
                            Ended::Replaced => TunnelEnd::Replaced,
                            Ended::Lost(_) => TunnelEnd::Lost,
                        }),
                    );
                    match ended {
                        Ended::Shutdown => {
                            conn.close(close_code::SHUTDOWN, b"client shutting down");
                            break;
                        }
                        Ended::Replaced => {
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
                        Ended::Lost(error) => {
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

async fn serve(conn: &quinn::Connection, context: Arc<Context>, shutdown: &mut Shutdown) -> Ended {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => return Ended::Shutdown,
            accepted = conn.accept_bi() => accepted,
        };
        match accepted {
            Ok((mut send, mut recv)) => {
                let Ok(permit) = context.handlers.clone().try_acquire_owned() else {
                    context.metrics.stream_rejected("overloaded");
                    reject(&mut send, &mut recv, stream_code::OVERLOADED);
                    continue;
                };
                let context = context.clone();
                tokio::spawn(async move {
                    stream(send, recv, context).await;
                    drop(permit);
                });
            }
            Err(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code == close_code::REPLACED =>
            {
                return Ended::Replaced;
            }
            Err(e) => return Ended::Lost(e),
        }
    }
}

/// One Visitor stream: PROXY header, ClientHello, Service, backend.
async fn stream(mut send: SendStream, mut recv: RecvStream, context: Arc<Context>) {
    let header = match tokio::time::timeout(
        STREAM_HEADER_DEADLINE,
        framing::read_proxy_header(&mut recv),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(error)) => {
            context.metrics.stream_rejected("bad_proxy_header");
            tracing::debug!(event = "stream_rejected", reason = "bad_proxy_header", error = ?error.to_string());
            return reject(&mut send, &mut recv, stream_code::BAD_FRAMING);
        }
        Err(_) => {
            context.metrics.stream_rejected("proxy_header_timeout");
            tracing::debug!(event = "stream_rejected", reason = "proxy_header_timeout");
            return reject(&mut send, &mut recv, stream_code::BAD_FRAMING);
        }
    };
    // For log lines: the Visitor's address, or "-" without a PROXY source.
    let visitor = header
        .map(|h| h.source.to_string())
        .unwrap_or_else(|| "-".to_string());
    let mut hello = Vec::new();
    let deadline = tokio::time::Instant::now() + CLIENT_HELLO_DEADLINE;
    let info = match sni::read_client_hello(&mut recv, &mut hello, deadline).await {
        Ok(info) => info,
        Err(e) => {
            context.metrics.stream_rejected(e.reason());
            tracing::debug!(event = "stream_rejected", visitor, reason = e.reason());
            return reject(&mut send, &mut recv, stream_code::BAD_FRAMING);
        }
    };
    let hostname = info.server_name.as_deref().map(wire_lookup_key);
    let services = context.services();
    let Some(service) = services.select(hostname.as_deref()) else {
        context.metrics.stream_rejected("no_service");
        if let Some(suppressed) = crate::logging::budget::NO_SERVICE.allow() {
            tracing::info!(
                event = "stream_rejected",
                hostname = hostname.as_deref().unwrap_or("-"),
                visitor,
                reason = "no_service",
                suppressed
            );
        }
        return reject(&mut send, &mut recv, stream_code::NO_SERVICE);
    };
    let host = hostname.as_deref().unwrap_or("-");
    let started = std::time::Instant::now();
    let service_metrics = context.metrics.service(service);
    let _active = service_metrics.as_ref().map(|m| {
        m.streams.inc();
        crate::metrics::ActiveStream::new(&m.streams_active)
    });
    let result = match service.tls_mode {
        TlsMode::Passthrough => {
            passthrough(
                &context,
                service,
                header,
                Bytes::from(hello),
                send,
                recv,
                host,
            )
            .await
        }
        TlsMode::Terminate => match &context.acceptor {
            Some(acceptor) => {
                terminate(
                    &context,
                    acceptor,
                    service,
                    header,
                    Bytes::from(hello),
                    send,
                    recv,
                    host,
                )
                .await
            }
            None => {
                reject(&mut send, &mut recv, stream_code::TLS_FAILED);
                Err("no_certificates")
            }
        },
    };
    if let (Some(m), Ok(t)) = (&service_metrics, &result) {
        m.bytes_to_backend.inc_by(t.to_backend);
        m.bytes_from_backend.inc_by(t.from_backend);
    }
    match result {
        Ok(t) => tracing::debug!(
            event = "stream_closed",
            hostname = host,
            service = service.index,
            to_backend = t.to_backend,
            from_backend = t.from_backend,
            duration_ms = started.elapsed().as_millis() as u64,
        ),
        Err(reason) => tracing::debug!(
            event = "stream_aborted",
            hostname = host,
            service = service.index,
            reason
        ),
    }
}

fn reject(send: &mut SendStream, recv: &mut RecvStream, code: quinn::VarInt) {
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

async fn connect_backend(
    context: &Context,
    service: &ServiceConfig,
    hostname: &str,
) -> Result<TcpStream, &'static str> {
    let addr = &service.backend_address;
    let metrics = context.metrics.service(service);
    let started = std::time::Instant::now();
    let connect = TcpStream::connect((addr.host.as_str(), addr.port));
    let (reason, error) = match tokio::time::timeout(BACKEND_CONNECT_DEADLINE, connect).await {
        Ok(Ok(tcp)) => {
            if let Some(m) = &metrics {
                crate::metrics::observe_since(&m.backend_connect, started);
            }
            let _ = tcp.set_nodelay(true);
            return Ok(tcp);
        }
        Ok(Err(error)) => ("backend_unreachable", error.to_string()),
        Err(_) => ("backend_timeout", "connect timed out".to_string()),
    };
    if let Some(m) = &metrics {
        m.backend_failed(reason);
    }
    if let Some(suppressed) = context.backend_errors.allow(&addr.to_string()) {
        tracing::warn!(event = "backend_unreachable", backend = %addr, hostname, error = ?error, suppressed);
    }
    Err(reason)
}

/// Write the PROXY v2 header the Service asked for (the Visitor's
/// addresses, as the Server saw them).
async fn send_proxy_header(
    tcp: &mut TcpStream,
    service: &ServiceConfig,
    header: Option<ProxyHeader>,
) -> std::io::Result<()> {
    if !service.proxy_protocol {
        return Ok(());
    }
    let bytes = match header {
        Some(h) => framing::encode(&h),
        None => framing::encode_local(),
    };
    tcp.write_all(&bytes).await
}

async fn passthrough(
    context: &Context,
    service: &ServiceConfig,
    header: Option<ProxyHeader>,
    hello: Bytes,
    mut send: SendStream,
    mut recv: RecvStream,
    hostname: &str,
) -> Result<Moved, &'static str> {
    let mut tcp = match connect_backend(context, service, hostname).await {
        Ok(tcp) => tcp,
        Err(reason) => {
            reject(&mut send, &mut recv, stream_code::BACKEND_UNREACHABLE);
            return Err(reason);
        }
    };
    let first = async {
        send_proxy_header(&mut tcp, service, header).await?;
        tcp.write_all(&hello).await
    };
    if first.await.is_err() {
        proxy::abort_tcp(&tcp);
        proxy::abort_stream(&mut send, &mut recv);
        return Err("backend_write_failed");
    }
    // Here the TCP side of the relay is the backend.
    let t = proxy::relay_tcp_stream(&mut tcp, &mut send, &mut recv, context.stream_timeouts)
        .await
        .map_err(|e| e.reason())?;
    Ok(Moved {
        to_backend: t.from_tunnel + hello.len() as u64,
        from_backend: t.to_tunnel,
    })
}

#[allow(clippy::too_many_arguments)]
async fn terminate(
    context: &Context,
    acceptor: &terminate::Acceptor,
    service: &ServiceConfig,
    header: Option<ProxyHeader>,
    hello: Bytes,
    send: SendStream,
    recv: RecvStream,
    hostname: &str,
) -> Result<Moved, &'static str> {
    let stream = terminate::tunnel_stream(hello, send, recv);
    let mut tls = match tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, acceptor.accept(stream)).await
    {
        Ok(Ok(Accepted::Visitor(tls))) => *tls,
        Ok(Ok(Accepted::AcmeChallenge)) => {
            tracing::info!(event = "acme_challenge_answered", hostname);
            return Ok(Moved {
                to_backend: 0,
                from_backend: 0,
            });
        }
        Ok(Err(error)) => {
            // The alert, if any, went out through the stream; dropping it
            // finishes the stream cleanly behind it.
            tracing::debug!(event = "terminate_handshake_failed", hostname, error = ?error.to_string());
            return Err("tls_handshake_failed");
        }
        Err(_) => return Err("tls_handshake_timeout"),
    };
    // Runegate: the plaintext goes through the gate, which proxies per request.
    match context.gates.for_service(service) {
        terminate::GateFor::Gate(gate) => {
            terminate::gated(gate, tls, header.map(|h| h.source)).await;
            return Ok(Moved {
                to_backend: 0,
                from_backend: 0,
            });
        }
        terminate::GateFor::Unavailable => {
            let quic = tls.get_mut().0.get_mut();
            let _ = quic.writer_mut().reset(stream_code::ABORTED);
            return Err("gate_not_started");
        }
        terminate::GateFor::None => {}
    }
    let abort_tls = |tls: &mut tokio_rustls::server::TlsStream<TunnelStream>| {
        let quic = tls.get_mut().0.get_mut();
        let _ = quic.writer_mut().reset(stream_code::ABORTED);
        let _ = quic.reader_mut().stop(stream_code::ABORTED);
    };
    let mut tcp = match connect_backend(context, service, hostname).await {
        Ok(tcp) => tcp,
        Err(reason) => {
            abort_tls(&mut tls);
            return Err(reason);
        }
    };
    if send_proxy_header(&mut tcp, service, header).await.is_err() {
        proxy::abort_tcp(&tcp);
        abort_tls(&mut tls);
        return Err("backend_write_failed");
    }
    proxy::tune_tcp(&tcp, context.stream_timeouts);
    match proxy::relay_io(&mut tls, &mut tcp, context.stream_timeouts).await {
        Ok(t) => Ok(Moved {
            to_backend: t.to_tunnel,
            from_backend: t.from_tunnel,
        }),
        Err(e) => {
            proxy::abort_tcp(&tcp);
            abort_tls(&mut tls);
            Err(match e {
                proxy::RelayError::WriteTimeout(_) | proxy::RelayError::IdleTimeout(_) => {
                    e.reason()
                }
                _ => "relay_failed",
            })
        }
    }
}

/// An address as people write it (no IPv4-mapped IPv6 form).
fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Bytes moved between the Visitor side and the Local backend.
#[derive(Debug, Clone, Copy)]
struct Moved {
    to_backend: u64,
    from_backend: u64,
}
