//! The public listener: accepts Visitor TCP, reads the ClientHello to learn
//! the SNI, routes by exact Public hostname and forwards the original bytes
//! over a new stream on the Tunnel connection, preceded by a PROXY v2
//! header. Visitors that cannot be routed are dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::net::{TcpListener, TcpStream};

use crate::config::ServerConfig;
use crate::hostname::wire_lookup_key;
use crate::logging::{RateLimit, budget};
use crate::metrics::ServerMetrics;
use crate::relay;
use crate::server::admission::{Admission, IntakePermit};
use crate::server::tunnels::{Registry, Route};
use crate::shutdown::Shutdown;
use crate::tls::acme;
use crate::tls::sni::{self, CLIENT_HELLO_DEADLINE};
use crate::tunnel::framing::{self, ProxyHeader};

pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    admission: Arc<Admission>,
    mut shutdown: Shutdown,
    acme_challenge: Option<Arc<rustls::ServerConfig>>,
) {
    let mut backoff = AcceptBackoff::default();
    let drops = Arc::new(DropCounts::default());
    let summary = tokio::spawn(summarise_drops(drops.clone()));
    // Dropped in reverse order: the periodic task stops, then the last
    // summary is written.
    let _final = FinalSummary {
        counts: drops.clone(),
        since: std::time::Instant::now(),
    };
    let _summary = AbortOnDrop(summary);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff.reset();
                registry.metrics().visitors_accepted.inc();
                // Admission happens here, before any task or buffer exists
                // for this Visitor: the newest Visitor is the one refused.
                let intake = match admission.intake(peer.ip()) {
                    Ok(permit) => permit,
                    Err(_) => {
                        drops.count(DropReason::Overloaded, registry.metrics(), None);
                        drop_visitor(&tcp, peer, None, DropReason::Overloaded);
                        continue;
                    }
                };
                let ctx = VisitorContext {
                    config: config.clone(),
                    registry: registry.clone(),
                    admission: admission.clone(),
                    drops: drops.clone(),
                    shutdown: shutdown.clone(),
                    acme_challenge: acme_challenge.clone(),
                };
                tokio::spawn(visitor(tcp, peer, intake, ctx));
            }
            Err(error) => {
                // EMFILE, ENFILE, ENOBUFS...: back off instead of spinning.
                let delay = backoff.next();
                if let Some(suppressed) = budget::ACCEPT_FAILED.allow() {
                    tracing::warn!(event = "accept_failed", listener = "public", error = ?error.to_string(), retry_in_ms = delay.as_millis() as u64, suppressed);
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Why a Visitor was dropped before reaching a Tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The ClientHello never completed, or was not TLS: the token of
    /// [`sni::ReadHelloError::reason`].
    ClientHello(&'static str),
    NoSni,
    ServerHostname,
    UnknownHostname,
    NoTunnelConnection,
    StreamOpenFailed,
    /// An admission limit was reached.
    Overloaded,
    /// The Server is shutting down.
    ShuttingDown,
}

/// Every reason token, in the order the summary line prints them.
pub(crate) const REASONS: [&str; 13] = [
    "not_tls",
    "malformed",
    "too_large",
    "timeout",
    "eof",
    "io",
    "no_sni",
    "server_hostname",
    "unknown_hostname",
    "no_tunnel_connection",
    "stream_open_failed",
    "overloaded",
    "shutting_down",
];

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ClientHello(r) => r,
            DropReason::NoSni => "no_sni",
            DropReason::ServerHostname => "server_hostname",
            DropReason::UnknownHostname => "unknown_hostname",
            DropReason::NoTunnelConnection => "no_tunnel_connection",
            DropReason::StreamOpenFailed => "stream_open_failed",
            DropReason::Overloaded => "overloaded",
            DropReason::ShuttingDown => "shutting_down",
        }
    }
}

/// How often dropped Visitors are summarised at `info`.
pub const DROP_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Dropped Visitors by reason since the last summary, and when each reason
/// was last noticed at `info`.
#[derive(Debug)]
pub struct DropCounts {
    counts: [AtomicU64; REASONS.len()],
    /// The first drop of each reason is logged at once (then at most once
    /// per summary interval), so an operator sees a misrouted hostname or
    /// plain HTTP on 443 without waiting for the summary.
    noticed: RateLimit<&'static str>,
}

impl Default for DropCounts {
    fn default() -> Self {
        Self {
            counts: Default::default(),
            noticed: RateLimit::new(DROP_SUMMARY_INTERVAL),
        }
    }
}

