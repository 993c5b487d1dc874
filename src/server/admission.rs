//! Admission: fixed limits on the work a public Server takes on, so floods
//! of half-open TLS, slowloris Visitors or a handshake storm cannot starve
//! good traffic. When a limit is reached the NEWEST work is refused;
//! established streams are never evicted. Saturation is logged at most
//! once per scope per 10 s, with a recovery line when it clears.
//!
//! Two kinds of limit: Server-wide pools (intake, handshakes, pending
//! stream opens, routed streams) and fair shares of them (per source
//! address, per Tunnel). Only sustained saturation of a Server-wide pool
//! closes the readiness listener; a share being used up is the share
//! holder's problem, not the Server's.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::sync::{InFlight, InFlightGuard, lock};

/// The limits. [`Limits::default`] holds the production values (see
/// docs/operations.md for their reasoning); tests inject small ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Visitors whose ClientHello is still being read (pre-routing work).
    pub client_hello_intake: usize,
    /// Of those, at most this many from one `Source`.
    pub per_source_ip: usize,
    /// QUIC handshakes with would-be Client instances in progress.
    pub quic_handshakes: usize,
    /// Once this many handshakes are in progress, a handshake from an
    /// address QUIC has not validated gets a Retry (address validation)
    /// instead of a slot: spoofed or junk Initials cannot take more.
    pub handshake_retry_above: usize,
    /// Handshakes in progress from one validated `Source`.
    pub handshakes_per_source: usize,
    /// How long a handshake may hold its slot.
    pub handshake_deadline: Duration,
    /// Visitors waiting for a stream to open on a Tunnel connection.
    pub pending_stream_opens: usize,
    /// How long a Visitor may wait for that stream.
    pub stream_open_deadline: Duration,
    /// Visitor streams relayed through Tunnels at once.
    pub routed_streams: usize,
    /// Routed plus pending Visitor streams from one `Source`.
    pub streams_per_source: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            client_hello_intake: 4096,
            per_source_ip: 256,
            quic_handshakes: 256,
            handshake_retry_above: 32,
            handshakes_per_source: 8,
            handshake_deadline: Duration::from_secs(5),
            pending_stream_opens: 1024,
            stream_open_deadline: Duration::from_secs(5),
            routed_streams: 4096,
            streams_per_source: 128,
        }
    }
}

impl Limits {
    /// One Tunnel's share of the pending-open pool: an equal share per
    /// configured Tunnel, but at least 1/16 of the pool (so with many
    /// Tunnels a busy one still gets somewhere).
    pub fn pending_share(&self, tunnels: usize) -> usize {
        let equal = self.pending_stream_opens / tunnels.max(1);
        equal
            .max(self.pending_stream_opens / 16)
            .clamp(1.min(self.pending_stream_opens), self.pending_stream_opens)
    }
}

/// Where work comes from, for per-source shares: an IPv4 address (an
/// IPv4-mapped IPv6 address counts as its IPv4 address), or an IPv6 /64
/// (one subscriber's network: a host can use any address in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(Ipv4Addr),
    V6Prefix(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6Prefix((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(v4) => write!(f, "{v4}"),
            Source::V6Prefix(p) => {
                let addr = std::net::Ipv6Addr::from_bits(u128::from(*p) << 64);
                write!(f, "{addr}/64")
            }
        }
    }
}

/// What a refusal was about, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// ClientHello intake in all.
    ClientHelloIntake,
    /// ClientHello intake per source.
    PerSourceIp,
    /// QUIC handshakes in progress.
    QuicHandshakes,
    /// Handshakes from addresses QUIC has not validated.
    UnvalidatedHandshakes,
    /// Handshakes per source.
    HandshakesPerSource,
    /// Stream opens waiting for credit, in all.
    PendingStreamOpens,
    /// Stream opens waiting per Tunnel.
    PendingPerTunnel,
    /// Routed streams in all.
    RoutedStreams,
    /// Routed streams per source.
    StreamsPerSource,
}

const SCOPES: [Scope; 9] = [
    Scope::ClientHelloIntake,
    Scope::PerSourceIp,
    Scope::QuicHandshakes,
    Scope::UnvalidatedHandshakes,
    Scope::HandshakesPerSource,
    Scope::PendingStreamOpens,
    Scope::PendingPerTunnel,
    Scope::RoutedStreams,
    Scope::StreamsPerSource,
];

