//! The Client instance: keeps one Tunnel connection to the Server (dialer,
//! reconnect backoff), accepts the streams the Server opens, selects a
//! Service by SNI and forwards to its Local backend, passing TLS through or
//! terminating it.

pub mod backoff;
pub mod dialer;
pub mod service;
pub mod terminate;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use rand::SeedableRng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{BackendAddress, ClientConfig, PublicCertSource, ServiceConfig, TlsMode};
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
}

/// What the stream handlers share.
struct Context {
    services: ServiceTable,
    handlers: Arc<tokio::sync::Semaphore>,
    acceptor: Option<terminate::Acceptor>,
    /// One `backend_unreachable` line per backend per interval.
    backend_errors: RateLimit<String>,
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
        let roots = trust::root_store(&config.server_trust)?;
        let quic = transport::client_config(roots, identity_material, config.congestion_control)?;
        let mut acme = None;
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
                let table = CertificateTable::new(material::load_public_certs(dir)?)?;
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
                Some(terminate::acceptor(Arc::new(table))?)
            }
        };
        let context = Arc::new(Context {
            services: ServiceTable::new(&config.services),
            handlers: Arc::new(tokio::sync::Semaphore::new(STREAM_HANDLERS)),
            acceptor,
            backend_errors: RateLimit::new(BACKEND_ERROR_LOG_INTERVAL),
        });
        Ok(Self {
            dialer: Dialer::new(config.server_address.clone(), &config.server_trust, quic),
            config: Arc::new(config),
            identity,
            context,
            status: tokio::sync::watch::Sender::new(ClientStatus::default()),
            acme,
        })
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
                    if self.status.borrow().connections == 1 {
                        notify::notify(notify::READY);
                    }
                    if acme_tasks.is_none() {
                        // TLS-ALPN-01 validations reach us through the
                        // tunnel: order only once it is up, so a CA does
                        // not count failed validations against us.
                        acme_tasks = self.acme.take().map(AcmeManager::spawn);
                    }
                    let ended = serve(&conn, self.context.clone(), &mut shutdown).await;
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
                            REPLACED_PAUSE
                        }
                        Ended::Lost(error) => {
                            let delay = backoff.next_delay(&mut rng);
                            tracing::info!(event = "tunnel_closed", server = %server, %peer, detail = ?error.to_string(), retry_in_ms = delay.as_millis() as u64);
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
                    delay
                }
            };
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        notify::notify(notify::STOPPING);
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
            tracing::debug!(event = "stream_rejected", reason = "bad_proxy_header", error = ?error.to_string());
            return reject(&mut send, &mut recv, stream_code::BAD_FRAMING);
        }
        Err(_) => {
            tracing::debug!(event = "stream_rejected", reason = "proxy_header_timeout");
            return reject(&mut send, &mut recv, stream_code::BAD_FRAMING);
        }
    };
    let visitor = header.map(|h| h.source);
    let mut hello = Vec::new();
    let deadline = tokio::time::Instant::now() + CLIENT_HELLO_DEADLINE;
    let info = match sni::read_client_hello(&mut recv, &mut hello, deadline).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(event = "stream_rejected", visitor = ?visitor, reason = e.reason());
            return reject(&mut send, &mut recv, stream_code::BAD_FRAMING);
        }
    };
    let hostname = info.server_name.as_deref().map(wire_lookup_key);
    let Some(service) = context.services.select(hostname.as_deref()) else {
        tracing::info!(event = "stream_rejected", hostname = hostname.as_deref().unwrap_or("-"), visitor = ?visitor, reason = "no_service");
        return reject(&mut send, &mut recv, stream_code::NO_SERVICE);
    };
    let host = hostname.as_deref().unwrap_or("-");
    let started = std::time::Instant::now();
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
    addr: &BackendAddress,
    hostname: &str,
) -> Result<TcpStream, &'static str> {
    let connect = TcpStream::connect((addr.host.as_str(), addr.port));
    let (reason, error) = match tokio::time::timeout(BACKEND_CONNECT_DEADLINE, connect).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            return Ok(tcp);
        }
        Ok(Err(error)) => ("backend_unreachable", error.to_string()),
        Err(_) => ("backend_timeout", "connect timed out".to_string()),
    };
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
    let mut tcp = match connect_backend(context, &service.backend_address, hostname).await {
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
    let t = proxy::relay_tcp_stream(&mut tcp, &mut send, &mut recv)
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
    let abort_tls = |tls: &mut tokio_rustls::server::TlsStream<TunnelStream>| {
        let quic = tls.get_mut().0.get_mut();
        let _ = quic.writer_mut().reset(stream_code::ABORTED);
        let _ = quic.reader_mut().stop(stream_code::ABORTED);
    };
    let mut tcp = match connect_backend(context, &service.backend_address, hostname).await {
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
    match proxy::relay_io(&mut tls, &mut tcp).await {
        Ok(t) => Ok(Moved {
            to_backend: t.to_tunnel,
            from_backend: t.from_tunnel,
        }),
        Err(_) => {
            proxy::abort_tcp(&tcp);
            abort_tls(&mut tls);
            Err("relay_failed")
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
