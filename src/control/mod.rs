//! The mesh control plane (seed 000: Runetale's User Management Server):
//! `runewarp control`. It enrols devices (setup keys, or SSO sign-in),
//! collects each device's WireGuard public key (the private key never
//! leaves the device), assigns addresses from the organisation's block and
//! pushes every device its network map — peers and packet filter, after
//! the organisation's ACL policy — within a fraction of a second of a
//! change. Devices of different organisations never learn of each other.
//!
//! Pieces: [`config`] (the `[control]` file), [`store`] (the state) over
//! [`db`] (SQLite, or PostgreSQL shared by several replicas),
//! [`policy`] (ACLs), [`netmap`] (what one device is told), [`api`] (the
//! HTTPS API), [`admin`] (the operator's commands).

pub mod admin;
pub mod api;
pub mod config;
pub mod db;
pub mod netmap;
pub mod oidc;
pub mod policy;
pub mod relay_tokens;
pub mod store;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::shutdown::Shutdown;
use crate::tls::material::{self, MaterialError};
pub use config::ControlConfig;
use store::{Store, StoreError};

/// The API's certificate material, under the state dir (made on first
/// start; devices trust `tls/server-ca.crt`).
pub const TLS_DIR: &str = "tls";
/// How often the server looks for changes made by admin commands (SQLite:
/// another process's change has no other way in).
const CHANGE_POLL: Duration = Duration::from_millis(100);
/// On PostgreSQL changes arrive by `LISTEN`; the poll only covers
/// notifications lost while the listening connection was down.
const CHANGE_POLL_LISTENING: Duration = Duration::from_millis(1500);
/// How often expired device logins are looked for.
const EXPIRY_POLL: Duration = Duration::from_secs(1);
/// A TLS handshake must finish within this time.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 16_384;
/// HTTP/2 requests in flight on one connection (a device needs two or
/// three: its map stream, a signal, an endpoint update).
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// Why the control server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The database could not be opened.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The API certificate could not be made or loaded.
    #[error("{0}")]
    Material(#[from] MaterialError),
    /// rustls refused the certificate.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// `[control.oidc]` could not be set up.
    #[error("{0}")]
    Oidc(#[from] oidc::OidcSetupError),
    /// The relay signing key could not be made or read.
    #[error("{0}")]
    RelayKey(String),
    /// The API address could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// `listen-address`.
        addr: SocketAddr,
        /// What the bind returned.
        error: std::io::Error,
    },
}

/// A control server ready to run: database open, certificate loaded,
/// listener bound.
pub struct Control {
    config: ControlConfig,
    store: Arc<Mutex<Store>>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    oidc: Option<Arc<oidc::Oidc>>,
    relays: Option<relay_tokens::Issuer>,
}

/// Stops the `LISTEN` thread when the server stops.
struct StopListening(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopListening {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Open the store, make the API certificate on first start, bind.
pub async fn start(config: ControlConfig) -> Result<Control, ControlError> {
    let (engine, target) = config.database_summary();
    let store = Store::connect(&config.database, &config.state_dir)?;
    tracing::info!(event = "control_database", engine, target = %target);
    let oidc = match &config.oidc {
        Some(o) => Some(Arc::new(oidc::Oidc::new(&config, o)?)),
        None => None,
    };
    let tls_dir = config.state_dir.join(TLS_DIR);
    if !tls_dir.join("server.crt").exists() {
        material::init_server_cert(&tls_dir, &config.hostname, false)?;
        tracing::info!(event = "control_certificate_created", ca_file = %tls_dir.join("server-ca.crt").display(), hostname = %config.hostname);
    }
    let tls = material::load_server_certificate(&tls_dir)?;
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(tls.chain, tls.key)?;
    // HTTP/2 first: a device keeps its map stream and its requests on one
    // connection. HTTP/1.1 stays for curl and simple clients.
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let relays = if config.relays.is_empty() {
        None
    } else {
        let key =
            relay_tokens::load_or_create(&config.state_dir).map_err(ControlError::RelayKey)?;
        tracing::info!(event = "control_relays", relays = config.relays.len(), key = %relay_tokens::public_key_text(&key));
        Some(relay_tokens::Issuer::new(key, config.relays.clone()))
    };
    let listener = TcpListener::bind(config.listen_address)
        .await
        .map_err(|error| ControlError::Bind {
            addr: config.listen_address,
            error,
        })?;
    Ok(Control {
        config,
        store: Arc::new(Mutex::new(store)),
        listener,
        acceptor: TlsAcceptor::from(Arc::new(server)),
        oidc,
        relays,
    })
}

/// Serve until `shutdown`.
pub async fn run(control: Control, mut shutdown: Shutdown) {
    // The API is bound and the database open (`start`): ready for systemd.
    crate::notify::notify(crate::notify::READY);
    let Control {
        config,
        store,
        listener,
        acceptor,
        oidc,
        relays,
    } = control;
    let first = crate::sync::lock(&store).serial().unwrap_or(0);
    let (serial_tx, serial_rx) = tokio::sync::watch::channel(first);
    let changed = Arc::new(tokio::sync::Notify::new());
    let stop_listening = StopListening(Arc::default());
    let poll = match &config.database {
        config::Database::Sqlite => CHANGE_POLL,
        config::Database::Postgres(url) => {
            match db::listen(url.clone(), changed.clone(), stop_listening.0.clone()) {
                Ok(_) => CHANGE_POLL_LISTENING,
                Err(e) => {
                    tracing::error!(event = "database_listen_failed", error = %e);
                    CHANGE_POLL
                }
            }
        }
    };
    let watcher = {
        let store = store.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut next_expiry = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(poll.min(EXPIRY_POLL)) => {}
                    _ = changed.notified() => {}
                }
                // Device keys whose login expired leave their peers' maps.
                if tokio::time::Instant::now() >= next_expiry {
                    next_expiry = tokio::time::Instant::now() + EXPIRY_POLL;
                    let at = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0);
                    match crate::sync::lock(&store).expire_logins(at) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(event = "device_logins_expired", devices = n),
                        Err(e) => tracing::error!(event = "store_failed", error = %e),
                    }
                }
                let now = crate::sync::lock(&store).serial();
                match now {
                    Ok(s) => {
                        serial_tx.send_if_modified(|v| {
                            let changed = *v != s;
                            *v = s;
                            changed
                        });
                    }
                    Err(e) => tracing::error!(event = "store_failed", error = %e),
                }
            }
        })
    };
    let sso = oidc.is_some();
    let mut api = api::Api::new(
        store,
        serial_rx,
        shutdown.clone(),
        Arc::new(config.clone()),
        oidc,
    );
    if let Some(issuer) = relays {
        api = api.with_relays(issuer);
    }
    let api = Arc::new(api);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tracing::info!(event = "control_started", listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), hostname = %config.hostname, state_dir = %config.state_dir.display(), sso);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(event = "accept_failed", error = %e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let (acceptor, api) = (acceptor.clone(), api.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                _ => return,
            };
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.handle(peer, req).await) }
            });
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .keep_alive_interval(Some(Duration::from_secs(30)));
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
    watcher.abort();
    drop(stop_listening);
    tracing::info!(event = "control_stopped");
}
