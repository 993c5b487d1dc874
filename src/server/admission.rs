//! Admission: fixed limits on the work a public Server takes on, so floods
//! of half-open TLS, slowloris Visitors or a handshake storm cannot starve
//! good traffic. When a limit is reached the NEWEST work is refused;
//! established streams are never evicted. Saturation is logged at most
//! once per scope per 10 s, with a recovery line when it clears.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// The limits. [`Limits::default`] holds the production values (see
/// docs/operations.md for their reasoning); tests inject small ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Visitors whose ClientHello is still being read (pre-routing work).
    pub client_hello_intake: usize,
    /// Of those, at most this many from one source IP.
    pub per_source_ip: usize,
    /// QUIC handshakes with would-be Client instances in progress.
    pub quic_handshakes: usize,
    /// Visitors waiting for a stream to open on a Tunnel connection.
    pub pending_stream_opens: usize,
    /// How long a Visitor may wait for that stream.
    pub stream_open_deadline: Duration,
    /// Visitor streams relayed through Tunnels at once.
    pub routed_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            client_hello_intake: 4096,
            per_source_ip: 256,
            quic_handshakes: 256,
            pending_stream_opens: 1024,
            stream_open_deadline: Duration::from_secs(5),
            routed_streams: 4096,
        }
    }
}

/// What a refusal was about, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    ClientHelloIntake,
    PerSourceIp,
    QuicHandshakes,
    PendingStreamOpens,
    RoutedStreams,
}

const SCOPES: [Scope; 5] = [
    Scope::ClientHelloIntake,
    Scope::PerSourceIp,
    Scope::QuicHandshakes,
    Scope::PendingStreamOpens,
    Scope::RoutedStreams,
];

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ClientHelloIntake => "client_hello_intake",
            Scope::PerSourceIp => "per_source_ip",
            Scope::QuicHandshakes => "quic_handshakes",
            Scope::PendingStreamOpens => "pending_stream_opens",
            Scope::RoutedStreams => "routed_streams",
        }
    }

    fn limit(self, l: &Limits) -> usize {
        match self {
            Scope::ClientHelloIntake => l.client_hello_intake,
            Scope::PerSourceIp => l.per_source_ip,
            Scope::QuicHandshakes => l.quic_handshakes,
            Scope::PendingStreamOpens => l.pending_stream_opens,
            Scope::RoutedStreams => l.routed_streams,
        }
    }
}

/// Saturation is reported at most this often per scope.
pub const SATURATION_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct ScopeLog {
    /// Refusals since the monitor last looked.
    refused: AtomicU64,
    state: Mutex<ScopeState>,
}

#[derive(Debug, Default)]
struct ScopeState {
    saturated: bool,
    last_warning: Option<Instant>,
    refused_since_warning: u64,
}

#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    intake: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    handshakes: Arc<Semaphore>,
    stream_opens: Arc<Semaphore>,
    routed: Arc<Semaphore>,
    logs: [ScopeLog; 5],
    admitting: watch::Sender<bool>,
    closed: AtomicBool,
}

/// Held while a Visitor's ClientHello is read.
#[derive(Debug)]
pub struct IntakePermit {
    _global: OwnedSemaphorePermit,
    ip: IpAddr,
    admission: Arc<Admission>,
}

impl Drop for IntakePermit {
    fn drop(&mut self) {
        let mut per_ip = lock(&self.admission.per_ip);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            intake: Arc::new(Semaphore::new(limits.client_hello_intake)),
            per_ip: Mutex::new(HashMap::new()),
            handshakes: Arc::new(Semaphore::new(limits.quic_handshakes)),
            stream_opens: Arc::new(Semaphore::new(limits.pending_stream_opens)),
            routed: Arc::new(Semaphore::new(limits.routed_streams)),
            logs: Default::default(),
            admitting: watch::Sender::new(true),
            closed: AtomicBool::new(false),
            limits,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Admit a Visitor from `ip` to ClientHello intake.
    pub fn intake(self: &Arc<Self>, ip: IpAddr) -> Result<IntakePermit, Scope> {
        let global = self
            .intake
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.refuse(Scope::ClientHelloIntake))?;
        {
            let mut per_ip = lock(&self.per_ip);
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= self.limits.per_source_ip {
                return Err(self.refuse(Scope::PerSourceIp));
            }
            *n += 1;
        }
        Ok(IntakePermit {
            _global: global,
            ip,
            admission: self.clone(),
        })
    }