impl Scope {
    /// The scope's stable token in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ClientHelloIntake => "client_hello_intake",
            Scope::PerSourceIp => "per_source_ip",
            Scope::QuicHandshakes => "quic_handshakes",
            Scope::UnvalidatedHandshakes => "unvalidated_handshakes",
            Scope::HandshakesPerSource => "handshakes_per_source",
            Scope::PendingStreamOpens => "pending_stream_opens",
            Scope::PendingPerTunnel => "pending_per_tunnel",
            Scope::RoutedStreams => "routed_streams",
            Scope::StreamsPerSource => "streams_per_source",
        }
    }

    /// Whether this is a Server-wide pool (whose sustained saturation
    /// closes readiness) rather than one holder's share of it.
    pub(crate) fn is_server_wide(self) -> bool {
        matches!(
            self,
            Scope::ClientHelloIntake
                | Scope::QuicHandshakes
                | Scope::PendingStreamOpens
                | Scope::RoutedStreams
        )
    }

    fn limit(self, l: &Limits, pending_share: usize) -> usize {
        match self {
            Scope::ClientHelloIntake => l.client_hello_intake,
            Scope::PerSourceIp => l.per_source_ip,
            Scope::QuicHandshakes => l.quic_handshakes,
            Scope::UnvalidatedHandshakes => l.handshake_retry_above,
            Scope::HandshakesPerSource => l.handshakes_per_source,
            Scope::PendingStreamOpens => l.pending_stream_opens,
            Scope::PendingPerTunnel => pending_share,
            Scope::RoutedStreams => l.routed_streams,
            Scope::StreamsPerSource => l.streams_per_source,
        }
    }
}

/// Saturation is reported at most this often per scope.
pub(crate) const SATURATION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Readiness closes once a Server-wide pool has refused work in this many
/// consecutive one-second checks: a burst that fills a pool for a moment
/// does not take the Server out of a load balancer.
pub(crate) const READINESS_SUSTAIN_CHECKS: u32 = 3;

#[derive(Debug, Default)]
struct ScopeLog {
    /// Refusals since the monitor last looked.
    refused: AtomicU64,
    /// Who was refused last (shares only), for the log line.
    last: Mutex<Option<String>>,
    state: Mutex<ScopeState>,
}

#[derive(Debug, Default)]
struct ScopeState {
    saturated: bool,
    /// Consecutive checks with refusals.
    saturated_checks: u32,
    last_warning: Option<Instant>,
    refused_since_warning: u64,
}

/// Per-key counts with a cap, for fair shares.
#[derive(Debug)]
struct Shares<K>(Mutex<HashMap<K, usize>>);

impl<K: Hash + Eq + Copy> Shares<K> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn try_add(&self, key: K, cap: usize) -> bool {
        let mut map = lock(&self.0);
        let n = map.entry(key).or_insert(0);
        if *n >= cap {
            if *n == 0 {
                map.remove(&key);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn remove(&self, key: K) {
        let mut map = lock(&self.0);
        if let Some(n) = map.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&key);
            }
        }
    }

    #[cfg(test)]
    fn get(&self, key: K) -> usize {
        lock(&self.0).get(&key).copied().unwrap_or(0)
    }
}

/// The Server's admission limits and the work they currently hold.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    pending_share: usize,
    intake: Arc<Semaphore>,
    intake_by_source: Shares<Source>,
    handshakes: Arc<Semaphore>,
    handshakes_by_source: Shares<Source>,
    stream_opens: Arc<Semaphore>,
    pending_by_tunnel: Shares<usize>,
    routed: Arc<Semaphore>,
    /// The routed streams held, for draining.
    routed_active: InFlight,
    streams_by_source: Shares<Source>,
    logs: [ScopeLog; SCOPES.len()],
    admitting: watch::Sender<bool>,
    closed: AtomicBool,
    /// Most work in progress since memory was last given back.
    peak: AtomicUsize,
    /// A saturated scope recovered: give memory back once work drained.
    release_due: AtomicBool,
    /// Refusals and saturation per scope, once the Server attached them.
    metrics: std::sync::OnceLock<Arc<crate::metrics::ServerMetrics>>,
}

/// After work in progress reached at least this much (or a saturated
/// scope recovered) and then fell back to an eighth of its peak, the
/// Server gives freed heap memory back to the system.
const RELEASE_AFTER_PEAK: usize = 256;

