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

/// An error body, and the line that ends a map stream of a revoked device.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: i64,
    pub hostname: String,
    pub public_key: String,
    pub addresses: Vec<String>,
    pub user: Option<String>,
    pub tags: Vec<String>,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
