//! The validated configuration the runtime consumes. Every value here was
//! checked at the config seam ([`super::prepare`] then [`super::validate`]);
//! nothing downstream re-parses hostnames, identities or addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::hostname::{PublicHostname, ServerHostname};
use crate::identity::ClientIdentity;
use crate::tls::server_pin::ServerPin;
pub use crate::tunnel::congestion::CongestionControl;

/// `log-level` at the top of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Nothing is logged.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Operational events (the default).
    Info,
    /// Per-connection and per-stream events.
    Debug,
    /// Everything, including library internals.
    Trace,
}

impl LogLevel {
    /// The level's spelling in the config file and in `RUNEWARP_LOG`.
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
    /// `email`: the ACME account contact, if any.
    pub email: Option<String>,
    pub(crate) state_dir: PathBuf,
    /// `directory-url`: the ACME directory (default: Let's Encrypt production).
    pub directory_url: String,
    pub(crate) directory_ca_file: Option<PathBuf>,
}

/// Let's Encrypt production, the default ACME directory.
pub(crate) const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Where the Server certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCertSource {
    /// `cert-dir`: `server.crt`, `server.key`, `server-ca.crt`, `state/`.
    Manual {
        /// The directory.
        cert_dir: PathBuf,
    },
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
    pub(crate) const DEFAULT_WRITE: Duration = Duration::from_secs(30);
    /// `stream-idle-timeout` default (the common edge default).
    pub(crate) const DEFAULT_IDLE: Duration = Duration::from_secs(15 * 60);
    /// Smallest accepted value of either key.
    pub(crate) const MIN: Duration = Duration::from_secs(1);
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
    /// `public-hostnames`: the hostnames this Tunnel serves.
    pub public_hostnames: Vec<PublicHostname>,
    /// `client-identities`: the pins of the Client instances allowed to serve them.
    pub client_identities: Vec<ClientIdentity>,
}

/// A fully prepared and validated Server config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
    /// `log-level`.
    pub log_level: LogLevel,
    /// `server.hostname`: the Server hostname (never routed to a Tunnel).
    pub hostname: ServerHostname,
    /// `public-bind-address`: the TCP listener for Visitors.
    pub public_bind_address: SocketAddr,
    /// `tunnel-bind-address`: the UDP socket for Tunnel connections.
    pub tunnel_bind_address: SocketAddr,
    /// `server.readiness-bind-address`: a TCP listener open while the Server admits work.
    pub readiness_bind_address: Option<SocketAddr>,
    /// `metrics-bind-address`: Prometheus `/metrics` (off when `None`).
    pub metrics_bind_address: Option<SocketAddr>,
    /// `control-socket`: the Unix socket `server status` reads (`None`:
    /// none, when no default location exists).
    pub control_socket: Option<PathBuf>,
    /// `graceful-shutdown-duration`: how long streams may finish after a graceful stop.
    pub graceful_shutdown_duration: Duration,
    /// `stream-write-timeout`, `stream-idle-timeout`.
    pub stream_timeouts: StreamTimeouts,
    /// `server.congestion-control`: for what the Server sends (uploads).
    pub congestion_control: CongestionControl,
    /// Where the Server certificate comes from.
    pub certificates: ServerCertSource,
    /// The `[[server.tunnels]]` entries, in file order.
    pub tunnels: Vec<TunnelConfig>,
    /// `[server.relay]`: the mesh Relay Server, when configured.
    pub relay: Option<RelayServerConfig>,
}

/// `[server.relay]`: the mesh Relay Server (UDP relay and STUN responder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayServerConfig {
    /// `listen`: the UDP address (default `0.0.0.0:3478`).
    pub listen: SocketAddr,
    /// `control-key` (or the file `control-key-file` names): the control
    /// server's Ed25519 public key, which signs the nodes' tokens.
    pub control_key: [u8; 32],
    /// Where `control_key` came from, as the file says it (for rendering).
    pub(crate) control_key_source: RelayKeySource,
}

/// How `[server.relay]` gave the control key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RelayKeySource {
    /// `control-key`.
    Inline,
    /// `control-key-file`.
    File(PathBuf),
}

impl RelayServerConfig {
    /// `listen` when the key is absent.
    pub const DEFAULT_LISTEN: &str = "0.0.0.0:3478";
}

impl ServerConfig {
    /// A Server on loopback ports the system picks, with a manual
    /// certificate from `cert_dir`, a 1 s grace period, log level info and
    /// nothing else (what the demo and the tests run).
    pub fn loopback(
        hostname: ServerHostname,
        cert_dir: PathBuf,
        tunnels: Vec<TunnelConfig>,
    ) -> Self {
        let any_port = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
        ServerConfig {
            source: None,
            log_level: LogLevel::Info,
            hostname,
            public_bind_address: any_port,
            tunnel_bind_address: any_port,
            readiness_bind_address: None,
            metrics_bind_address: None,
            control_socket: None,
            graceful_shutdown_duration: Duration::from_secs(1),
            stream_timeouts: StreamTimeouts::default(),
            congestion_control: Default::default(),
            certificates: ServerCertSource::Manual { cert_dir },
            tunnels,
            relay: None,
        }
    }
}

/// `client.server-address`: a DNS name and a UDP port (default 443).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    /// The Server hostname, also checked against the Server certificate.
    pub host: ServerHostname,
    /// The UDP port.
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
    Manual {
        /// The directory.
        dir: PathBuf,
    },
    /// `[client.acme]`.
    Acme(AcmeConfig),
}

/// `tls-mode` of a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Forward the Visitor's TLS unchanged to the Local backend (the default).
    Passthrough,
    /// Terminate the Visitor's TLS in the Client instance and forward plaintext.
    Terminate,
}

/// `backend-address = "host:port"`. The host may be an IP literal or a DNS
/// name (resolved at connect time); the port is required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddress {
    /// An IP literal or a DNS name.
    pub host: String,
    /// The TCP port.
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
    /// Position in the file (0-based), used in logs as `service=<index>`.
    pub index: usize,
    /// Empty means the sole catch-all Service.
    pub public_hostnames: Vec<PublicHostname>,
    /// `backend-address`: where the Local backend listens.
    pub backend_address: BackendAddress,
    /// `tls-mode`.
    pub tls_mode: TlsMode,
    /// Send a PROXY protocol v2 header to the backend.
    pub proxy_protocol: bool,
}

/// A fully prepared and validated Client instance config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
    /// `log-level`.
    pub log_level: LogLevel,
    /// `client.server-address`.
    pub server_address: ServerAddress,
    /// `server-trust` and its CA file or pin.
    pub server_trust: ServerTrust,
    /// `identity-dir`: the Client identity's certificate and key.
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
    /// The `[[client.services]]` entries, in file order.
    pub services: Vec<ServiceConfig>,
    /// `[client.services.gate]` tables and `[client.smtp]` (Runegate on
    /// terminate Services).
    pub gates: crate::gate::config::ClientGates,
    /// `stream-write-timeout`, `stream-idle-timeout`.
    pub stream_timeouts: StreamTimeouts,
    /// `client.congestion-control`: for what the Client sends (downloads).
    pub congestion_control: CongestionControl,
}
