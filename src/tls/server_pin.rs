//! `server-trust = "pin"`: the Client accepts the Server certificate only
//! if the SHA-256 of its SubjectPublicKeyInfo equals `server-pin`. No CA,
//! name or date is consulted; the handshake signature is still verified, so
//! only the holder of the pinned key can complete it.

use std::fmt;
use std::sync::Arc;

use rustls::CertificateError;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{ClientIdentity, ClientIdentityError};

/// The SHA-256 of a Server certificate's SubjectPublicKeyInfo DER, written
/// as 64 lowercase hex characters (the same form as a Client identity).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerPin([u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerPinError {
    #[error(
        "a server pin is 64 lowercase hex characters (SHA-256 of the Server certificate's public key), got {0} characters"
    )]
    Length(usize),
    #[error("a server pin is lowercase hex without colons or spaces")]
    NotLowerHex,
}

impl ServerPin {
    /// Parse the canonical form: 64 lowercase hex digits, nothing else.
    /// (The same form as a Client identity, so the same parser.)
    pub fn parse(text: &str) -> Result<Self, ServerPinError> {
        match ClientIdentity::parse(text) {
            Ok(id) => Ok(Self(*id.as_bytes())),
            Err(ClientIdentityError::Length(n)) => Err(ServerPinError::Length(n)),
            Err(_) => Err(ServerPinError::NotLowerHex),
        }
    }

    /// The pin of a DER certificate; `None` if it does not parse.
    pub(crate) fn of_certificate(cert: &[u8]) -> Option<Self> {
        ClientIdentity::from_certificate_der(cert)
            .ok()
            .map(|id| Self(*id.as_bytes()))
    }
}

impl fmt::Display for ServerPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&ClientIdentity::from_bytes(self.0), f)
    }
}

impl fmt::Debug for ServerPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerPin({self})")
    }
}

/// Accepts a Server certificate if and only if its SPKI pin is `expected`,
/// then verifies the TLS 1.3 handshake signature with that key.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    expected: ServerPin,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedServerVerifier {
    pub fn new(expected: ServerPin, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        Self { expected, provider }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = ServerPin::of_certificate(end_entity).ok_or(
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
        )?;
        if presented == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        // Once per failed handshake, which the Client itself paces (its
        // redial backoff): not something a third party can flood.
        tracing::warn!(
            event = "server_pin_mismatch",
            server = %server_name.to_str(),
            expected = %self.expected,
            presented = %presented,
            hint = "server-pin must be the output of \"runewarp server cert show-pin\" on the Server",
        );
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    crate::tls::tls13_only_signatures!(Tls12NotOffered);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_only_the_canonical_form() {
        let hex = "ab".repeat(32);
        assert_eq!(ServerPin::parse(&hex).unwrap().to_string(), hex);
        assert_eq!(ServerPin::parse("abc"), Err(ServerPinError::Length(3)));
        assert_eq!(
            ServerPin::parse(&"AB".repeat(32)),
            Err(ServerPinError::NotLowerHex)
        );
        assert!(ServerPin::parse(&format!("{}:", "a".repeat(63))).is_err());
    }

    #[test]
    fn the_verifier_accepts_only_the_pinned_key_whatever_the_name() {
        use rustls::pki_types::pem::PemObject;
        let cert = |name: &str| {
            let (pem, _) = crate::tls::material::generate_self_signed(&[name]).unwrap();
            CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
        };
        let (ours, theirs) = (cert("edge.example.com"), cert("edge.example.com"));
        let pin = ServerPin::of_certificate(&ours).unwrap();
        let verifier =
            PinnedServerVerifier::new(pin, Arc::new(rustls::crypto::ring::default_provider()));
        let verify = |c: &CertificateDer<'static>, name: &str| {
            verifier.verify_server_cert(
                c,
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
        };
        assert!(verify(&ours, "edge.example.com").is_ok());
        // No name or CA is consulted: the key is the trust.
        assert!(verify(&ours, "other.example.com").is_ok());
        assert_eq!(
            verify(&theirs, "edge.example.com").unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        );
    }
}
