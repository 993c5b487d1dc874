//! Secrets the gate hands out: link tokens, session tokens, browser ids
//! (256 random bits, base64url) and 6-digit codes. Only their SHA-256
//! digests are ever stored; a presented secret is hashed and looked up.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;

/// A fresh 256-bit secret as 43 base64url characters.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A fresh 6-digit code, uniform over 000000..=999999.
pub fn new_code() -> String {
    format!("{:06}", rand::rng().random_range(0..1_000_000u32))
}

/// The stored form of a secret or code: lowercase hex SHA-256.
pub fn digest(secret: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `text` has the shape of a secret from [`new_secret`] (cheap
/// filter before hashing attacker input).
pub fn looks_like_secret(text: &str) -> bool {
    text.len() == 43
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A code as typed: digits only after dropping spaces and dashes.
pub fn normalize_code(text: &str) -> Option<String> {
    let digits: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect();
    (digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit())).then_some(digits)
}

/// HMAC-SHA256 of `purpose` and `subject` under `key`, base64url: the CSRF
/// token for a form bound to `subject` (a browser id or a session).
pub fn csrf_token(key: &[u8], purpose: &str, subject: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(purpose.as_bytes());
    ctx.update(b"\0");
    ctx.update(subject.as_bytes());
    URL_SAFE_NO_PAD.encode(ctx.sign().as_ref())
}

/// Constant-time check of a CSRF token.
pub fn csrf_ok(key: &[u8], purpose: &str, subject: &str, presented: &str) -> bool {
    let Ok(tag) = URL_SAFE_NO_PAD.decode(presented) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut msg = purpose.as_bytes().to_vec();
    msg.push(0);
    msg.extend_from_slice(subject.as_bytes());
    ring::hmac::verify(&key, &msg, &tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_256_bits_and_distinct() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(looks_like_secret(&a), "{a}");
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert!(!looks_like_secret("short"));
        assert!(!looks_like_secret(&format!("{}!", &a[..42])));
    }

    #[test]
    fn codes_are_six_digits_and_vary() {
        let codes: std::collections::HashSet<String> = (0..50).map(|_| new_code()).collect();
        assert!(codes.len() > 40);
        assert!(
            codes
                .iter()
                .all(|c| normalize_code(c).as_deref() == Some(c.as_str()))
        );
        assert_eq!(normalize_code(" 123-456 ").as_deref(), Some("123456"));
        assert_eq!(normalize_code("12345"), None);
        assert_eq!(normalize_code("12345a"), None);
    }

    #[test]
    fn digest_is_sha256_hex() {
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn csrf_tokens_are_bound_to_key_purpose_and_subject() {
        let t = csrf_token(b"k", "sign-in", "browser");
        assert!(csrf_ok(b"k", "sign-in", "browser", &t));
        assert!(!csrf_ok(b"k2", "sign-in", "browser", &t));
        assert!(!csrf_ok(b"k", "logout", "browser", &t));
        assert!(!csrf_ok(b"k", "sign-in", "other", &t));
        assert!(!csrf_ok(b"k", "sign-in", "browser", ""));
        assert!(!csrf_ok(b"k", "sign-in", "browser", "%%%"));
    }
}
