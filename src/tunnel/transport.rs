//! QUIC transport for the Tunnel connection (`runewarp/1`).
//!
//! One QUIC connection per Client instance, TLS 1.3 only, ALPN exactly
//! `runewarp/1`, no 0-RTT. The Server authenticates the Client by the
//! SHA-256 of its certificate's SubjectPublicKeyInfo (the pinned
//! [`ClientIdentity`]); validity dates and chains are ignored. Only the
//! Server opens streams: one bidirectional stream per Visitor connection.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::ResolvesServerCert;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DistinguishedName};

use crate::identity::ClientIdentity;
use crate::logging::RateLimit;
use crate::sync::{read, write};
use crate::tls::material::TlsMaterial;
use crate::tunnel::congestion::CongestionControl;

/// The ALPN protocol of the tunnel.
pub const ALPN: &[u8] = b"runewarp/1";
/// QUIC idle timeout.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Keep-alive interval of the Server.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Keep-alive interval of the Client: short, so that a Server that crashed
/// and restarted answers a probe with a stateless reset within a second or
/// two and the Client redials at once, instead of waiting out the 60 s idle
/// timeout. Costs one small packet per second per Client.
pub(crate) const CLIENT_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A tunnel handshake must complete within this time (the Client's wait;
/// the Server gives a handshake slot 5 s, see `server::admission::Limits`).
pub(crate) const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Streams the Client guarantees the Server can have open at once.
pub(crate) const MAX_STREAMS: u32 = 1024;
/// Stream credit the Client actually grants. quinn re-announces stream
/// credit only after 1/8 of it was freed, so granting exactly 1024 could
/// leave the Server with as few as 896 usable streams; the extra eighth
/// keeps at least [`MAX_STREAMS`] available at all times.
pub(crate) const STREAM_CREDIT: u32 = MAX_STREAMS + MAX_STREAMS / 8;

/// Per-stream receive window. One stream can carry at most this much per
/// round trip, and less on a lossy path: the data behind a lost packet
/// stays in the window until its retransmission arrives, a round trip or
/// more later. 4 MiB is 670 Mbit/s over a clean 50 ms path and held
/// 100-220 Mbit/s under 50 ms + 1 % and 100 ms + 0.5 % loss, where 2 MiB
/// held 65-130 (docs/architecture.md, "Flow-control windows"). It is also
/// what one stuck stream (a Visitor or Local backend that stopped reading)
/// pins in the receiver's memory until the write deadline resets it; 8 MiB
/// gained another 0-15 % on those paths for twice that memory.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection-wide receive window: every stream the peer may have open at
/// once, each with a full stream window (4.5 GiB, a credit limit, not an
/// allocation). Stuck streams can therefore never exhaust the connection's
/// credit and hold back the other streams of the Tunnel connection; what
/// bounds the memory they pin is the stream count (admission limits,
/// [`STREAM_CREDIT`]) times [`STREAM_WINDOW`], and the write deadline that
/// resets them.
pub(crate) const CONNECTION_WINDOW: u64 = STREAM_CREDIT as u64 * STREAM_WINDOW as u64;
/// How much unacknowledged data we keep buffered for sending, all streams
/// together: 80 MB/s over a 50 ms path. 8 MiB bought no throughput in the
/// bench and cost ~6 MiB of peak RSS.
const SEND_WINDOW: u64 = 4 * 1024 * 1024;

/// Largest UDP payload we accept and that MTU discovery may probe up to.
/// Paths with a 1,500-byte MTU stay at quinn's 1,452 (the probes are lost
/// and nothing else is); jumbo-frame LANs and loopback go higher, which
/// divides the per-packet cost that dominates tunnel CPU. The bound is set
/// by segmentation offload: quinn sends up to 10 segments in one `sendmsg`
/// and the kernel refuses a batch over 64 KiB (EMSGSIZE, the whole batch
/// lost), so 10 segments plus IP and UDP headers must fit in 65,535 bytes.
pub(crate) const MAX_UDP_PAYLOAD: u16 = 6_500;
const _: () = assert!(10 * MAX_UDP_PAYLOAD as usize + 40 + 8 <= 65_535);

/// Application error codes carried in CONNECTION_CLOSE.
pub mod close_code {
    use quinn::VarInt;
    /// Orderly shutdown of the closing side.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// A newer authenticated connection took over this Tunnel.
    pub const REPLACED: VarInt = VarInt::from_u32(1);
    /// The identity is not (or no longer) pinned.
    pub const UNAUTHORIZED: VarInt = VarInt::from_u32(2);
    /// The peer broke the protocol (e.g. opened a stream it may not).
    pub const PROTOCOL: VarInt = VarInt::from_u32(3);
}

/// Application error codes carried in RESET_STREAM / STOP_SENDING.
pub mod stream_code {
    use quinn::VarInt;
    /// The proxied connection failed (reset, I/O error).
    pub const ABORTED: VarInt = VarInt::from_u32(1);
    /// The Client has no Service for the stream's hostname.
    pub const NO_SERVICE: VarInt = VarInt::from_u32(2);
    /// The Local backend could not be reached.
    pub const BACKEND_UNREACHABLE: VarInt = VarInt::from_u32(3);
    /// The stream's framing (PROXY header, ClientHello) was invalid.
    pub const BAD_FRAMING: VarInt = VarInt::from_u32(4);
    /// Terminate mode: the Visitor's TLS handshake failed.
    pub const TLS_FAILED: VarInt = VarInt::from_u32(5);
    /// The process is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(6);
    /// The Client instance is handling as many streams as it allows.
    pub const OVERLOADED: VarInt = VarInt::from_u32(7);
}

/// Why the Tunnel TLS or QUIC configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("TLS configuration: {0}")]
    /// rustls refused the configuration.
    Tls(#[from] rustls::Error),
    #[error("QUIC crypto configuration: {0}")]
    /// quinn refused the crypto configuration.
    Quic(String),
}

fn transport(is_server: bool, congestion: CongestionControl) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.congestion_controller_factory(congestion.factory());
    t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
        IDLE_TIMEOUT.as_millis() as u32,
    ))));
    t.keep_alive_interval(Some(if is_server {
        KEEP_ALIVE
    } else {
        CLIENT_KEEP_ALIVE
    }));
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    // Far below QUIC's 2^62 limit; saturating keeps this total anyway.
    t.receive_window(VarInt::from_u64(CONNECTION_WINDOW).unwrap_or(VarInt::MAX));
    t.send_window(SEND_WINDOW);
    t.datagram_receive_buffer_size(None);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    if is_server {
        // The Client may not open streams towards the Server.
        t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    } else {
        t.max_concurrent_bidi_streams(VarInt::from_u32(STREAM_CREDIT));
    }
    t
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The Server side of the tunnel's TLS. Every incoming connection gets its
/// own config whose verifier knows the peer address, so a refused identity
/// is logged with where it came from.
pub struct TunnelTls {
    certificate: Arc<dyn ResolvesServerCert>,
    /// Replaced on reload; each handshake takes the set current then.
    pins: std::sync::RwLock<Arc<HashSet<ClientIdentity>>>,
    refusals: Arc<RateLimit<ClientIdentity>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    transport: Arc<TransportConfig>,
}

