//! Stream framing: each tunnel stream starts with a PROXY protocol v2
//! header carrying the Visitor's address (source) and the address it
//! connected to (destination).
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! 0..12  signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
//! 12     version (high nibble, must be 2) | command (low nibble: 0 LOCAL, 1 PROXY)
//! 13     family/protocol: 0x11 TCP over IPv4, 0x21 TCP over IPv6, 0x00 UNSPEC
//! 14..16 length of everything that follows
//! 16..   addresses (IPv4: src, dst, sport, dport = 12 bytes;
//!        IPv6: 36 bytes), then optional TLVs (skipped)
//! ```

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte PROXY protocol v2 signature.
const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Size of the fixed part: signature, version/command, family, length.
const FIXED_LEN: usize = 16;
const VERSION_2: u8 = 2;
const COMMAND_LOCAL: u8 = 0;
const COMMAND_PROXY: u8 = 1;
const FAMILY_UNSPEC: u8 = 0x00;
const FAMILY_TCP4: u8 = 0x11;
const FAMILY_TCP6: u8 = 0x21;
/// Address block sizes for the supported families.
const ADDR_LEN_TCP4: usize = 12;
const ADDR_LEN_TCP6: usize = 36;

/// The addresses a PROXY v2 PROXY command carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The Visitor's address.
    pub source: SocketAddr,
    /// The address the Visitor connected to.
    pub destination: SocketAddr,
}

/// The result of [`decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// More bytes are needed.
    Incomplete,
    /// A whole header: `header` is `None` for a LOCAL command. `consumed` is
    /// the header's total size, TLVs included; the stream data follows it.
    Complete {
        /// The addresses; `None` for LOCAL.
        header: Option<ProxyHeader>,
        /// Header bytes, TLVs included.
        consumed: usize,
    },
}

/// Why bytes are not a valid PROXY v2 header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("missing PROXY protocol v2 signature")]
    /// The 12-byte signature is missing.
    BadSignature,
    #[error("unsupported PROXY protocol version {0} (expected 2)")]
    /// A version other than 2.
    BadVersion(u8),
    #[error("invalid PROXY protocol command {0:#x} (expected LOCAL or PROXY)")]
    /// A command other than LOCAL or PROXY.
    BadCommand(u8),
    #[error("unsupported PROXY protocol address family/protocol {0:#04x}")]
    /// An address family or protocol other than TCP over IPv4/IPv6.
    UnsupportedFamily(u8),
    #[error("PROXY header length {length} too short for address family {family:#04x}")]
    /// The length cannot hold the family's addresses.
    LengthTooShort {
        /// The family/protocol byte.
        family: u8,
        /// The header's length field.
        length: u16,
    },
}

/// Why [`read_proxy_header`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadFramingError {
    #[error("i/o error reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid PROXY header: {0}")]
    Framing(#[from] FramingError),
}

/// Encodes a PROXY command header for `h`, without TLVs.
///
/// Two IPv4 addresses use the TCP/IPv4 family; otherwise both addresses are
/// sent as IPv6, an IPv4 address becoming its IPv4-mapped form
/// (`::ffff:a.b.c.d`). IPv6 flow info and scope ids are not carried.
pub fn encode(h: &ProxyHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN + ADDR_LEN_TCP6);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_2 << 4 | COMMAND_PROXY);
    match (h.source.ip(), h.destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(FAMILY_TCP4);
            out.extend_from_slice(&(ADDR_LEN_TCP4 as u16).to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            out.push(FAMILY_TCP6);
            out.extend_from_slice(&(ADDR_LEN_TCP6 as u16).to_be_bytes());
            out.extend_from_slice(&to_ipv6(src).octets());
            out.extend_from_slice(&to_ipv6(dst).octets());
        }
    }
    out.extend_from_slice(&h.source.port().to_be_bytes());
    out.extend_from_slice(&h.destination.port().to_be_bytes());
    out
}

/// Encodes a LOCAL command header (UNSPEC family, no addresses).
pub(crate) fn encode_local() -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_2 << 4 | COMMAND_LOCAL);
    out.push(FAMILY_UNSPEC);
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

fn to_ipv6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The validated fixed part of a header.
struct Fixed {
    command: u8,
    family: u8,
    /// Length of the variable part (addresses + TLVs).
    length: u16,
}

impl Fixed {
    /// Size of the address block to decode: 0 for LOCAL (its addresses,
    /// if any, are skipped along with the TLVs).
    fn address_len(&self) -> usize {
        match (self.command, self.family) {
            (COMMAND_PROXY, FAMILY_TCP4) => ADDR_LEN_TCP4,
            (COMMAND_PROXY, FAMILY_TCP6) => ADDR_LEN_TCP6,
            _ => 0,
        }
    }
}

