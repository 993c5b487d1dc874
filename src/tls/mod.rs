//! TLS concerns: SNI parsing of Visitor ClientHellos, certificate material,
//! trust in and pinning of the Server certificate, and ACME. (The Client
//! identity type itself is [`crate::identity`].)

pub mod acme;
pub mod material;
pub(crate) mod server_pin;
pub mod sni;
pub mod trust;

/// Install ring as the process-wide rustls crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
