//! The Server: the public listener (Visitor TLS on TCP), the tunnel
//! listener (QUIC from Client instances) and the registry that joins them.

pub mod public_listener;
pub mod registry;
pub mod tunnel_listener;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ServerCertSource, ServerConfig};
use crate::shutdown::Shutdown;
use crate::tls::acme::{self, AcmeManager, AcmeSetupError};
use crate::tls::material;
use crate::tunnel::transport::{self, close_code};

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
    #[error("{0}")]
    Acme(#[from] AcmeSetupError),
}

/// A Server whose listeners are bound and ready to run.
pub struct Server {
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    public: tokio::net::TcpListener,
    tunnel: quinn::Endpoint,
    /// `[server.acme]`: the certificate manager (started by `run`) and the
    /// config answering TLS-ALPN-01 validations on the public listener.
    acme: Option<(AcmeManager, Arc<rustls::ServerConfig>)>,
}

impl Server {
    /// Load material and bind both listeners. Nothing is served until
    /// [`Server::run`].
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let registry = Arc::new(Registry::new(&config.tunnels));
        let (quic, acme) = match &config.certificates {
            ServerCertSource::Manual { cert_dir } => {
                let cert = material::load_server_certificate(cert_dir)?;
                (transport::server_config(cert, registry.pins())?, None)
            }
            ServerCertSource::Acme(acme_config) => {
                let hostname = config.hostname.as_str().to_string();
                let manager = AcmeManager::new(
                    "server",
                    "server.acme",
                    acme_config,
                    std::slice::from_ref(&hostname),
                )?;
                let resolver = manager.resolver();
                let single = Arc::new(resolver.single(&hostname).expect("hostname is managed"));
                let challenge = acme::challenge_config(resolver).map_err(AcmeSetupError::Tls)?;
                if config.public_bind_address.port() != 443 {
                    tracing::warn!(
                        event = "acme_public_port",
                        public = %config.public_bind_address,
                        hint = "ACME CAs validate TLS-ALPN-01 on port 443; forward 443 to this listener",
                    );
                }
                let quic = transport::server_config_with_resolver(single, registry.pins())?;
                (quic, Some((manager, challenge)))
            }
        };
        let tunnel =
            transport::endpoint(config.tunnel_bind_address, Some(quic), None).map_err(|error| {
                ServerError::Bind {
                    what: "tunnel listener (UDP)",
                    addr: config.tunnel_bind_address,
                    error,
                }
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
            public,
            tunnel,
            acme,
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
            public,
            tunnel,
            acme,
        } = self;
        let (_acme_tasks, challenge) = match acme {
            Some((manager, challenge)) => (Some(manager.spawn()), Some(challenge)),
            None => (None, None),
        };
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
            challenge,
        ));
        let tunnel_task = tokio::spawn(tunnel_listener::serve(
            tunnel.clone(),
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
