//! The Server: the public listener (Visitor TLS on TCP), the tunnel
//! listener (QUIC from Client instances) and the Tunnel registry
//! ([`tunnels`]) that joins them.

/// An info line about Tunnel connection `$tc`: `event`, the fields that
/// name the connection (Tunnel, identity, peer, id), then `$field`s.
macro_rules! tunnel_info {
    ($tc:expr, $event:literal, $($field:tt)*) => {
        tracing::info!(
            event = $event,
            tunnel = $tc.tunnel,
            identity = %$tc.identity,
            peer = %$tc.peer,
            connection = $tc.id,
            $($field)*
        )
    };
}

pub mod admission;
pub(crate) mod public_listener;
pub mod reload;
pub mod status;
pub(crate) mod tunnel_listener;
pub mod tunnels;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ServerCertSource, ServerConfig};
use crate::fsutil;
use crate::notify;
use crate::readiness;
use crate::shutdown::Shutdown;
use crate::tls::acme::{self, AcmeManager, AcmeSetupError};
use crate::tls::material;
use crate::tunnel::transport::{self, TunnelTls, close_code};
use admission::{Admission, Limits};
use rustls::server::ResolvesServerCert;

pub use tunnels::Registry;

/// After closing the tunnels, wait at most this long for the close frames
/// to go out.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Why the Server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    /// Certificate material could not be loaded.
    Material(#[from] material::MaterialError),
    #[error("tunnel TLS: {0}")]
    /// The Tunnel TLS or QUIC configuration could not be built.
    Transport(#[from] transport::TransportError),
    #[error("cannot bind {what} {addr}: {error}")]
    /// A listener could not be bound.
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address it was to bind.
        addr: SocketAddr,
        /// The underlying error.
        error: std::io::Error,
    },
    #[error("stateless-reset secret {path}: {error}")]
    /// The stateless-reset secret could not be read or created.
    ResetSecret {
        /// Its file.
        path: std::path::PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    #[error("{0}")]
    /// ACME could not be set up.
    Acme(#[from] AcmeSetupError),
}

/// Bind the optional TCP listener `what` at `addr`, if one is configured.
async fn bind_optional(
    addr: Option<SocketAddr>,
    what: &'static str,
) -> Result<Option<tokio::net::TcpListener>, ServerError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr).await;
    let bound = listener.map_err(|error| ServerError::Bind { what, addr, error })?;
    Ok(Some(bound))
}

/// Reads the config again (same file and overlays) for a reload.
pub(crate) type Reloader =
    Box<dyn Fn() -> Result<ServerConfig, crate::config::ConfigError> + Send + Sync>;

/// A Server whose listeners are bound and ready to run.
pub struct Server {
    reloader: Option<Reloader>,
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    tls: Arc<TunnelTls>,
    admission: Arc<Admission>,
    public: tokio::net::TcpListener,
    readiness: Option<tokio::net::TcpListener>,
    metrics: Option<tokio::net::TcpListener>,
    control: Option<crate::control_socket::ControlSocket>,
    tunnel: quinn::Endpoint,
    /// `[server.acme]`: the certificate manager (started by `run`) and the
    /// config answering TLS-ALPN-01 validations on the public listener.
    acme: Option<(AcmeManager, Arc<rustls::ServerConfig>)>,
    /// `[server.relay]`: the mesh Relay Server's bound socket.
    relay: Option<crate::relay_server::RelayServer>,
}