/// A refused identity is logged at most once per this interval.
pub(crate) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl TunnelTls {
    /// TLS for the Server's tunnel listener: present `certificate`, accept the Client identities in `pins`, send with `congestion`.
    pub fn new(
        certificate: Arc<dyn ResolvesServerCert>,
        pins: HashSet<ClientIdentity>,
        congestion: CongestionControl,
    ) -> Self {
        Self {
            certificate,
            pins: std::sync::RwLock::new(Arc::new(pins)),
            refusals: Arc::new(RateLimit::new(REFUSAL_LOG_INTERVAL)),
            provider: provider(),
            transport: Arc::new(transport(true, congestion)),
        }
    }

    /// Accept these pins from the next handshake on (config reload).
    pub(crate) fn set_pins(&self, pins: HashSet<ClientIdentity>) {
        *write(&self.pins) = Arc::new(pins);
    }

    /// The QUIC server config for a handshake from `peer`.
    pub fn config(&self, peer: Option<SocketAddr>) -> Result<quinn::ServerConfig, TransportError> {
        let pins = read(&self.pins).clone();
        let verifier = Arc::new(PinnedClientVerifier {
            pins,
            provider: self.provider.clone(),
            peer,
            refusals: self.refusals.clone(),
        });
        let mut tls = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.certificate.clone());
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TransportError::Quic(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(self.transport.clone());
        Ok(config)
    }
}

/// Always presents the same certificate (cert-dir mode).
#[derive(Debug)]
pub(crate) struct FixedCertificate(Arc<CertifiedKey>);

impl FixedCertificate {
    pub fn new(material: TlsMaterial) -> Result<Self, TransportError> {
        let key = rustls::crypto::ring::sign::any_supported_type(&material.key)?;
        Ok(Self(Arc::new(CertifiedKey::new(material.chain, key))))
    }
}

impl ResolvesServerCert for FixedCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Build the Client's QUIC config: trust exactly `roots`, present the
/// Client identity.
pub fn client_config(
    roots: rustls::RootCertStore,
    identity: TlsMaterial,
    congestion: CongestionControl,
) -> Result<quinn::ClientConfig, TransportError> {
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TransportError::Quic(e.to_string()))?;
    client_config_with_verifier(verifier, identity, congestion)
}

/// [`client_config`] with any Server certificate verifier (such as the
/// `server-trust = "pin"` one).
pub(crate) fn client_config_with_verifier(
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    identity: TlsMaterial,
    congestion: CongestionControl,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain, identity.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport(false, congestion)));
    Ok(config)
}

/// The identity of an authenticated peer, from its certificate.
pub(crate) fn peer_identity(conn: &quinn::Connection) -> Option<ClientIdentity> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = certs.first()?;
    ClientIdentity::from_certificate_der(leaf).ok()
}

