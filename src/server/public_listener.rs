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
use crate::sync::AbortOnDrop;
use crate::tls::acme;
use crate::tls::sni::{self, CLIENT_HELLO_DEADLINE, ReadHelloError, SniError};
use crate::tunnel::framing::{self, ProxyHeader};

pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    admission: Arc<Admission>,
    mut shutdown: Shutdown,
    acme_challenge: Option<Arc<rustls::ServerConfig>>,
    relay_tcp: Option<crate::relay_server::TcpHandoff>,
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
    let _summary = AbortOnDrop::new(summary);
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
                    relay_tcp: relay_tcp.clone(),
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

/// Why a Visitor was dropped before reaching a Tunnel. The discriminant is
/// the reason's index in [`DropReason::ALL`], so counters indexed by it and
/// the names in logs, metrics and status cannot drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// The first bytes were not a TLS handshake record.
    NotTls,
    /// The ClientHello could not be parsed.
    Malformed,
    /// The ClientHello exceeded the 16 KiB cap.
    TooLarge,
    /// The ClientHello did not arrive within its deadline.
    Timeout,
    /// The Visitor closed before the ClientHello was complete.
    Eof,
    /// Reading the ClientHello failed.
    Io,
    /// The ClientHello carried no SNI.
    NoSni,
    /// The SNI named the Server hostname (and was not an ACME validation).
    ServerHostname,
    /// No Tunnel lists the hostname.
    UnknownHostname,
    /// The hostname's Tunnel has no active Tunnel connection.
    NoTunnelConnection,
    /// A stream could not be opened or written on the Tunnel connection.
    StreamOpenFailed,
    /// An admission limit was reached.
    Overloaded,
    /// The Server is shutting down.
    ShuttingDown,
}

impl DropReason {
    /// Every reason, in the order the summary line prints them; entry `i`
    /// is the reason whose [`DropReason::index`] is `i`.
    pub(crate) const ALL: [DropReason; 13] = [
        DropReason::NotTls,
        DropReason::Malformed,
        DropReason::TooLarge,
        DropReason::Timeout,
        DropReason::Eof,
        DropReason::Io,
        DropReason::NoSni,
        DropReason::ServerHostname,
        DropReason::UnknownHostname,
        DropReason::NoTunnelConnection,
        DropReason::StreamOpenFailed,
        DropReason::Overloaded,
        DropReason::ShuttingDown,
    ];

    /// Position in [`DropReason::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The reason's stable token in logs, metrics and status.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NotTls => "not_tls",
            DropReason::Malformed => "malformed",
            DropReason::TooLarge => "too_large",
            DropReason::Timeout => "timeout",
            DropReason::Eof => "eof",
            DropReason::Io => "io",
            DropReason::NoSni => "no_sni",
            DropReason::ServerHostname => "server_hostname",
            DropReason::UnknownHostname => "unknown_hostname",
            DropReason::NoTunnelConnection => "no_tunnel_connection",
            DropReason::StreamOpenFailed => "stream_open_failed",
            DropReason::Overloaded => "overloaded",
            DropReason::ShuttingDown => "shutting_down",
        }
    }

    /// The reason for a ClientHello that could not be read.
    pub(crate) fn from_hello(error: &ReadHelloError) -> Self {
        match error {
            ReadHelloError::Io(_) => DropReason::Io,
            ReadHelloError::Timeout => DropReason::Timeout,
            ReadHelloError::Eof => DropReason::Eof,
            ReadHelloError::Parse(SniError::NotTls) => DropReason::NotTls,
            ReadHelloError::Parse(SniError::Malformed(_)) => DropReason::Malformed,
            ReadHelloError::Parse(SniError::TooLarge) => DropReason::TooLarge,
        }
    }
}

// `ALL` ends with the last variant, so with `index` checked per entry in
// the tests it lists every variant exactly once.
const _: () = assert!(DropReason::ShuttingDown.index() + 1 == DropReason::ALL.len());

