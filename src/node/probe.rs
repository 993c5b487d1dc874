//! The path probe protocol (docs/mesh.md, "Direct paths"): the ping and
//! pong datagrams nodes exchange on their one UDP socket to find and keep
//! a direct path, the call-me-maybe signal that makes a peer probe back at
//! the same time, and the per-source rate limit on probes. Pure: no I/O.
//!
//! A datagram is
//!
//! ```text
//! "RWP" | version (1) | type (1 ping, 2 pong) | sender public key (32)
//!       | tx id length (8..=12) | tx id | tag (16)
//! ```
//!
//! The tag is HMAC-SHA256 (first 16 bytes) over everything before it,
//! keyed with [`crate::mesh_protocol::pair_key`] of the two peers (label
//! `runewarp probe v1`): only the two peers can make one, so a third party
//! can neither forge a pong (to redirect a peer's traffic) nor make a node
//! answer pings for someone else. The sender's key is in the clear so the
//! receiver can pick the key; a pong echoes the ping's tx id.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::dataplane::PROBE_MAGIC;

/// The probe format's version byte.
pub const VERSION: u8 = 1;
/// Shortest and longest transaction id.
pub const TX_MIN: usize = 8;
pub const TX_MAX: usize = 12;
/// Length of the authenticator.
const TAG: usize = 16;
/// Offset of the sender's key.
const KEY_AT: usize = 5;
/// Largest probe datagram.
pub const MAX_LEN: usize = KEY_AT + 32 + 1 + TX_MAX + TAG;

/// A probe's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ping,
    Pong,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Ping => 1,
            Kind::Pong => 2,
        }
    }
}

/// A transaction id (as sent: 8 to 12 bytes).
pub type Tx = Vec<u8>;

/// A fresh random transaction id of 12 bytes.
pub fn new_tx() -> Tx {
    rand::random::<[u8; TX_MAX]>().to_vec()
}

/// The key that authenticates probes between this device and `theirs`.
pub fn key(secret: &x25519_dalek::StaticSecret, theirs: &[u8; 32]) -> ring::hmac::Key {
    let k = crate::mesh_protocol::pair_key(secret, theirs, b"runewarp probe v1");
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k)
}

/// A probe datagram from `sender` (this device's public key).
pub fn encode(kind: Kind, sender: &[u8; 32], tx: &[u8], key: &ring::hmac::Key) -> Vec<u8> {
    let tx = &tx[..tx.len().min(TX_MAX)];
    let mut d = Vec::with_capacity(MAX_LEN);
    d.extend_from_slice(PROBE_MAGIC);
    d.push(VERSION);
    d.push(kind.byte());
    d.extend_from_slice(sender);
    d.push(tx.len() as u8);
    d.extend_from_slice(tx);
    let tag = ring::hmac::sign(key, &d);
    d.extend_from_slice(&tag.as_ref()[..TAG]);
    d
}

/// A probe's header, read before it is authenticated: its type and who
/// claims to send it. None for anything that is not a well-formed probe
/// of this version.
pub fn peek(d: &[u8]) -> Option<(Kind, [u8; 32])> {
    if d.len() < KEY_AT + 32 + 1 + TX_MIN + TAG || d.len() > MAX_LEN {
        return None;
    }
    if d[..3] != *PROBE_MAGIC || d[3] != VERSION {
        return None;
    }
    let kind = match d[4] {
        1 => Kind::Ping,
        2 => Kind::Pong,
        _ => return None,
    };
    let n = usize::from(d[KEY_AT + 32]);
    if !(TX_MIN..=TX_MAX).contains(&n) || d.len() != KEY_AT + 32 + 1 + n + TAG {
        return None;
    }
    let sender: [u8; 32] = d[KEY_AT..KEY_AT + 32].try_into().ok()?;
    Some((kind, sender))
}

/// Check a probe's tag with the pair's `key`; its type and tx id if it
/// holds.
pub fn open(d: &[u8], key: &ring::hmac::Key) -> Option<(Kind, Tx)> {
    let (kind, _) = peek(d)?;
    let (body, tag) = d.split_at(d.len() - TAG);
    let expected = ring::hmac::sign(key, body);
    // Compared in constant time: the tag is a secret until it matches.
    let diff = expected.as_ref()[..TAG]
        .iter()
        .zip(tag)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return None;
    }
    Some((kind, body[KEY_AT + 33..].to_vec()))
}

/// The probe protocol's messages on the signal channel (JSON, sealed like
/// every signal message). Anything else a peer sends keeps going to
/// `signals.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PathSignal {
    /// "I am probing you now: probe me back at these addresses."
    CallMeMaybe { candidates: Vec<String> },
}