/// A share of one of the per-key counts, given back on drop.
#[derive(Debug)]
struct ShareGuard<K: Hash + Eq + Copy> {
    key: K,
    admission: Arc<Admission>,
    shares: fn(&Admission) -> &Shares<K>,
}

impl<K: Hash + Eq + Copy> Drop for ShareGuard<K> {
    fn drop(&mut self) {
        (self.shares)(&self.admission).remove(self.key);
    }
}

/// Held while a Visitor's ClientHello is read.
#[derive(Debug)]
pub struct IntakePermit {
    _share: ShareGuard<Source>,
    _global: OwnedSemaphorePermit,
}

/// Held while a QUIC handshake is in progress.
#[derive(Debug)]
pub struct HandshakePermit {
    _share: Option<ShareGuard<Source>>,
    _global: OwnedSemaphorePermit,
}

/// Held while a Visitor is routed (waiting for its stream or relayed).
#[derive(Debug)]
pub(crate) struct RoutedPermit {
    _share: ShareGuard<Source>,
    _global: OwnedSemaphorePermit,
    _active: InFlightGuard,
}

/// Held while a Visitor waits for a stream on its Tunnel connection.
#[derive(Debug)]
pub(crate) struct PendingPermit {
    _share: ShareGuard<usize>,
    _global: OwnedSemaphorePermit,
}