/// What the public listener does with a Visitor whose ClientHello it has
/// read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict<C> {
    /// Open a stream to the Visitor's Tunnel on this Tunnel connection.
    Forward(C),
    /// Answer the ACME TLS-ALPN-01 validation for the Server hostname.
    AcmeChallenge,
    /// Drop the Visitor.
    Drop(DropReason),
}

/// The routing decision, free of I/O. `key` is the normalised SNI (`None`
/// without SNI); `acme_challenge` says that the Server runs ACME and the
/// ClientHello offers exactly `acme-tls/1`; `route` looks a hostname up in
/// the registry. Only a hostname that passes the earlier checks is looked
/// up.
pub(crate) fn decide<C>(
    key: Option<&str>,
    server_hostname: &str,
    acme_challenge: bool,
    shutting_down: bool,
    route: impl FnOnce(&str) -> Route<C>,
) -> Verdict<C> {
    let Some(key) = key else {
        return Verdict::Drop(DropReason::NoSni);
    };
    if key == server_hostname {
        // Only ACME TLS-ALPN-01 validations may address the Server
        // hostname, and only when the Server itself runs ACME.
        return match acme_challenge {
            true => Verdict::AcmeChallenge,
            false => Verdict::Drop(DropReason::ServerHostname),
        };
    }
    if shutting_down {
        return Verdict::Drop(DropReason::ShuttingDown);
    }
    match route(key) {
        Route::Unknown => Verdict::Drop(DropReason::UnknownHostname),
        Route::NoConnection { .. } => Verdict::Drop(DropReason::NoTunnelConnection),
        Route::Active(c) => Verdict::Forward(c),
    }
}

/// How often dropped Visitors are summarised at `info`.
pub(crate) const DROP_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Dropped Visitors by reason since the last summary, and when each reason
/// was last noticed at `info`.
#[derive(Debug)]
pub(crate) struct DropCounts {
    counts: [AtomicU64; DropReason::ALL.len()],
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
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
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
        DropReason::ALL
            .iter()
            .zip(&self.counts)
            .map(|(r, c)| (r.as_str(), c.swap(0, Ordering::Relaxed)))
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
        DropReason::NotTls => {
            "not TLS (plain HTTP on the TLS port?); the Server only routes TLS by SNI"
        }
        DropReason::Eof => {
            "the Visitor closed before sending a ClientHello (a port scan or a TCP health check?)"
        }
        DropReason::Malformed | DropReason::TooLarge | DropReason::Timeout | DropReason::Io => {
            "the Visitor did not send a complete TLS ClientHello in time"
        }
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
    /// `[server.relay]`: relay frames over TCP (the fallback) go there.
    relay_tcp: Option<crate::relay_server::TcpHandoff>,
}

