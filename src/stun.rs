//! A small STUN codec (RFC 8489), only what the mesh needs: Binding
//! requests, Binding success responses with XOR-MAPPED-ADDRESS (what the relay's
//! responder sends). Shared by the node (which asks for its
//! server-reflexive address) and the relay (which answers).
//!
//! Every parser takes untrusted bytes and returns `None` for anything it
//! does not understand; none of them panics on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic cookie at offset 4 of every STUN message.
pub const MAGIC_COOKIE: u32 = 0x2112_a442;
/// Binding request.
const BINDING_REQUEST: u16 = 0x0001;
/// Binding success response.
const BINDING_SUCCESS: u16 = 0x0101;
/// MAPPED-ADDRESS (the pre-RFC 5389 form; read, never written).
const MAPPED_ADDRESS: u16 = 0x0001;
/// XOR-MAPPED-ADDRESS.
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// The fixed header: type, length, cookie, transaction id.
const HEADER: usize = 20;
/// Largest message parsed (one UDP datagram on a 1500-byte path).
const MAX_MESSAGE: usize = 1500;

/// A transaction id: 96 random bits chosen by the requester.
pub type TransactionId = [u8; 12];

/// The header of a STUN message: (type, transaction id, attributes), if
/// `d` is one (cookie, length and padding all right).
fn header(d: &[u8]) -> Option<(u16, TransactionId, &[u8])> {
    if d.len() < HEADER || d.len() > MAX_MESSAGE {
        return None;
    }
    let kind = u16::from_be_bytes([d[0], d[1]]);
    let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
    let cookie = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
    if kind & 0xc000 != 0 || cookie != MAGIC_COOKIE || len % 4 != 0 || HEADER + len != d.len() {
        return None;
    }
    let mut id = [0u8; 12];
    id.copy_from_slice(&d[8..HEADER]);
    Some((kind, id, &d[HEADER..]))
}

