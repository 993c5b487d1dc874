//! The relay protocol: the frames a node and the relay (seed 000's Relay
//! Server, [`crate::relay_server`]) exchange over UDP, and the admission
//! token the control server signs and the relay checks. A common piece, so
//! the node, the relay and the control server never reach into each other.
//!
//! Every frame opens with `RWR`, a version byte ([`VERSION`]) and a type
//! byte (docs/mesh.md, "Relay protocol"); over UDP a frame is one
//! datagram, over the TCP fallback each is preceded by its length (u16,
//! big-endian):
//!
//! | Type | Direction | After the 5-byte header |
//! |---|---|---|
//! | 1 register | node → relay | the token (binary, [`TOKEN_LEN`] bytes) |
//! | 2 registered | relay → node | u16 seconds the binding stays without traffic |
//! | 3 error | relay → node | one [`Refusal`] code byte |
//! | 4 send | node → relay | 32-byte destination key, then a WireGuard datagram |
//! | 5 receive | relay → node | 32-byte source key, then the datagram |
//!
//! A token is `version(1) | expires unix s (u64) | organisation id (i64) |
//! device public key (32) | Ed25519 signature (64)`, the signature over
//! [`TOKEN_CONTEXT`] followed by the first 49 bytes. The relay trusts one
//! control server's public key.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// The magic that opens a relay frame.
pub const MAGIC: &[u8; 3] = b"RWR";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Header: magic, version, type.
pub const HEADER: usize = 5;
/// A signed token's length.
pub const TOKEN_LEN: usize = 1 + 8 + 8 + 32 + 64;
/// What an Ed25519 token signature covers besides the token's body.
const TOKEN_CONTEXT: &[u8] = b"runewarp relay token v1\0";
const TOKEN_VERSION: u8 = 1;
/// The bytes before the signature.
const TOKEN_BODY: usize = TOKEN_LEN - 64;

const REGISTER: u8 = 1;
const REGISTERED: u8 = 2;
const ERROR: u8 = 3;
const SEND: u8 = 4;
const RECEIVE: u8 = 5;

/// Why the relay refused a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a token this relay's control server signed.
    BadToken,
    /// Signed, but expired.
    Expired,
    /// Too many registrations from this address.
    RateLimited,
    /// The binding table is full.
    Full,
    /// A frame version this relay does not speak.
    Version,
}

impl Refusal {
    fn code(self) -> u8 {
        match self {
            Refusal::BadToken => 1,
            Refusal::Expired => 2,
            Refusal::RateLimited => 3,
            Refusal::Full => 4,
            Refusal::Version => 5,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Refusal::BadToken,
            2 => Refusal::Expired,
            3 => Refusal::RateLimited,
            4 => Refusal::Full,
            5 => Refusal::Version,
            _ => return None,
        })
    }
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadToken => "bad_token",
            Refusal::Expired => "expired",
            Refusal::RateLimited => "rate_limited",
            Refusal::Full => "full",
            Refusal::Version => "version",
        }
    }
}

/// A parsed frame; the slices borrow the datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Register { token: &'a [u8] },
    Registered { idle_s: u16 },
    Error(Refusal),
    Send { to: [u8; 32], payload: &'a [u8] },
    Receive { from: [u8; 32], payload: &'a [u8] },
}

/// Whether `d` opens like a relay frame (any version).
pub fn is_frame(d: &[u8]) -> bool {
    d.len() >= 4 && d[..3] == *MAGIC
}

/// A frame of this version, or `None` (wrong magic, version or type,
/// short). Never panics.
pub fn parse(d: &[u8]) -> Option<Frame<'_>> {
    if !is_frame(d) || d[3] != VERSION || d.len() < HEADER {
        return None;
    }
    let body = &d[HEADER..];
    let key = |b: &[u8]| -> Option<[u8; 32]> { b.get(..32)?.try_into().ok() };
    Some(match d[4] {
        REGISTER => Frame::Register { token: body },
        REGISTERED => Frame::Registered {
            idle_s: u16::from_be_bytes(body.get(..2)?.try_into().ok()?),
        },
        ERROR => Frame::Error(Refusal::from_code(*body.first()?)?),
        SEND => Frame::Send {
            to: key(body)?,
            payload: &body[32..],
        },
        RECEIVE => Frame::Receive {
            from: key(body)?,
            payload: &body[32..],
        },
        _ => return None,
    })
}

fn header(out: &mut Vec<u8>, kind: u8) {
    out.clear();
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
}

/// A register frame carrying `token`.
pub fn register(token: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + token.len());
    header(&mut out, REGISTER);
    out.extend_from_slice(token);
    out
}

/// The ack of a registration.
pub fn registered(idle_s: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 2);
    header(&mut out, REGISTERED);
    out.extend_from_slice(&idle_s.to_be_bytes());
    out
}

/// A refusal.
pub fn error(why: Refusal) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 1);
    header(&mut out, ERROR);
    out.push(why.code());
    out
}

/// A send frame (`to` and `payload`) written into `out`.
pub fn send_into(out: &mut Vec<u8>, to: &[u8; 32], payload: &[u8]) {
    header(out, SEND);
    out.extend_from_slice(to);
    out.extend_from_slice(payload);
}

