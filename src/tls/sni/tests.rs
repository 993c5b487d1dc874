//! Tests of the ClientHello parser: fragmented, multi-record, malformed and
//! oversized input, and property tests.

use super::*;
use proptest::prelude::*;

/// Builds ClientHello messages and wraps them in TLS records.
#[derive(Default, Clone)]
struct HelloBuilder {
    sni: Option<Vec<u8>>,
    alpn: Vec<Vec<u8>>,
    /// Sizes of padding (type 21) extensions to add.
    padding: Vec<usize>,
    /// Extra raw extensions (type, data).
    raw_extensions: Vec<(u16, Vec<u8>)>,
    /// Omit the extensions block entirely.
    no_extensions: bool,
}

fn push_u16(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&u16::try_from(v).expect("fits u16").to_be_bytes());
}

fn push_u24(out: &mut Vec<u8>, v: usize) {
    let v = u32::try_from(v).expect("fits u32");
    out.extend_from_slice(&v.to_be_bytes()[1..]);
}

impl HelloBuilder {
    fn sni(mut self, name: &str) -> Self {
        self.sni = Some(name.as_bytes().to_vec());
        self
    }

    fn alpn(mut self, protocols: &[&str]) -> Self {
        self.alpn = protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
        self
    }

    fn padding(mut self, len: usize) -> Self {
        self.padding.push(len);
        self
    }

    fn raw_extension(mut self, ext_type: u16, data: Vec<u8>) -> Self {
        self.raw_extensions.push((ext_type, data));
        self
    }

    fn extensions(&self) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = &self.sni {
            let mut list = vec![NAME_TYPE_HOST_NAME];
            push_u16(&mut list, name.len());
            list.extend_from_slice(name);
            push_u16(&mut exts, EXT_SERVER_NAME.into());
            push_u16(&mut exts, list.len() + 2);
            push_u16(&mut exts, list.len());
            exts.extend_from_slice(&list);
        }
        if !self.alpn.is_empty() {
            let mut list = Vec::new();
            for p in &self.alpn {
                list.push(u8::try_from(p.len()).expect("short ALPN"));
                list.extend_from_slice(p);
            }
            push_u16(&mut exts, EXT_ALPN.into());
            push_u16(&mut exts, list.len() + 2);
            push_u16(&mut exts, list.len());
            exts.extend_from_slice(&list);
        }
        for &len in &self.padding {
            push_u16(&mut exts, 21);
            push_u16(&mut exts, len);
            exts.extend(std::iter::repeat_n(0u8, len));
        }
        for (ext_type, data) in &self.raw_extensions {
            push_u16(&mut exts, usize::from(*ext_type));
            push_u16(&mut exts, data.len());
            exts.extend_from_slice(data);
        }
        exts
    }

    /// The ClientHello body (without the handshake header).
    fn body(&self) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0xAB; 32]); // random
        body.push(32);
        body.extend_from_slice(&[0x11; 32]); // session_id
        push_u16(&mut body, 4);
        body.extend_from_slice(&[0x13, 0x01, 0x13, 0x02]); // cipher_suites
        body.extend_from_slice(&[1, 0]); // compression: null
        if !self.no_extensions {
            let exts = self.extensions();
            push_u16(&mut body, exts.len());
            body.extend_from_slice(&exts);
        }
        body
    }

    /// The handshake message (header + body).
    fn message(&self) -> Vec<u8> {
        wrap_handshake(&self.body())
    }

    /// The message in a single record.
    fn build(&self) -> Vec<u8> {
        records(&self.message(), &[])
    }
}

fn wrap_handshake(body: &[u8]) -> Vec<u8> {
    let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
    push_u24(&mut msg, body.len());
    msg.extend_from_slice(body);
    msg
}

fn record(content_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![content_type, 3, 1];
    push_u16(&mut out, payload.len());
    out.extend_from_slice(payload);
    out
}

/// Splits `message` into handshake records at the given offsets.
fn records(message: &[u8], splits: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = 0;
    for &end in splits.iter().chain(std::iter::once(&message.len())) {
        out.extend(record(CONTENT_TYPE_HANDSHAKE, &message[start..end]));
        start = end;
    }
    out
}

/// A ClientHello for `name` that offers h2.
fn h2_hello(name: &str) -> HelloBuilder {
    HelloBuilder::default().sni(name).alpn(&["h2"])
}