impl Admission {
    /// Limits for a Server with `tunnels` configured Tunnels.
    pub fn new(limits: Limits, tunnels: usize) -> Arc<Self> {
        Arc::new(Self {
            pending_share: limits.pending_share(tunnels),
            intake: Arc::new(Semaphore::new(limits.client_hello_intake)),
            intake_by_source: Shares::new(),
            handshakes: Arc::new(Semaphore::new(limits.quic_handshakes)),
            handshakes_by_source: Shares::new(),
            stream_opens: Arc::new(Semaphore::new(limits.pending_stream_opens)),
            pending_by_tunnel: Shares::new(),
            routed: Arc::new(Semaphore::new(limits.routed_streams)),
            routed_active: InFlight::default(),
            streams_by_source: Shares::new(),
            logs: Default::default(),
            admitting: watch::Sender::new(true),
            closed: AtomicBool::new(false),
            peak: AtomicUsize::new(0),
            release_due: AtomicBool::new(false),
            metrics: std::sync::OnceLock::new(),
            limits,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Count refusals and saturation per scope in `metrics`.
    pub(crate) fn attach_metrics(&self, metrics: Arc<crate::metrics::ServerMetrics>) {
        for scope in SCOPES {
            metrics.admission_saturated(scope.as_str(), false);
        }
        let _ = self.metrics.set(metrics);
    }

    /// One Tunnel's share of the pending-open pool.
    pub fn pending_share(&self) -> usize {
        self.pending_share
    }

    /// Admit a Visitor from `ip` to ClientHello intake.
    pub fn intake(self: &Arc<Self>, ip: IpAddr) -> Result<IntakePermit, Scope> {
        let share = self.source_share(ip, |a| &a.intake_by_source, Scope::PerSourceIp)?;
        let global = self.take(&self.intake, Scope::ClientHelloIntake)?;
        Ok(IntakePermit {
            _share: share,
            _global: global,
        })
    }

    /// Admit a QUIC handshake from `ip`. `validated`: QUIC has validated
    /// the address (a Retry round trip), so it is not spoofed. An
    /// unvalidated one is refused with [`Scope::UnvalidatedHandshakes`]
    /// once [`Limits::handshake_retry_above`] handshakes are in progress:
    /// the caller answers it with a Retry.
    pub fn handshake(
        self: &Arc<Self>,
        ip: IpAddr,
        validated: bool,
    ) -> Result<HandshakePermit, Scope> {
        let in_progress = self.limits.quic_handshakes - self.handshakes.available_permits();
        if !validated {
            if in_progress >= self.limits.handshake_retry_above {
                return Err(self.refuse(Scope::UnvalidatedHandshakes));
            }
            // Not counted per source: a spoofer could otherwise use up the
            // share of the address it pretends to be.
            let global = self.take(&self.handshakes, Scope::QuicHandshakes)?;
            return Ok(HandshakePermit {
                _share: None,
                _global: global,
            });
        }
        let share =
            self.source_share(ip, |a| &a.handshakes_by_source, Scope::HandshakesPerSource)?;
        let global = self.take(&self.handshakes, Scope::QuicHandshakes)?;
        Ok(HandshakePermit {
            _share: Some(share),
            _global: global,
        })
    }

    /// Admit a routed Visitor stream from `ip` (held until it ends).
    pub(crate) fn routed_stream(self: &Arc<Self>, ip: IpAddr) -> Result<RoutedPermit, Scope> {
        let share = self.source_share(ip, |a| &a.streams_by_source, Scope::StreamsPerSource)?;
        let global = self.take(&self.routed, Scope::RoutedStreams)?;
        Ok(RoutedPermit {
            _share: share,
            _global: global,
            _active: self.routed_active.enter(),
        })
    }

    /// Admit a Visitor of Tunnel `tunnel` to wait for a stream.
    pub(crate) fn stream_open(self: &Arc<Self>, tunnel: usize) -> Result<PendingPermit, Scope> {
        let share = self
            .share(tunnel, |a| &a.pending_by_tunnel, self.pending_share)
            .ok_or_else(|| {
                self.refuse_share(Scope::PendingPerTunnel, &format!("tunnel {tunnel}"))
            })?;
        let global = self.take(&self.stream_opens, Scope::PendingStreamOpens)?;
        Ok(PendingPermit {
            _share: share,
            _global: global,
        })
    }

    /// Visitor streams currently relayed.
    pub(crate) fn routed_in_flight(&self) -> usize {
        self.limits.routed_streams - self.routed.available_permits()
    }

    /// Wait until no Visitor stream is relayed any more (true), or `window`
    /// passed (false).
    pub(crate) async fn routed_drained(&self, window: Duration) -> bool {
        self.routed_active.drained(window).await
    }

    fn share<K: Hash + Eq + Copy>(
        self: &Arc<Self>,
        key: K,
        shares: fn(&Admission) -> &Shares<K>,
        cap: usize,
    ) -> Option<ShareGuard<K>> {
        shares(self).try_add(key, cap).then(|| ShareGuard {
            key,
            admission: self.clone(),
            shares,
        })
    }

    /// `ip`'s share of the per-source limit `scope`, counted in `shares`;
    /// refused (naming the source for the log) once it is used up.
    fn source_share(
        self: &Arc<Self>,
        ip: IpAddr,
        shares: fn(&Admission) -> &Shares<Source>,
        scope: Scope,
    ) -> Result<ShareGuard<Source>, Scope> {
        let source = Source::of(ip);
        let cap = scope.limit(&self.limits, self.pending_share);
        self.share(source, shares, cap)
            .ok_or_else(|| self.refuse_share(scope, &source))
    }

    fn take(&self, sem: &Arc<Semaphore>, scope: Scope) -> Result<OwnedSemaphorePermit, Scope> {
        sem.clone()
            .try_acquire_owned()
            .map_err(|_| self.refuse(scope))
    }

    fn refuse(&self, scope: Scope) -> Scope {
        self.logs[scope as usize]
            .refused
            .fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            m.admission_refused(scope.as_str());
        }
        scope
    }

    fn refuse_share(&self, scope: Scope, who: &dyn fmt::Display) -> Scope {
        *lock(&self.logs[scope as usize].last) = Some(who.to_string());
        self.refuse(scope)
    }

    /// Whether new work is admitted (drives the readiness listener).
    pub(crate) fn admitting(&self) -> watch::Receiver<bool> {
        self.admitting.subscribe()
    }

    /// Stop admitting for good (shutdown started).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.admitting.send_replace(false);
    }

    /// Once a second: report saturation and recovery per scope, and keep
    /// the "admitting" signal current. Runs until the Server stops.
    pub(crate) async fn monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.check();
        }
    }

    /// Work in progress: Visitors in intake, handshakes, routed streams.
    fn in_progress(&self) -> usize {
        (self.limits.client_hello_intake - self.intake.available_permits())
            + (self.limits.quic_handshakes - self.handshakes.available_permits())
            + self.routed_in_flight()
    }

    /// Once a flood has passed, give the memory it used back to the
    /// system: the allocator keeps freed memory for reuse, so without this
    /// a Server's RSS would stay at its highest ever.
    fn release_memory_after_peak(&self, recovered: bool) {
        if recovered {
            self.release_due.store(true, Ordering::Relaxed);
        }
        let now = self.in_progress();
        let peak = self.peak.fetch_max(now, Ordering::Relaxed).max(now);
        // Once the work has drained, not while the last of it still holds
        // its memory.
        if now > peak / 8 {
            return;
        }
        let due = self.release_due.swap(false, Ordering::Relaxed);
        if due || peak >= RELEASE_AFTER_PEAK {
            self.peak.store(now, Ordering::Relaxed);
            let released = release_free_memory();
            tracing::debug!(event = "memory_released", peak, in_progress = now, released);
        }
    }

    /// One check of every scope.
    fn check(&self) {
        let mut overloaded = false;
        let mut recovered = false;
        for scope in SCOPES {
            let (checks, now_recovered) = self.review(scope);
            overloaded |= scope.is_server_wide() && checks >= READINESS_SUSTAIN_CHECKS;
            recovered |= now_recovered;
        }
        self.release_memory_after_peak(recovered);
        // Once closed for shutdown the signal never turns back on. Closed
        // on sustained saturation, reopened once no Server-wide pool is
        // saturated any more.
        if !self.closed.load(Ordering::Acquire) {
            let any_server_wide = SCOPES
                .iter()
                .any(|s| s.is_server_wide() && lock(&self.logs[*s as usize].state).saturated);
            self.admitting.send_if_modified(|a| {
                let next = if *a { !overloaded } else { !any_server_wide };
                let changed = *a != next;
                *a = next;
                changed
            });
        }
    }

    /// Log this scope's state change; returns for how many consecutive
    /// checks it has been saturated (0: not saturated), and whether it has
    /// just recovered.
    fn review(&self, scope: Scope) -> (u32, bool) {
        let log = &self.logs[scope as usize];
        let refused = log.refused.swap(0, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            m.admission_saturated(scope.as_str(), refused > 0);
        }
        let mut state = lock(&log.state);
        let now = Instant::now();
        if refused > 0 {
            state.refused_since_warning += refused;
            let due = state
                .last_warning
                .is_none_or(|t| now.duration_since(t) >= SATURATION_LOG_INTERVAL);
            if !state.saturated || due {
                let last = lock(&log.last).take();
                tracing::warn!(
                    event = "admission_saturated",
                    scope = scope.as_str(),
                    limit = scope.limit(&self.limits, self.pending_share),
                    refused = state.refused_since_warning,
                    last = last.as_deref().unwrap_or("-"),
                );
                state.last_warning = Some(now);
                state.refused_since_warning = 0;
            }
            state.saturated = true;
            state.saturated_checks = state.saturated_checks.saturating_add(1);
        } else if state.saturated {
            tracing::info!(
                event = "admission_recovered",
                scope = scope.as_str(),
                refused_since_last_warning = state.refused_since_warning,
            );
            *state = ScopeState::default();
            return (0, true);
        }
        (state.saturated_checks, false)
    }
}

