//! The mesh protocol: the messages the control server ([`crate::control`])
//! and the device agent ([`crate::node`]) exchange over the control API
//! (docs/control-api.md), and the checks both sides apply to them. A
//! common piece, so neither system reaches into the other.

use serde::{Deserialize, Serialize};

/// `POST /v1/register`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub setup_key: String,
    /// WireGuard X25519 public key, base64 (32 bytes).
    pub public_key: String,
    pub hostname: String,
}

/// The answer to a registration: the bearer token is shown only here.
#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub device_id: i64,
    pub token: String,
    pub organisation: String,
    pub hostname: String,
    pub addresses: Vec<String>,
}

/// `POST /v1/login`: start an SSO login for this device's key.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoginRequest {
    /// WireGuard X25519 public key, base64 (32 bytes).
    pub public_key: String,
    pub hostname: String,
}

/// The answer to `POST /v1/login`: a URL for the user to open in any
/// browser, and the bearer token for `GET /v1/login/wait` (shown once).
#[derive(Debug, Serialize, Deserialize)]
pub struct LoginStarted {
    pub login_url: String,
    pub wait_token: String,
    /// Seconds until the login expires.
    pub expires_in: u64,
}

/// `GET /v1/login/wait` while the user has not finished (status 202).
#[derive(Debug, Serialize, Deserialize)]
pub struct LoginPending {
    /// Always `"pending"`.
    pub status: String,
}

/// An error body, and the line that ends a map stream of a revoked device.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `POST /v1/signal`: a message for one peer, sealed on the sending
/// device for the receiving one (see [`seal`]); the server forwards it
/// without being able to read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalRequest {
    /// The receiving device's id (from the network map).
    pub to: i64,
    /// 12 random bytes, base64.
    pub nonce: String,
    /// ChaCha20-Poly1305 ciphertext and tag, base64.
    #[serde(rename = "box")]
    pub sealed: String,
}

/// A map-stream line that carries a signal message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalLine {
    /// The message.
    pub signal: SignalEnvelope,
}

/// A signal message as delivered: who sent it, and the sealed bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalEnvelope {
    /// The sending device's id.
    pub from: i64,
    /// The sending device's WireGuard public key (base64), as the control
    /// server knows it.
    pub from_key: String,
    /// As sent.
    pub nonce: String,
    /// As sent.
    #[serde(rename = "box")]
    pub sealed: String,
}

/// `POST /v1/endpoints`: the UDP addresses (`IP:PORT`) where this device's
/// data plane can be reached, best first; peers find them in their maps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointsRequest {
    pub endpoints: Vec<String>,
}

/// Most endpoints one device may report.
pub const MAX_ENDPOINTS: usize = 16;

/// An endpoint as reported: `IPv4:PORT` or `[IPv6]:PORT`, port not 0.
pub fn valid_endpoint(text: &str) -> bool {
    text.parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast())
}

/// Largest sealed signal message accepted (bytes before base64).
pub const MAX_SIGNAL: usize = 2048;

/// A 32-byte key two devices share: X25519 between their WireGuard keys,
/// then HKDF-SHA256 with `label` as the salt, bound to both public keys
/// (in sorted order, so both ends derive the same key). Each use has its
/// own label, so no two uses share a key.
pub fn pair_key(secret: &x25519_dalek::StaticSecret, theirs: &[u8; 32], label: &[u8]) -> [u8; 32] {
    let mine = x25519_dalek::PublicKey::from(secret).to_bytes();
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*theirs));
    let (a, b) = if mine <= *theirs {
        (&mine, theirs)
    } else {
        (theirs, &mine)
    };
    let info = [a.as_slice(), b.as_slice()];
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, label).extract(shared.as_bytes());
    let mut out = [0u8; 32];
    // Expanding 32 bytes from HKDF-SHA256 cannot fail (the limit is 8 KiB).
    prk.expand(&info, ring::hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .unwrap_or_else(|_| unreachable!("HKDF output of 32 bytes"));
    out
}

/// The key two devices share for signal messages ([`pair_key`]).
fn signal_key(secret: &x25519_dalek::StaticSecret, theirs: &[u8; 32]) -> ring::aead::LessSafeKey {
    let key = pair_key(secret, theirs, b"runewarp signal v1");
    // A 32-byte key is what ChaCha20-Poly1305 takes.
    let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &key)
        .unwrap_or_else(|_| unreachable!("a 32-byte ChaCha20-Poly1305 key"));
    ring::aead::LessSafeKey::new(key)
}