fn complete(buf: &[u8]) -> ClientHelloInfo {
    match parse_client_hello(buf) {
        Ok(Parse::Complete(info)) => info,
        other => panic!("expected Complete, got {other:?}"),
    }
}

fn is_malformed(r: Result<Parse, SniError>) -> bool {
    matches!(r, Err(SniError::Malformed(_)))
}

#[test]
fn simple_sni() {
    let info = complete(&HelloBuilder::default().sni("App.Example.com").build());
    assert_eq!(info.server_name.as_deref(), Some("App.Example.com"));
    assert!(info.alpn.is_empty());
}

#[test]
fn sni_and_alpn() {
    let hello = HelloBuilder::default()
        .sni("app.example.com")
        .alpn(&["h2", "http/1.1"])
        .padding(100)
        .build();
    let info = complete(&hello);
    assert_eq!(info.server_name.as_deref(), Some("app.example.com"));
    assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
}

#[test]
fn trailing_bytes_after_hello_are_ignored() {
    let mut buf = HelloBuilder::default().sni("a.example").build();
    buf.extend_from_slice(&[0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5]);
    assert_eq!(complete(&buf).server_name.as_deref(), Some("a.example"));
}

#[test]
fn byte_by_byte_is_incomplete_until_complete() {
    let hello = h2_hello("app.example.com").build();
    for end in 0..hello.len() {
        assert_eq!(
            parse_client_hello(&hello[..end]),
            Ok(Parse::Incomplete),
            "prefix of {end} bytes"
        );
    }
    assert_eq!(
        complete(&hello).server_name.as_deref(),
        Some("app.example.com")
    );
}

#[test]
fn fragmented_across_two_and_three_records() {
    let msg = h2_hello("frag.example.com").message();
    let len = msg.len();
    for splits in [vec![len / 2], vec![10, len - 3], vec![1, 2], vec![len - 1]] {
        let buf = records(&msg, &splits);
        let info = complete(&buf);
        assert_eq!(info.server_name.as_deref(), Some("frag.example.com"));
        assert_eq!(info.alpn, vec![b"h2".to_vec()]);
        // Every strict prefix is Incomplete.
        for end in 0..buf.len() {
            assert_eq!(parse_client_hello(&buf[..end]), Ok(Parse::Incomplete));
        }
    }
}

#[test]
fn split_inside_handshake_header() {
    let msg = HelloBuilder::default().sni("hdr.example.com").message();
    for split in 1..HANDSHAKE_HEADER_LEN {
        let buf = records(&msg, &[split]);
        assert_eq!(
            complete(&buf).server_name.as_deref(),
            Some("hdr.example.com")
        );
    }
    // Every byte of the header in its own record.
    let buf = records(&msg, &[1, 2, 3, 4]);
    assert_eq!(
        complete(&buf).server_name.as_deref(),
        Some("hdr.example.com")
    );
}

#[test]
fn no_sni() {
    let info = complete(&HelloBuilder::default().alpn(&["h2"]).build());
    assert_eq!(info.server_name, None);
    assert_eq!(info.alpn, vec![b"h2".to_vec()]);

    let bare = HelloBuilder {
        no_extensions: true,
        ..Default::default()
    };
    assert_eq!(complete(&bare.build()), ClientHelloInfo::default());
}

#[test]
fn sni_list_without_host_name() {
    // A server_name list holding only an unknown name type.
    let data = vec![0, 4, 7, 0, 1, b'x'];
    let hello = HelloBuilder::default().raw_extension(0, data).build();
    assert_eq!(complete(&hello).server_name, None);
}

#[test]
fn not_tls() {
    assert_eq!(
        parse_client_hello(b"GET / HTTP/1.1\r\n"),
        Err(SniError::NotTls)
    );
    assert_eq!(parse_client_hello(b"G"), Err(SniError::NotTls));
    assert_eq!(parse_client_hello(&[0x16, 2]), Err(SniError::NotTls));
    assert_eq!(parse_client_hello(&[0x16, 3, 0]), Err(SniError::NotTls));
    assert_eq!(parse_client_hello(&[0x16, 3, 5, 0]), Err(SniError::NotTls));
    assert_eq!(parse_client_hello(&[0x16]), Ok(Parse::Incomplete));
    assert_eq!(parse_client_hello(&[0x16, 3, 3]), Ok(Parse::Incomplete));
    assert_eq!(parse_client_hello(&[]), Ok(Parse::Incomplete));
}