    pub fn handshake(&self) -> Result<OwnedSemaphorePermit, Scope> {
        self.take(&self.handshakes, Scope::QuicHandshakes)
    }

    pub fn stream_open(&self) -> Result<OwnedSemaphorePermit, Scope> {
        self.take(&self.stream_opens, Scope::PendingStreamOpens)
    }

    pub fn routed_stream(&self) -> Result<OwnedSemaphorePermit, Scope> {
        self.take(&self.routed, Scope::RoutedStreams)
    }

    /// Visitor streams currently relayed.
    pub fn routed_in_flight(&self) -> usize {
        self.limits.routed_streams - self.routed.available_permits()
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
        scope
    }

    /// Whether new work is admitted (drives the readiness listener).
    pub fn admitting(&self) -> watch::Receiver<bool> {
        self.admitting.subscribe()
    }

    /// Stop admitting for good (shutdown started).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.admitting.send_replace(false);
    }

    /// Once a second: report saturation and recovery per scope, and keep
    /// the "admitting" signal current. Runs until the Server stops.
    pub async fn monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let mut any_saturated = false;
            for scope in SCOPES {
                any_saturated |= self.review(scope);
            }
            // Once closed for shutdown the signal never turns back on.
            if !self.closed.load(Ordering::Acquire) {
                self.admitting.send_if_modified(|a| {
                    let changed = *a == any_saturated;
                    *a = !any_saturated;
                    changed
                });
            }
        }
    }

    /// Log this scope's state change; returns whether it is saturated.
    fn review(&self, scope: Scope) -> bool {
        let log = &self.logs[scope as usize];
        let refused = log.refused.swap(0, Ordering::Relaxed);
        let mut state = lock(&log.state);
        let now = Instant::now();
        if refused > 0 {
            state.refused_since_warning += refused;
            let due = state
                .last_warning
                .is_none_or(|t| now.duration_since(t) >= SATURATION_LOG_INTERVAL);
            if !state.saturated || due {
                tracing::warn!(
                    event = "admission_saturated",
                    scope = scope.as_str(),
                    limit = scope.limit(&self.limits),
                    refused = state.refused_since_warning,
                );
                state.last_warning = Some(now);
                state.refused_since_warning = 0;
            }
            state.saturated = true;
        } else if state.saturated {
            tracing::info!(
                event = "admission_recovered",
                scope = scope.as_str(),
                refused_since_last_warning = state.refused_since_warning,
            );
            *state = ScopeState::default();
        }
        state.saturated
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Limits {
        Limits {
            client_hello_intake: 3,
            per_source_ip: 2,
            quic_handshakes: 1,
            pending_stream_opens: 1,
            stream_open_deadline: Duration::from_millis(10),
            routed_streams: 2,
        }
    }

    #[test]
    fn the_newest_work_is_refused_and_permits_come_back() {
        let a = Admission::new(small());
        let ip1: IpAddr = "192.0.2.1".parse().unwrap();
        let ip2: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = a.intake(ip1).unwrap();
        let _p2 = a.intake(ip1).unwrap();
        assert_eq!(a.intake(ip1).unwrap_err(), Scope::PerSourceIp);
        let _p3 = a.intake(ip2).unwrap();
        assert_eq!(a.intake(ip2).unwrap_err(), Scope::ClientHelloIntake);
        drop(p1);
        assert!(a.intake(ip1).is_ok(), "a finished intake frees both counts");

        let r1 = a.routed_stream().unwrap();
        let _r2 = a.routed_stream().unwrap();
        assert_eq!(a.routed_stream().unwrap_err(), Scope::RoutedStreams);
        assert_eq!(a.routed_in_flight(), 2);
        drop(r1);
        assert_eq!(a.routed_in_flight(), 1);
    }
}
