//! Incremental, allocation-bounded parsing of a Visitor's TLS ClientHello:
//! the SNI host_name and the ALPN protocol list.
//!
//! The Server never terminates Visitor TLS; it only peeks at the first
//! handshake message to route the connection, then forwards every byte it
//! read unchanged. `parse_client_hello` is therefore a pure function of the
//! bytes received so far and may be called again after each read; it
//! reassembles a ClientHello that is fragmented across several TLS records
//! and never looks at more than `MAX_CLIENT_HELLO` bytes.
//!
//! All parsing goes through a bounds-checked cursor (`Reader`), so no
//! network input can cause a panic.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// At most this many bytes of ClientHello are buffered.
pub(crate) const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// The whole ClientHello must arrive within this time.
pub(crate) const CLIENT_HELLO_DEADLINE: Duration = Duration::from_secs(5);

/// TLS record content type `handshake`.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Size of a TLS record header: type(1) version(2) length(2).
const RECORD_HEADER_LEN: usize = 5;
/// Size of a handshake message header: type(1) length(3).
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Largest record payload we accept: 2^14 plus the 2048 bytes of expansion
/// RFC 5246 allows for compressed records.
const MAX_RECORD_PAYLOAD: usize = 16384 + 2048;
/// Extension type `server_name` (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// Extension type `application_layer_protocol_negotiation` (RFC 7301).
const EXT_ALPN: u16 = 16;
/// ServerName name_type `host_name`.
const NAME_TYPE_HOST_NAME: u8 = 0;
/// Longest host_name we accept (a DNS name is at most 253 characters).
const MAX_HOST_NAME: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ClientHelloInfo {
    /// The first host_name entry of server_name, as sent (not normalised).
    pub(crate) server_name: Option<String>,
    /// ALPN protocol names, in the Visitor's order.
    pub(crate) alpn: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parse {
    /// More bytes are needed.
    Incomplete,
    Complete(ClientHelloInfo),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SniError {
    #[error("not TLS")]
    NotTls,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
}

/// Is `minor` an acceptable minor version for a record whose major is 3
/// (TLS 1.0 = 0x0301 .. TLS 1.3 = 0x0304)?
fn is_tls_minor(minor: u8) -> bool {
    (1..=4).contains(&minor)
}

/// Parses the ClientHello at the start of `buf`, the raw bytes a Visitor has
/// sent so far.
///
/// Returns [`Parse::Incomplete`] while more bytes are needed. Only the first
/// [`MAX_CLIENT_HELLO`] bytes of `buf` are ever examined; if the ClientHello
/// (including its record framing) does not fit in them, the result is
/// [`SniError::TooLarge`]. Bytes following the ClientHello are ignored.
pub(crate) fn parse_client_hello(buf: &[u8]) -> Result<Parse, SniError> {
    // Decide NotTls from as few bytes as possible: a handshake record
    // starts with 0x16 0x03 0x01..=0x04.
    match *buf {
        [] => return Ok(Parse::Incomplete),
        [first, ..] if first != CONTENT_TYPE_HANDSHAKE => return Err(SniError::NotTls),
        [_, major, ..] if major != 3 => return Err(SniError::NotTls),
        [_, _, minor, ..] if !is_tls_minor(minor) => return Err(SniError::NotTls),
        _ => {}
    }

    // Never look beyond the buffering budget: everything must fit in it.
    let window = buf.get(..MAX_CLIENT_HELLO).unwrap_or(buf);
    match reassemble_and_parse(window)? {
        Parse::Incomplete if buf.len() > MAX_CLIENT_HELLO => Err(SniError::TooLarge),
        parse => Ok(parse),
    }
}

/// Walks the TLS records in `window`, concatenating their payloads into the
/// handshake message, and parses the ClientHello once all of it is present.
///
/// `window` is at most [`MAX_CLIENT_HELLO`] bytes, which bounds both the loop
/// and the reassembly buffer.
fn reassemble_and_parse(window: &[u8]) -> Result<Parse, SniError> {
    // The handshake message bytes seen so far (header included). Only
    // allocated once the message turns out to span more than one record.
    let mut message: Vec<u8> = Vec::new();
    let mut rest = window;
    let mut first_record = true;

    loop {
        let Some((header, after_header)) = rest.split_first_chunk::<RECORD_HEADER_LEN>() else {
            // A record header is still (partly) missing. The first record's
            // visible prefix has already been vetted by the caller.
            if !first_record {
                check_partial_record_header(rest)?;
            }
            return Ok(Parse::Incomplete);
        };
        let [content_type, major, minor, len_hi, len_lo] = *header;
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Err(SniError::Malformed(
                "non-handshake record before the ClientHello was complete",
            ));
        }
        if major != 3 || !is_tls_minor(minor) {
            return Err(SniError::Malformed("bad record version"));
        }
        let record_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if record_len == 0 {
            // RFC 8446 5.1: zero-length handshake fragments are forbidden.
            return Err(SniError::Malformed("empty handshake record"));
        }
        if record_len > MAX_RECORD_PAYLOAD {
            return Err(SniError::Malformed("record too long"));
        }

        // Use whatever part of the record payload has arrived: the message
        // may well be complete before the end of a record is received.
        let available = record_len.min(after_header.len());
        let (payload, after_payload) = after_header.split_at(available);

        // Fast path: the whole message is inside the first record, so it can
        // be parsed in place without copying.
        if first_record {
            if let Some(parse) = try_parse_message(payload)? {
                return Ok(parse);
            }
            message.extend_from_slice(payload);
        } else {
            message.extend_from_slice(payload);
            if let Some(parse) = try_parse_message(&message)? {
                return Ok(parse);
            }
        }

        if available < record_len {
            // The rest of this record has not arrived yet.
            return Ok(Parse::Incomplete);
        }
        first_record = false;
        rest = after_payload;
    }
}

/// Rejects a truncated record header early when its visible bytes are
/// already wrong.
fn check_partial_record_header(partial: &[u8]) -> Result<(), SniError> {
    match *partial {
        [content_type, ..] if content_type != CONTENT_TYPE_HANDSHAKE => Err(SniError::Malformed(
            "non-handshake record before the ClientHello was complete",
        )),
        [_, major, ..] if major != 3 => Err(SniError::Malformed("bad record version")),
        [_, _, minor, ..] if !is_tls_minor(minor) => Err(SniError::Malformed("bad record version")),
        _ => Ok(()),
    }
}

/// Given the handshake bytes reassembled so far, validates the handshake
/// header and, once the whole ClientHello is present, parses it.
///
/// Returns `Ok(None)` if more bytes are needed.
fn try_parse_message(message: &[u8]) -> Result<Option<Parse>, SniError> {
    let Some((header, body)) = message.split_first_chunk::<HANDSHAKE_HEADER_LEN>() else {
        // Even a partial header can already be judged by its type byte.
        if let Some(&msg_type) = message.first()
            && msg_type != HANDSHAKE_CLIENT_HELLO
        {
            return Err(SniError::Malformed(
                "first handshake message is not a ClientHello",
            ));
        }
        return Ok(None);
    };
    let [msg_type, l0, l1, l2] = *header;
    if msg_type != HANDSHAKE_CLIENT_HELLO {
        return Err(SniError::Malformed(
            "first handshake message is not a ClientHello",
        ));
    }
    let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
    if len > MAX_CLIENT_HELLO {
        return Err(SniError::TooLarge);
    }
    match body.get(..len) {
        // Any bytes after the message (a further handshake message in the
        // same record) are not ours to judge.
        Some(hello) => parse_client_hello_body(hello).map(|info| Some(Parse::Complete(info))),
        None => Ok(None),
    }
}

/// Parses a complete ClientHello message body (RFC 8446 4.1.2; the same
/// layout is used by TLS 1.0 to 1.2).
fn parse_client_hello_body(body: &[u8]) -> Result<ClientHelloInfo, SniError> {
    let mut r = Reader::new(body);

    let [major, _minor] = r.array::<2>("truncated legacy_version")?;
    if major != 3 {
        return Err(SniError::Malformed("bad legacy_version"));
    }
    r.take(32, "truncated random")?;

    let session_id = r.vec_u8("truncated session_id")?;
    if session_id.len() > 32 {
        return Err(SniError::Malformed("session_id longer than 32 bytes"));
    }

    let cipher_suites = r.vec_u16("truncated cipher_suites")?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(SniError::Malformed("bad cipher_suites length"));
    }

    let compression = r.vec_u8("truncated compression_methods")?;
    if compression.is_empty() {
        return Err(SniError::Malformed("empty compression_methods"));
    }

    let mut info = ClientHelloInfo::default();
    if r.is_empty() {
        // A (pre-TLS 1.3) ClientHello may omit the extensions block.
        return Ok(info);
    }
    let extensions = r.vec_u16("truncated extensions")?;
    if !r.is_empty() {
        return Err(SniError::Malformed("trailing bytes after extensions"));
    }

    let mut ext = Reader::new(extensions);
    let mut seen_server_name = false;
    let mut seen_alpn = false;
    while !ext.is_empty() {
        let ext_type = ext.u16("truncated extension header")?;
        let data = ext.vec_u16("truncated extension data")?;
        match ext_type {
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_server_name, true) {
                    return Err(SniError::Malformed("duplicate server_name extension"));
                }
                info.server_name = parse_server_name(data)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(SniError::Malformed("duplicate ALPN extension"));
                }
                info.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Parses the server_name extension data (RFC 6066 section 3) and returns its
/// first host_name entry, if any.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, SniError> {
    let mut outer = Reader::new(data);
    let list = outer.vec_u16("truncated server_name list")?;
    if !outer.is_empty() {
        return Err(SniError::Malformed(
            "trailing bytes in server_name extension",
        ));
    }
    if list.is_empty() {
        return Err(SniError::Malformed("empty server_name list"));
    }

    let mut entries = Reader::new(list);
    let mut host_name = None;
    while !entries.is_empty() {
        let name_type = entries.u8("truncated server_name entry")?;
        // Every name type defined so far carries a 2-byte-length opaque
        // name, so unknown types can be skipped the same way.
        let name = entries.vec_u16("truncated server_name entry")?;
        if name_type != NAME_TYPE_HOST_NAME || host_name.is_some() {
            continue;
        }
        if name.is_empty() {
            return Err(SniError::Malformed("empty host_name"));
        }
        if name.len() > MAX_HOST_NAME {
            return Err(SniError::Malformed("host_name longer than 255 bytes"));
        }
        // Printable ASCII only (no NUL, controls, space or 8-bit bytes);
        // this also makes the bytes valid UTF-8.
        if !name.iter().all(u8::is_ascii_graphic) {
            return Err(SniError::Malformed("host_name is not printable ASCII"));
        }
        let name = std::str::from_utf8(name)
            .map_err(|_| SniError::Malformed("host_name is not printable ASCII"))?;
        host_name = Some(name.to_owned());
    }
    Ok(host_name)
}

