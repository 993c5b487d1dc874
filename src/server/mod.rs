//! The Server: the public listener (Visitor TLS on TCP), the tunnel
//! listener (QUIC from Client instances) and the registry that joins them.

pub mod public_listener;
pub mod registry;
pub mod tunnel_listener;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ServerCertSource, ServerConfig};
use crate::fsutil;
use crate::shutdown::Shutdown;
use crate::tls::material;
use crate::tunnel::transport::{self, TunnelTls, close_code};
use rustls::server::ResolvesServerCert;

pub use registry::Registry;

/// After closing the tunnels, wait at most this long for the close frames
/// to go out.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Material(#[from] material::MaterialError),
    #[error("tunnel TLS: {0}")]
    Transport(#[from] transport::TransportError),
    #[error("cannot bind {what} {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("stateless-reset secret {path}: {error}")]
    ResetSecret {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error(
        "[server.acme] is configured but this build obtains Server certificates from cert-dir only; use cert-dir"
    )]
    AcmeUnavailable,
}

/// A Server whose listeners are bound and ready to run.
pub struct Server {
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    tls: Arc<TunnelTls>,
    public: tokio::net::TcpListener,
    tunnel: quinn::Endpoint,
}

impl Server {
    /// Load material and bind both listeners. Nothing is served until
    /// [`Server::run`].
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let (certificate, state_dir) = match &config.certificates {
            ServerCertSource::Manual { cert_dir } => {
                let cert = material::load_server_certificate(cert_dir)?;
                let fixed: Arc<dyn ResolvesServerCert> =
                    Arc::new(transport::FixedCertificate::new(cert)?);
                (fixed, cert_dir.join("state"))
            }
            ServerCertSource::Acme(_) => return Err(ServerError::AcmeUnavailable),
        };
        let secret = reset_secret(&state_dir)?;
        let registry = Arc::new(Registry::new(&config.tunnels));
        let tls = Arc::new(TunnelTls::new(certificate, registry.pins()));
        let quic = tls.config(None)?;
        let tunnel = transport::endpoint(config.tunnel_bind_address, Some(quic), Some(&secret))
            .map_err(|error| ServerError::Bind {
                what: "tunnel listener (UDP)",
                addr: config.tunnel_bind_address,
                error,
            })?;
        let public = tokio::net::TcpListener::bind(config.public_bind_address)
            .await
            .map_err(|error| ServerError::Bind {
                what: "public listener (TCP)",
                addr: config.public_bind_address,
                error,
            })?;
        Ok(Self {
            config: Arc::new(config),
            registry,
            tls,
            public,
            tunnel,
        })
    }

    pub fn public_addr(&self) -> std::io::Result<SocketAddr> {
        self.public.local_addr()
    }

    pub fn tunnel_addr(&self) -> std::io::Result<SocketAddr> {
        self.tunnel.local_addr()
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Serve until `shutdown` fires, then stop accepting, close every
    /// Tunnel connection with a reason and return.
    pub async fn run(self, shutdown: Shutdown) {
        let Server {
            config,
            registry,
            tls,
            public,
            tunnel,
        } = self;
        tracing::info!(
            event = "server_started",
            hostname = %config.hostname,
            public = %public.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            tunnel = %tunnel.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            tunnels = config.tunnels.len(),
        );
        let public_task = tokio::spawn(public_listener::serve(
            public,
            config.clone(),
            registry.clone(),
            shutdown.clone(),
        ));
        let tunnel_task = tokio::spawn(tunnel_listener::serve(
            tunnel.clone(),
            tls,
            registry.clone(),
            shutdown.clone(),
        ));
        let mut stop = shutdown;
        stop.wait().await;
        public_task.abort();
        tunnel_task.abort();
        tunnel.close(close_code::SHUTDOWN, b"server shutting down");
        let _ = tokio::time::timeout(CLOSE_FLUSH, tunnel.wait_idle()).await;
        tracing::info!(event = "server_stopped");
    }
}

/// File (in the Server's state directory) holding the secret that keys
/// stateless resets; created on first start.
pub const RESET_SECRET_FILE: &str = "stateless-reset.secret";

/// Load the stateless-reset secret, creating it (32 random bytes, mode
/// 0600) on first start.
fn reset_secret(state_dir: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    let path = state_dir.join(RESET_SECRET_FILE);
    let err = |error| ServerError::ResetSecret {
        path: path.clone(),
        error,
    };
    match std::fs::read(&path) {
        Ok(secret) if secret.len() >= 32 => return Ok(secret),
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
