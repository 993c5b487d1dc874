//! The setup of the tests whose Server knows a second Client identity (a
//! stranger, a stuck or an offline Client) next to the one that serves:
//! the material for both and a TLS echo backend. Include it with
//! `#[path = "common/two_ids.rs"] mod two_ids;` after `mod common;`.
#![allow(dead_code)]

use std::path::PathBuf;

use runewarp::identity::ClientIdentity;

use crate::common::{EchoBackend, identity, material};

/// Server material, the identity `name` (as [`material`] makes it) and the
/// identity `other` in the same directory, and a TLS echo backend. The
/// fields drop in this order: the backend first, the directory last.
pub struct TwoIds {
    pub backend: EchoBackend,
    pub cert_dir: PathBuf,
    pub ca: PathBuf,
    pub id_dir: PathBuf,
    pub pin: ClientIdentity,
    pub other_dir: PathBuf,
    pub other_pin: ClientIdentity,
    _dir: tempfile::TempDir,
}

impl TwoIds {
    /// `name` and `other` name the identities; the backend serves `host`.
    pub async fn new(name: &str, other: &str, host: &str) -> TwoIds {
        let (dir, cert_dir, ca, id_dir, pin) = material(name);
        let (other_dir, other_pin) = identity(dir.path(), other);
        let backend = EchoBackend::tls(&[host]).await;
        TwoIds {
            backend,
            cert_dir,
            ca,
            id_dir,
            pin,
            other_dir,
            other_pin,
            _dir: dir,
        }
    }
}
