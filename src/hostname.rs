//! Hostnames, validated once at the config seam and never re-parsed.
//!
//! [`PublicHostname`] is a name Visitors reach (routed by SNI);
//! [`ServerHostname`] names the Runewarp edge itself (the QUIC tunnel
//! endpoint's certificate). Both are normalised the same way: ASCII
//! lowercase, one trailing dot stripped. IP literals, wildcards, raw
//! Unicode (use the punycode `xn--` form) and malformed labels are rejected.

use std::borrow::Borrow;
use std::fmt;

/// Why a string is not an acceptable hostname.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    #[error("hostname is empty")]
    Empty,
    #[error("hostname is longer than 253 characters")]
    TooLong,
    #[error("IP literals are not hostnames; use a DNS name")]
    IpLiteral,
    #[error("wildcards are not supported; list each hostname explicitly")]
    Wildcard,
    #[error("raw Unicode is not allowed; write the punycode (xn--) form")]
    NonAscii,
    #[error("a bare DNS name is expected, without scheme, port or path (e.g. \"app.example.com\")")]
    NotBare,
    #[error("label {0:?} is empty or longer than 63 characters")]
    BadLabelLength(String),
    #[error("label {0:?} may contain only a-z, 0-9 and '-', and may not start or end with '-'")]
    BadLabelChars(String),
}

/// Normalise and validate a DNS hostname. Returns the canonical form.
pub fn normalize(raw: &str) -> Result<String, HostnameError> {
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() {
        return Err(HostnameError::Empty);
    }
    if !trimmed.is_ascii() {
        return Err(HostnameError::NonAscii);
    }
    if trimmed.contains('*') {
        return Err(HostnameError::Wildcard);
    }
    // A URL or host:port pasted where a name belongs: say what is expected
    // rather than complaining about a label.
    if trimmed.contains("://") || trimmed.contains('/') {
        return Err(HostnameError::NotBare);
    }
    if let Some((host, port)) = trimmed.rsplit_once(':')
        && !host.is_empty()
        && !host.contains(':')
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(HostnameError::NotBare);
    }
    if trimmed.parse::<std::net::IpAddr>().is_ok()
        || (trimmed.starts_with('[') && trimmed.ends_with(']'))
    {
        return Err(HostnameError::IpLiteral);
    }
    if trimmed.len() > 253 {
        return Err(HostnameError::TooLong);
    }
    let lower = trimmed.to_ascii_lowercase();
    for label in lower.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(HostnameError::BadLabelLength(label.to_string()));
        }
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok_chars || label.starts_with('-') || label.ends_with('-') {
            return Err(HostnameError::BadLabelChars(label.to_string()));
        }
    }
    // A name made only of digits and dots that did not parse as an IP is
    // still an IP-looking literal (e.g. "1.2.3"): reject it too.
    if lower
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(HostnameError::IpLiteral);
    }
    Ok(lower)
}

macro_rules! hostname_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validate and normalise `raw`.
            pub fn parse(raw: &str) -> Result<Self, HostnameError> {
                normalize(raw).map(Self)
            }
            /// The canonical (lowercase, no trailing dot) form.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

hostname_type!(
    /// A hostname Visitors connect to; owned by exactly one Tunnel on the
    /// Server and at most one Service on a Client.
    PublicHostname
);
hostname_type!(
    /// The hostname of the Runewarp edge itself: the name in the Server
    /// certificate and the name the Client dials.
    ServerHostname
);

/// Normalise a hostname taken from the wire (an SNI value) for lookup in a
/// table keyed by [`PublicHostname`]. Never fails: an SNI that is not a
/// valid hostname simply matches nothing.
pub fn wire_lookup_key(sni: &str) -> String {
    sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercases_and_strips_one_trailing_dot() {
        let h = PublicHostname::parse("App.Example.COM.").unwrap();
        assert_eq!(h.as_str(), "app.example.com");
    }

    #[test]
    fn rejects_what_operators_get_wrong() {
        assert_eq!(PublicHostname::parse(""), Err(HostnameError::Empty));
        assert_eq!(PublicHostname::parse("."), Err(HostnameError::Empty));
        assert_eq!(
            PublicHostname::parse("10.0.0.1"),
            Err(HostnameError::IpLiteral)
        );
        assert_eq!(PublicHostname::parse("::1"), Err(HostnameError::IpLiteral));
        assert_eq!(
            PublicHostname::parse("[::1]"),
            Err(HostnameError::IpLiteral)
        );
        assert_eq!(
            PublicHostname::parse("1.2.3"),
            Err(HostnameError::IpLiteral)
        );
        assert_eq!(
            PublicHostname::parse("*.example.com"),
            Err(HostnameError::Wildcard)
        );
        assert_eq!(
            PublicHostname::parse("bücher.de"),
            Err(HostnameError::NonAscii)
        );
        assert!(matches!(
            PublicHostname::parse("a..b"),
            Err(HostnameError::BadLabelLength(_))
        ));
        assert!(matches!(
            PublicHostname::parse("-a.b"),
            Err(HostnameError::BadLabelChars(_))
        ));
        assert!(matches!(
            PublicHostname::parse("a_b.c"),
            Err(HostnameError::BadLabelChars(_))
        ));
        for pasted in [
            "app.example.com:443",
            "https://app.example.com",
            "https://app.example.com:8443/",
            "app.example.com/login",
        ] {
            assert_eq!(
                PublicHostname::parse(pasted),
                Err(HostnameError::NotBare),
                "{pasted}"
            );
        }
        assert!(
            HostnameError::NotBare
                .to_string()
                .contains("without scheme, port or path")
        );
        let long = format!("{}.com", "a".repeat(64));
        assert!(matches!(
            PublicHostname::parse(&long),
            Err(HostnameError::BadLabelLength(_))
        ));
    }

    #[test]
    fn accepts_punycode_and_digits_in_labels() {
        assert!(PublicHostname::parse("xn--bcher-kva.de").is_ok());
        assert!(PublicHostname::parse("1password.example").is_ok());
        assert!(ServerHostname::parse("localhost").is_ok());
    }

    #[test]
    fn wire_key_matches_parsed_form() {
        let h = PublicHostname::parse("app.example.com").unwrap();
        assert_eq!(wire_lookup_key("APP.example.com."), h.as_str());
    }
}
