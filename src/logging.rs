//! Logging: tracing with one line per event and stable `key=value` fields.
//! The config's `log-level` applies to Runewarp's own events; third-party
//! crates (quinn, rustls) only speak at `warn` and above unless
//! `RUNEWARP_LOG` (an EnvFilter directive) says otherwise.

use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;
use crate::sync::lock;

/// Install the global subscriber (idempotent: later calls are ignored).
pub fn init(level: LogLevel) {
    let directive = match std::env::var("RUNEWARP_LOG") {
        Ok(d) if !d.trim().is_empty() => d,
        _ => format!("warn,runewarp={}", level.as_str()),
    };
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|e| {
        eprintln!(
            "runewarp: ignoring RUNEWARP_LOG={directive:?} ({e}); using log-level {}",
            level.as_str()
        );
        EnvFilter::new(format!("warn,runewarp={}", level.as_str()))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Rate-limits log lines per key: at most one per `interval`, counting what
/// was suppressed in between so the next line can say so.
#[derive(Debug)]
pub(crate) struct RateLimit<K> {
    interval: std::time::Duration,
    state: std::sync::Mutex<std::collections::HashMap<K, (std::time::Instant, u64)>>,
}

/// Keys remembered at most; older ones are forgotten first.
const RATE_LIMIT_KEYS: usize = 4096;

impl<K: std::hash::Hash + Eq + Clone> RateLimit<K> {
    pub fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            state: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// `Some(suppressed)` if a line for `key` may be logged now, with the
    /// number of lines suppressed since the last one; `None` otherwise.
    pub fn allow(&self, key: &K) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut state = lock(&self.state);
        if let Some((last, suppressed)) = state.get_mut(key) {
            if now.duration_since(*last) < self.interval {
                *suppressed += 1;
                return None;
            }
            let n = *suppressed;
            *last = now;
            *suppressed = 0;
            return Some(n);
        }
        if state.len() >= RATE_LIMIT_KEYS {
            let interval = self.interval;
            state.retain(|_, (last, _)| now.duration_since(*last) < interval);
        }
        if state.len() < RATE_LIMIT_KEYS {
            state.insert(key.clone(), (now, 0));
        }
        Some(0)
    }
}

/// A Server-wide token bucket for one log event that an unauthenticated
/// party can trigger: up to [`LOG_BUDGET_BURST`] lines at once, then one
/// per [`LOG_BUDGET_REFILL`]. However many addresses or keys a flood uses,
/// the event costs at most that many lines; each line that gets through
/// carries the number suppressed before it.
#[derive(Debug)]
pub(crate) struct LogBudget {
    burst: u64,
    refill: std::time::Duration,
    state: std::sync::Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    tokens: u64,
    /// When `tokens` was last topped up; `None` before the first use.
    since: Option<std::time::Instant>,
    suppressed: u64,
}

/// Lines a [`LogBudget`] lets through at once.
pub(crate) const LOG_BUDGET_BURST: u64 = 10;
/// A [`LogBudget`] earns one more line per this interval.
pub(crate) const LOG_BUDGET_REFILL: std::time::Duration = std::time::Duration::from_secs(10);

impl LogBudget {
    pub const fn new(burst: u64, refill: std::time::Duration) -> Self {
        Self {
            burst,
            refill,
            state: std::sync::Mutex::new(BudgetState {
                tokens: burst,
                since: None,
                suppressed: 0,
            }),
        }
    }

    /// The production budget.
    pub(crate) const fn standard() -> Self {
        Self::new(LOG_BUDGET_BURST, LOG_BUDGET_REFILL)
    }

    /// `Some(suppressed)` if a line may be logged now, with the number of
    /// lines suppressed since the last one; `None` otherwise.
    pub fn allow(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut s = lock(&self.state);
        let since = *s.since.get_or_insert(now);
        let refill = self.refill.as_nanos().max(1);
        let earned = (now.duration_since(since).as_nanos() / refill) as u64;
        if earned > 0 {
            s.tokens = s.tokens.saturating_add(earned).min(self.burst);
            s.since = Some(if s.tokens == self.burst {
                now
            } else {
                since + self.refill * earned as u32
            });
        }
        if s.tokens == 0 {
            s.suppressed += 1;
            return None;
        }
        s.tokens -= 1;
        Some(std::mem::take(&mut s.suppressed))
    }

    /// Count a line that was suppressed for another reason (e.g. a
    /// per-key [`RateLimit`]), so the next line reports it too.
    pub(crate) fn suppressed(&self) {
        let mut s = lock(&self.state);
        s.suppressed += 1;
    }
}

/// Server-wide budgets, one per event an unauthenticated party can
/// trigger at `info` or `warn`.
pub(crate) mod budget {
    use super::LogBudget;

    /// `tunnel_refused reason="unknown_identity"` (any key can be offered).
    pub(crate) static UNKNOWN_IDENTITY: LogBudget = LogBudget::standard();
    /// `acme_challenge_answered` (anyone can send the ACME ALPN).
    pub(crate) static ACME_CHALLENGE: LogBudget = LogBudget::standard();
    /// `accept_failed` (a connection flood can exhaust descriptors).
    pub(crate) static ACCEPT_FAILED: LogBudget = LogBudget::standard();
    /// Client `stream_rejected reason="no_service"` (any Visitor can send
    /// an SNI the Server routes but no Service takes).
    pub(crate) static NO_SERVICE: LogBudget = LogBudget::standard();
    /// Control API `register_refused` and `register_rate_limited` (anyone
    /// can offer a setup key).
    pub(crate) static REGISTER_REFUSED: LogBudget = LogBudget::standard();
    /// Control API `map_refused` (anyone can offer a bearer token).
    pub(crate) static MAP_REFUSED: LogBudget = LogBudget::standard();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_line_per_interval_per_key_with_suppressed_count() {
        let r = RateLimit::new(Duration::from_millis(50));
        assert_eq!(r.allow(&"a"), Some(0));
        assert_eq!(r.allow(&"a"), None);
        assert_eq!(r.allow(&"a"), None);
        assert_eq!(r.allow(&"b"), Some(0), "keys are independent");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.allow(&"a"), Some(2), "reports what it suppressed");
    }

    #[test]
    fn a_budget_lets_a_burst_through_then_one_line_per_refill() {
        let b = LogBudget::new(3, Duration::from_millis(100));
        assert_eq!(b.allow(), Some(0));
        assert_eq!(b.allow(), Some(0));
        assert_eq!(b.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(b.allow(), None, "a flood gets nothing more");
        }
        b.suppressed();
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(b.allow(), Some(1001), "reports what it suppressed");
        assert_eq!(b.allow(), None);
        std::thread::sleep(Duration::from_millis(450));
        let mut through = 0;
        while b.allow().is_some() {
            through += 1;
        }
        assert_eq!(through, 3, "refills up to the burst, no more");
    }
}