/// Seal `message` from the device with `secret` for the device with public
/// key `theirs`: (nonce, sealed), both base64.
pub fn seal(
    secret: &x25519_dalek::StaticSecret,
    theirs: &[u8; 32],
    message: &[u8],
) -> (String, String) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mine = x25519_dalek::PublicKey::from(secret).to_bytes();
    let key = signal_key(secret, theirs);
    let nonce: [u8; 12] = rand::random();
    let mut data = message.to_vec();
    let aad = [mine.as_slice(), theirs.as_slice()].concat();
    // Sealing only fails for messages over ChaCha20-Poly1305's 256 GiB.
    let _ = key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key(nonce),
        ring::aead::Aad::from(aad),
        &mut data,
    );
    (b64.encode(nonce), b64.encode(data))
}

/// Open a message sealed by the device with public key `theirs` for the
/// device with `secret`; None if it was not sealed for this pair or was
/// altered.
pub fn open(
    secret: &x25519_dalek::StaticSecret,
    theirs: &[u8; 32],
    nonce: &str,
    sealed: &str,
) -> Option<Vec<u8>> {
    let mine = x25519_dalek::PublicKey::from(secret).to_bytes();
    open_with(&signal_key(secret, theirs), theirs, &mine, nonce, sealed)
}

/// The AEAD step of [`open`], with the pair's `key` given: the associated
/// data binds the sender's public key (`theirs`), then the receiver's.
fn open_with(
    key: &ring::aead::LessSafeKey,
    theirs: &[u8; 32],
    mine: &[u8; 32],
    nonce: &str,
    sealed: &str,
) -> Option<Vec<u8>> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let nonce: [u8; 12] = b64.decode(nonce).ok()?.try_into().ok()?;
    let mut data = b64.decode(sealed).ok()?;
    let aad = [theirs.as_slice(), mine.as_slice()].concat();
    let plain = key
        .open_in_place(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(aad),
            &mut data,
        )
        .ok()?;
    Some(plain.to_vec())
}

/// A base64 X25519 public key as bytes.
pub fn public_key_bytes(key: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .ok()?
        .try_into()
        .ok()
}

/// A base64 X25519 public key: 32 bytes.
pub fn valid_public_key(key: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|b| b.len() == 32)
}

/// A device hostname: one DNS label, lowercase letters, digits and '-'.
pub fn valid_hostname(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// One line of the map stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMap {
    /// The control server's change serial this map reflects. Keep it the
    /// first field: the server compares maps by what follows it.
    pub serial: u64,
    pub organisation: String,
    #[serde(rename = "self")]
    pub node: Node,
    pub peers: Vec<Peer>,
    /// Traffic this device accepts: anything not listed is dropped.
    pub filter: Vec<FilterRule>,
    /// Relays this device may use, each with a token for it (refreshed by
    /// a new map line before it expires).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<RelayInfo>,
}

/// A relay in the map: where it is and this device's admission token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    pub name: String,
    /// UDP `HOST:PORT`.
    pub address: String,
    /// The TCP fallback's `HOST:PORT`, if the relay has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_address: Option<String>,
    /// The signed token (`relay_protocol`), base64.
    pub token: String,
    /// When the token expires (Unix seconds).
    pub expires_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: i64,
    pub hostname: String,
    pub public_key: String,
    pub addresses: Vec<String>,
    pub user: Option<String>,
    pub tags: Vec<String>,
    /// Subnets this device is approved to serve as a Subnet Connector
    /// (CIDRs); empty for other devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub id: i64,
    pub hostname: String,
    /// WireGuard X25519 public key (base64).
    pub public_key: String,
    /// The peer's tunnel addresses (WireGuard AllowedIPs).
    pub allowed_ips: Vec<String>,
    /// Connection candidates (filled by the data plane's discovery).
    pub endpoints: Vec<String>,
    pub user: Option<String>,
    pub tags: Vec<String>,
}

/// Sources allowed to reach this device on `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    pub sources: Vec<String>,
    pub ports: String,
    /// `tcp`, `udp` or `icmp`; absent: every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// Destinations the rule admits (CIDRs of the subnets this device
    /// serves as a Subnet Connector); absent: this device's own addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<String>,
}

/// `POST /v1/routes`: the subnets this device offers to forward for (a
/// Subnet Connector); replaces what it advertised before. Peers reach them
/// once the policy or an admin approves them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutesRequest {
    pub routes: Vec<String>,
}

/// Most routes one device may advertise.
pub const MAX_ROUTES: usize = 64;

