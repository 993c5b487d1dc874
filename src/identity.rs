//! The Client identity: the SHA-256 of a Client certificate's
//! SubjectPublicKeyInfo DER, written as 64 lowercase hex characters. The
//! Server pins these; certificate dates and chains are ignored.

use std::fmt;
use std::str::FromStr;

/// A pinned Client public-key identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientIdentity([u8; 32]);

/// Why a text or certificate is not a Client identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientIdentityError {
    #[error(
        "a client identity is 64 lowercase hex characters (SHA-256 of the public key), got {0} characters"
    )]
    /// Not 64 characters long (the length found).
    Length(usize),
    #[error("a client identity is lowercase hex without colons or spaces")]
    /// A character that is not lowercase hex.
    NotLowerHex,
    #[error("certificate is not valid DER X.509: {0}")]
    /// The certificate is not valid DER X.509.
    BadCertificate(String),
}

impl ClientIdentity {
    /// Parse the textual pin. Only the canonical form is accepted: 64
    /// lowercase hex digits, no colons.
    pub fn parse(text: &str) -> Result<Self, ClientIdentityError> {
        if text.len() != 64 {
            return Err(ClientIdentityError::Length(text.chars().count()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or(ClientIdentityError::NotLowerHex)?;
            let lo = hex_val(pair[1]).ok_or(ClientIdentityError::NotLowerHex)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Self(out))
    }

    /// The identity with these SHA-256 bytes.
    pub(crate) fn from_bytes(sha256: [u8; 32]) -> Self {
        Self(sha256)
    }

    /// The identity of a SubjectPublicKeyInfo DER blob.
    pub(crate) fn from_spki_der(spki: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// The identity of an X.509 certificate (DER).
    pub fn from_certificate_der(cert: &[u8]) -> Result<Self, ClientIdentityError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| ClientIdentityError::BadCertificate(e.to_string()))?;
        Ok(Self::from_spki_der(parsed.tbs_certificate.subject_pki.raw))
    }

    /// The 32 bytes of the SHA-256.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientIdentity({self})")
    }
}

impl FromStr for ClientIdentity {
    type Err = ClientIdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text() {
        let text = "00ff10a0b1c2d3e4f5061728394a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c";
        assert_eq!(ClientIdentity::parse(text).unwrap().to_string(), text);
    }

    #[test]
    fn rejects_uppercase_colons_and_wrong_length() {
        let upper = "00FF10A0B1C2D3E4F5061728394A5B6C7D8E9FA0B1C2D3E4F5061728394A5B6C";
        assert_eq!(
            ClientIdentity::parse(upper),
            Err(ClientIdentityError::NotLowerHex)
        );
        assert_eq!(
            ClientIdentity::parse("ab:cd"),
            Err(ClientIdentityError::Length(5))
        );
        assert!(ClientIdentity::parse(&"g".repeat(64)).is_err());
    }

    #[test]
    fn pin_of_known_vector() {
        // SHA-256("abc") is the FIPS 180-2 test vector; the pin is the
        // plain SHA-256 of the SPKI bytes, so the same vector applies.
        assert_eq!(
            ClientIdentity::from_spki_der(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
