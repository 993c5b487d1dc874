//! The dialer: resolves `server-address` and establishes the Tunnel
//! connection, racing the resolved addresses (staggered, first handshake
//! wins) so a dead address family cannot stall the Client.
//!
//! Testing aid: the environment variable [`RESOLVE_ENV`]
//! (`RUNEWARP_RESOLVE="name=ip[,name=ip...]"`) pins `server-address` names
//! to addresses without DNS, like `curl --resolve`. It exists so tests can
//! use a real DNS name (one an ACME CA will issue for) on loopback without
//! editing `/etc/hosts`; it is not meant for production use.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::task::JoinSet;

use crate::config::{ServerAddress, ServerTrust};
use crate::tunnel::transport::{self, HANDSHAKE_DEADLINE};

/// Testing aid: `name=ip[,name=ip...]` overrides DNS for those names.
pub const RESOLVE_ENV: &str = "RUNEWARP_RESOLVE";

/// The address [`RESOLVE_ENV`] pins `host` to, if any.
fn resolve_override(host: &str) -> Option<IpAddr> {
    let spec = std::env::var(RESOLVE_ENV).ok()?;
    spec.split(',').find_map(|pair| {
        let (name, ip) = pair.trim().split_once('=')?;
        (name.trim().eq_ignore_ascii_case(host))
            .then(|| ip.trim().parse().ok())
            .flatten()
    })
}

/// Delay before trying the next resolved address.
const STAGGER: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
/// Why a dial attempt failed.
pub enum DialError {
    #[error("cannot resolve {address}: {error}")]
    /// DNS resolution of `server-address` failed.
    Resolve {
        /// The `server-address` as configured.
        address: String,
        /// What the resolver returned.
        error: std::io::Error,
    },
    #[error("{address} resolved to no addresses")]
    /// Resolution succeeded but gave no address.
    #[allow(missing_docs)]
    NoAddresses { address: String },
    #[error("cannot create a UDP socket: {0}")]
    /// No UDP socket could be created.
    Socket(std::io::Error),
    #[error("{addr}: {error}")]
    /// QUIC refused to start the connection (bad address, endpoint closed).
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// Why quinn refused.
        error: quinn::ConnectError,
    },
    #[error("{addr}: {error}")]
    /// The handshake failed.
    Handshake {
        /// The address tried.
        addr: SocketAddr,
        /// How the connection ended.
        error: quinn::ConnectionError,
    },
    #[error("{addr}: no answer within {}s", HANDSHAKE_DEADLINE.as_secs())]
    /// No answer within the handshake deadline.
    #[allow(missing_docs)]
    Timeout { addr: SocketAddr },
    #[error("{addr}: the Server certificate for {hostname} is not trusted with {trust}: {detail}")]
    /// The Server's certificate did not verify against the configured trust.
    Untrusted {
        /// The address tried.
        addr: SocketAddr,
        /// The Server hostname verified against.
        hostname: String,
        /// The trust setting in use (`ca-file`, `system`, `pin`).
        trust: String,
        /// What the verifier said.
        detail: String,
    },
    #[error(
        "{addr}: the Server refused this Client identity (TLS access_denied); add its pin to a [[server.tunnels]] entry on the Server"
    )]
    /// The Server refused this Client identity (TLS access_denied).
    #[allow(missing_docs)]
    Refused { addr: SocketAddr },
}

impl DialError {
    /// Short stable token for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::Resolve { .. } | DialError::NoAddresses { .. } => "resolve_failed",
            DialError::Socket(_) | DialError::Connect { .. } => "socket_error",
            DialError::Handshake { .. } => "handshake_failed",
            DialError::Timeout { .. } => "timeout",
            DialError::Refused { .. } => "identity_refused",
            DialError::Untrusted { .. } => "server_untrusted",
        }
    }
}

/// TLS alert 49 (access_denied) as a QUIC CRYPTO_ERROR.
fn is_access_denied(error: &quinn::ConnectionError) -> bool {
    matches!(error, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::crypto(49))
}

/// QUIC CRYPTO_ERROR codes: 0x100 + the TLS alert.
const CRYPTO_ERRORS: std::ops::Range<u64> = 0x100..0x200;

