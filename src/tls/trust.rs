//! How a Client trusts the Server certificate: the system roots, exactly
//! the CAs of one PEM file (`server-trust = "ca-file"`), never both, or no
//! CA at all but the pin of the Server's public key (`server-trust =
//! "pin"`).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;

use crate::config::ServerTrust;
use crate::tls::material::{self, MaterialError};
use crate::tls::server_pin::PinnedServerVerifier;

/// Why the Client cannot build its trust in the Server certificate.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("server-trust = \"system\": no usable system root certificates ({0})")]
    /// `server-trust = "system"` found no usable root.
    NoSystemRoots(String),
    #[error("server-trust = \"ca-file\": {0}")]
    /// The `server-ca-file` cannot be read.
    CaFile(#[from] MaterialError),
    #[error("server-trust = \"ca-file\": {path}: certificate rejected: {error}")]
    /// A CA in `server-ca-file` was rejected.
    BadCa {
        /// The file.
        path: String,
        /// Why rustls rejected it.
        error: rustls::Error,
    },
    #[error("cannot build the Server certificate verifier: {0}")]
    /// The verifier could not be built.
    Verifier(String),
}

/// The verifier of the Server certificate for `trust`.
pub(crate) fn server_verifier(
    trust: &ServerTrust,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, TrustError> {
    if let ServerTrust::Pin(pin) = trust {
        return Ok(Arc::new(PinnedServerVerifier::new(*pin, provider)));
    }
    let roots = root_store(trust)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| TrustError::Verifier(e.to_string()))?;
    Ok(verifier)
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
        // Pinning consults no CA (see `server_verifier`).
        ServerTrust::Pin(_) => {}
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