/// Return freed heap pages to the system (glibc keeps them otherwise).
/// Returns whether anything was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() -> bool {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Limits {
        Limits {
            client_hello_intake: 3,
            per_source_ip: 2,
            quic_handshakes: 4,
            handshake_retry_above: 2,
            handshakes_per_source: 1,
            handshake_deadline: Duration::from_millis(10),
            pending_stream_opens: 4,
            stream_open_deadline: Duration::from_millis(10),
            routed_streams: 3,
            streams_per_source: 2,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_newest_work_is_refused_and_permits_come_back() {
        let a = Admission::new(small(), 1);
        let ip1 = ip("192.0.2.1");
        let ip2 = ip("192.0.2.2");
        let p1 = a.intake(ip1).unwrap();
        let _p2 = a.intake(ip1).unwrap();
        assert_eq!(a.intake(ip1).unwrap_err(), Scope::PerSourceIp);
        let _p3 = a.intake(ip2).unwrap();
        assert_eq!(a.intake(ip2).unwrap_err(), Scope::ClientHelloIntake);
        assert_eq!(
            a.intake_by_source.get(Source::of(ip2)),
            1,
            "a refusal by the pool gives the share back"
        );
        drop(p1);
        assert!(a.intake(ip1).is_ok(), "a finished intake frees both counts");

        let r1 = a.routed_stream(ip1).unwrap();
        let _r2 = a.routed_stream(ip1).unwrap();
        assert_eq!(a.routed_stream(ip1).unwrap_err(), Scope::StreamsPerSource);
        let _r3 = a.routed_stream(ip2).unwrap();
        assert_eq!(
            a.routed_stream(ip("192.0.2.3")).unwrap_err(),
            Scope::RoutedStreams
        );
        assert_eq!(a.routed_in_flight(), 3);
        drop(r1);
        assert_eq!(a.routed_in_flight(), 2);
        assert!(a.routed_stream(ip1).is_ok());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.7")),
            Source::of(ip("192.0.2.7"))
        );
        assert_eq!(
            Source::of(ip("2001:db8:1:2::9")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(Source::of(ip("::ffff:192.0.2.7")).to_string(), "192.0.2.7");

        let a = Admission::new(small(), 1);
        let _s1 = a.routed_stream(ip("2001:db8:1:2::1")).unwrap();
        let _s2 = a.routed_stream(ip("2001:db8:1:2::2")).unwrap();
        assert_eq!(
            a.routed_stream(ip("2001:db8:1:2::3")).unwrap_err(),
            Scope::StreamsPerSource,
            "one /64 is one source"
        );
        let _i1 = a.intake(ip("::ffff:192.0.2.7")).unwrap();
        let _i2 = a.intake(ip("192.0.2.7")).unwrap();
        assert_eq!(
            a.intake(ip("::ffff:192.0.2.7")).unwrap_err(),
            Scope::PerSourceIp
        );
    }

    #[test]
    fn each_tunnel_gets_its_share_of_the_pending_pool() {
        let limits = Limits {
            pending_stream_opens: 1024,
            ..Limits::default()
        };
        assert_eq!(limits.pending_share(1), 1024);
        assert_eq!(limits.pending_share(4), 256);
        assert_eq!(limits.pending_share(100), 64, "at least 1/16 of the pool");
        assert_eq!(limits.pending_share(0), 1024);

        let a = Admission::new(small(), 2);
        assert_eq!(a.pending_share(), 2);
        let _a1 = a.stream_open(0).unwrap();
        let _a2 = a.stream_open(0).unwrap();
        assert_eq!(a.stream_open(0).unwrap_err(), Scope::PendingPerTunnel);
        let _b1 = a.stream_open(1).unwrap();
        let _b2 = a.stream_open(1).unwrap();
    }

    #[test]
    fn unvalidated_handshakes_stop_at_the_retry_threshold_and_validated_ones_per_source() {
        let a = Admission::new(small(), 1);
        let spoofed = ip("198.51.100.1");
        let _u1 = a.handshake(spoofed, false).unwrap();
        let _u2 = a.handshake(spoofed, false).unwrap();
        assert_eq!(
            a.handshake(spoofed, false).unwrap_err(),
            Scope::UnvalidatedHandshakes
        );
        // The spoofer did not use up the share of the address it used.
        let v1 = a.handshake(spoofed, true).unwrap();
        assert_eq!(
            a.handshake(spoofed, true).unwrap_err(),
            Scope::HandshakesPerSource
        );
        let _v2 = a.handshake(ip("198.51.100.2"), true).unwrap();
        assert_eq!(
            a.handshake(ip("198.51.100.3"), true).unwrap_err(),
            Scope::QuicHandshakes
        );
        drop(v1);
        assert!(a.handshake(spoofed, true).is_ok());
    }

    #[test]
    fn only_sustained_saturation_of_a_server_wide_pool_closes_readiness() {
        let a = Admission::new(small(), 1);
        let ready = a.admitting();
        let ip1 = ip("192.0.2.1");
        let _held: Vec<_> = (0..2).map(|_| a.routed_stream(ip1).unwrap()).collect();
        // One source at its share, for many checks: still ready.
        for _ in 0..READINESS_SUSTAIN_CHECKS + 2 {
            assert!(a.routed_stream(ip1).is_err());
            a.check();
            assert!(*ready.borrow(), "a source's cap never closes readiness");
        }
        // The Server-wide pool: closes only after the sustain period.
        let _last = a.routed_stream(ip("192.0.2.2")).unwrap();
        for i in 1..=READINESS_SUSTAIN_CHECKS {
            assert_eq!(
                a.routed_stream(ip("192.0.2.3")).unwrap_err(),
                Scope::RoutedStreams
            );
            a.check();
            assert_eq!(*ready.borrow(), i < READINESS_SUSTAIN_CHECKS, "check {i}");
        }
        // One quiet check reopens it.
        a.check();
        assert!(*ready.borrow());
    }
}
