//! The demo's Visitor: a TLS client that connects to the Server's public
//! address with the Public hostname as SNI, trusting exactly one
//! certificate, sends one HTTP/1.1 request and reads the answer to EOF.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::BoxError;

/// What one Visitor request looked like from the Visitor's side.
pub(crate) struct Visit {
    pub certificate: CertificateSummary,
    pub(crate) tls_version: String,
    pub(crate) cipher_suite: String,
    pub(crate) alpn: Option<String>,
    pub(crate) status_line: String,
    pub body: String,
    /// HTTP bytes (inside TLS).
    pub(crate) request_bytes: usize,
    pub(crate) response_bytes: usize,
    /// TCP payload bytes on the wire (TLS records).
    pub(crate) wire_sent: u64,
    pub(crate) wire_received: u64,
    pub connect: Duration,
    pub handshake: Duration,
    pub total: Duration,
    /// Whether the peer ended TLS with close_notify.
    pub(crate) clean_close: bool,
}

/// The certificate the Visitor was shown.
pub(crate) struct CertificateSummary {
    pub subject: String,
    pub dns_names: Vec<String>,
    pub issuer: String,
    pub self_signed: bool,
    pub not_after: String,
    pub fingerprint: String,
}

pub async fn visit(
    public: SocketAddr,
    hostname: &str,
    trust: &CertificateDer<'static>,
) -> Result<Visit, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(trust.clone())
        .map_err(|e| format!("cannot trust the certificate: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(hostname.to_string())?;

    let started = Instant::now();
    let tcp = TcpStream::connect(public)
        .await
        .map_err(|e| format!("TCP connect to the Server's public address {public}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let connected = Instant::now();
    let mut tls = connector
        .connect(server_name, Counted::new(tcp))
        .await
        .map_err(|e| {
            format!(
                "TLS handshake with {hostname} via {public}: {e} \
                 (the Server drops connections it cannot route; see any warnings above)"
            )
        })?;
    let handshake = connected.elapsed();

    let (_, session) = tls.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("the TLS session has no peer certificate")?;
    let certificate = summarize(leaf)?;
    let tls_version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "-".to_string(),
    };
    let cipher_suite = session
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "-".into());
    let alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());

    let request = format!(
        "GET / HTTP/1.1\r\nHost: {hostname}\r\nUser-Agent: runewarp-demo\r\nAccept: */*\r\n\r\n"
    );
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    tls.flush().await?;
    let mut response = Vec::new();
    let clean_close = match tls.read_to_end(&mut response).await {
        Ok(_) => true,
        // A peer that closes TCP without close_notify still delivered a
        // complete `connection: close` answer.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !response.is_empty() => false,
        Err(e) => return Err(format!("reading the response: {e}").into()),
    };
    let total = started.elapsed();
    let counted = tls.get_ref().0;

    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("").to_string();
    if status_line.is_empty() {
        return Err("the connection closed without an HTTP response".into());
    }
    Ok(Visit {
        certificate,
        tls_version,
        cipher_suite,
        alpn,
        status_line,
        body: body.to_string(),
        request_bytes: request.len(),
        response_bytes: response.len(),
        wire_sent: counted.written,
        wire_received: counted.read,
        connect: connected - started,
        handshake,
        total,
        clean_close,
    })
}

/// Subject, SANs, issuer and SHA-256 fingerprint of a DER certificate.
pub(crate) fn summarize(der: &[u8]) -> Result<CertificateSummary, BoxError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the certificate is not valid X.509: {e}"))?;
    let dns_names = crate::tls::material::san_dns_names(&cert).unwrap_or_default();
    Ok(CertificateSummary {
        subject: cert.subject().to_string(),
        dns_names,
        issuer: cert.issuer().to_string(),
        self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
        not_after: cert.validity().not_after.to_string(),
        fingerprint: crate::tls::material::fingerprint_sha256(der),
    })
}

/// A TCP stream that counts the bytes it moves.
struct Counted {
    inner: TcpStream,
    read: u64,
    written: u64,
}

impl Counted {
    fn new(inner: TcpStream) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.read += (buf.filled().len() - before) as u64;
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