#[test]
fn wrong_record_type_or_handshake_type() {
    let msg = HelloBuilder::default().sni("x.example").message();
    // A change_cipher_spec record between two handshake fragments.
    let mut buf = record(CONTENT_TYPE_HANDSHAKE, &msg[..10]);
    buf.extend(record(20, &[1]));
    buf.extend(record(CONTENT_TYPE_HANDSHAKE, &msg[10..]));
    assert!(is_malformed(parse_client_hello(&buf)));
    // Detected from the first byte of the offending record header.
    let mut partial = record(CONTENT_TYPE_HANDSHAKE, &msg[..10]);
    partial.push(23);
    assert!(is_malformed(parse_client_hello(&partial)));

    // A ServerHello (type 2) instead of a ClientHello.
    let mut wrong = msg.clone();
    wrong[0] = 2;
    assert!(is_malformed(parse_client_hello(&records(&wrong, &[]))));
    assert!(is_malformed(parse_client_hello(&records(&wrong, &[1]))));
    assert!(is_malformed(parse_client_hello(&[0x16, 3, 1, 0, 50, 2])));
}

#[test]
fn bad_record_lengths() {
    assert!(is_malformed(parse_client_hello(&[0x16, 3, 1, 0, 0])));
    assert!(is_malformed(parse_client_hello(&[
        0x16, 3, 1, 0x48, 0x01, 1
    ])));
}

#[test]
fn truncated_lengths_are_malformed() {
    // An extension whose data length runs past the extensions block.
    let good = HelloBuilder::default().sni("t.example.com").message();
    let mut bad = good.clone();
    // The SNI extension header starts right after the 2-byte
    // extensions length: type(2) then its length(2).
    let ext_len_at = HANDSHAKE_HEADER_LEN + 2 + 32 + 33 + 6 + 2 + 2 + 2;
    bad[ext_len_at + 1] = bad[ext_len_at + 1].wrapping_add(1);
    assert!(is_malformed(parse_client_hello(&records(&bad, &[]))));

    // Extensions length claiming more than is there.
    let mut bad = good.clone();
    let exts_len_at = HANDSHAKE_HEADER_LEN + 2 + 32 + 33 + 6 + 2;
    bad[exts_len_at + 1] = bad[exts_len_at + 1].wrapping_add(1);
    assert!(is_malformed(parse_client_hello(&records(&bad, &[]))));

    // A hello body cut short but with a consistent handshake length.
    let body = HelloBuilder::default().sni("t.example.com").body();
    for cut in [1, 20, 34, 40, 70, 74, 76, body.len() - 1] {
        let msg = wrap_handshake(&body[..cut]);
        assert!(
            is_malformed(parse_client_hello(&records(&msg, &[]))),
            "cut at {cut}"
        );
    }
}

#[test]
fn bad_server_name_and_alpn() {
    let cases: Vec<(u16, Vec<u8>)> = vec![
        (0, vec![]),                        // empty extension
        (0, vec![0, 0]),                    // empty list
        (0, vec![0, 3, 0, 0, 0]),           // empty host_name
        (0, vec![0, 4, 0, 0, 1, 0]),        // NUL in host_name
        (0, vec![0, 4, 0, 0, 1, b' ']),     // space in host_name
        (0, vec![0, 4, 0, 0, 1, 0xC3]),     // non-ASCII
        (0, vec![0, 4, 0, 0, 2, b'a']),     // truncated name
        (0, vec![0, 4, 0, 0, 1, b'a', 9]),  // trailing byte
        (16, vec![0, 0]),                   // empty ALPN list
        (16, vec![0, 1, 0]),                // empty protocol name
        (16, vec![0, 2, 5, b'h']),          // truncated protocol name
        (16, vec![0, 3, 2, b'h', b'2', 0]), // trailing byte
    ];
    for (ext_type, data) in cases {
        let hello = HelloBuilder::default()
            .raw_extension(ext_type, data.clone())
            .build();
        assert!(
            is_malformed(parse_client_hello(&hello)),
            "ext {ext_type} {data:?}"
        );
    }

    let long = "a".repeat(256);
    assert!(is_malformed(parse_client_hello(
        &HelloBuilder::default().sni(&long).build()
    )));
    let max = "a".repeat(255);
    assert_eq!(
        complete(&HelloBuilder::default().sni(&max).build()).server_name,
        Some(max)
    );
}

