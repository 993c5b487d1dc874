//! The public listener: accepts Visitor TCP, reads the ClientHello to learn
//! the SNI, routes by exact Public hostname and forwards the original bytes
//! over a new stream on the Tunnel connection, preceded by a PROXY v2
//! header. Visitors that cannot be routed are dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::net::{TcpListener, TcpStream};

use crate::config::ServerConfig;
use crate::hostname::wire_lookup_key;
use crate::proxy;
use crate::server::registry::{Registry, Route};
use crate::shutdown::Shutdown;
use crate::tls::acme;
use crate::tls::sni::{self, CLIENT_HELLO_DEADLINE};
use crate::tunnel::framing::{self, ProxyHeader};

/// Opening a stream waits for the Client's stream credit at most this long.
pub const STREAM_OPEN_DEADLINE: Duration = Duration::from_secs(5);

pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    mut shutdown: Shutdown,
    acme_challenge: Option<Arc<rustls::ServerConfig>>,
) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff.reset();
                tokio::spawn(visitor(
                    tcp,
                    peer,
                    config.clone(),
                    registry.clone(),
                    acme_challenge.clone(),
                ));
            }
            Err(error) => {
                // EMFILE, ENFILE, ENOBUFS...: back off instead of spinning.
                let delay = backoff.next();
                tracing::warn!(event = "accept_failed", listener = "public", error = ?error.to_string(), retry_in_ms = delay.as_millis() as u64);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Why a Visitor was dropped before reaching a Tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    ClientHello(&'static str),
    NoSni,
    ServerHostname,
    UnknownHostname,
    NoTunnelConnection,
    StreamOpenFailed,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ClientHello(r) => r,
            DropReason::NoSni => "no_sni",
            DropReason::ServerHostname => "server_hostname",
            DropReason::UnknownHostname => "unknown_hostname",
            DropReason::NoTunnelConnection => "no_tunnel_connection",
            DropReason::StreamOpenFailed => "stream_open_failed",
        }
    }
}

async fn visitor(
    mut tcp: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    acme_challenge: Option<Arc<rustls::ServerConfig>>,
) {
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or(config.public_bind_address);
    let mut hello = Vec::new();
    let deadline = tokio::time::Instant::now() + CLIENT_HELLO_DEADLINE;
    let info = match sni::read_client_hello(&mut tcp, &mut hello, deadline).await {
        Ok(info) => info,
        Err(e) => return dropped(&tcp, peer, None, DropReason::ClientHello(e.reason())),
    };
    let Some(server_name) = info.server_name.as_deref() else {
        return dropped(&tcp, peer, None, DropReason::NoSni);
    };
    let key = wire_lookup_key(server_name);
    if key == config.hostname.as_str() {
        // Only ACME TLS-ALPN-01 validations may address the Server
        // hostname, and only when the Server itself runs ACME.
        if let Some(challenge) = acme_challenge.filter(|_| acme::is_challenge_alpn(&info.alpn)) {
            let result = acme::answer_challenge(challenge, hello.into(), tcp).await;
            tracing::info!(event = "acme_challenge_answered", hostname = %key, %peer, result = result.err().unwrap_or("ok"));
            return;
        }
        return dropped(&tcp, peer, Some(&key), DropReason::ServerHostname);
    }
    let tc = match registry.route(&key) {
        Route::Unknown => return dropped(&tcp, peer, Some(&key), DropReason::UnknownHostname),
        Route::NoConnection { .. } => {
            return dropped(&tcp, peer, Some(&key), DropReason::NoTunnelConnection);
        }
        Route::Active(tc) => tc,
    };
    let _guard = tc.begin_stream();
    let (mut send, mut recv) =
        match tokio::time::timeout(STREAM_OPEN_DEADLINE, tc.conn.open_bi()).await {
            Ok(Ok(pair)) => pair,
            _ => return dropped(&tcp, peer, Some(&key), DropReason::StreamOpenFailed),
        };
    let header = framing::encode(&ProxyHeader {
        source: peer,
        destination: local,
    });
    let mut first = BytesMut::with_capacity(header.len() + hello.len());
    first.put_slice(&header);
    first.put_slice(&hello);
    drop(hello);
    if send.write_chunk(first.freeze()).await.is_err() {
        proxy::abort_stream(&mut send, &mut recv);
        return dropped(&tcp, peer, Some(&key), DropReason::StreamOpenFailed);
    }
    tracing::debug!(event = "stream_routed", hostname = %key, %peer, tunnel = tc.tunnel, connection = tc.id);
    let started = std::time::Instant::now();
    match proxy::relay_tcp_stream(&mut tcp, &mut send, &mut recv).await {
        Ok(t) => tracing::debug!(
            event = "stream_closed",
            hostname = %key,
            %peer,
            to_tunnel = t.to_tunnel,
            from_tunnel = t.from_tunnel,
            duration_ms = started.elapsed().as_millis() as u64,
        ),
        Err(e) => tracing::debug!(
            event = "stream_aborted",
            hostname = %key,
            %peer,
            reason = e.reason(),
            error = ?e.to_string(),
        ),
    }
}

fn dropped(tcp: &TcpStream, peer: SocketAddr, hostname: Option<&str>, reason: DropReason) {
    // Reset rather than FIN: the Visitor gets an immediate, unambiguous end.
    proxy::abort_tcp(tcp);
    tracing::debug!(event = "visitor_dropped", %peer, hostname = hostname.unwrap_or("-"), reason = reason.as_str());
}

/// Accept-error backoff: 10 ms doubling to 1 s.
#[derive(Debug, Default)]
struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    fn next(&mut self) -> Duration {
        let d = self.next.unwrap_or(Duration::from_millis(10));
        self.next = Some((d * 2).min(Duration::from_secs(1)));
        d
    }

    fn reset(&mut self) {
        self.next = None;
    }
}
