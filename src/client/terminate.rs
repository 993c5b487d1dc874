//! Terminate mode: the Client completes the Visitor's TLS handshake with a
//! per-hostname certificate chosen by SNI, then proxies plaintext to the
//! Local backend. A hostname without a certificate fails closed at the
//! handshake; there is no fallback to passthrough.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::Join;

use crate::hostname::{HostnameTable, PublicHostname, wire_lookup_key};
use crate::relay::Prefixed;
use crate::tls::acme;
use crate::tls::material::{MaterialError, TlsMaterial};

#[derive(Debug, thiserror::Error)]
/// Why the terminate TLS configuration could not be built.
pub enum TerminateError {
    #[error("{hostname}: unusable certificate or key: {error}")]
    /// A certificate's key is not usable by rustls.
    Key {
        /// The hostname the certificate is for.
        hostname: PublicHostname,
        /// What rustls said.
        error: rustls::Error,
    },
    #[error("{0}")]
    /// The certificates could not be loaded.
    Material(#[from] MaterialError),
    #[error("TLS configuration: {0}")]
    /// rustls refused the configuration.
    Tls(#[from] rustls::Error),
}

/// Certificates by Public hostname: a certificate for `*.example.com`
/// serves every name one label under it that has none of its own.
#[derive(Debug, Default)]
pub struct CertificateTable {
    by_hostname: HostnameTable<Arc<CertifiedKey>>,
}

impl CertificateTable {
    /// A table of the loaded certificates, by hostname.
    pub fn new(material: Vec<(PublicHostname, TlsMaterial)>) -> Result<Self, TerminateError> {
        let mut by_hostname = HostnameTable::default();
        for (hostname, m) in material {
            let key = rustls::crypto::ring::sign::any_supported_type(&m.key).map_err(|error| {
                TerminateError::Key {
                    hostname: hostname.clone(),
                    error,
                }
            })?;
            by_hostname.insert(&hostname, Arc::new(CertifiedKey::new(m.chain, key)));
        }
        Ok(Self { by_hostname })
    }

    /// Whether `hostname` (a name or a wildcard) has a certificate: its
    /// own, or for a name a wildcard certificate covering it.
    pub fn contains(&self, hostname: &PublicHostname) -> bool {
        self.by_hostname.get(hostname).is_some()
            || (!hostname.is_wildcard() && self.by_hostname.lookup(hostname.as_str()).is_some())
    }
}

impl ResolvesServerCert for CertificateTable {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = wire_lookup_key(hello.server_name()?);
        self.by_hostname.lookup(&name).cloned()
    }
}

/// A [`CertificateTable`] that a reload can replace.
#[derive(Debug)]
pub struct SwappableCerts(std::sync::RwLock<Arc<CertificateTable>>);

impl SwappableCerts {
    /// Start with `table`.
    pub fn new(table: CertificateTable) -> Self {
        Self(std::sync::RwLock::new(Arc::new(table)))
    }

    /// The table in use now.
    pub fn current(&self) -> Arc<CertificateTable> {
        crate::sync::read(&self.0).clone()
    }

    /// Swap in a newly loaded table (reload); handshakes in progress keep
    /// the old one.
    pub fn replace(&self, table: CertificateTable) {
        *crate::sync::write(&self.0) = Arc::new(table);
    }

    /// Whether a certificate for `hostname` is loaded.
    pub fn contains(&self, hostname: &PublicHostname) -> bool {
        self.current().contains(hostname)
    }
}

impl ResolvesServerCert for SwappableCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current().resolve(hello)
    }
}

/// The TLS acceptor for terminating Services.
pub fn acceptor(certs: Arc<dyn ResolvesServerCert>) -> Result<Acceptor, TerminateError> {
    Ok(Acceptor {
        visitors: visitor_config(certs)?,
        acme_challenge: None,
    })
}

/// The TLS acceptor for terminating Services with `[client.acme]`: also
/// answers TLS-ALPN-01 validations (ALPN exactly `acme-tls/1`) for the
/// hostnames `resolver` manages.
pub fn acme_acceptor(resolver: Arc<dyn ResolvesServerCert>) -> Result<Acceptor, TerminateError> {
    Ok(Acceptor {
        visitors: visitor_config(resolver.clone())?,
        acme_challenge: Some(acme::challenge_config(resolver)?),
    })
}

fn visitor_config(
    certs: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, TerminateError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    Ok(Arc::new(config))
}

/// Completes Visitor handshakes in terminate mode.
#[derive(Clone)]
pub struct Acceptor {
    /// Ordinary Visitors: no ALPN, the certificate for the SNI.
    visitors: Arc<rustls::ServerConfig>,
    /// ACME validations, when `[client.acme]` is on.
    acme_challenge: Option<Arc<rustls::ServerConfig>>,
}