impl PathSignal {
    /// The message if `bytes` is one.
    pub fn parse(bytes: &[u8]) -> Option<PathSignal> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Probes answered per second from one source address, and the burst.
const PER_SOURCE_RATE: f64 = 50.0;
const PER_SOURCE_BURST: f64 = 100.0;
/// Sources remembered at most (then the table starts over).
const MAX_SOURCES: usize = 4096;

/// A token bucket per source IP address, for probes: anyone can send them,
/// so what a node does for them is bounded.
#[derive(Debug, Default)]
pub struct SourceLimit {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl SourceLimit {
    /// Whether one more probe from `ip` may be looked at.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&ip) {
            let stale = Duration::from_secs_f64(PER_SOURCE_BURST / PER_SOURCE_RATE);
            self.buckets
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < stale);
            if self.buckets.len() >= MAX_SOURCES {
                self.buckets.clear();
            }
        }
        let (tokens, at) = self.buckets.entry(ip).or_insert((PER_SOURCE_BURST, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * PER_SOURCE_RATE;
        *tokens = (*tokens + refill).min(PER_SOURCE_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (x25519_dalek::StaticSecret, x25519_dalek::StaticSecret) {
        (
            x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>()),
            x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>()),
        )
    }

    fn public(s: &x25519_dalek::StaticSecret) -> [u8; 32] {
        x25519_dalek::PublicKey::from(s).to_bytes()
    }

    #[test]
    fn a_probe_round_trips_and_both_ends_share_the_key() {
        let (a, b) = pair();
        let (pa, pb) = (public(&a), public(&b));
        let tx = new_tx();
        let d = encode(Kind::Ping, &pa, &tx, &key(&a, &pb));
        assert_eq!(d.len(), MAX_LEN);
        assert_eq!(
            super::super::dataplane::classify(&d),
            super::super::dataplane::Datagram::Probe
        );
        assert_eq!(peek(&d), Some((Kind::Ping, pa)));
        assert_eq!(open(&d, &key(&b, &pa)), Some((Kind::Ping, tx.clone())));
        let short = encode(Kind::Pong, &pb, &tx[..8], &key(&b, &pa));
        assert_eq!(
            open(&short, &key(&a, &pb)),
            Some((Kind::Pong, tx[..8].to_vec()))
        );
    }

    #[test]
    fn a_forged_or_altered_pong_is_rejected() {
        let (a, b) = pair();
        let (pa, pb) = (public(&a), public(&b));
        let (mallory, _) = pair();
        let tx = new_tx();
        // Mallory claims to be b, with a key of her own.
        let forged = encode(Kind::Pong, &pb, &tx, &key(&mallory, &pa));
        assert_eq!(peek(&forged), Some((Kind::Pong, pb)));
        assert_eq!(open(&forged, &key(&a, &pb)), None);
        // A real pong with any bit changed.
        let real = encode(Kind::Pong, &pb, &tx, &key(&b, &pa));
        for i in 0..real.len() {
            let mut bad = real.clone();
            bad[i] ^= 0x40;
            assert_eq!(open(&bad, &key(&a, &pb)), None, "byte {i}");
        }
        // A ping turned into a pong (the type is authenticated).
        let mut flipped = encode(Kind::Ping, &pb, &tx, &key(&b, &pa));
        flipped[4] = 2;
        assert_eq!(open(&flipped, &key(&a, &pb)), None);
    }

    #[test]
    fn bad_bytes_never_panic() {
        let (a, b) = pair();
        let k = key(&a, &public(&b));
        let real = encode(Kind::Ping, &public(&b), &new_tx(), &k);
        for n in 0..=real.len() + 4 {
            let mut d = real.clone();
            d.resize(n, 0xff);
            let _ = peek(&d);
            let _ = open(&d, &k);
        }
        let mut bad_len = real.clone();
        bad_len[KEY_AT + 32] = 200;
        assert_eq!(peek(&bad_len), None);
        for _ in 0..2000 {
            let n = rand::random::<u8>() as usize % 80;
            let mut d: Vec<u8> = (0..n).map(|_| rand::random()).collect();
            if n > 4 {
                d[..4].copy_from_slice(b"RWP\x01");
            }
            let _ = peek(&d);
            let _ = open(&d, &k);
        }
        assert_eq!(peek(b"RWP\x02"), None);
    }

    #[test]
    fn call_me_maybe_is_json_with_a_kind() {
        let m = PathSignal::CallMeMaybe {
            candidates: vec!["192.0.2.1:41641".into()],
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"call-me-maybe","candidates":["192.0.2.1:41641"]}"#
        );
        assert_eq!(PathSignal::parse(text.as_bytes()), Some(m));
        assert_eq!(PathSignal::parse(b"hello"), None);
        assert_eq!(PathSignal::parse(br#"{"kind":"other"}"#), None);
    }

    #[test]
    fn probes_from_one_source_are_rate_limited() {
        let mut l = SourceLimit::default();
        let t = Instant::now();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let allowed = (0..1000).filter(|_| l.allow(ip, t)).count();
        assert_eq!(allowed, PER_SOURCE_BURST as usize);
        assert!(l.allow("192.0.2.8".parse().unwrap(), t), "another source");
        assert!(l.allow(ip, t + Duration::from_millis(100)), "refilled");
        for i in 0..(MAX_SOURCES as u32 + 10) {
            l.allow(IpAddr::from(std::net::Ipv4Addr::from(i)), t);
        }
        assert!(l.buckets.len() <= MAX_SOURCES);
    }
}