/// Validates the fixed 16-byte part, or as much of it as `buf` holds.
///
/// Returns `Ok(None)` if `buf` is shorter than 16 bytes but has no error
/// so far, so bad input is rejected as early as possible.
fn check_fixed(buf: &[u8]) -> Result<Option<Fixed>, FramingError> {
    // Compare whatever prefix of the signature has arrived.
    let sig_seen = buf.len().min(SIGNATURE.len());
    if buf.get(..sig_seen) != SIGNATURE.get(..sig_seen) {
        return Err(FramingError::BadSignature);
    }

    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(None);
    };
    let (version, command) = (ver_cmd >> 4, ver_cmd & 0x0F);
    if version != VERSION_2 {
        return Err(FramingError::BadVersion(version));
    }
    if command != COMMAND_LOCAL && command != COMMAND_PROXY {
        return Err(FramingError::BadCommand(command));
    }

    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    if command == COMMAND_PROXY && family != FAMILY_TCP4 && family != FAMILY_TCP6 {
        return Err(FramingError::UnsupportedFamily(family));
    }

    let Some(&[hi, lo]) = buf.get(14..FIXED_LEN).and_then(|b| b.first_chunk::<2>()) else {
        return Ok(None);
    };
    let fixed = Fixed {
        command,
        family,
        length: u16::from_be_bytes([hi, lo]),
    };
    if usize::from(fixed.length) < fixed.address_len() {
        return Err(FramingError::LengthTooShort {
            family,
            length: fixed.length,
        });
    }
    Ok(Some(fixed))
}

/// The source and destination addresses of `N` bytes each (4 for IPv4, 16
/// for IPv6) at the start of `addrs`, and the bytes after them (the ports).
fn address_pair<const N: usize>(addrs: &[u8]) -> Option<(IpAddr, IpAddr, &[u8])>
where
    IpAddr: From<[u8; N]>,
{
    let (src, rest) = addrs.split_first_chunk::<N>()?;
    let (dst, ports) = rest.split_first_chunk::<N>()?;
    Some((IpAddr::from(*src), IpAddr::from(*dst), ports))
}

/// Decodes the address block of a PROXY header; `addrs` must be exactly
/// `fixed.address_len()` bytes. Returns `None` for LOCAL.
fn decode_addresses(fixed: &Fixed, addrs: &[u8]) -> Option<ProxyHeader> {
    let (src, dst, ports) = match fixed.address_len() {
        ADDR_LEN_TCP4 => address_pair::<4>(addrs)?,
        ADDR_LEN_TCP6 => address_pair::<16>(addrs)?,
        _ => return None,
    };
    let &[sp0, sp1, dp0, dp1] = ports.first_chunk::<4>()?;
    // `to_canonical` turns IPv4-mapped IPv6 back into plain IPv4.
    Some(ProxyHeader {
        source: SocketAddr::new(src.to_canonical(), u16::from_be_bytes([sp0, sp1])),
        destination: SocketAddr::new(dst.to_canonical(), u16::from_be_bytes([dp0, dp1])),
    })
}

/// Decodes a PROXY protocol v2 header at the start of `buf`.
///
/// Errors are reported as soon as the received prefix shows them (a wrong
/// first byte is enough for [`FramingError::BadSignature`]).
pub fn decode(buf: &[u8]) -> Result<Decoded, FramingError> {
    let Some(fixed) = check_fixed(buf)? else {
        return Ok(Decoded::Incomplete);
    };
    let consumed = FIXED_LEN + usize::from(fixed.length);
    let Some(variable) = buf.get(FIXED_LEN..consumed) else {
        return Ok(Decoded::Incomplete);
    };
    // The length was checked to cover the addresses; TLVs after them are
    // skipped.
    let addrs = variable.get(..fixed.address_len()).unwrap_or_default();
    Ok(Decoded::Complete {
        header: decode_addresses(&fixed, addrs),
        consumed,
    })
}

