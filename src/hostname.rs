//! Hostnames, validated once at the config seam and never re-parsed.
//!
//! [`PublicHostname`] is a name Visitors reach (routed by SNI);
//! [`ServerHostname`] names the Runewarp edge itself (the QUIC tunnel
//! endpoint's certificate). Both are normalised the same way: ASCII
//! lowercase, one trailing dot stripped. IP literals, raw Unicode (use the
//! punycode `xn--` form) and malformed labels are rejected.
//!
//! A [`PublicHostname`] may also be a wildcard, `*.example.com`, matching
//! exactly one more label (`a.example.com`, not `a.b.example.com`, not
//! `example.com`); `PublicHostname::pattern` tells the two apart and
//! `HostnameTable` looks names up with exact names winning over
//! wildcards. The Server hostname is never a wildcard.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;

/// Why a string is not an acceptable hostname.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    #[error("hostname is empty")]
    /// The hostname is empty.
    Empty,
    #[error("hostname is longer than 253 characters")]
    /// Longer than 253 characters.
    TooLong,
    #[error("IP literals are not hostnames; use a DNS name")]
    /// An IP address, not a DNS name.
    IpLiteral,
    #[error(
        "a wildcard must be the whole first label, as in \"*.example.com\" (one label, no partial or nested wildcards)"
    )]
    /// A `*` anywhere but as the whole first label.
    Wildcard,
    #[error("a wildcard needs at least two labels after \"*.\" (\"*.example.com\", not \"*.com\")")]
    /// A wildcard over fewer than two labels.
    WildcardTooBroad,
    #[error("wildcards are not allowed here; give one DNS name")]
    /// A wildcard where only one DNS name is accepted.
    WildcardNotAllowed,
    #[error("raw Unicode is not allowed; write the punycode (xn--) form")]
    /// Raw Unicode instead of the punycode form.
    NonAscii,
    #[error("a bare DNS name is expected, without scheme, port or path (e.g. \"app.example.com\")")]
    /// A scheme, port or path around the name.
    NotBare,
    #[error("label {0:?} is empty or longer than 63 characters")]
    /// This label is empty or longer than 63 characters.
    BadLabelLength(String),
    #[error("label {0:?} may contain only a-z, 0-9 and '-', and may not start or end with '-'")]
    /// This label has a character outside a-z, 0-9 and '-', or starts or ends with '-'.
    BadLabelChars(String),
}