impl Server {
    /// Load material and bind both listeners. Nothing is served until
    /// [`Server::run`].
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        Self::bind_with_limits(config, Limits::default()).await
    }

    /// [`Server::bind`] with other admission limits (for tests: production
    /// always uses [`Limits::default`]).
    #[doc(hidden)]
    pub async fn bind_with_limits(
        config: ServerConfig,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        let mut server_not_after = None;
        let (certificate, state_dir, acme) = match &config.certificates {
            ServerCertSource::Manual { cert_dir } => {
                let cert = material::load_server_certificate(cert_dir)?;
                server_not_after = cert
                    .chain
                    .first()
                    .and_then(|c| crate::metrics::not_after(c));
                let fixed: Arc<dyn ResolvesServerCert> =
                    Arc::new(transport::FixedCertificate::new(cert)?);
                (fixed, cert_dir.join("state"), None)
            }
            ServerCertSource::Acme(acme_config) => {
                let (resolver, manager, challenge) = acme_certificate(&config, acme_config)?;
                (
                    resolver,
                    acme_config.state_dir.clone(),
                    Some((manager, challenge)),
                )
            }
        };
        let secret = reset_secret(&state_dir)?;
        let registry = Arc::new(Registry::new(&config.tunnels));
        let tls = Arc::new(TunnelTls::new(
            certificate,
            registry.pins(),
            config.congestion_control,
        ));
        let quic = tls.config(None)?;
        let tunnel = transport::endpoint(config.tunnel_bind_address, Some(quic), Some(&secret))
            .map_err(|error| ServerError::Bind {
                what: "tunnel listener (UDP)",
                addr: config.tunnel_bind_address,
                error,
            })?;
        let public = listen(config.public_bind_address).map_err(|error| ServerError::Bind {
            what: "public listener (TCP)",
            addr: config.public_bind_address,
            error,
        })?;
        let readiness =
            bind_optional(config.readiness_bind_address, "readiness listener (TCP)").await?;
        let metrics = bind_optional(config.metrics_bind_address, "metrics listener (TCP)").await?;
        let relay =
            match &config.relay {
                Some(r) => Some(crate::relay_server::RelayServer::bind(r).await.map_err(
                    |error| ServerError::Bind {
                        what: "relay (UDP)",
                        addr: r.listen,
                        error,
                    },
                )?),
                None => None,
            };
        let control = config
            .control_socket
            .as_deref()
            .and_then(|path| crate::control_socket::ControlSocket::bind(path, "server"));
        let admission = Admission::new(limits, config.tunnels.len());
        admission.attach_metrics(registry.metrics().clone());
        if let Some(not_after) = server_not_after {
            registry
                .metrics()
                .certificate_expiry(config.hostname.as_str(), not_after);
        }
        Ok(Self {
            reloader: None,
            config: Arc::new(config),
            registry,
            tls,
            admission,
            public,
            readiness,
            metrics,
            control,
            tunnel,
            acme,
            relay,
        })
    }

    /// Re-read the config with `reloader` on SIGHUP.
    pub(crate) fn with_reloader(mut self, reloader: Reloader) -> Self {
        self.reloader = Some(reloader);
        self
    }

    /// The bound metrics address, if the metrics listener runs.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|r| r.local_addr().ok())
    }

    /// The bound public listener address.
    pub fn public_addr(&self) -> std::io::Result<SocketAddr> {
        self.public.local_addr()
    }

    /// The bound tunnel listener address.
    pub fn tunnel_addr(&self) -> std::io::Result<SocketAddr> {
        self.tunnel.local_addr()
    }

    /// The Tunnel registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The bound readiness address, if the readiness listener runs.
    pub fn readiness_addr(&self) -> Option<SocketAddr> {
        self.readiness.as_ref().and_then(|r| r.local_addr().ok())
    }

    /// The admission limits.
    pub fn admission(&self) -> Arc<Admission> {
        self.admission.clone()
    }

    /// Serve until `shutdown` asks to stop. A graceful stop stops
    /// admitting new work at once, lets established streams finish within
    /// `graceful-shutdown-duration` (a fast stop cuts that short), then
    /// closes every Tunnel connection with a reason and returns.
    pub async fn run(self, shutdown: Shutdown) {
        let Server {
            reloader,
            config,
            registry,
            tls,
            admission,
            public,
            readiness,
            metrics,
            control,
            tunnel,
            acme,
            relay,
        } = self;
        let started = std::time::SystemTime::now();
        let (_acme_tasks, challenge) = match acme {
            Some((manager, challenge)) => (Some(manager.spawn()), Some(challenge)),
            None => (None, None),
        };
        tracing::info!(
            event = "server_started",
            hostname = %config.hostname,
            public = %public.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            tunnel = %tunnel.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            readiness = %readiness.as_ref().and_then(|r| r.local_addr().ok()).map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            metrics = %metrics.as_ref().and_then(|r| r.local_addr().ok()).map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            control = %control.as_ref().map(|c| c.path().display().to_string()).unwrap_or_else(|| "-".into()),
            tunnels = config.tunnels.len(),
            congestion_control = %config.congestion_control,
        );
        let monitor = tokio::spawn(admission.clone().monitor());
        let ready_task = readiness.map(|listener| {
            tokio::spawn(readiness::serve(listener, admission.admitting(), |a| *a))
        });
        let reload_task = reloader.map(|r| {
            tokio::spawn(reload::on_sighup(
                r,
                config.clone(),
                registry.clone(),
                tls.clone(),
            ))
        });
        let _control = control.and_then(|c| {
            let (config, registry) = (config.clone(), registry.clone());
            c.serve(std::sync::Arc::new(move || {
                status::snapshot(&config, &registry, started)
            }))
        });
        let metrics_task = metrics.map(|listener| {
            let m = registry.metrics().clone();
            crate::metrics::spawn_listener(listener, Arc::new(move || m.render()))
        });
        let relay_tcp = relay.as_ref().map(|r| r.tcp_handoff());
        let relay_task = relay.map(|r| tokio::spawn(r.run(shutdown.clone())));
        let public_task = tokio::spawn(public_listener::serve(
            public,
            config.clone(),
            registry.clone(),
            admission.clone(),
            shutdown.clone(),
            challenge,
            relay_tcp,
        ));
        let tunnel_task = tokio::spawn(tunnel_listener::serve(
            tunnel.clone(),
            tls,
            registry.clone(),
            admission.clone(),
            shutdown.clone(),
        ));
        notify::notify(notify::READY);

        let mut stop = shutdown;
        stop.wait().await;
        // Stop admitting: readiness closes, the public listener and the
        // tunnel listener stop accepting, Visitors still in their
        // ClientHello are dropped.
        notify::notify(notify::STOPPING);
        admission.close();
        public_task.abort();
        tunnel_task.abort();
        if let Some(t) = relay_task {
            t.abort();
        }
        tunnel.set_server_config(None);
        if let Some(t) = ready_task {
            t.abort();
        }
        let window = config.graceful_shutdown_duration;
        let in_flight = admission.routed_in_flight();
        if in_flight > 0 {
            // A person at a terminal pressed Ctrl-C and sees nothing happen
            // for up to the whole window: say what is going on, once.
            tracing::info!(
                event = "server_draining",
                streams_in_flight = in_flight,
                window_ms = window.as_millis() as u64,
                hint = %format!(
                    "letting {in_flight} open streams finish for up to {} s; press Ctrl-C again (or send SIGTERM) to stop now",
                    window.as_secs_f64().ceil()
                ),
            );
        } else {
            tracing::info!(
                event = "server_draining",
                streams_in_flight = in_flight,
                window_ms = window.as_millis() as u64
            );
        }
        let drained = tokio::select! {
            _ = stop.wait_fast() => false,
            drained = admission.routed_drained(window) => drained,
        };
        monitor.abort();
        if let Some(t) = reload_task {
            t.abort();
        }
        if let Some(t) = metrics_task {
            t.abort();
        }
        let left = admission.routed_in_flight();
        tunnel.close(close_code::SHUTDOWN, b"server shutting down");
        let _ = tokio::time::timeout(CLOSE_FLUSH, tunnel.wait_idle()).await;
        tracing::info!(event = "server_stopped", drained, streams_cut = left);
    }
}