/// Wait until the Server has confirmed the handshake. In TLS 1.3 the Client
/// finishes before the Server has judged its certificate; only the Server's
/// HANDSHAKE_DONE frame says the pinned identity was accepted.
async fn confirmed(
    conn: quinn::Connection,
    addr: SocketAddr,
) -> Result<quinn::Connection, DialError> {
    let wait = async {
        loop {
            if conn.stats().frame_rx.handshake_done > 0 {
                return Ok(());
            }
            if let Some(error) = conn.close_reason() {
                return Err(error);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    match tokio::time::timeout(HANDSHAKE_DEADLINE, wait).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(error)) if is_access_denied(&error) => Err(DialError::Refused { addr }),
        Ok(Err(error)) => Err(DialError::Handshake { addr, error }),
        Err(_) => Err(DialError::Timeout { addr }),
    }
}

/// Resolves `server-address` and races the addresses to one Tunnel
/// connection.
pub struct Dialer {
    address: ServerAddress,
    /// How the Server certificate is trusted, for error messages.
    trust: String,
    quic: quinn::ClientConfig,
    endpoint: Option<quinn::Endpoint>,
}

impl Dialer {
    /// A dialer for `address` with the Server trust and QUIC settings.
    pub fn new(address: ServerAddress, trust: &ServerTrust, quic: quinn::ClientConfig) -> Self {
        let trust = match trust {
            ServerTrust::System => {
                "server-trust = \"system\" (the system root certificates)".into()
            }
            ServerTrust::CaFile(path) => {
                format!(
                    "server-trust = \"ca-file\" (server-ca-file = {})",
                    path.display()
                )
            }
            ServerTrust::Pin(pin) => format!("server-trust = \"pin\" (server-pin = {pin})"),
        };
        Self {
            address,
            trust,
            quic,
            endpoint: None,
        }
    }

    /// The local endpoint, created on first use: dual-stack where the host
    /// has IPv6, IPv4 only otherwise.
    pub fn endpoint(&mut self) -> Result<quinn::Endpoint, DialError> {
        if let Some(e) = &self.endpoint {
            return Ok(e.clone());
        }
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
        let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let endpoint = transport::endpoint(any6, None, None)
            .or_else(|_| transport::endpoint(any4, None, None))
            .map_err(DialError::Socket)?;
        self.endpoint = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// One dial: resolve, race the addresses, wait for the Server to confirm
    /// the handshake.
    pub async fn dial(&mut self) -> Result<quinn::Connection, DialError> {
        let host = self.address.host.as_str().to_string();
        let address = self.address.to_string();
        let mut addrs: Vec<SocketAddr> = match resolve_override(&host) {
            Some(ip) => vec![SocketAddr::new(ip, self.address.port)],
            None => tokio::net::lookup_host((host.as_str(), self.address.port))
                .await
                .map_err(|error| DialError::Resolve {
                    address: address.clone(),
                    error,
                })?
                .collect(),
        };
        addrs.dedup();
        if addrs.is_empty() {
            return Err(DialError::NoAddresses { address });
        }
        let endpoint = self.endpoint()?;
        let ipv4_only = endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(true);
        if ipv4_only {
            addrs.retain(SocketAddr::is_ipv4);
            if addrs.is_empty() {
                return Err(DialError::NoAddresses { address });
            }
        }
        let mut attempts = JoinSet::new();
        for (i, addr) in addrs.into_iter().enumerate() {
            let endpoint = endpoint.clone();
            let config = self.quic.clone();
            let host = host.clone();
            let trust = self.trust.clone();
            attempts.spawn(async move {
                tokio::time::sleep(STAGGER * i as u32).await;
                let connecting = endpoint
                    .connect_with(config, addr, &host)
                    .map_err(|error| DialError::Connect { addr, error })?;
                match tokio::time::timeout(HANDSHAKE_DEADLINE, connecting).await {
                    Ok(Ok(conn)) => confirmed(conn, addr).await,
                    Ok(Err(error)) if is_access_denied(&error) => Err(DialError::Refused { addr }),
                    // A TLS failure we raised ourselves: verifying the Server failed.
                    Ok(Err(quinn::ConnectionError::TransportError(t)))
                        if CRYPTO_ERRORS.contains(&u64::from(t.code)) =>
                    {
                        Err(DialError::Untrusted {
                            addr,
                            hostname: host,
                            trust,
                            detail: t.reason,
                        })
                    }
                    Ok(Err(error)) => Err(DialError::Handshake { addr, error }),
                    Err(_) => Err(DialError::Timeout { addr }),
                }
            });
        }
        let mut last = None;
        while let Some(joined) = attempts.join_next().await {
            match joined {
                Ok(Ok(conn)) => {
                    attempts.abort_all();
                    return Ok(conn);
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {}
            }
        }
        Err(last.unwrap_or(DialError::NoAddresses { address }))
    }
}