/// What a completed handshake was.
pub enum Accepted {
    /// A Visitor, to be proxied to the Local backend.
    Visitor(Box<tokio_rustls::server::TlsStream<TunnelStream>>),
    /// An ACME TLS-ALPN-01 validation, answered and closed.
    AcmeChallenge,
}

impl Acceptor {
    /// Accept the Visitor's TLS on `stream`, or answer an ACME TLS-ALPN-01
    /// challenge.
    pub async fn accept(&self, stream: TunnelStream) -> io::Result<Accepted> {
        let Some(challenge) = &self.acme_challenge else {
            let acceptor = tokio_rustls::TlsAcceptor::from(self.visitors.clone());
            return Ok(Accepted::Visitor(Box::new(acceptor.accept(stream).await?)));
        };
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                .await?;
        let alpn: Vec<Vec<u8>> = start
            .client_hello()
            .alpn()
            .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        if acme::is_challenge_alpn(&alpn) {
            let mut tls = start.into_stream(challenge.clone()).await?;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
            return Ok(Accepted::AcmeChallenge);
        }
        Ok(Accepted::Visitor(Box::new(
            start.into_stream(self.visitors.clone()).await?,
        )))
    }
}

/// A tunnel stream whose first bytes (the ClientHello already read for
/// Service selection) are replayed before the rest of the stream.
pub type TunnelStream = Prefixed<Join<RecvStream, SendStream>>;

/// The tunnel stream as a byte stream, with the ClientHello already read
/// replayed first.
pub fn tunnel_stream(prefix: Bytes, send: SendStream, recv: RecvStream) -> TunnelStream {
    Prefixed::new(prefix, tokio::io::join(recv, send))
}

/// Runegate on terminate Services (`[client.services.gate]`), keyed by the
/// Service's Public hostnames (stable across reloads, unlike its index):
/// opened once at start (sessions, mail relay), shared by every stream of
/// that Service. Fails closed: a Service that a reload gave a gate is
/// refused until a restart starts that gate, and a gate a reload removed
/// keeps guarding its Service until then.
#[derive(Default)]
pub struct Gates {
    running: std::collections::HashMap<String, Arc<crate::gate::server::Gate>>,
    /// Services whose current config has a gate.
    required: std::sync::RwLock<std::collections::HashSet<String>>,
}

/// What stands in front of a terminate Service.
pub enum GateFor {
    /// No gate: plaintext straight to the backend.
    None,
    /// The gate that signs Visitors in, then proxies to the backend.
    Gate(Arc<crate::gate::server::Gate>),
    /// A gate is configured but not running (added by a reload).
    Unavailable,
}

fn gate_key(service: &crate::config::ServiceConfig) -> String {
    let names: Vec<&str> = service
        .public_hostnames
        .iter()
        .map(|h| h.as_str())
        .collect();
    names.join(",")
}

fn required(config: &crate::config::ClientConfig) -> std::collections::HashSet<String> {
    config
        .services
        .iter()
        .filter(|s| config.gates.services.iter().any(|g| g.service == s.index))
        .map(gate_key)
        .collect()
}

impl Gates {
    /// Open the gate of every gated Service; its upstream is the Service's
    /// backend.
    pub fn open(
        config: &crate::config::ClientConfig,
    ) -> Result<Self, crate::gate::server::GateError> {
        let mut running = std::collections::HashMap::new();
        for g in &config.gates.services {
            let Some(service) = config.services.iter().find(|s| s.index == g.service) else {
                continue;
            };
            let Some(gate_config) =
                config
                    .gates
                    .gate_config(g, service.backend_address.clone(), config.log_level)
            else {
                continue;
            };
            let gate = crate::gate::server::Gate::open(gate_config)?;
            if tokio::runtime::Handle::try_current().is_ok() {
                gate.spawn_sweeper();
            }
            tracing::info!(
                event = "gate_ready",
                service = g.service,
                base_url = %g.base_url,
                upstream = %service.backend_address,
            );
            running.insert(gate_key(service), gate);
        }
        Ok(Self {
            running,
            required: std::sync::RwLock::new(required(config)),
        })
    }

    /// The gate in front of `service` (from the current Service table).
    pub fn for_service(&self, service: &crate::config::ServiceConfig) -> GateFor {
        let key = gate_key(service);
        if let Some(gate) = self.running.get(&key) {
            return GateFor::Gate(gate.clone());
        }
        let required = crate::sync::read(&self.required);
        if required.contains(&key) {
            GateFor::Unavailable
        } else {
            GateFor::None
        }
    }

