//! One Visitor stream on the Client: read the PROXY header and the
//! ClientHello, select the Service by SNI, connect the Local backend and
//! relay, passing TLS through or terminating it. Every way a stream can end
//! early is an [`Abort`] with a stable log token.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Context;
use super::terminate::{self, Accepted, TunnelStream};
use crate::config::{ServiceConfig, TlsMode};
use crate::hostname::wire_lookup_key;
use crate::relay as proxy;
use crate::tls::sni::{self, CLIENT_HELLO_DEADLINE};
use crate::tunnel::framing::{self, ProxyHeader};
use crate::tunnel::transport::stream_code;

/// The Local backend must accept the TCP connection within this time.
pub const BACKEND_CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// The PROXY header of a new stream must arrive within this time.
const STREAM_HEADER_DEADLINE: Duration = Duration::from_secs(10);
/// Terminate mode: the Visitor's TLS handshake must finish within this time.
const TLS_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// One Visitor stream: PROXY header, ClientHello, Service, backend.
pub(super) async fn stream(mut send: SendStream, mut recv: RecvStream, context: Arc<Context>) {
    let header = match tokio::time::timeout(
        STREAM_HEADER_DEADLINE,
        framing::read_proxy_header(&mut recv),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(error)) => {
            context.metrics.stream_rejected("bad_proxy_header");
            tracing::debug!(event = "stream_rejected", reason = "bad_proxy_header", error = ?error.to_string());
            return reject(&mut send, &mut recv, stream_code::BAD_FRAMING);
        }
        Err(_) => {
            context.metrics.stream_rejected("proxy_header_timeout");
            tracing::debug!(event = "stream_rejected", reason = "proxy_header_timeout");
            return reject(&mut send, &mut recv, stream_code::BAD_FRAMING);
        }
    };
    // For log lines: the Visitor's address, or "-" without a PROXY source.
    let visitor = header
        .map(|h| h.source.to_string())
        .unwrap_or_else(|| "-".to_string());
    let mut hello = Vec::new();
    let deadline = tokio::time::Instant::now() + CLIENT_HELLO_DEADLINE;
    let info = match sni::read_client_hello(&mut recv, &mut hello, deadline).await {
        Ok(info) => info,
        Err(e) => {
            context.metrics.stream_rejected(e.reason());
            tracing::debug!(event = "stream_rejected", visitor, reason = e.reason());
            return reject(&mut send, &mut recv, stream_code::BAD_FRAMING);
        }
    };
    let hostname = info.server_name.as_deref().map(wire_lookup_key);
    let services = context.services();
    let Some(service) = services.select(hostname.as_deref()) else {
        context.metrics.stream_rejected("no_service");
        if let Some(suppressed) = crate::logging::budget::NO_SERVICE.allow() {
            tracing::info!(
                event = "stream_rejected",
                hostname = hostname.as_deref().unwrap_or("-"),
                visitor,
                reason = "no_service",
                suppressed
            );
        }
        return reject(&mut send, &mut recv, stream_code::NO_SERVICE);
    };
    let host = hostname.as_deref().unwrap_or("-");
    let started = std::time::Instant::now();
    let service_metrics = context.metrics.service(service);
    let _active = service_metrics.as_ref().map(|m| {
        m.streams.inc();
        crate::metrics::ActiveStream::new(&m.streams_active)
    });
    let opened = Opened {
        service,
        header,
        hello: Bytes::from(hello),
        send,
        recv,
        hostname: host,
    };
    let result = match service.tls_mode {
        TlsMode::Passthrough => passthrough(&context, opened).await,
        TlsMode::Terminate => match &context.acceptor {
            Some(acceptor) => terminate(&context, acceptor, opened).await,
            None => {
                let Opened {
                    mut send, mut recv, ..
                } = opened;
                reject(&mut send, &mut recv, stream_code::TLS_FAILED);
                Err(Abort::NoCertificates)
            }
        },
    };
    if let (Some(m), Ok(t)) = (&service_metrics, &result) {
        m.bytes_to_backend.inc_by(t.to_backend);
        m.bytes_from_backend.inc_by(t.from_backend);
    }
    match result {
        Ok(t) => tracing::debug!(
            event = "stream_closed",
            hostname = host,
            service = service.index,
            to_backend = t.to_backend,
            from_backend = t.from_backend,
            duration_ms = started.elapsed().as_millis() as u64,
        ),
        Err(abort) => tracing::debug!(
            event = "stream_aborted",
            hostname = host,
            service = service.index,
            reason = abort.reason(),
        ),
    }
}

