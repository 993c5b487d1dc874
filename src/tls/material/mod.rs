//! Certificate material on disk: the Server `cert-dir`, the Client
//! `identity-dir` and the Client `public-cert-dir`: the operations that
//! create, renew and rotate them (their CLI front end is
//! [`crate::commands::material`]) and the loaders the runtime uses.
//!
//! Layouts (compatible with the public implementation):
//!
//! - `cert-dir`: `server.crt`, `server.key`, `server-ca.crt`,
//!   `state/server-ca.key`.
//! - `identity-dir`: `client.crt`, `client.key`, `client-identity.txt`.
//! - `public-cert-dir`: `public-ca.crt`, `state/public-ca.key`,
//!   `<hostname>/public.crt`, `<hostname>/public.key`.
//!
//! Keys are written with mode 0600, certificates 0644, `state/` is 0700 and
//! a material directory created here is 0755 (an existing one keeps its
//! mode). Every file is written atomically (`crate::fsutil`), and each new
//! key is written before the certificate that needs it, CA before leaf. A
//! crash can therefore leave at most one pair out of step (a new key next to
//! the old certificate, or a new CA next to an old leaf), which the loaders
//! report as a mismatch and the same command, run again, repairs.

mod identity;
mod pki;
mod public_cert;
mod server_cert;

pub use identity::{
    CLIENT_CERT, CLIENT_IDENTITY_TXT, CLIENT_KEY, init_client_identity, rotate_client_identity,
    show_client_identity,
};
pub use pki::{TlsMaterial, fingerprint_sha256, generate_self_signed, san_dns_names};
pub use public_cert::{
    PUBLIC_CA_CERT, PUBLIC_CA_KEY, PUBLIC_CERT, PUBLIC_KEY, init_public_certs, renew_public_certs,
    rotate_public_ca,
};
pub use server_cert::{
    SERVER_CA_CERT, SERVER_CA_KEY, SERVER_CERT, SERVER_KEY, init_server_cert, renew_server_cert,
    rotate_server_ca, show_server_pin,
};

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;

use crate::config::ConfigError;
use crate::hostname::{HostnameError, PublicHostname};
use crate::identity::ClientIdentity;

/// Name of the directory holding CA keys inside a material directory.
pub(crate) const STATE_DIR: &str = "state";

/// Everything that can go wrong with material on disk. Each message names
/// the file or directory and, where there is one, the command to run next.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("cannot read {}: {source}", path.display())]
    /// A file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    /// A file could not be written.
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    #[error("no {what} in {}: run \"{next}\"", dir.display())]
    /// The material does not exist yet.
    Missing {
        /// What is missing.
        what: &'static str,
        /// Where it was looked for.
        dir: PathBuf,
        /// The command that creates it.
        next: String,
    },
    #[error("{} already exists; refusing to overwrite it: {next}", path.display())]
    /// A file that would be overwritten exists (no `--force`).
    Exists {
        /// The file.
        path: PathBuf,
        /// What to do instead.
        next: String,
    },
    #[error(
        "incomplete {what}: {} exists but {} is missing; nothing was written: {next}",
        present.display(),
        missing.display()
    )]
    /// One file of a pair exists without the other.
    Partial {
        /// What the pair is.
        what: &'static str,
        /// The file present.
        present: PathBuf,
        /// The file missing.
        missing: PathBuf,
        /// The command that repairs it.
        next: String,
    },
    #[error("{}: {reason}", path.display())]
    /// A file's content is not valid.
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    #[error("{}: no PEM certificate found", path.display())]
    /// A PEM file holds no certificate.
    NoCertificates {
        /// The file.
        path: PathBuf,
    },
    #[error("{} does not belong to {}: {next}", key.display(), cert.display())]
    /// A key does not match its certificate.
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
        /// The command that repairs it.
        next: String,
    },
    #[error(
        "{} says {recorded} but {} has Client identity {actual}: {next}",
        recorded_path.display(),
        cert_path.display()
    )]
    /// The recorded Client identity differs from the certificate's.
    PinMismatch {
        /// The file recording the pin.
        recorded_path: PathBuf,
        /// The recorded pin.
        recorded: String,
        /// The certificate file.
        cert_path: PathBuf,
        /// The certificate's pin.
        actual: String,
        /// The command that repairs it.
        next: String,
    },
    #[error(
        "no Server hostname: pass --hostname or set RUNEWARP_SERVER_HOSTNAME or server.hostname"
    )]
    /// No Server hostname was given or configured.
    NoServerHostname,
    #[error("invalid hostname {value:?}: {source}")]
    /// A hostname argument is invalid.
    Hostname {
        /// The hostname as given.
        value: String,
        /// Why it is invalid.
        #[source]
        source: HostnameError,
    },
    #[error("cannot generate certificate: {0}")]
    /// Certificate generation failed.
    Generate(#[from] rcgen::Error),
    #[error(transparent)]
    /// The config file could not be loaded.
    Config(#[from] ConfigError),
}

/// Load the Server certificate from a `cert-dir`: `server.crt` (leaf first,
/// followed by any chain certificates in the file) and `server.key`.
pub fn load_server_certificate(cert_dir: &Path) -> Result<TlsMaterial, MaterialError> {
    let cert = cert_dir.join(SERVER_CERT);
    let key = cert_dir.join(SERVER_KEY);
    pki::require_pair(
        "Server certificate",
        cert_dir,
        &cert,
        &key,
        server_cert::init_hint(cert_dir),
    )?;
    pki::load_tls_material(&cert, &key, &server_cert::renew_hint(cert_dir))
}

/// Load a PEM CA bundle (one or more certificates).
pub fn load_ca_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let bytes = pki::read(path)?;
    let certs = pki::parse_certs(path, &bytes)?;
    if certs.is_empty() {
        return Err(MaterialError::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Load the Client identity from an `identity-dir`: the TLS material to
/// present and its pin (SHA-256 of `client.crt`'s SubjectPublicKeyInfo).
pub fn load_client_identity(
    identity_dir: &Path,
) -> Result<(TlsMaterial, ClientIdentity), MaterialError> {
    identity::load(identity_dir)
}

/// Load every `<hostname>/public.crt` + `public.key` pair in a
/// `public-cert-dir`, sorted by hostname. Subdirectories whose names are not
/// hostnames (such as `state/`) are skipped.
pub fn load_public_certs(dir: &Path) -> Result<Vec<(PublicHostname, TlsMaterial)>, MaterialError> {
    public_cert::load(dir)
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Quote a path for a command suggestion if it needs it.
fn shell_arg(path: &Path) -> String {
    let s = path.display().to_string();
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'/' | b'.' | b'-' | b'_' | b'+' | b',' | b':' | b'@' | b'%' | b'='
                )
        });
    if plain {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests;