#[test]
fn duplicate_extensions() {
    let sni = HelloBuilder::default().sni("a.example");
    let sni_data = sni.extensions()[4..].to_vec();
    let dup = sni.clone().raw_extension(0, sni_data).build();
    assert!(is_malformed(parse_client_hello(&dup)));

    let alpn = HelloBuilder::default().alpn(&["h2"]);
    let alpn_data = alpn.extensions()[4..].to_vec();
    let dup = alpn.clone().raw_extension(16, alpn_data).build();
    assert!(is_malformed(parse_client_hello(&dup)));
}

#[test]
fn too_large() {
    // A 20 KiB ClientHello (via padding) across two records.
    let msg = HelloBuilder::default()
        .sni("big.example.com")
        .padding(20 * 1024)
        .message();
    let buf = records(&msg, &[16384]);
    assert_eq!(parse_client_hello(&buf), Err(SniError::TooLarge));
    // Decided from the handshake header alone.
    assert_eq!(parse_client_hello(&buf[..9]), Err(SniError::TooLarge));

    // A plausible header followed by 17 KiB of garbage.
    let mut garbage = vec![0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0x3f, 0xfc];
    garbage.extend(std::iter::repeat_n(0x5A, 17 * 1024));
    assert_eq!(parse_client_hello(&garbage), Err(SniError::TooLarge));

    // A hello that only becomes complete beyond the budget.
    let msg = HelloBuilder::default()
        .padding(MAX_CLIENT_HELLO - 200)
        .message();
    assert!(msg.len() < MAX_CLIENT_HELLO);
    let splits: Vec<usize> = (1..60).map(|i| i * 100).collect();
    let buf = records(&msg, &splits);
    assert!(buf.len() > MAX_CLIENT_HELLO);
    assert_eq!(parse_client_hello(&buf), Err(SniError::TooLarge));
    // The same hello in one record fits.
    assert!(matches!(
        parse_client_hello(&records(&msg, &[])),
        Ok(Parse::Complete(_))
    ));
}

/// A ClientHello as rustls writes it.
fn rustls_client_hello() -> Vec<u8> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("app.example.com").expect("name");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

#[test]
fn real_rustls_client_hello() {
    let hello = rustls_client_hello();
    let info = complete(&hello);
    assert_eq!(info.server_name.as_deref(), Some("app.example.com"));
    assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    for end in 0..hello.len() {
        assert_eq!(parse_client_hello(&hello[..end]), Ok(Parse::Incomplete));
    }
}

/// An `AsyncRead` yielding one byte per read, then EOF.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(&b) = self.data.get(self.pos)
            && out.remaining() > 0
        {
            out.put_slice(&[b]);
            self.pos += 1;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

fn far_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + CLIENT_HELLO_DEADLINE
}

#[tokio::test]
async fn read_completes_byte_by_byte_and_keeps_bytes() {
    let hello = h2_hello("app.example.com").build();
    let mut data = hello.clone();
    data.extend_from_slice(b"after");
    let mut reader = Trickle { data, pos: 0 };
    let mut buf = Vec::new();
    let info = read_client_hello(&mut reader, &mut buf, far_deadline())
        .await
        .expect("hello");
    assert_eq!(info.server_name.as_deref(), Some("app.example.com"));
    // One byte at a time: it stops reading exactly at the hello's end.
    assert_eq!(buf, hello);
}

#[tokio::test]
async fn read_over_duplex() {
    let hello = rustls_client_hello();
    let (mut client, mut server) = tokio::io::duplex(64);
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        client.write_all(&hello).await.expect("write");
        client
    });
    let mut buf = Vec::new();
    let info = read_client_hello(&mut server, &mut buf, far_deadline())
        .await
        .expect("hello");
    assert_eq!(info.server_name.as_deref(), Some("app.example.com"));
    drop(writer.await.expect("writer"));
}

#[tokio::test]
async fn read_eof() {
    let hello = HelloBuilder::default().sni("a.example").build();
    let mut reader = Trickle {
        data: hello[..hello.len() - 1].to_vec(),
        pos: 0,
    };
    let mut buf = Vec::new();
    let err = read_client_hello(&mut reader, &mut buf, far_deadline())
        .await
        .expect_err("eof");
    assert!(matches!(err, ReadHelloError::Eof), "{err:?}");
    assert_eq!(err.reason(), "eof");
    assert_eq!(buf.len(), hello.len() - 1);
}

