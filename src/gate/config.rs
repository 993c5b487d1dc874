//! The validated `[gate]` configuration (the config seam's output for
//! Runegate). Every value here was checked once by
//! `crate::config::load_gate`; the gate never re-parses addresses, URLs or
//! mail addresses.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{BackendAddress, LogLevel};
use crate::hostname::ServerHostname;

/// The reserved path prefix of the gate's own pages; requests under it never
/// reach the upstream.
pub const GATE_PATH_PREFIX: &str = "/_runewarp/gate/";

/// Default `gate.listen-address`: loopback, behind a TLS-terminating proxy.
pub const DEFAULT_LISTEN_ADDRESS: &str = "127.0.0.1:7870";
/// Default `gate.link-ttl`.
pub const DEFAULT_LINK_TTL: Duration = Duration::from_secs(10 * 60);
/// Default `gate.session-ttl` (absolute lifetime of a session).
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Default `gate.session-idle` (a session unused this long ends).
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(3600);

/// `gate.base-url`: the public origin Visitors use, `https://host[:port]`
/// (`http://` only for a loopback host, for local trials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub https: bool,
    /// Lowercase host: a DNS name, an IPv4 literal or a bracketed IPv6 literal.
    pub host: String,
    /// `None` when it is the scheme's default port.
    pub port: Option<u16>,
}

impl BaseUrl {
    /// `host[:port]`, the value a browser sends in `Host`.
    pub fn authority(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }
    pub fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.authority())
    }
}

/// One `gate.trusted-proxies` entry: an address or a CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// The network address (host bits cleared).
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies inside the block. An IPv4-mapped IPv6 address
    /// matches IPv4 blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_v4(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_v6(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

pub(crate) fn mask_v4(bits: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - u32::from(prefix)))
    }
}

pub(crate) fn mask_v6(bits: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - u32::from(prefix)))
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A mail address as the gate compares them: `local@domain`, the domain
/// lowercased (the local part is kept as written but compared
/// case-insensitively, as every large provider does).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EmailAddress(String);

impl EmailAddress {
    /// Parse a bare address (`alice@example.com`). Rejects display names,
    /// whitespace, control characters and anything without exactly one `@`
    /// between a non-empty local part and a valid DNS domain.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if raw.len() > 254 {
            return Err("a mail address is at most 254 characters".to_string());
        }
        let Some((local, domain)) = raw.rsplit_once('@') else {
            return Err("expected a mail address such as \"alice@example.com\"".to_string());
        };
        if local.is_empty() || local.len() > 64 {
            return Err("the part before '@' must be 1 to 64 characters".to_string());
        }
        let bad = |c: char| {
            c.is_whitespace()
                || c.is_control()
                || matches!(
                    c,
                    '@' | '<' | '>' | '(' | ')' | ',' | ';' | ':' | '"' | '\\'
                )
        };
        if local.chars().any(bad) || !local.is_ascii() {
            return Err(
                "the part before '@' may not contain spaces, quotes, brackets or any of @<>(),;:\\"
                    .to_string(),
            );
        }
        let domain = ServerHostname::parse(domain)
            .map_err(|e| format!("the domain after '@' is not valid: {e}"))?;
        if !domain.as_str().contains('.') {
            return Err("the domain after '@' must have at least two labels".to_string());
        }
        Ok(EmailAddress(format!("{local}@{domain}")))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The lowercased address, the key sessions and rate limits use.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
    /// The domain (already lowercase).
    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who may sign in: `gate.allowed-emails` and `gate.allowed-domains`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowList {
    pub emails: Vec<EmailAddress>,
    /// Exact domains: `example.com` allows `a@example.com`, not
    /// `a@sub.example.com`.
    pub domains: Vec<ServerHostname>,
}

impl AllowList {
    pub fn allows(&self, address: &EmailAddress) -> bool {
        let key = address.key();
        self.emails.iter().any(|e| e.key() == key)
            || self.domains.iter().any(|d| d.as_str() == address.domain())
    }
}

