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

/// The signature methods of a rustls certificate verifier that pins a key
/// instead of checking a chain (the Client's pin of the Server, the
/// Server's pins of Client identities). The Tunnel connection is QUIC, so
/// TLS 1.2 is refused with the given [`rustls::PeerIncompatible`] variant;
/// TLS 1.3 handshake signatures are checked with the algorithms of
/// `self.provider`, which proves possession of the pinned key.
macro_rules! tls13_only_signatures {
    ($tls12_refusal:ident) => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &rustls::pki_types::CertificateDer<'_>,
            _dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::$tls12_refusal,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
pub(crate) use tls13_only_signatures;