impl DropCounts {
    fn count(&self, reason: DropReason, metrics: &ServerMetrics, hostname: Option<&str>) {
        let token = reason.as_str();
        metrics.visitor_dropped(token);
        let i = REASONS
            .iter()
            .position(|r| *r == token)
            .unwrap_or(REASONS.len() - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        if self.noticed.allow(&token).is_some() {
            tracing::info!(
                event = "visitor_drop_noticed",
                reason = token,
                // Visitor input: quoted and escaped.
                hostname = ?hostname.unwrap_or("-"),
                hint = drop_hint(reason),
            );
        }
    }

    /// Take the counts, resetting them; empty when nothing was dropped.
    fn take(&self) -> Vec<(&'static str, u64)> {
        REASONS
            .iter()
            .zip(&self.counts)
            .map(|(r, c)| (*r, c.swap(0, Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// What an operator can do about the first drop of each reason.
fn drop_hint(reason: DropReason) -> &'static str {
    match reason {
        DropReason::UnknownHostname => {
            "no Tunnel lists this hostname: check DNS and the public-hostnames of [[server.tunnels]]"
        }
        DropReason::NoTunnelConnection => {
            "the hostname's Tunnel has no Client connected: check the Client instance"
        }
        DropReason::NoSni => "TLS without SNI: Visitors must use a hostname, not an IP address",
        DropReason::ServerHostname => {
            "the Server hostname is not routed; only ACME validations may use it"
        }
        DropReason::Overloaded => "an admission limit refused the Visitor (admission_saturated)",
        DropReason::StreamOpenFailed => "the Tunnel connection could not open a stream in time",
        DropReason::ShuttingDown => "the Server is stopping",
        DropReason::ClientHello("not_tls") => {
            "not TLS (plain HTTP on the TLS port?); the Server only routes TLS by SNI"
        }
        DropReason::ClientHello("eof") => {
            "the Visitor closed before sending a ClientHello (a port scan or a TCP health check?)"
        }
        DropReason::ClientHello(_) => "the Visitor did not send a complete TLS ClientHello in time",
    }
}

/// Log one summary line of dropped Visitors, if any.
fn log_drop_summary(counts: &DropCounts, window: Duration) {
    let taken = counts.take();
    if taken.is_empty() {
        return;
    }
    let total: u64 = taken.iter().map(|(_, n)| n).sum();
    let by_reason = taken
        .iter()
        .map(|(r, n)| format!("{r}:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    tracing::info!(
        event = "visitors_dropped",
        window_s = window.as_secs(),
        total,
        by_reason = %by_reason,
    );
}

/// Log one line per interval summarising dropped Visitors, if any.
async fn summarise_drops(counts: Arc<DropCounts>) {
    let mut tick = tokio::time::interval(DROP_SUMMARY_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        log_drop_summary(&counts, DROP_SUMMARY_INTERVAL);
    }
}

/// Writes the last summary when the listener stops, so drops since the
/// previous one are not lost with the process.
struct FinalSummary {
    counts: Arc<DropCounts>,
    since: std::time::Instant,
}

impl Drop for FinalSummary {
    fn drop(&mut self) {
        // The window ends now; it started at the last periodic summary.
        let window = Duration::from_secs(
            self.since.elapsed().as_secs() % DROP_SUMMARY_INTERVAL.as_secs().max(1),
        );
        log_drop_summary(&self.counts, window);
    }
}

/// What each Visitor task shares.
struct VisitorContext {
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    admission: Arc<Admission>,
    drops: Arc<DropCounts>,
    shutdown: Shutdown,
    /// `[server.acme]`: answers TLS-ALPN-01 validations for the Server
    /// hostname.
    acme_challenge: Option<Arc<rustls::ServerConfig>>,
}

async fn visitor(mut tcp: TcpStream, peer: SocketAddr, intake: IntakePermit, ctx: VisitorContext) {
    let VisitorContext {
        config,
        registry,
        admission,
        drops,
        shutdown,
        acme_challenge,
    } = ctx;
    let dropped = |tcp: &TcpStream, host: Option<&str>, reason: DropReason| {
        drops.count(reason, registry.metrics(), host);
        drop_visitor(tcp, peer, host, reason);
    };
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or(config.public_bind_address);
    let mut hello = Vec::new();
    let deadline = tokio::time::Instant::now() + CLIENT_HELLO_DEADLINE;
    let info = match sni::read_client_hello(&mut tcp, &mut hello, deadline).await {
        Ok(info) => info,
        Err(e) => return dropped(&tcp, None, DropReason::ClientHello(e.reason())),
    };
    let Some(server_name) = info.server_name.as_deref() else {
        return dropped(&tcp, None, DropReason::NoSni);
    };
    let key = wire_lookup_key(server_name);
    if key == config.hostname.as_str() {
        // Only ACME TLS-ALPN-01 validations may address the Server
        // hostname, and only when the Server itself runs ACME.
        if let Some(challenge) = acme_challenge.filter(|_| acme::is_challenge_alpn(&info.alpn)) {
            let result = acme::answer_challenge(challenge, hello.into(), tcp).await;
            if let Some(suppressed) = budget::ACME_CHALLENGE.allow() {
                tracing::info!(event = "acme_challenge_answered", hostname = %key, %peer, result = result.err().unwrap_or("ok"), suppressed);
            }
            return;
        }
        return dropped(&tcp, Some(&key), DropReason::ServerHostname);
    }
    if shutdown.is_requested() {
        return dropped(&tcp, Some(&key), DropReason::ShuttingDown);
    }
    let tc = match registry.route(&key) {
        Route::Unknown => return dropped(&tcp, Some(&key), DropReason::UnknownHostname),
        Route::NoConnection { .. } => {
            return dropped(&tcp, Some(&key), DropReason::NoTunnelConnection);
        }
        Route::Active(tc) => tc,
    };
    let Ok(_routed) = admission.routed_stream(peer.ip()) else {
        return dropped(&tcp, Some(&key), DropReason::Overloaded);
    };
    let opened = {
        let Ok(_opening) = admission.stream_open(tc.tunnel) else {
            return dropped(&tcp, Some(&key), DropReason::Overloaded);
        };
        tokio::time::timeout(admission.limits().stream_open_deadline, tc.conn.open_bi()).await
    };
    // Routing is done: this Visitor no longer counts as intake.
    drop(intake);
    let _guard = tc.begin_stream();
    let tunnel_metrics = registry.metrics().tunnel(tc.tunnel);
    let _active = tunnel_metrics.as_ref().map(|m| {
        m.streams.inc();
        crate::metrics::ActiveStream::new(&m.streams_active)
    });
    let (mut send, mut recv) = match opened {
        Ok(Ok(pair)) => pair,
        _ => return dropped(&tcp, Some(&key), DropReason::StreamOpenFailed),
    };
    let header = framing::encode(&ProxyHeader {
        source: peer,
        destination: local,
    });
    let mut first = BytesMut::with_capacity(header.len() + hello.len());
    first.put_slice(&header);
    first.put_slice(&hello);
    let hello_len = hello.len() as u64;
    drop(hello);
    if send.write_chunk(first.freeze()).await.is_err() {
        relay::abort_stream(&mut send, &mut recv);
        return dropped(&tcp, Some(&key), DropReason::StreamOpenFailed);
    }
    tracing::debug!(event = "stream_routed", hostname = %key, %peer, tunnel = tc.tunnel, connection = tc.id);
    let started = std::time::Instant::now();
    let relayed = {
        let relaying = relay::relay_tcp_stream(&mut tcp, &mut send, &mut recv, config.stream_timeouts);
        let window = config.graceful_shutdown_duration;
        tokio::select! {
            r = relaying => Some(r),
            () = route_revoked(&registry, &key, tc.tunnel, window) => None,
        }
    };
    let Some(relayed) = relayed else {
        // A reload took this hostname from this Tunnel and the stream
        // outlived the graceful window.
        relay::abort_tcp(&tcp);
        relay::abort_stream(&mut send, &mut recv);
        tracing::debug!(event = "stream_cut", hostname = %key, %peer, reason = "hostname_removed");
        return;
    };
    if let (Some(m), Ok(t)) = (&tunnel_metrics, &relayed) {
        m.bytes_to_client.inc_by(t.to_tunnel + hello_len);
        m.bytes_to_visitor.inc_by(t.from_tunnel);
    }
    match relayed {
        Ok(t) => tracing::debug!(
            event = "stream_closed",
            hostname = %key,
            %peer,
            to_tunnel = t.to_tunnel + hello_len,
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

/// Resolves `window` after a reload stops `key` routing to `slot`; never
/// otherwise.
async fn route_revoked(registry: &Registry, key: &str, slot: usize, window: Duration) {
    let mut reloads = registry.reloads();
    loop {
        if reloads.changed().await.is_err() {
            return std::future::pending().await;
        }
        if !registry.routes_to(key, slot) {
            break;
        }
    }
    tokio::time::sleep(window).await;
}

fn drop_visitor(tcp: &TcpStream, peer: SocketAddr, hostname: Option<&str>, reason: DropReason) {
    // Reset rather than FIN: the Visitor gets an immediate, unambiguous end.
    relay::abort_tcp(tcp);
    tracing::debug!(event = "visitor_dropped", %peer, hostname = hostname.unwrap_or("-"), reason = reason.as_str());
}

/// Aborts a task when dropped (the summary task ends with the listener).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