/// Reads exactly one PROXY protocol v2 header from `r`: the 16-byte fixed
/// part, then exactly the announced length. Nothing after the header is
/// read, so the stream data stays in `r`. Returns `None` for LOCAL.
///
/// The caller applies its own timeout.
pub(crate) async fn read_proxy_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<ProxyHeader>, ReadFramingError> {
    let mut head = [0u8; FIXED_LEN];
    r.read_exact(&mut head).await?;
    // With all 16 bytes present `check_fixed` either fails or returns the
    // fixed part; the `ok_or` only guards against that ever changing.
    let fixed = check_fixed(&head)?.ok_or(FramingError::BadSignature)?;

    // Read the addresses into a small stack buffer, then discard any TLVs
    // without buffering them.
    let mut addrs = [0u8; ADDR_LEN_TCP6];
    let addr_len = fixed.address_len();
    let addrs = addrs.get_mut(..addr_len).unwrap_or_default();
    r.read_exact(addrs).await?;

    // `check_fixed` guarantees length >= addr_len.
    let skip = u64::from(fixed.length).saturating_sub(addr_len as u64);
    let skipped = tokio::io::copy(&mut (&mut *r).take(skip), &mut tokio::io::sink()).await?;
    if skipped != skip {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(decode_addresses(&fixed, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn header(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader {
            source: addr(source),
            destination: addr(destination),
        }
    }

    fn complete(buf: &[u8]) -> (Option<ProxyHeader>, usize) {
        match decode(buf) {
            Ok(Decoded::Complete { header, consumed }) => (header, consumed),
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    #[test]
    fn ipv4_and_ipv6_round_trip() {
        // Source, destination, header length, family/protocol and length bytes.
        for (source, destination, len, fixed) in [
            (
                "203.0.113.7:51234",
                "192.0.2.1:443",
                28,
                [0x21, 0x11, 0x00, 0x0C],
            ),
            (
                "[2001:db8::1]:40000",
                "[2001:db8::2]:443",
                52,
                [0x21, 0x21, 0x00, 0x24],
            ),
        ] {
            let h = header(source, destination);
            let bytes = encode(&h);
            assert_eq!(bytes.len(), len, "{source}");
            assert_eq!(&bytes[12..16], &fixed, "{source}");
            assert_eq!(complete(&bytes), (Some(h), len), "{source}");
        }
        let v4 = encode(&header("203.0.113.7:51234", "192.0.2.1:443"));
        assert_eq!(
            &v4[16..],
            &[203, 0, 113, 7, 192, 0, 2, 1, 0xC8, 0x22, 0x01, 0xBB]
        );
    }

    #[test]
    fn mixed_families_use_mapped_ipv6() {
        let h = header("198.51.100.9:1234", "[2001:db8::2]:443");
        let bytes = encode(&h);
        assert_eq!(bytes[13], FAMILY_TCP6);
        let mapped = Ipv4Addr::new(198, 51, 100, 9).to_ipv6_mapped().octets();
        assert_eq!(&bytes[16..32], &mapped);
        // Decodes back to the canonical IPv4 address.
        assert_eq!(complete(&bytes), (Some(h), 52));

        // A mapped address sent by someone else is canonicalised too.
        let h6 = header("[::ffff:10.0.0.1]:1", "[::1]:2");
        let (decoded, _) = complete(&encode(&h6));
        assert_eq!(decoded.expect("proxy").source, addr("10.0.0.1:1"));
    }

    #[test]
    fn local() {
        let bytes = encode_local();
        assert_eq!(bytes.len(), 16);
        assert_eq!(&bytes[12..], &[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(complete(&bytes), (None, 16));

        // LOCAL with any family: addresses and TLVs are skipped.
        let mut odd = SIGNATURE.to_vec();
        odd.extend_from_slice(&[0x20, 0x31, 0x00, 0x03, 1, 2, 3, 0xFF]);
        assert_eq!(complete(&odd), (None, 19));
    }

    #[test]
    fn tlvs_are_skipped() {
        let h = header("10.1.2.3:1000", "10.3.2.1:2000");
        let mut bytes = encode(&h);
        // Append a NOOP TLV (type 0x04, length 3) and fix up the length.
        bytes.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]);
        let len = u16::try_from(bytes.len() - FIXED_LEN).expect("fits");
        bytes[14..16].copy_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(b"payload");
        assert_eq!(complete(&bytes), (Some(h), 34));
    }

    #[test]
    fn errors() {
        assert_eq!(decode(b"GET / HTTP/1.1"), Err(FramingError::BadSignature));
        assert_eq!(decode(b"G"), Err(FramingError::BadSignature));
        assert_eq!(decode(&SIGNATURE[..5]), Ok(Decoded::Incomplete));
        let mut early = SIGNATURE[..5].to_vec();
        early.push(0x42);
        assert_eq!(decode(&early), Err(FramingError::BadSignature));

        let with = |rest: &[u8]| {
            let mut b = SIGNATURE.to_vec();
            b.extend_from_slice(rest);
            decode(&b)
        };
        assert_eq!(with(&[0x11]), Err(FramingError::BadVersion(1)));
        assert_eq!(with(&[0x31, 0x11, 0, 12]), Err(FramingError::BadVersion(3)));
        assert_eq!(with(&[0x22]), Err(FramingError::BadCommand(2)));
        assert_eq!(with(&[0x2F, 0x11]), Err(FramingError::BadCommand(0xF)));
        assert_eq!(with(&[0x21, 0x00]), Err(FramingError::UnsupportedFamily(0)));
        assert_eq!(
            with(&[0x21, 0x12]),
            Err(FramingError::UnsupportedFamily(0x12))
        );
        assert_eq!(
            with(&[0x21, 0x31, 0, 216]),
            Err(FramingError::UnsupportedFamily(0x31))
        );
        assert_eq!(
            with(&[0x21, 0x11, 0, 11]),
            Err(FramingError::LengthTooShort {
                family: 0x11,
                length: 11
            })
        );
        assert_eq!(
            with(&[0x21, 0x21, 0, 12]),
            Err(FramingError::LengthTooShort {
                family: 0x21,
                length: 12
            })
        );
        // Error messages are human-readable.
        assert_eq!(
            FramingError::LengthTooShort {
                family: 0x21,
                length: 12
            }
            .to_string(),
            "PROXY header length 12 too short for address family 0x21"
        );
    }

    #[test]
    fn byte_by_byte_incomplete() {
        let h = header("[2001:db8::1]:40000", "192.0.2.1:443");
        for bytes in [encode(&h), encode_local()] {
            for end in 0..bytes.len() {
                assert_eq!(decode(&bytes[..end]), Ok(Decoded::Incomplete), "{end}");
            }
            assert!(matches!(decode(&bytes), Ok(Decoded::Complete { .. })));
        }
    }

    #[tokio::test]
    async fn read_leaves_following_bytes() {
        use tokio::io::AsyncWriteExt;
        let h = header("203.0.113.7:51234", "[2001:db8::2]:443");
        let mut bytes = encode(&h);
        // With a TLV, which must be skipped without touching "hello".
        bytes.extend_from_slice(&[0x04, 0x00, 0x02, 9, 9]);
        let len = u16::try_from(bytes.len() - FIXED_LEN).expect("fits");
        bytes[14..16].copy_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(b"hello");

        let (mut client, mut server) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            client.write_all(&bytes).await.expect("write");
            // Dropping `client` closes the stream after "hello".
        });
        let decoded = read_proxy_header(&mut server).await.expect("header");
        assert_eq!(decoded, Some(h));
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(rest, b"hello");
        writer.await.expect("writer");

        let mut local: &[u8] = &[encode_local(), b"x".to_vec()].concat();
        assert_eq!(read_proxy_header(&mut local).await.expect("local"), None);
        assert_eq!(local, b"x");
    }

    #[tokio::test]
    async fn read_errors() {
        let mut bad: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert!(matches!(
            read_proxy_header(&mut bad).await,
            Err(ReadFramingError::Framing(FramingError::BadSignature))
        ));

        let full = encode(&header("10.0.0.1:1", "10.0.0.2:2"));
        for end in [3, 16, 20, full.len() - 1] {
            let mut short: &[u8] = &full[..end];
            match read_proxy_header(&mut short).await {
                Err(ReadFramingError::Io(e)) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof)
                }
                other => panic!("expected UnexpectedEof at {end}, got {other:?}"),
            }
        }

        // Truncated inside the TLVs.
        let mut tlv = encode_local();
        tlv[15] = 10;
        tlv.extend_from_slice(&[0; 4]);
        let mut short: &[u8] = &tlv;
        assert!(matches!(
            read_proxy_header(&mut short).await,
            Err(ReadFramingError::Io(_))
        ));
    }

    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddrV4::new(
                ip.into(),
                port
            )
            .into()),
            (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
                |(ip, port, flow, scope)| SocketAddrV6::new(ip.into(), port, flow, scope).into()
            ),
            // IPv4-mapped IPv6 addresses.
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| {
                SocketAddr::new(Ipv4Addr::from(ip).to_ipv6_mapped().into(), port)
            }),
        ]
    }

    /// What a decoded address looks like: canonical IP, no flow/scope.
    fn canonical(a: SocketAddr) -> SocketAddr {
        SocketAddr::new(a.ip().to_canonical(), a.port())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&buf);
        }

        #[test]
        fn signature_prefixed_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut buf = SIGNATURE.to_vec();
            buf.extend(tail);
            if let Ok(Decoded::Complete { consumed, .. }) = decode(&buf) {
                prop_assert!(consumed <= buf.len());
            }
        }

        #[test]
        fn round_trip(src in socket_addr(), dst in socket_addr(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            let h = ProxyHeader { source: src, destination: dst };
            let mut bytes = encode(&h);
            let len = bytes.len();
            bytes.extend(tail);
            let expected = ProxyHeader {
                source: canonical(src),
                destination: canonical(dst),
            };
            prop_assert_eq!(
                decode(&bytes),
                Ok(Decoded::Complete { header: Some(expected), consumed: len })
            );
        }
    }
}
