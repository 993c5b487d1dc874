//! The demo's two Local backends on 127.0.0.1: one terminates TLS itself
//! (for the passthrough Service), one speaks plaintext HTTP (for the
//! terminating Service). Both answer any request with a short text/plain
//! page saying who answered and what arrived, then close, and both record
//! what they saw so the report can show it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::BoxError;
use crate::sync::{AbortOnDrop, lock};

/// A whole backend connection (handshake, request, answer) must finish
/// within this time.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// The request head may not be larger than this.
const MAX_HEAD: usize = 16 * 1024;
/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How the request's bytes reached the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// A TLS ClientHello: the Visitor's TLS was still intact.
    Tls,
    /// A readable HTTP request line.
    Plaintext,
    /// Neither.
    Unreadable,
}

/// What a backend saw on one connection.
#[derive(Debug, Clone)]
pub(crate) struct Observation {
    /// Who connected (the Client instance, on loopback).
    pub peer: SocketAddr,
    pub(crate) first_byte: Option<u8>,
    pub(crate) arrival: Arrival,
    /// `GET / HTTP/1.1`, as the backend read it (after decryption for the
    /// TLS backend).
    pub(crate) request_line: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
}

#[derive(Clone, Copy)]
enum Kind {
    Tls,
    Plain,
}

/// A running Local backend. Dropping it stops accepting.
pub struct Backend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Observation>>>,
    _task: AbortOnDrop,
}

impl Backend {
    /// A backend that terminates TLS with its own certificate.
    pub async fn start_tls(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, BoxError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| format!("TLS backend certificate rejected: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start(Kind::Tls, Some(acceptor)).await
    }

    /// A backend that speaks plaintext HTTP.
    pub(crate) async fn start_plain() -> Result<Self, BoxError> {
        Self::start(Kind::Plain, None).await
    }

    async fn start(
        kind: Kind,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<Self, BoxError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept_loop(listener, kind, acceptor, seen.clone()));
        Ok(Self {
            addr,
            seen,
            _task: AbortOnDrop::new(task),
        })
    }

    /// The most recent connection's observation, if any.
    pub(crate) fn last_seen(&self) -> Option<Observation> {
        lock(&self.seen).last().cloned()
    }
}

async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    seen: Arc<Mutex<Vec<Observation>>>,
) {
    let local = listener.local_addr().ok();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of descriptors or similar: back off briefly.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let conn = serve(tcp, peer, local, kind, acceptor, seen);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
        });
    }
}

async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    kind: Kind,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    seen: Arc<Mutex<Vec<Observation>>>,
) {
    let mut first = [0u8; 1];
    let first_byte = match tcp.peek(&mut first).await {
        Ok(1) => Some(first[0]),
        _ => None,
    };
    let local = local.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
    match (kind, acceptor) {
        (Kind::Tls, Some(acceptor)) => {
            if first_byte != Some(TLS_HANDSHAKE_RECORD) {
                // Not TLS: note it and hang up without answering.
                lock(&seen).push(Observation {
                    peer,
                    first_byte,
                    arrival: Arrival::Unreadable,
                    request_line: None,
                    method: None,
                    path: None,
                    host: None,
                });
                return;
            }
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            answer(tls, peer, first_byte, Arrival::Tls, &local, kind, &seen).await;
        }
        _ => {
            let arrival = if first_byte == Some(TLS_HANDSHAKE_RECORD) {
                Arrival::Tls
            } else {
                Arrival::Plaintext
            };
            answer(tcp, peer, first_byte, arrival, &local, kind, &seen).await;
        }
    }
}

/// Read the request head, record what arrived, answer and close.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    peer: SocketAddr,
    first_byte: Option<u8>,
    arrival: Arrival,
    local: &str,
    kind: Kind,
    seen: &Mutex<Vec<Observation>>,
) {
    let Ok(head) = read_head(&mut io).await else {
        return;
    };
    let request = parse_request(&head);
    let arrival = match (arrival, &request) {
        (Arrival::Plaintext, None) => Arrival::Unreadable,
        (a, _) => a,
    };
    let observation = Observation {
        peer,
        first_byte,
        arrival,
        request_line: request.as_ref().map(|r| r.line.clone()),
        method: request.as_ref().map(|r| r.method.clone()),
        path: request.as_ref().map(|r| r.path.clone()),
        host: request.as_ref().and_then(|r| r.host.clone()),
    };
    let (status, body) = page(kind, local, &observation, head.len());
    lock(seen).push(observation);
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if io.write_all(response.as_bytes()).await.is_ok() {
        // For TLS this sends close_notify before the FIN.
        let _ = io.shutdown().await;
    }
}

fn page(kind: Kind, local: &str, seen: &Observation, head_len: usize) -> (&'static str, String) {
    let what = match (&seen.method, &seen.path) {
        (Some(m), Some(p)) => format!("{m} {p}"),
        _ => "an unreadable request".to_string(),
    };
    let host = seen.host.as_deref().unwrap_or("-");
    match (kind, seen.arrival) {
        (Kind::Tls, _) => (
            "200 OK",
            format!(
                "Hello from the TLS Local backend at {local}.\n\
                 It received {what} (Host: {host}) over TLS.\n\
                 The bytes arrived still encrypted (first byte 0x16, the Visitor's ClientHello);\n\
                 this backend terminated TLS itself with its own certificate: TLS passthrough.\n"
            ),
        ),
        (Kind::Plain, Arrival::Plaintext) => (
            "200 OK",
            format!(
                "Hello from the plaintext Local backend at {local}.\n\
                 It received {what} (Host: {host}) as plaintext.\n\
                 The request line was readable on arrival ({:?}):\n\
                 the Client instance terminated TLS before forwarding: terminate mode.\n",
                seen.request_line.as_deref().unwrap_or("")
            ),
        ),
        (Kind::Plain, _) => (
            "400 Bad Request",
            format!(
                "Hello from the plaintext Local backend at {local}.\n\
                 It received {head_len} bytes that are not a plaintext HTTP request (first byte {}).\n",
                seen.first_byte
                    .map(|b| format!("0x{b:02x}"))
                    .unwrap_or_else(|| "-".into())
            ),
        ),
    }
}

async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() >= MAX_HEAD {
            return Ok(head);
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(head);
        }
        head.extend_from_slice(&chunk[..n]);
    }
}

struct Request {
    line: String,
    method: String,
    path: String,
    host: Option<String>,
}

/// A minimal HTTP/1.x request-head parser: enough to say what arrived.
fn parse_request(head: &[u8]) -> Option<Request> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let line = lines.next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let path = parts.next()?;
    let version = parts.next()?;
    let valid = !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_uppercase())
        && path.starts_with('/')
        && version.starts_with("HTTP/1.")
        && parts.next().is_none();
    if !valid {
        return None;
    }
    let host = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("host"))
        .map(|(_, value)| value.trim().to_string());
    Some(Request {
        line: line.to_string(),
        method: method.to_string(),
        path: path.to_string(),
        host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_head() {
        let r = parse_request(b"GET /x HTTP/1.1\r\nHOST: a.test\r\n\r\n").expect("request");
        assert_eq!(r.line, "GET /x HTTP/1.1");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/x");
        assert_eq!(r.host.as_deref(), Some("a.test"));
    }

    #[test]
    fn rejects_tls_bytes() {
        assert!(parse_request(&[0x16, 0x03, 0x01, 0x00, 0x10]).is_none());
        assert!(parse_request(b"hello\r\n\r\n").is_none());
    }
}