/// Parses the ALPN extension data (RFC 7301 section 3.1).
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, SniError> {
    let mut outer = Reader::new(data);
    let list = outer.vec_u16("truncated ALPN list")?;
    if !outer.is_empty() {
        return Err(SniError::Malformed("trailing bytes in ALPN extension"));
    }
    if list.is_empty() {
        return Err(SniError::Malformed("empty ALPN list"));
    }

    let mut names = Reader::new(list);
    let mut protocols = Vec::new();
    while !names.is_empty() {
        let name = names.vec_u8("truncated ALPN protocol name")?;
        if name.is_empty() {
            return Err(SniError::Malformed("empty ALPN protocol name"));
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

/// A bounds-checked cursor over a byte slice. Every read either succeeds or
/// returns `Malformed` with the given description; nothing panics.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or(SniError::Malformed(what))?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], SniError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(SniError::Malformed(what))?;
        self.rest = tail;
        Ok(*head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        self.array::<2>(what).map(u16::from_be_bytes)
    }

    /// A vector with a 1-byte length prefix.
    fn vec_u8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A vector with a 2-byte length prefix.
    fn vec_u16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }
}

/// Why [`read_client_hello`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadHelloError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for the ClientHello")]
    Timeout,
    #[error("connection closed before the ClientHello was complete")]
    Eof,
    #[error(transparent)]
    Parse(#[from] SniError),
}

impl ReadHelloError {
    /// A short, stable token for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ReadHelloError::Io(_) => "io",
            ReadHelloError::Timeout => "timeout",
            ReadHelloError::Eof => "eof",
            ReadHelloError::Parse(SniError::NotTls) => "not_tls",
            ReadHelloError::Parse(SniError::Malformed(_)) => "malformed",
            ReadHelloError::Parse(SniError::TooLarge) => "too_large",
        }
    }
}