/// At most this many differing characters make a configured pin "close"
/// to a presented one (a typo, not another key: two random pins differ in
/// about 60 of 64).
const CLOSE_PIN_DIFFERENCES: usize = 4;

/// The configured pin that differs from `presented` in the fewest hex
/// characters, if that is at most [`CLOSE_PIN_DIFFERENCES`].
fn closest_pin(
    pins: &HashSet<ClientIdentity>,
    presented: &ClientIdentity,
) -> Option<(ClientIdentity, usize)> {
    let want = presented.to_string();
    pins.iter()
        .map(|pin| {
            let differ = pin
                .to_string()
                .bytes()
                .zip(want.bytes())
                .filter(|(a, b)| a != b)
                .count();
            (*pin, differ)
        })
        .filter(|(_, differ)| *differ <= CLOSE_PIN_DIFFERENCES)
        .min_by_key(|(_, differ)| *differ)
}

/// Accepts a Client certificate if and only if its SPKI pin is known.
/// Rejection maps to the TLS `access_denied` alert.
#[derive(Debug)]
struct PinnedClientVerifier {
    pins: Arc<HashSet<ClientIdentity>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    peer: Option<SocketAddr>,
    refusals: Arc<RateLimit<ClientIdentity>>,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let identity = ClientIdentity::from_certificate_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.pins.contains(&identity) {
            Ok(ClientCertVerified::assertion())
        } else {
            // Per pin, and Server-wide: a flood of fresh keys is bounded too.
            let budget = &crate::logging::budget::UNKNOWN_IDENTITY;
            let allowed = match self.refusals.allow(&identity) {
                Some(_) => budget.allow(),
                None => {
                    budget.suppressed();
                    None
                }
            };
            if let Some(suppressed) = allowed {
                // Unproven: the handshake has not shown the key is held.
                let peer = self
                    .peer
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into());
                match closest_pin(&self.pins, &identity) {
                    // One or two mistyped characters in the config are the
                    // common case: point at the pin that was meant.
                    Some((pin, differ)) => tracing::warn!(
                        event = "tunnel_refused",
                        claimed_identity = %identity,
                        peer,
                        reason = "unknown_identity",
                        suppressed,
                        closest_configured = %pin,
                        hint = %format!("a configured client-identity differs from this pin in {differ} characters: a typo in the Server's config?"),
                    ),
                    None => tracing::warn!(
                        event = "tunnel_refused",
                        claimed_identity = %identity,
                        peer,
                        reason = "unknown_identity",
                        suppressed,
                        hint = "add this pin to a [[server.tunnels]] entry to accept it",
                    ),
                }
            }
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    crate::tls::tls13_only_signatures!(Tls13RequiredForQuic);
}

/// Socket buffer size asked for on tunnel UDP sockets; the kernel may cap
/// it at `net.core.{r,w}mem_max`, in which case we try the privileged
/// FORCE variant and otherwise keep what we got.
const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// A UDP socket for a QUIC endpoint with enlarged buffers, so bursts at
/// full speed are not dropped by the kernel.
pub(crate) fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    for (set, force) in [
        (
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>,
            libc::SO_RCVBUFFORCE,
        ),
        (Socket::set_send_buffer_size, libc::SO_SNDBUFFORCE),
    ] {
        let _ = set(&socket, UDP_BUFFER);
        let _ = set_force(&socket, force, UDP_BUFFER);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn set_force(socket: &socket2::Socket, option: libc::c_int, size: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt with a valid fd, a pointer to a c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A quinn endpoint on `addr`, serving `server` if given.
pub fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_secret: Option<&[u8]>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = udp_socket(addr)?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(format!("QUIC endpoint: {e}")))?;
    if let Some(secret) = reset_secret {
        // A restarted Server must recognise the connection IDs it issued
        // before the restart (they carry a keyed signature) and answer them
        // with stateless resets whose tokens the Clients already hold. Both
        // keys therefore derive from a secret that survives restarts.
        let derive = |label: &[u8]| {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
            ring::hmac::sign(&key, label)
        };
        let reset = derive(b"runewarp stateless reset key");
        config.reset_key(Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            reset.as_ref(),
        )));
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&derive(b"runewarp connection id key").as_ref()[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
    }
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}

#[cfg(test)]
mod closest_pin_tests {
    use super::*;

    fn pin(hex: &str) -> ClientIdentity {
        ClientIdentity::parse(hex).expect("pin")
    }

    #[test]
    fn a_mistyped_configured_pin_is_named_and_a_stranger_is_not() {
        let good = "a".repeat(64);
        let typo = format!("ab{}", "a".repeat(62));
        let other = "0123456789abcdef".repeat(4);
        let pins: HashSet<ClientIdentity> = [pin(&typo), pin(&other)].into_iter().collect();
        assert_eq!(closest_pin(&pins, &pin(&good)), Some((pin(&typo), 1)));
        let stranger = "f".repeat(64);
        assert_eq!(closest_pin(&pins, &pin(&stranger)), None);
    }
}
