//! TLS concerns: SNI parsing of Visitor ClientHellos, Client identities,
//! certificate material and ACME.

pub mod acme;
pub mod client_identity;
pub mod material;
pub mod server_pin;
pub mod sni;
pub mod trust;

/// Install ring as the process-wide rustls crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