/// A receive frame (`from` and `payload`) written into `out`.
pub fn receive_into(out: &mut Vec<u8>, from: &[u8; 32], payload: &[u8]) {
    header(out, RECEIVE);
    out.extend_from_slice(from);
    out.extend_from_slice(payload);
}

/// What a valid token admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    pub expires_unix: u64,
    pub organisation: i64,
    pub public_key: [u8; 32],
}

fn body(c: &Claims) -> [u8; TOKEN_BODY] {
    let mut b = [0u8; TOKEN_BODY];
    b[0] = TOKEN_VERSION;
    b[1..9].copy_from_slice(&c.expires_unix.to_be_bytes());
    b[9..17].copy_from_slice(&c.organisation.to_be_bytes());
    b[17..49].copy_from_slice(&c.public_key);
    b
}

/// A token for `claims`, signed with the control server's key.
pub fn sign(key: &Ed25519KeyPair, claims: &Claims) -> Vec<u8> {
    let body = body(claims);
    let signature = key.sign(&[TOKEN_CONTEXT, &body].concat());
    [&body[..], signature.as_ref()].concat()
}

/// The claims of `token` if `control_key` (an Ed25519 public key) signed
/// it; `Err(Refusal::Expired)` if it did but the token expired before `now_unix`.
pub fn verify(control_key: &[u8; 32], token: &[u8], now_unix: u64) -> Result<Claims, Refusal> {
    if token.len() != TOKEN_LEN || token[0] != TOKEN_VERSION {
        return Err(Refusal::BadToken);
    }
    let (body, signature) = token.split_at(TOKEN_BODY);
    UnparsedPublicKey::new(&ED25519, control_key)
        .verify(&[TOKEN_CONTEXT, body].concat(), signature)
        .map_err(|_| Refusal::BadToken)?;
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[i..i + 8]);
        b
    };
    let mut public_key = [0u8; 32];
    public_key.copy_from_slice(&body[17..49]);
    let claims = Claims {
        expires_unix: u64::from_be_bytes(u64_at(1)),
        organisation: i64::from_be_bytes(u64_at(9)),
        public_key,
    };
    if claims.expires_unix <= now_unix {
        return Err(Refusal::Expired);
    }
    Ok(claims)
}

/// Seconds since the Unix epoch (token expiries count in them).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The public half of a signing key, as the relay's `control-key` takes it.
pub fn public_key(key: &Ed25519KeyPair) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(key.public_key().as_ref());
    out
}

#[cfg(test)]
pub(crate) fn test_key() -> Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_bytes_are_refused() {
        let (k, p) = ([9u8; 32], b"\x04\0\0\0ciphertext");
        let mut out = Vec::new();
        send_into(&mut out, &k, p);
        assert_eq!(parse(&out), Some(Frame::Send { to: k, payload: p }));
        receive_into(&mut out, &k, p);
        assert_eq!(
            parse(&out),
            Some(Frame::Receive {
                from: k,
                payload: p
            })
        );
        assert_eq!(
            parse(&registered(90)),
            Some(Frame::Registered { idle_s: 90 })
        );
        assert_eq!(
            parse(&error(Refusal::Expired)),
            Some(Frame::Error(Refusal::Expired))
        );
        assert_eq!(
            parse(&register(b"tok")),
            Some(Frame::Register { token: b"tok" })
        );
        // Short, another version, an unknown type, a key cut short.
        assert_eq!(parse(b"RWR"), None);
        assert_eq!(parse(b"RWR\x02\x04"), None);
        assert_eq!(parse(b"RWR\x01\x09"), None);
        assert_eq!(parse(b"RWR\x01\x04short"), None);
        assert_eq!(parse(b"RWR\x01\x03\x63"), None);
        for _ in 0..2000 {
            let len = rand::random::<u8>() as usize % 48;
            let mut d: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            if d.len() >= 4 {
                d[..4].copy_from_slice(b"RWR\x01");
            }
            let _ = parse(&d);
        }
    }

    #[test]
    fn tokens_are_checked() {
        let key = test_key();
        let control = public_key(&key);
        let claims = Claims {
            expires_unix: 1000,
            organisation: 7,
            public_key: [5u8; 32],
        };
        let token = sign(&key, &claims);
        assert_eq!(token.len(), TOKEN_LEN);
        assert_eq!(verify(&control, &token, 999), Ok(claims));
        assert_eq!(verify(&control, &token, 1000), Err(Refusal::Expired));
        // Another control server's key.
        let other = public_key(&test_key());
        assert_eq!(verify(&other, &token, 0), Err(Refusal::BadToken));
        // A changed organisation, key or expiry breaks the signature.
        for i in [1, 12, 30, 100] {
            let mut t = token.clone();
            t[i] ^= 1;
            assert_eq!(verify(&control, &t, 0), Err(Refusal::BadToken), "byte {i}");
        }
        assert_eq!(verify(&control, &token[..50], 0), Err(Refusal::BadToken));
        assert_eq!(verify(&control, &[], 0), Err(Refusal::BadToken));
    }
}