/// Normalise and validate a DNS hostname. Returns the canonical form.
pub(crate) fn normalize(raw: &str) -> Result<String, HostnameError> {
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

/// Normalise and validate a Public hostname: a DNS name, or a wildcard
/// `*.<name>` whose `<name>` has at least two labels.
pub(crate) fn normalize_public(raw: &str) -> Result<String, HostnameError> {
    match raw.strip_prefix("*.") {
        Some(rest) => {
            let suffix = normalize(rest).map_err(|e| match e {
                HostnameError::Empty => HostnameError::Wildcard,
                e => e,
            })?;
            if !suffix.contains('.') {
                return Err(HostnameError::WildcardTooBroad);
            }
            Ok(format!("*.{suffix}"))
        }
        None => normalize(raw),
    }
}

/// What a [`PublicHostname`] matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostnamePattern<'a> {
    /// Exactly this name.
    Exact(&'a str),
    /// `*.<suffix>`: any one label followed by `.<suffix>`.
    Wildcard { suffix: &'a str },
}

macro_rules! hostname_type {
    ($(#[$doc:meta])* $name:ident, $normalize:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validate and normalise `raw`.
            pub fn parse(raw: &str) -> Result<Self, HostnameError> {
                $normalize(raw).map(Self)
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
    /// A hostname Visitors connect to, or a one-label wildcard of them
    /// (`*.example.com`); owned by exactly one Tunnel on the Server and at
    /// most one Service on a Client.
    PublicHostname,
    normalize_public
);
hostname_type!(
    /// The hostname of the Runewarp edge itself: the name in the Server
    /// certificate and the name the Client dials.
    ServerHostname,
    normalize
);

impl PublicHostname {
    /// Exact name or wildcard.
    pub(crate) fn pattern(&self) -> HostnamePattern<'_> {
        match self.0.strip_prefix("*.") {
            Some(suffix) => HostnamePattern::Wildcard { suffix },
            None => HostnamePattern::Exact(&self.0),
        }
    }

    pub(crate) fn is_wildcard(&self) -> bool {
        matches!(self.pattern(), HostnamePattern::Wildcard { .. })
    }

    /// Whether a lookup key (see `wire_lookup_key`) matches this name or
    /// pattern.
    pub fn matches(&self, key: &str) -> bool {
        match self.pattern() {
            HostnamePattern::Exact(name) => name == key,
            HostnamePattern::Wildcard { suffix } => wildcard_suffix(key) == Some(suffix),
        }
    }

    /// This name if it is not a wildcard (where only a DNS name will do).
    pub fn exact(self) -> Result<Self, HostnameError> {
        if self.is_wildcard() {
            Err(HostnameError::WildcardNotAllowed)
        } else {
            Ok(self)
        }
    }
}

/// The suffix a wildcard would need to match `key`: everything after its
/// first label, if that label is a plausible one (non-empty, no `*`).
fn wildcard_suffix(key: &str) -> Option<&str> {
    let (first, rest) = key.split_once('.')?;
    if first.is_empty() || first.contains('*') || rest.is_empty() {
        return None;
    }
    Some(rest)
}

/// Values by Public hostname: exact names first, then one-label
/// wildcards. A lookup costs at most two hash look-ups, whatever the
/// number of names.
#[derive(Debug, Clone)]
pub(crate) struct HostnameTable<T> {
    exact: HashMap<String, T>,
    /// By suffix (`example.com` for `*.example.com`).
    wildcard: HashMap<String, T>,
}

impl<T> Default for HostnameTable<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

impl<T> HostnameTable<T> {
    /// Add `hostname`; returns the value it replaced, if any.
    pub fn insert(&mut self, hostname: &PublicHostname, value: T) -> Option<T> {
        match hostname.pattern() {
            HostnamePattern::Exact(name) => self.exact.insert(name.to_string(), value),
            HostnamePattern::Wildcard { suffix } => self.wildcard.insert(suffix.to_string(), value),
        }
    }

    /// The value for a lookup key (see [`wire_lookup_key`]): the exact
    /// name's, else the wildcard's that covers it.
    pub(crate) fn lookup(&self, key: &str) -> Option<&T> {
        if let Some(v) = self.exact.get(key) {
            return Some(v);
        }
        self.wildcard.get(wildcard_suffix(key)?)
    }

    /// The value stored for exactly this name or pattern.
    pub fn get(&self, hostname: &PublicHostname) -> Option<&T> {
        match hostname.pattern() {
            HostnamePattern::Exact(name) => self.exact.get(name),
            HostnamePattern::Wildcard { suffix } => self.wildcard.get(suffix),
        }
    }
}

/// Normalise a hostname taken from the wire (an SNI value) for lookup in a
/// table keyed by [`PublicHostname`]. Never fails: an SNI that is not a
/// valid hostname simply matches nothing.
pub(crate) fn wire_lookup_key(sni: &str) -> String {
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
        for (text, error) in [
            ("", HostnameError::Empty),
            (".", HostnameError::Empty),
            ("10.0.0.1", HostnameError::IpLiteral),
            ("::1", HostnameError::IpLiteral),
            ("[::1]", HostnameError::IpLiteral),
            ("1.2.3", HostnameError::IpLiteral),
            ("*.com", HostnameError::WildcardTooBroad),
            ("bücher.de", HostnameError::NonAscii),
        ] {
            assert_eq!(PublicHostname::parse(text), Err(error), "{text}");
        }
        for bad in [
            "*",
            "*.",
            "a*.example.com",
            "*.*.example.com",
            "a.*.example.com",
            "**.example.com",
            "*example.com",
        ] {
            assert!(
                matches!(
                    PublicHostname::parse(bad),
                    Err(HostnameError::Wildcard | HostnameError::BadLabelChars(_))
                ),
                "{bad}: {:?}",
                PublicHostname::parse(bad)
            );
        }
        assert_eq!(
            ServerHostname::parse("*.example.com"),
            Err(HostnameError::Wildcard)
        );
        let bad_length = |h: &str| {
            matches!(
                PublicHostname::parse(h),
                Err(HostnameError::BadLabelLength(_))
            )
        };
        let bad_chars = |h: &str| {
            matches!(
                PublicHostname::parse(h),
                Err(HostnameError::BadLabelChars(_))
            )
        };
        assert!(bad_length("a..b"));
        assert!(bad_chars("-a.b"));
        assert!(bad_chars("a_b.c"));
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
        assert!(bad_length(&format!("{}.com", "a".repeat(64))));
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

    #[test]
    fn a_wildcard_matches_exactly_one_label() {
        let w = PublicHostname::parse("*.Example.COM.").unwrap();
        assert_eq!(w.as_str(), "*.example.com");
        assert_eq!(
            w.pattern(),
            HostnamePattern::Wildcard {
                suffix: "example.com"
            }
        );
        assert!(w.matches("a.example.com"));
        assert!(w.matches("xn--bcher-kva.example.com"));
        assert!(!w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches(".example.com"));
        assert!(!w.matches("*.example.com"));
        assert!(!w.matches("aexample.com"));
        assert!(w.clone().exact().is_err());
        let e = PublicHostname::parse("a.example.com").unwrap();
        assert_eq!(e.pattern(), HostnamePattern::Exact("a.example.com"));
        assert!(e.matches("a.example.com") && !e.matches("b.example.com"));
    }

    #[test]
    fn exact_names_win_over_wildcards_whatever_the_order() {
        let h = |s: &str| PublicHostname::parse(s).unwrap();
        let mut t = HostnameTable::default();
        t.insert(&h("*.example.com"), "wild");
        t.insert(&h("api.example.com"), "api");
        t.insert(&h("*.b.example.com"), "deep-wild");
        let mut u = HostnameTable::default();
        u.insert(&h("api.example.com"), "api");
        u.insert(&h("*.example.com"), "wild");
        u.insert(&h("*.b.example.com"), "deep-wild");
        for t in [t, u] {
            assert_eq!(t.lookup("api.example.com"), Some(&"api"));
            assert_eq!(t.lookup("www.example.com"), Some(&"wild"));
            assert_eq!(t.lookup("b.example.com"), Some(&"wild"));
            assert_eq!(t.lookup("x.b.example.com"), Some(&"deep-wild"));
            assert_eq!(t.lookup("x.y.example.com"), None);
            assert_eq!(t.lookup("example.com"), None);
            assert_eq!(t.lookup("*.example.com"), None);
            assert_eq!(t.lookup(""), None);
            assert_eq!(t.get(&h("*.example.com")), Some(&"wild"));
            assert_eq!(t.get(&h("www.example.com")), None);
        }
    }
}