/// End both directions of a tunnel stream with `code`.
pub(super) fn reject(send: &mut SendStream, recv: &mut RecvStream, code: quinn::VarInt) {
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// Abort a terminated stream: the tunnel stream under the Visitor's TLS.
fn abort_tls(tls: &mut tokio_rustls::server::TlsStream<TunnelStream>) {
    let quic = tls.get_mut().0.get_mut();
    let _ = quic.writer_mut().reset(stream_code::ABORTED);
    let _ = quic.reader_mut().stop(stream_code::ABORTED);
}

async fn connect_backend(
    context: &Context,
    service: &ServiceConfig,
    hostname: &str,
) -> Result<TcpStream, Abort> {
    let addr = &service.backend_address;
    let metrics = context.metrics.service(service);
    let started = std::time::Instant::now();
    let connect = TcpStream::connect((addr.host.as_str(), addr.port));
    let (reason, error) = match tokio::time::timeout(BACKEND_CONNECT_DEADLINE, connect).await {
        Ok(Ok(tcp)) => {
            if let Some(m) = &metrics {
                crate::metrics::observe_since(&m.backend_connect, started);
            }
            let _ = tcp.set_nodelay(true);
            return Ok(tcp);
        }
        Ok(Err(error)) => (Abort::BackendUnreachable, error.to_string()),
        Err(_) => (Abort::BackendTimeout, "connect timed out".to_string()),
    };
    if let Some(m) = &metrics {
        m.backend_failed(reason.reason());
    }
    if let Some(suppressed) = context.backend_errors.allow(&addr.to_string()) {
        tracing::warn!(event = "backend_unreachable", backend = %addr, hostname, error = ?error, suppressed);
    }
    Err(reason)
}

/// Write the PROXY v2 header the Service asked for (the Visitor's
/// addresses, as the Server saw them).
async fn send_proxy_header(
    tcp: &mut TcpStream,
    service: &ServiceConfig,
    header: Option<ProxyHeader>,
) -> std::io::Result<()> {
    if !service.proxy_protocol {
        return Ok(());
    }
    let bytes = match header {
        Some(h) => framing::encode(&h),
        None => framing::encode_local(),
    };
    tcp.write_all(&bytes).await
}

/// A Visitor stream with its Service selected: what the relay starts from.
struct Opened<'a> {
    service: &'a ServiceConfig,
    header: Option<ProxyHeader>,
    /// The ClientHello as read from the stream, still to be relayed.
    hello: Bytes,
    send: SendStream,
    recv: RecvStream,
    /// The Public hostname for log lines ("-" without SNI).
    hostname: &'a str,
}

async fn passthrough(context: &Context, opened: Opened<'_>) -> Result<Moved, Abort> {
    let Opened {
        service,
        header,
        hello,
        mut send,
        mut recv,
        hostname,
    } = opened;
    let mut tcp = match connect_backend(context, service, hostname).await {
        Ok(tcp) => tcp,
        Err(reason) => {
            reject(&mut send, &mut recv, stream_code::BACKEND_UNREACHABLE);
            return Err(reason);
        }
    };
    let first = async {
        send_proxy_header(&mut tcp, service, header).await?;
        tcp.write_all(&hello).await
    };
    if first.await.is_err() {
        proxy::abort_tcp(&tcp);
        proxy::abort_stream(&mut send, &mut recv);
        return Err(Abort::BackendWriteFailed);
    }
    // Here the TCP side of the relay is the backend.
    let t = proxy::relay_tcp_stream(&mut tcp, &mut send, &mut recv, context.stream_timeouts())
        .await
        .map_err(Abort::Relay)?;
    Ok(Moved {
        to_backend: t.from_tunnel + hello.len() as u64,
        from_backend: t.to_tunnel,
    })
}