/// An advertised route: an IPv4 or IPv6 CIDR in canonical form (no host
/// bits set), not a default route. Err says what is wrong.
pub fn check_route(text: &str) -> Result<(), String> {
    let Some((addr, len)) = text.split_once('/') else {
        return Err(format!("{text:?}: a route is a CIDR such as 10.0.5.0/24"));
    };
    let addr: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{text:?}: {addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?;
    if len == 0 {
        return Err(format!(
            "{text:?}: default routes (exit nodes) are not supported yet; advertise the subnets themselves"
        ));
    }
    let host_bits = match addr {
        std::net::IpAddr::V4(a) => u32::from(a) & (u32::MAX >> len) != 0,
        std::net::IpAddr::V6(a) => u128::from(a) & (u128::MAX >> len) != 0,
    };
    if host_bits {
        return Err(format!(
            "{text:?}: host bits are set; write the network address (such as 10.0.5.0/24)"
        ));
    }
    if addr.is_loopback() || addr.is_multicast() || addr.is_unspecified() {
        return Err(format!("{text:?}: not a routable subnet"));
    }
    // The mesh's own IPv4 range: a route overlapping it would take peers'
    // addresses away from them.
    if let std::net::IpAddr::V4(a) = addr {
        let shorter = len.min(10);
        let mask = u32::MAX << (32 - u32::from(shorter));
        if u32::from(a) & mask == u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)) & mask {
            return Err(format!(
                "{text:?}: overlaps the mesh's own addresses (100.64.0.0/10)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_addressed_peer_opens_a_signal_message() {
        let a = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
        let b = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
        let c = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
        let (pa, pb) = (
            x25519_dalek::PublicKey::from(&a).to_bytes(),
            x25519_dalek::PublicKey::from(&b).to_bytes(),
        );
        let (nonce, sealed) = seal(&a, &pb, b"candidate 192.0.2.1:51820");
        assert_eq!(
            open(&b, &pa, &nonce, &sealed).as_deref(),
            Some(&b"candidate 192.0.2.1:51820"[..])
        );
        assert_eq!(open(&c, &pa, &nonce, &sealed), None, "a third device");
        // Claimed to come from someone else: the key and the AAD differ.
        let pc = x25519_dalek::PublicKey::from(&c).to_bytes();
        assert_eq!(open(&b, &pc, &nonce, &sealed), None);
        let mut bad = sealed.clone().into_bytes();
        bad[0] = if bad[0] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            open(&b, &pa, &nonce, std::str::from_utf8(&bad).unwrap()),
            None
        );
    }

    #[test]
    fn the_signal_key_is_what_earlier_releases_derived() {
        // The derivation before `pair_key`: HKDF expanded straight into a
        // ChaCha20-Poly1305 key. Older nodes must still open our messages.
        let a = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
        let b = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
        let (pa, pb) = (
            x25519_dalek::PublicKey::from(&a).to_bytes(),
            x25519_dalek::PublicKey::from(&b).to_bytes(),
        );
        let shared = b.diffie_hellman(&x25519_dalek::PublicKey::from(pa));
        let (lo, hi) = if pa <= pb { (pa, pb) } else { (pb, pa) };
        let info = [lo.as_slice(), hi.as_slice()];
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"runewarp signal v1");
        let old = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::from(
            salt.extract(shared.as_bytes())
                .expand(&info, &ring::aead::CHACHA20_POLY1305)
                .unwrap(),
        ));
        let (nonce, sealed) = seal(&a, &pb, b"hello");
        let plain = open_with(&old, &pa, &pb, &nonce, &sealed);
        assert_eq!(plain.as_deref(), Some(&b"hello"[..]));
        assert_ne!(pair_key(&a, &pb, b"one"), pair_key(&a, &pb, b"two"));
        assert_eq!(pair_key(&a, &pb, b"one"), pair_key(&b, &pa, b"one"));
    }

    #[test]
    fn public_keys_and_hostnames_are_checked() {
        assert!(valid_public_key(
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        ));
        assert!(!valid_public_key(
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8yk=="
        ));
        assert!(!valid_public_key("not base64!"));
        assert!(valid_hostname("laptop-2"));
        assert!(!valid_hostname("Laptop"));
        assert!(!valid_hostname("-x"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("a.b"));
        assert!(valid_endpoint("10.77.0.2:41641"));
        assert!(valid_endpoint("[2001:db8::1]:41641"));
        assert!(!valid_endpoint("10.77.0.2:0"));
        assert!(!valid_endpoint("0.0.0.0:1"));
        assert!(!valid_endpoint("host:1"));
    }

    #[test]
    fn routes_are_canonical_cidrs_and_never_the_default_route() {
        assert_eq!(check_route("10.0.5.0/24"), Ok(()));
        assert_eq!(check_route("fd12:3456::/48"), Ok(()));
        assert!(
            check_route("0.0.0.0/0")
                .unwrap_err()
                .contains("default routes")
        );
        assert!(check_route("::/0").unwrap_err().contains("default routes"));
        assert!(
            check_route("10.0.5.1/24")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(check_route("10.0.5.0").unwrap_err().contains("CIDR"));
        assert!(check_route("10.0.5.0/33").unwrap_err().contains("0 to 32"));
        assert!(check_route("ten/8").unwrap_err().contains("not an IP"));
        assert!(check_route("127.0.0.0/8").is_err());
        assert!(check_route("100.64.5.0/24").unwrap_err().contains("mesh"));
        assert!(check_route("100.0.0.0/8").unwrap_err().contains("mesh"));
        assert_eq!(check_route("100.128.0.0/16"), Ok(()));
    }
}
