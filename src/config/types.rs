//! The validated configuration the runtime consumes. Every value here was
//! checked at the config seam ([`super::prepare`] then [`super::validate`]);
//! nothing downstream re-parses hostnames, identities or addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::hostname::{PublicHostname, ServerHostname};
use crate::tls::client_identity::ClientIdentity;
use crate::tls::server_pin::ServerPin;
pub use crate::tunnel::congestion::CongestionControl;

/// `log-level` at the top of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// ACME settings, shared by `[server.acme]` and `[client.acme]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    pub email: Option<String>,
    pub state_dir: PathBuf,
    pub directory_url: String,
    pub directory_ca_file: Option<PathBuf>,
}

/// Let's Encrypt production, the default ACME directory.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Where the Server certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCertSource {
    /// `cert-dir`: `server.crt`, `server.key`, `server-ca.crt`, `state/`.
    Manual { cert_dir: PathBuf },
    /// `[server.acme]`.
    Acme(AcmeConfig),
}

/// `stream-write-timeout` and `stream-idle-timeout`, in `[server]` and in
/// `[client]`: the deadlines of every relayed stream on that side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTimeouts {
    /// A relay direction that cannot write a single byte for this long
    /// resets the stream both ways.
    pub write: Duration,
    /// A stream that moves no byte either way for this long is closed.
    pub idle: Duration,
}

impl StreamTimeouts {
    /// `stream-write-timeout` default.
    pub const DEFAULT_WRITE: Duration = Duration::from_secs(30);
    /// `stream-idle-timeout` default (the common edge default).
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(15 * 60);
    /// Smallest accepted value of either key.
    pub const MIN: Duration = Duration::from_secs(1);
    /// Largest accepted value of either key.
    pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);
}

impl Default for StreamTimeouts {
    fn default() -> Self {
        Self {
            write: Self::DEFAULT_WRITE,
            idle: Self::DEFAULT_IDLE,
        }
    }
}

/// One `[[server.tunnels]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// Position in the file (0-based), used in logs as `tunnel=<index>`.
    pub index: usize,
    pub public_hostnames: Vec<PublicHostname>,
    pub client_identities: Vec<ClientIdentity>,
}

/// A fully prepared and validated Server config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
    pub log_level: LogLevel,
    pub hostname: ServerHostname,
    pub public_bind_address: SocketAddr,
    pub tunnel_bind_address: SocketAddr,
    pub readiness_bind_address: Option<SocketAddr>,
    /// `metrics-bind-address`: Prometheus `/metrics` (off when `None`).
    pub metrics_bind_address: Option<SocketAddr>,
    /// `control-socket`: the Unix socket `server status` reads (`None`:
    /// none, when no default location exists).
    pub control_socket: Option<PathBuf>,
    pub graceful_shutdown_duration: Duration,
    /// `stream-write-timeout`, `stream-idle-timeout`.
    pub stream_timeouts: StreamTimeouts,
    /// `server.congestion-control`: for what the Server sends (uploads).
    pub congestion_control: CongestionControl,
    pub certificates: ServerCertSource,
    pub tunnels: Vec<TunnelConfig>,
}

/// `client.server-address`: a DNS name and a UDP port (default 443).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    pub host: ServerHostname,
    pub port: u16,
}

impl std::fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// How the Client validates the Server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// The operating system's roots.
    System,
    /// Exactly the CAs in this PEM bundle, nothing else.
    CaFile(PathBuf),
    /// No CA: the Server certificate's public key must have this pin.
    Pin(ServerPin),
}

/// Where terminate-mode certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicCertSource {
    /// `public-cert-dir`: `public-ca.crt`, `<hostname>/public.{crt,key}`.
    Manual { dir: PathBuf },
    /// `[client.acme]`.
    Acme(AcmeConfig),
}

/// `tls-mode` of a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Passthrough,
    Terminate,
}

/// `backend-address = "host:port"`. The host may be an IP literal or a DNS
/// name (resolved at connect time); the port is required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddress {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One `[[client.services]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub index: usize,
    /// Empty means the sole catch-all Service.
    pub public_hostnames: Vec<PublicHostname>,
    pub backend_address: BackendAddress,
    pub tls_mode: TlsMode,
    /// Send a PROXY protocol v2 header to the backend.
    pub proxy_protocol: bool,
}

/// A fully prepared and validated Client instance config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub source: Option<PathBuf>,
    pub log_level: LogLevel,
    pub server_address: ServerAddress,
    pub server_trust: ServerTrust,
    pub identity_dir: PathBuf,
    /// `Some` only when at least one Service terminates.
    pub public_certs: Option<PublicCertSource>,
    /// `client.readiness-bind-address`: a TCP listener open only while the
    /// Tunnel connection is up.
    pub readiness_bind_address: Option<SocketAddr>,
    /// `metrics-bind-address`: Prometheus `/metrics` (off when `None`).
    pub metrics_bind_address: Option<SocketAddr>,
    /// `control-socket`: the Unix socket `client status` reads.
    pub control_socket: Option<PathBuf>,
    pub services: Vec<ServiceConfig>,
    /// `[client.services.gate]` tables and `[client.smtp]` (Runegate on
    /// terminate Services).
    pub gates: crate::gate::config::ClientGates,
    /// `stream-write-timeout`, `stream-idle-timeout`.
    pub stream_timeouts: StreamTimeouts,
    /// `client.congestion-control`: for what the Client sends (downloads).
    pub congestion_control: CongestionControl,
}