async fn terminate(
    context: &Context,
    acceptor: &terminate::Acceptor,
    opened: Opened<'_>,
) -> Result<Moved, Abort> {
    let (service, header, hostname) = (opened.service, opened.header, opened.hostname);
    let stream = terminate::tunnel_stream(opened.hello, opened.send, opened.recv);
    let mut tls = match tokio::time::timeout(TLS_HANDSHAKE_DEADLINE, acceptor.accept(stream)).await
    {
        Ok(Ok(Accepted::Visitor(tls))) => *tls,
        Ok(Ok(Accepted::AcmeChallenge)) => {
            tracing::info!(event = "acme_challenge_answered", hostname);
            return Ok(Moved {
                to_backend: 0,
                from_backend: 0,
            });
        }
        Ok(Err(error)) => {
            // The alert, if any, went out through the stream; dropping it
            // finishes the stream cleanly behind it.
            tracing::debug!(event = "terminate_handshake_failed", hostname, error = ?error.to_string());
            return Err(Abort::TlsHandshakeFailed);
        }
        Err(_) => return Err(Abort::TlsHandshakeTimeout),
    };
    // Runegate: the plaintext goes through the gate, which proxies per request.
    match context.gates.for_service(service) {
        terminate::GateFor::Gate(gate) => {
            terminate::gated(gate, tls, header.map(|h| h.source)).await;
            return Ok(Moved {
                to_backend: 0,
                from_backend: 0,
            });
        }
        terminate::GateFor::Unavailable => {
            abort_tls(&mut tls);
            return Err(Abort::GateNotStarted);
        }
        terminate::GateFor::None => {}
    }
    let mut tcp = match connect_backend(context, service, hostname).await {
        Ok(tcp) => tcp,
        Err(reason) => {
            abort_tls(&mut tls);
            return Err(reason);
        }
    };
    if send_proxy_header(&mut tcp, service, header).await.is_err() {
        proxy::abort_tcp(&tcp);
        abort_tls(&mut tls);
        return Err(Abort::BackendWriteFailed);
    }
    proxy::tune_tcp(&tcp, context.stream_timeouts());
    match proxy::relay_io(&mut tls, &mut tcp, context.stream_timeouts()).await {
        Ok(t) => Ok(Moved {
            to_backend: t.to_tunnel,
            from_backend: t.from_tunnel,
        }),
        Err(e) => {
            proxy::abort_tcp(&tcp);
            abort_tls(&mut tls);
            Err(Abort::Relay(e))
        }
    }
}

/// Why a Visitor stream ended before its relay finished.
#[derive(Debug)]
enum Abort {
    /// A terminate Service, but no certificate source is configured.
    NoCertificates,
    /// The Local backend refused or reset the connection.
    BackendUnreachable,
    /// The Local backend did not accept within [`BACKEND_CONNECT_DEADLINE`].
    BackendTimeout,
    /// The PROXY header or the ClientHello could not be written to the
    /// backend.
    BackendWriteFailed,
    /// Terminate: the Visitor's TLS handshake failed.
    TlsHandshakeFailed,
    /// Terminate: the Visitor's TLS handshake took longer than
    /// [`TLS_HANDSHAKE_DEADLINE`].
    TlsHandshakeTimeout,
    /// A gated Service whose gate was added by a reload: it fails closed
    /// until a restart starts the gate.
    GateNotStarted,
    /// The relay ended with an error (a deadline, a reset, a lost tunnel).
    Relay(proxy::RelayError),
}

impl Abort {
    /// Short stable token for logs (`stream_aborted reason=`).
    fn reason(&self) -> &'static str {
        match self {
            Abort::NoCertificates => "no_certificates",
            Abort::BackendUnreachable => "backend_unreachable",
            Abort::BackendTimeout => "backend_timeout",
            Abort::BackendWriteFailed => "backend_write_failed",
            Abort::TlsHandshakeFailed => "tls_handshake_failed",
            Abort::TlsHandshakeTimeout => "tls_handshake_timeout",
            Abort::GateNotStarted => "gate_not_started",
            Abort::Relay(e) => e.reason(),
        }
    }
}

/// Bytes moved between the Visitor side and the Local backend.
#[derive(Debug, Clone, Copy)]
struct Moved {
    to_backend: u64,
    from_backend: u64,
}
