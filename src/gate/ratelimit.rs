//! Token buckets keyed by a string (a source IP or a mail address): each
//! key may spend `burst` at once and regains one token per `refill`. The
//! table is bounded; when full, idle (fully refilled) keys are dropped
//! first, then the stalest.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAX_KEYS: usize = 100_000;

#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    refill: Duration,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(burst: u32, refill: Duration) -> Self {
        RateLimiter {
            burst: f64::from(burst.max(1)),
            refill: refill.max(Duration::from_millis(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Spend one token for `key` at `now`; false when the key is over its
    /// limit.
    pub fn allow_at(&self, key: &str, now: Instant) -> bool {
        let mut buckets = crate::sync::lock(&self.buckets);
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let (burst, refill) = (self.burst, self.refill);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() / refill.as_secs_f64()
                    < burst
            });
            if buckets.len() >= MAX_KEYS
                && let Some(stalest) = buckets
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
            {
                buckets.remove(&stalest);
            }
        }
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        let gained = now.saturating_duration_since(*at).as_secs_f64() / self.refill.as_secs_f64();
        *tokens = (*tokens + gained).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_per_key() {
        let l = RateLimiter::new(3, Duration::from_secs(10));
        let t = Instant::now();
        assert!((0..3).all(|_| l.allow_at("a", t)));
        assert!(!l.allow_at("a", t));
        assert!(l.allow_at("b", t), "keys are independent");
        assert!(!l.allow_at("a", t + Duration::from_secs(9)));
        // 9 s brought 0.9 tokens, one more second makes a whole one.
        assert!(l.allow_at("a", t + Duration::from_secs(10)));
        assert!(!l.allow_at("a", t + Duration::from_secs(10)));
    }
}
