//! Reconnect backoff: after any failure or close, wait a random delay in
//! `0..window`, the windows growing 1, 2, 3, 5, 8, 12, 18, 27, 41, 60 s and
//! then staying at 60 s; back to the first window after each authenticated
//! connection.

use std::time::Duration;

use rand::Rng;

/// The window sequence, in seconds.
pub const WINDOWS_SECS: [u64; 10] = [1, 2, 3, 5, 8, 12, 18, 27, 41, 60];

/// The largest window after a refused identity (the delay is the whole
/// window plus up to a quarter).
pub const REFUSED_WINDOW_CAP: Duration = Duration::from_secs(15);

#[derive(Debug, Default, Clone)]
/// Reconnect delays: random within a growing window (see the module doc),
/// back to the first window after a success.
pub struct Backoff {
    attempt: usize,
}

impl Backoff {
    /// The window the next delay is drawn from.
    pub fn window(&self) -> Duration {
        let i = self.attempt.min(WINDOWS_SECS.len() - 1);
        Duration::from_secs(WINDOWS_SECS[i])
    }

    /// Draw the next delay and advance to the next window.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let window = self.window();
        self.attempt = self.attempt.saturating_add(1);
        let ms = window.as_millis() as u64;
        Duration::from_millis(rng.random_range(0..ms))
    }

    /// Draw the delay after the Server refused our identity: at least the
    /// whole window (plus up to a quarter more as jitter), so a refused
    /// Client makes at most 6 attempts in 30 s instead of hammering the
    /// Server while its operator fixes the pin.
    pub fn next_refused_delay(&mut self, rng: &mut impl Rng) -> Duration {
        // Capped: once the operator adds the pin, the Client is back within
        // about 19 s instead of up to 75 s.
        let window = self.window().min(REFUSED_WINDOW_CAP);
        self.attempt = self.attempt.saturating_add(1);
        let ms = window.as_millis() as u64;
        Duration::from_millis(ms + rng.random_range(0..=ms / 4))
    }

    /// An authenticated connection was established.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_sequence_then_stay_at_60s() {
        let mut b = Backoff::default();
        let mut rng = rand::rng();
        let mut seen = Vec::new();
        for _ in 0..13 {
            seen.push(b.window().as_secs());
            let d = b.next_delay(&mut rng);
            assert!(d < Duration::from_secs(*seen.last().unwrap()));
        }
        assert_eq!(seen, [1, 2, 3, 5, 8, 12, 18, 27, 41, 60, 60, 60, 60]);
    }

    #[test]
    fn a_refused_client_makes_at_most_6_attempts_in_30s() {
        let mut rng = rand::rng();
        for _ in 0..100 {
            let mut b = Backoff::default();
            // First attempt at t=0, then one after each delay.
            let (mut t, mut attempts) = (Duration::ZERO, 1);
            loop {
                t += b.next_refused_delay(&mut rng);
                if t > Duration::from_secs(30) {
                    break;
                }
                attempts += 1;
            }
            assert!(attempts <= 6, "{attempts} attempts in 30 s");
        }
    }

    #[test]
    fn a_long_refused_client_still_retries_within_19s() {
        let mut rng = rand::rng();
        let mut b = Backoff::default();
        for _ in 0..50 {
            assert!(b.next_refused_delay(&mut rng) <= Duration::from_millis(18_750));
        }
    }

    #[test]
    fn reset_returns_to_first_window() {
        let mut b = Backoff::default();
        let mut rng = rand::rng();
        for _ in 0..5 {
            b.next_delay(&mut rng);
        }
        b.reset();
        assert_eq!(b.window(), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_jittered_across_the_window() {
        let mut rng = rand::rng();
        let delays: Vec<_> = (0..200)
            .map(|_| Backoff { attempt: 9 }.next_delay(&mut rng))
            .collect();
        let min = delays.iter().min().unwrap();
        let max = delays.iter().max().unwrap();
        // 200 draws from 0..60 s: spread over most of the window.
        assert!(*min < Duration::from_secs(10), "min {min:?}");
        assert!(*max > Duration::from_secs(50), "max {max:?}");
    }
}