/// Accept queue of the public listener. A burst of connections beyond it
/// has SYNs dropped and retried by the kernel after a second, good
/// Visitors' included; the kernel caps it at `net.core.somaxconn` (4,096
/// by default since Linux 5.4).
const PUBLIC_BACKLOG: u32 = 4096;

/// Bind the public listener (`SO_REUSEADDR`, as tokio's `bind` does).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(PUBLIC_BACKLOG)
}

/// File (in the Server's state directory) holding the secret that keys
/// stateless resets; created on first start.
pub(crate) const RESET_SECRET_FILE: &str = "stateless-reset.secret";

/// Load the stateless-reset secret, creating it (32 random bytes, mode
/// 0600) on first start.
/// `[server.acme]`: the resolver the tunnel listener presents (the ACME
/// certificate for the Server hostname, renewals included), the manager to
/// start in `run`, and the config answering TLS-ALPN-01 validations on the
/// public listener.
#[allow(clippy::type_complexity)]
fn acme_certificate(
    config: &ServerConfig,
    acme_config: &crate::config::AcmeConfig,
) -> Result<
    (
        Arc<dyn ResolvesServerCert>,
        AcmeManager,
        Arc<rustls::ServerConfig>,
    ),
    ServerError,
> {
    let hostname = config.hostname.as_str().to_string();
    let manager = AcmeManager::new(
        "server",
        "server.acme",
        acme_config,
        std::slice::from_ref(&hostname),
    )?;
    let resolver = manager.resolver();
    let single: Arc<dyn ResolvesServerCert> =
        Arc::new(resolver.single(&hostname).expect("hostname is managed"));
    let challenge = acme::challenge_config(resolver).map_err(AcmeSetupError::Tls)?;
    if config.public_bind_address.port() != 443 {
        tracing::warn!(
            event = "acme_public_port",
            public = %config.public_bind_address,
            hint = "ACME CAs validate TLS-ALPN-01 on port 443; forward 443 to this listener",
        );
    }
    Ok((single, manager, challenge))
}

fn reset_secret(state_dir: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    let path = state_dir.join(RESET_SECRET_FILE);
    let err = |error| ServerError::ResetSecret {
        path: path.clone(),
        error,
    };
    fsutil::check_not_symlink(state_dir).map_err(err)?;
    match std::fs::read(&path) {
        Ok(secret) if secret.len() >= 32 => {
            fsutil::warn_if_exposed(&path, "stateless-reset secret");
            return Ok(secret);
        }
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "shorter than 32 bytes; delete it to have a new one created",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut secret = vec![0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| err(std::io::Error::other("no randomness available")))?;
    fsutil::create_dir_private(state_dir, fsutil::STATE_DIR_MODE).map_err(err)?;
    match fsutil::write_new_atomic(&path, &secret, fsutil::KEY_MODE) {
        Ok(()) => Ok(secret),
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::read(&path).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}