#[tokio::test]
async fn read_timeout() {
    let (_client, mut server) = tokio::io::duplex(64);
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
    let err = read_client_hello(&mut server, &mut buf, deadline)
        .await
        .expect_err("timeout");
    assert!(matches!(err, ReadHelloError::Timeout), "{err:?}");
    assert_eq!(err.reason(), "timeout");
}

#[tokio::test]
async fn read_parse_errors_and_bounded_buffer() {
    let mut reader: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
    let mut buf = Vec::new();
    let err = read_client_hello(&mut reader, &mut buf, far_deadline())
        .await
        .expect_err("not tls");
    assert_eq!(err.reason(), "not_tls");

    // Endless fragments of a huge handshake message: stops at the cap.
    let mut data = vec![0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0x3f, 0xfc];
    data.extend(std::iter::repeat_n(0x5A, 40 * 1024));
    let mut reader: &[u8] = &data;
    let mut buf = Vec::new();
    let err = read_client_hello(&mut reader, &mut buf, far_deadline())
        .await
        .expect_err("too large");
    assert_eq!(err.reason(), "too_large");
    assert_eq!(buf.len(), MAX_CLIENT_HELLO + 1);

    let err = ReadHelloError::from(SniError::Malformed("x"));
    assert_eq!(err.reason(), "malformed");
    let err = ReadHelloError::from(std::io::Error::other("boom"));
    assert_eq!(err.reason(), "io");
}

fn valid_hello() -> Vec<u8> {
    HelloBuilder::default()
        .sni("prop.example.com")
        .alpn(&["h2", "http/1.1"])
        .padding(40)
        .build()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..1024)) {
        if let Ok(Parse::Complete(_)) = parse_client_hello(&buf) {
            prop_assert!(buf.len() >= 5 + 4 + 41);
            prop_assert_eq!(buf[0], CONTENT_TYPE_HANDSHAKE);
        }
    }

    #[test]
    fn handshake_prefixed_bytes_never_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        // Get past the record/handshake header checks more often.
        let mut buf = vec![0x16, 3, 3, 0x08, 0x00, 1, 0, 0x07, 0xfc, 3, 3];
        buf.extend(tail);
        let _ = parse_client_hello(&buf);
    }
}

// Large inputs are slow to generate in debug builds: fewer cases.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn large_arbitrary_bytes_never_panic(
        buf in proptest::collection::vec(any::<u8>(), 0..40 * 1024),
        plausible_start in any::<bool>(),
    ) {
        let mut buf = buf;
        if plausible_start && buf.len() >= 3 {
            buf[..3].copy_from_slice(&[0x16, 3, 1]);
        }
        if let Ok(Parse::Complete(_)) = parse_client_hello(&buf) {
            // Record header + handshake header + minimal hello body.
            prop_assert!(buf.len() >= 5 + 4 + 41);
            prop_assert_eq!(buf[0], CONTENT_TYPE_HANDSHAKE);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn truncations_never_panic(cut in 0usize..2000) {
        let hello = valid_hello();
        let cut = cut.min(hello.len());
        let expected = if cut == hello.len() {
            Parse::Complete(ClientHelloInfo {
                server_name: Some("prop.example.com".into()),
                alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            })
        } else {
            Parse::Incomplete
        };
        prop_assert_eq!(parse_client_hello(&hello[..cut]), Ok(expected));
    }

    #[test]
    fn mutations_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        splits in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let msg = HelloBuilder::default()
            .sni("prop.example.com")
            .alpn(&["h2", "http/1.1"])
            .padding(40)
            .message();
        let mut splits: Vec<usize> = splits.iter().map(|i| i.index(msg.len())).collect();
        splits.sort_unstable();
        splits.dedup();
        splits.retain(|&s| s > 0);
        let mut buf = records(&msg, &splits);
        for (at, byte) in edits {
            let at = at.index(buf.len());
            buf[at] = byte;
        }
        let _ = parse_client_hello(&buf);
        let _ = parse_client_hello(&buf[..cut.index(buf.len() + 1)]);
    }
}