async fn visitor(mut tcp: TcpStream, peer: SocketAddr, intake: IntakePermit, ctx: VisitorContext) {
    let VisitorContext {
        config,
        registry,
        admission,
        drops,
        shutdown,
        acme_challenge,
        relay_tcp,
    } = ctx;
    let dropped = |tcp: &TcpStream, host: Option<&str>, reason: DropReason| {
        drops.count(reason, registry.metrics(), host);
        drop_visitor(tcp, peer, host, reason);
    };
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or(config.public_bind_address);
    let mut hello = Vec::new();
    let deadline = tokio::time::Instant::now() + CLIENT_HELLO_DEADLINE;
    if let Some(relay) = &relay_tcp
        && crate::relay_server::is_relay_connection(&tcp, deadline).await
    {
        // Not a Visitor: a node's relay connection (TCP fallback).
        let _ = relay.try_send((tcp, peer));
        return;
    }
    let info = match sni::read_client_hello(&mut tcp, &mut hello, deadline).await {
        Ok(info) => info,
        Err(e) => return dropped(&tcp, None, DropReason::from_hello(&e)),
    };
    let key = info.server_name.as_deref().map(wire_lookup_key);
    let answers_acme = acme_challenge.is_some() && acme::is_challenge_alpn(&info.alpn);
    let verdict = decide(
        key.as_deref(),
        config.hostname.as_str(),
        answers_acme,
        shutdown.is_requested(),
        |key| registry.route(key),
    );
    let tc = match verdict {
        Verdict::Forward(tc) => tc,
        Verdict::Drop(reason) => return dropped(&tcp, key.as_deref(), reason),
        Verdict::AcmeChallenge => {
            if let Some(challenge) = acme_challenge {
                let result = acme::answer_challenge(challenge, hello.into(), tcp).await;
                if let Some(suppressed) = budget::ACME_CHALLENGE.allow() {
                    tracing::info!(event = "acme_challenge_answered", hostname = %key.as_deref().unwrap_or_default(), %peer, result = result.err().unwrap_or("ok"), suppressed);
                }
            }
            return;
        }
    };
    // `Forward` is only decided for a hostname.
    let key = key.unwrap_or_default();
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
        let relaying =
            relay::relay_tcp_stream(&mut tcp, &mut send, &mut recv, config.stream_timeouts);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_sits_at_its_index_with_a_distinct_token() {
        let mut tokens = std::collections::HashSet::new();
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
            assert!(tokens.insert(reason.as_str()), "{reason:?} repeats a token");
        }
    }

    #[test]
    fn client_hello_failures_keep_the_parser_tokens() {
        let errors = [
            ReadHelloError::Io(std::io::Error::other("x")),
            ReadHelloError::Timeout,
            ReadHelloError::Eof,
            ReadHelloError::Parse(SniError::NotTls),
            ReadHelloError::Parse(SniError::Malformed("x")),
            ReadHelloError::Parse(SniError::TooLarge),
        ];
        for e in &errors {
            assert_eq!(DropReason::from_hello(e).as_str(), e.reason());
        }
    }

    /// `decide` with the Server hostname `server.example`, looking hostnames
    /// up in a table where `up.example` has a connection (`7`) and
    /// `down.example` has none; also returns the hostnames looked up.
    fn decide_for(key: Option<&str>, acme: bool, stopping: bool) -> (Verdict<u32>, Vec<String>) {
        let mut looked_up = Vec::new();
        let verdict = decide(key, "server.example", acme, stopping, |k| {
            looked_up.push(k.to_string());
            match k {
                "up.example" => Route::Active(7),
                "down.example" => Route::NoConnection { tunnel: 0 },
                _ => Route::Unknown,
            }
        });
        (verdict, looked_up)
    }

    #[test]
    fn routes_a_connected_hostname_to_its_connection() {
        assert_eq!(
            decide_for(Some("up.example"), false, false),
            (Verdict::Forward(7), vec!["up.example".to_string()])
        );
    }

    #[test]
    fn drops_what_cannot_be_routed() {
        let drop = Verdict::<u32>::Drop;
        assert_eq!(
            decide_for(None, false, false),
            (drop(DropReason::NoSni), vec![])
        );
        assert_eq!(
            decide_for(Some("other.example"), false, false).0,
            drop(DropReason::UnknownHostname)
        );
        assert_eq!(
            decide_for(Some("down.example"), false, false).0,
            drop(DropReason::NoTunnelConnection)
        );
        // No lookup once the Server is stopping.
        assert_eq!(
            decide_for(Some("up.example"), false, true),
            (drop(DropReason::ShuttingDown), vec![])
        );
    }

    #[test]
    fn the_server_hostname_only_answers_acme_validations() {
        assert_eq!(
            decide_for(Some("server.example"), false, false),
            (Verdict::Drop(DropReason::ServerHostname), vec![])
        );
        assert_eq!(
            decide_for(Some("server.example"), true, false),
            (Verdict::AcmeChallenge, vec![])
        );
        // Even while stopping, a validation is answered (as before).
        assert_eq!(
            decide_for(Some("server.example"), true, true).0,
            Verdict::AcmeChallenge
        );
    }
}
