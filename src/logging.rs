//! Logging: tracing with one line per event and stable `key=value` fields.
//! The config's `log-level` applies to Runewarp's own events; third-party
//! crates (quinn, rustls) only speak at `warn` and above unless
//! `RUNEWARP_LOG` (an EnvFilter directive) says otherwise.

use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

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
pub struct RateLimit<K> {
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
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
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
}