/// `gate.smtp.tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (required, never optional).
    StartTls,
    /// TLS from the first byte (SMTPS).
    Implicit,
    /// No TLS at all; only allowed for a loopback host.
    None,
}

impl SmtpTls {
    pub fn as_str(self) -> &'static str {
        match self {
            SmtpTls::StartTls => "starttls",
            SmtpTls::Implicit => "implicit",
            SmtpTls::None => "none",
        }
    }
    /// The usual port for this mode.
    pub fn default_port(self) -> u16 {
        match self {
            SmtpTls::StartTls => 587,
            SmtpTls::Implicit => 465,
            SmtpTls::None => 25,
        }
    }
}

/// `[gate.smtp]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// A DNS name or an IP literal (unbracketed).
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// `username` and `password-file`, always both or neither.
    pub credentials: Option<SmtpCredentials>,
    /// The sender: a bare address, optionally with a display name.
    pub from: MailFrom,
    /// Extra trust roots (PEM) for the mail server's certificate, besides
    /// the system's: for a relay with a private CA.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpCredentials {
    pub username: String,
    /// Read at start, never logged.
    pub password_file: PathBuf,
}

/// `gate.smtp.from`: `addr@example.com` or `Name <addr@example.com>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    pub name: Option<String>,
    pub address: EmailAddress,
}

impl fmt::Display for MailFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n} <{}>", self.address),
            None => write!(f, "{}", self.address),
        }
    }
}

/// A fully prepared and validated `[gate]` config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateConfig {
    pub source: Option<PathBuf>,
    pub log_level: LogLevel,
    pub listen_address: SocketAddr,
    /// `gate.upstream = "http://host:port"`: the private app.
    pub upstream: BackendAddress,
    pub base_url: BaseUrl,
    pub trusted_proxies: Vec<IpNet>,
    pub sign_in: SignIn,
    pub smtp: SmtpConfig,
}

/// Who may sign in, how long links and sessions last, and where the
/// sessions are kept: the keys a standalone `[gate]` and a
/// `[client.services.gate]` share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignIn {
    pub allowed: AllowList,
    pub link_ttl: Duration,
    pub session_ttl: Duration,
    pub session_idle: Duration,
    /// `Some` → `__Secure-runegate` with this Domain; `None` → host-only
    /// `__Host-runegate`.
    pub cookie_domain: Option<ServerHostname>,
    pub state_dir: PathBuf,
}

/// One `[client.services.gate]`: the gate in front of a terminate Service,
/// inside the Client instance. The Service's backend is the upstream; the
/// Visitor's address comes from the PROXY v2 header the Server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceGate {
    /// Index of the Service (`client.services[service]`).
    pub service: usize,
    /// `base-url`, by default `https://` and the first non-wildcard Public
    /// hostname.
    pub base_url: BaseUrl,
    pub sign_in: SignIn,
}

/// The gates of a Client instance and the mail relay they share
/// (`[client.smtp]`, present exactly when some Service has a gate).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientGates {
    pub smtp: Option<SmtpConfig>,
    pub services: Vec<ServiceGate>,
}

impl ClientGates {
    /// The gate of Service `index`, as a full [`GateConfig`] for the shared
    /// implementation (no listener of its own, no trusted proxies).
    pub fn gate_config(
        &self,
        gate: &ServiceGate,
        upstream: BackendAddress,
        log_level: LogLevel,
    ) -> Option<GateConfig> {
        Some(GateConfig {
            source: None,
            log_level,
            listen_address: SocketAddr::from(([0, 0, 0, 0], 0)),
            upstream,
            base_url: gate.base_url.clone(),
            trusted_proxies: Vec::new(),
            sign_in: gate.sign_in.clone(),
            smtp: self.smtp.clone()?,
        })
    }
}