    /// A reload: each running gate takes the allow-lists of its Service's
    /// gate in `config` (sessions of removed addresses end now). Gates
    /// added or removed need a restart, and say so.
    pub fn reload(&self, config: &crate::config::ClientConfig) {
        let new = required(config);
        for (key, gate) in &self.running {
            let g = config
                .services
                .iter()
                .find(|s| &gate_key(s) == key)
                .and_then(|s| config.gates.services.iter().find(|g| g.service == s.index));
            match g {
                Some(g) => match gate.set_allowed(g.sign_in.allowed.clone()) {
                    Ok(revoked) => {
                        tracing::info!(event = "gate_reloaded", service = g.service, revoked)
                    }
                    Err(e) => tracing::error!(event = "gate_store_failed", error = %e),
                },
                None => tracing::warn!(
                    event = "reload_restart_needed",
                    keys = "client.services.gate",
                    hostnames = %key,
                    hint = "the gate was removed; it keeps guarding the Service until a restart"
                ),
            }
        }
        for key in new.iter().filter(|k| !self.running.contains_key(*k)) {
            tracing::warn!(
                event = "reload_restart_needed",
                keys = "client.services.gate",
                hostnames = %key,
                hint = "a new gate starts with the next restart; until then its Service refuses Visitors"
            );
        }
        *crate::sync::write(&self.required) = new;
    }
}

/// Serve a terminated Visitor connection through `gate`: plaintext HTTP
/// from the TLS stream, the Visitor's address from the PROXY v2 source
/// (unspecified when the Server sent none).
pub async fn gated(
    gate: Arc<crate::gate::server::Gate>,
    tls: tokio_rustls::server::TlsStream<TunnelStream>,
    source: Option<std::net::SocketAddr>,
) {
    let peer = source
        .map(|s| std::net::SocketAddr::new(s.ip().to_canonical(), s.port()))
        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    gate.serve_connection(tls, peer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Client config with Services `a.example.com` (gated when `gate_a`)
    /// and `b.example.com` (gated when `gate_b`), both terminate.
    fn config(dir: &std::path::Path, gate_a: bool, gate_b: bool) -> crate::config::ClientConfig {
        let gate = |on: bool, name: &str| {
            if on {
                format!(
                    "[client.services.gate]\nallowed-emails = [\"alice@example.com\"]\nstate-dir = \"{name}\"\n"
                )
            } else {
                String::new()
            }
        };
        let text = format!(
            "[client]\nserver-address = \"edge.example.com\"\npublic-cert-dir = \"certs\"\n\
             [[client.services]]\npublic-hostnames = [\"a.example.com\"]\nbackend-address = \"127.0.0.1:1\"\ntls-mode = \"terminate\"\n{}\
             [[client.services]]\npublic-hostnames = [\"b.example.com\"]\nbackend-address = \"127.0.0.1:2\"\ntls-mode = \"terminate\"\n{}\
             [client.smtp]\nhost = \"127.0.0.1\"\ntls = \"none\"\nfrom = \"s@example.com\"\n",
            gate(gate_a, "gate-a"),
            gate(gate_b, "gate-b"),
        );
        let path = dir.join(format!("client-{gate_a}-{gate_b}.toml"));
        std::fs::write(&path, text).unwrap();
        crate::config::load_client(
            &crate::config::ClientOverlay {
                config: Some(path),
                ..Default::default()
            },
            &crate::config::Environment::from_pairs([("HOME", "/nonexistent")]),
        )
        .unwrap()
    }

    fn kind(g: GateFor) -> &'static str {
        match g {
            GateFor::None => "none",
            GateFor::Gate(_) => "gate",
            GateFor::Unavailable => "unavailable",
        }
    }

    #[test]
    fn gates_follow_hostnames_and_fail_closed_across_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let start = config(dir.path(), true, false);
        let gates = Gates::open(&start).unwrap();
        let (a, b) = (&start.services[0], &start.services[1]);
        assert_eq!(kind(gates.for_service(a)), "gate");
        assert_eq!(kind(gates.for_service(b)), "none");

        // Reordered by a reload: the gate stays with a.example.com.
        let mut moved = a.clone();
        moved.index = 1;
        assert_eq!(kind(gates.for_service(&moved)), "gate");

        // A reload gives b a gate: refused until a restart starts it; a's
        // gate, removed, keeps guarding a.
        gates.reload(&config(dir.path(), false, true));
        assert_eq!(kind(gates.for_service(b)), "unavailable");
        assert_eq!(kind(gates.for_service(a)), "gate");
    }
}
