//! Relay admission tokens: the control server signs, for each connected
//! device, a short-lived token (device public key, organisation id,
//! expiry; [`crate::relay_protocol`]) with an Ed25519 key it keeps in its
//! state dir, and puts it in the device's map next to the relays of
//! `[[control.relays]]`. The relays trust that key's public half
//! (`runewarp control relay-key` prints it for `[server.relay]`).

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use ring::signature::Ed25519KeyPair;

use super::config::RelayEntry;
use crate::mesh_protocol::RelayInfo;
use crate::relay_protocol::{self, Claims};

/// The signing key (PKCS#8), in the state dir: made once, 0600, never
/// replaced.
pub const KEY_FILE: &str = "relay-signing.key";
/// How long a token admits its device.
pub const TOKEN_TTL: Duration = Duration::from_secs(600);
/// A map stream hands out a new token when this much of the old one's life
/// is left.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(300);

pub use crate::relay_protocol::unix_now;

/// The key in `state_dir`, made on first use.
pub fn load_or_create(state_dir: &Path) -> Result<Ed25519KeyPair, String> {
    let path = state_dir.join(KEY_FILE);
    let shown = path.display().to_string();
    if !path.exists() {
        crate::fsutil::ensure_dir(state_dir, 0o700)
            .map_err(|e| format!("{}: {e}", state_dir.display()))?;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| format!("{shown}: cannot generate a key"))?;
        match crate::fsutil::write_new_atomic(&path, pkcs8.as_ref(), 0o600) {
            Ok(()) => tracing::info!(event = "relay_key_created", path = %shown),
            // Made by another process a moment ago: use that one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("{shown}: cannot write: {e}")),
        }
    }
    crate::fsutil::warn_if_exposed(&path, "relay signing key");
    let bytes = std::fs::read(&path).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    Ed25519KeyPair::from_pkcs8(&bytes)
        .map_err(|_| format!("{shown}: not an Ed25519 PKCS#8 key (remove it to make a new one, then update every [server.relay] control-key)"))
}

/// The public key as `[server.relay] control-key` takes it.
pub fn public_key_text(key: &Ed25519KeyPair) -> String {
    base64::engine::general_purpose::STANDARD.encode(relay_protocol::public_key(key))
}

/// Signs tokens for the configured relays.
pub struct Issuer {
    key: Ed25519KeyPair,
    relays: Vec<RelayEntry>,
}

impl Issuer {
    pub fn new(key: Ed25519KeyPair, relays: Vec<RelayEntry>) -> Self {
        Self { key, relays }
    }

    /// The map's `relays` for the device with `public_key` (base64) in
    /// organisation `organisation`; empty without relays or with a bad key.
    pub fn relays_for(&self, organisation: i64, public_key: &str, now_unix: u64) -> Vec<RelayInfo> {
        let Some(public_key) = crate::mesh_protocol::public_key_bytes(public_key) else {
            return Vec::new();
        };
        if self.relays.is_empty() {
            return Vec::new();
        }
        let expires_unix = now_unix + TOKEN_TTL.as_secs();
        let token = relay_protocol::sign(
            &self.key,
            &Claims {
                expires_unix,
                organisation,
                public_key,
            },
        );
        let token = base64::engine::general_purpose::STANDARD.encode(token);
        self.relays
            .iter()
            .map(|r| RelayInfo {
                name: r.name.clone(),
                address: r.address.clone(),
                tcp_address: r.tcp_address.clone(),
                token: token.clone(),
                expires_unix,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(public_key_text(&a), public_key_text(&b));
        std::fs::write(dir.path().join(KEY_FILE), b"junk").unwrap();
        assert!(
            load_or_create(dir.path())
                .unwrap_err()
                .contains("not an Ed25519")
        );
    }

    #[test]
    fn tokens_name_the_device_and_its_organisation() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create(dir.path()).unwrap();
        let control = relay_protocol::public_key(&key);
        let issuer = Issuer::new(
            key,
            vec![RelayEntry {
                name: "eu-1".into(),
                address: "192.0.2.1:3478".into(),
                tcp_address: None,
            }],
        );
        let pk = [7u8; 32];
        let b64 = base64::engine::general_purpose::STANDARD;
        let got = issuer.relays_for(4, &b64.encode(pk), 1000);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].expires_unix, 1600);
        let token = b64.decode(&got[0].token).unwrap();
        let claims = relay_protocol::verify(&control, &token, 1000).unwrap();
        assert_eq!((claims.organisation, claims.public_key), (4, pk));
        assert!(issuer.relays_for(4, "bad", 1000).is_empty());
    }
}
