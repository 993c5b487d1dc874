//! How a Client trusts the Server certificate: the system roots, or exactly
//! the CAs of one PEM file (`server-trust = "ca-file"`), never both.

use crate::config::ServerTrust;
use crate::tls::material::{self, MaterialError};

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("server-trust = \"system\": no usable system root certificates ({0})")]
    NoSystemRoots(String),
    #[error("server-trust = \"ca-file\": {0}")]
    CaFile(#[from] MaterialError),
    #[error("server-trust = \"ca-file\": {path}: certificate rejected: {error}")]
    BadCa { path: String, error: rustls::Error },
}

/// Build the root store for `trust`.
pub fn root_store(trust: &ServerTrust) -> Result<rustls::RootCertStore, TrustError> {
    let mut roots = rustls::RootCertStore::empty();
    match trust {
        ServerTrust::System => {
            let loaded = rustls_native_certs::load_native_certs();
            for err in &loaded.errors {
                tracing::warn!(event = "system_roots_error", error = ?err.to_string());
            }
            let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err(TrustError::NoSystemRoots(
                    "install ca-certificates or use server-trust = \"ca-file\"".into(),
                ));
            }
        }
        ServerTrust::CaFile(path) => {
            for cert in material::load_ca_bundle(path)? {
                roots.add(cert).map_err(|error| TrustError::BadCa {
                    path: path.display().to_string(),
                    error,
                })?;
            }
        }
    }
    Ok(roots)
}