/// A Binding request with transaction id `id` (no attributes).
pub fn binding_request(id: TransactionId) -> [u8; HEADER] {
    let mut m = [0u8; HEADER];
    m[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[8..].copy_from_slice(&id);
    m
}

/// The transaction id of a Binding request, if `d` is one. Attributes are
/// allowed and ignored (none of them changes the answer).
pub fn parse_request(d: &[u8]) -> Option<TransactionId> {
    match header(d)? {
        (BINDING_REQUEST, id, _) => Some(id),
        _ => None,
    }
}

/// The success response to request `id` from `observed`: one
/// XOR-MAPPED-ADDRESS attribute.
pub fn binding_response(id: TransactionId, observed: SocketAddr) -> Vec<u8> {
    let mut cookie_and_id = [0u8; 16];
    cookie_and_id[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    cookie_and_id[4..].copy_from_slice(&id);
    let port = observed.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let (family, octets): (u8, &[u8]) = match observed.ip() {
        IpAddr::V4(a) => (1, &a.octets()),
        IpAddr::V6(a) => (2, &a.octets()),
    };
    let address: Vec<u8> = octets
        .iter()
        .zip(&cookie_and_id)
        .map(|(x, k)| x ^ k)
        .collect();
    let value_len = 4 + address.len();
    let mut m = Vec::with_capacity(HEADER + 4 + value_len);
    m.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    m.extend_from_slice(&((4 + value_len) as u16).to_be_bytes());
    m.extend_from_slice(&cookie_and_id);
    m.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    m.extend_from_slice(&(value_len as u16).to_be_bytes());
    m.extend_from_slice(&[0, family]);
    m.extend_from_slice(&port.to_be_bytes());
    m.extend_from_slice(&address);
    m
}

/// The address a Binding success response for request `id` reports:
/// XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS.
pub fn parse_response(d: &[u8], id: TransactionId) -> Option<SocketAddr> {
    let (kind, got, mut attrs) = header(d)?;
    if kind != BINDING_SUCCESS || got != id {
        return None;
    }
    let mut plain = None;
    while attrs.len() >= 4 {
        let t = u16::from_be_bytes([attrs[0], attrs[1]]);
        let len = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let padded = len.checked_add(3)? & !3;
        let value = attrs.get(4..4 + len)?;
        match t {
            XOR_MAPPED_ADDRESS => return address(value, Some(&id)),
            MAPPED_ADDRESS => plain = address(value, None),
            _ => {}
        }
        attrs = attrs.get(4 + padded..).unwrap_or(&[]);
    }
    plain
}

/// A (XOR-)MAPPED-ADDRESS value; XORed with the cookie and `id` when given.
fn address(v: &[u8], id: Option<&TransactionId>) -> Option<SocketAddr> {
    let mut mask = [0u8; 16];
    if let Some(id) = id {
        mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        mask[4..].copy_from_slice(id);
    }
    let port =
        u16::from_be_bytes([*v.get(2)?, *v.get(3)?]) ^ u16::from_be_bytes([mask[0], mask[1]]);
    let ip = match (v.get(1)?, v.len()) {
        (1, 8) => {
            let mut o = [0u8; 4];
            for (i, b) in o.iter_mut().enumerate() {
                *b = v[4 + i] ^ mask[i];
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (2, 20) => {
            let mut o = [0u8; 16];
            for (i, b) in o.iter_mut().enumerate() {
                *b = v[4 + i] ^ mask[i];
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The responder as the relay runs it.
    fn respond(d: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
        parse_request(d).map(|id| binding_response(id, from))
    }

    #[test]
    fn a_request_gets_the_observed_address_back() {
        let id = [7u8; 12];
        let req = binding_request(id);
        assert_eq!(parse_request(&req), Some(id));
        for observed in ["198.51.100.7:40000", "[2001:db8::5]:3478"] {
            let observed: SocketAddr = observed.parse().unwrap();
            let resp = respond(&req, observed).unwrap();
            assert_eq!(parse_response(&resp, id), Some(observed));
            assert_eq!(parse_response(&resp, [8u8; 12]), None, "another request's");
            // A response is not a request, and the reverse.
            assert_eq!(parse_request(&resp), None);
        }
        assert_eq!(parse_response(&req, id), None);
    }

    #[test]
    fn the_plain_mapped_address_is_read_when_alone() {
        let id = [1u8; 12];
        let mut m = vec![0x01, 0x01, 0, 12];
        m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(&id);
        m.extend_from_slice(&[0, 1, 0, 8, 0, 1, 0x0d, 0x96, 192, 0, 2, 1]);
        assert_eq!(
            parse_response(&m, id),
            Some("192.0.2.1:3478".parse().unwrap())
        );
    }

    #[test]
    fn bad_bytes_are_refused_without_panicking() {
        let id = [3u8; 12];
        let good = binding_response(id, "192.0.2.9:1".parse().unwrap());
        // Every truncation, every single-byte change, and random noise.
        for n in 0..good.len() {
            let _ = parse_response(&good[..n], id);
            let _ = parse_request(&good[..n]);
        }
        for i in 0..good.len() {
            for v in [0u8, 0xff, 0x7f, 0x01] {
                let mut m = good.clone();
                m[i] = v;
                let _ = parse_response(&m, id);
                let _ = respond(&m, "192.0.2.1:9".parse().unwrap());
            }
        }
        for _ in 0..2000 {
            let len = rand::random::<u16>() as usize % 64;
            let mut m: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            if m.len() >= 8 {
                m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            }
            let _ = parse_response(&m, id);
            let _ = parse_request(&m);
        }
        // An attribute longer than the message.
        let mut m = vec![0x01, 0x01, 0, 4];
        m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(&id);
        m.extend_from_slice(&[0, 0x20, 0xff, 0xff]);
        assert_eq!(parse_response(&m, id), None);
        // Wrong cookie, odd length, a length that disagrees.
        let mut bad = binding_request(id);
        bad[4] = 0;
        assert_eq!(parse_request(&bad), None);
        let mut bad = binding_request(id).to_vec();
        bad[3] = 4;
        assert_eq!(parse_request(&bad), None);
        bad.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(parse_request(&bad), Some(id));
    }
}