/// Largest single read, so `buf` grows in modest steps.
const READ_CHUNK: usize = 4096;

/// Reads from `reader`, appending to `buf`, until `buf` holds a complete
/// ClientHello, and returns what it says.
///
/// Every byte read is appended to `buf` (which may already hold earlier
/// bytes), so the caller can forward exactly these bytes afterwards. Reads
/// are capped so that `buf` never grows beyond `MAX_CLIENT_HELLO + 1` bytes:
/// one byte past the budget is enough to report [`SniError::TooLarge`].
/// The whole operation must finish by `deadline`.
pub(crate) async fn read_client_hello<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) -> Result<ClientHelloInfo, ReadHelloError> {
    loop {
        // Parse first: `buf` may already contain a whole ClientHello. When
        // this returns Incomplete, `buf.len() <= MAX_CLIENT_HELLO`.
        if let Parse::Complete(info) = parse_client_hello(buf)? {
            return Ok(info);
        }

        let room = (MAX_CLIENT_HELLO + 1)
            .saturating_sub(buf.len())
            .clamp(1, READ_CHUNK);
        buf.reserve(room);
        // `take` limits the read to `room` bytes; `read_buf` appends into
        // the reserved spare capacity without zero-filling or over-reading.
        let mut limited = (&mut *reader).take(room as u64);
        let n = match tokio::time::timeout_at(deadline, limited.read_buf(buf)).await {
            Err(_elapsed) => return Err(ReadHelloError::Timeout),
            Ok(result) => result?,
        };
        if n == 0 {
            return Err(ReadHelloError::Eof);
        }
    }
}

#[cfg(test)]
mod tests;
