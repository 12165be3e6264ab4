//! Capped exponential backoff with jitter, for reconnect and retry loops.
//!
//! Pure arithmetic: it says how long to wait and never sleeps itself, so the
//! caller can wait on a shutdown channel instead of blocking blindly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Backoff state: the next delay doubles after every failure up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
    seed: u64,
}

impl Backoff {
    /// Starts at `base` and never exceeds `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            | 1;
        Backoff {
            base,
            max,
            failures: 0,
            seed,
        }
    }

    /// The delay after one more failure: `base * 2^n` capped at `max`, then
    /// scaled by a random factor in [0.5, 1.0] so that many clients that lost
    /// the same server do not come back in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        let full = self.base.saturating_mul(1 << exp).min(self.max);
        let jitter = 0.5 + 0.5 * (self.random() as f64 / u64::MAX as f64);
        full.mul_f64(jitter)
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Call after a success: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    fn random(&mut self) -> u64 {
        // xorshift64: plenty for spreading reconnects.
        let mut x = self.seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_with_jitter() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut b = Backoff::new(base, max);
        for n in 0..12u32 {
            let full = base.saturating_mul(1 << n).min(max);
            let d = b.next_delay();
            assert!(d <= full, "attempt {n}: {d:?} > {full:?}");
            assert!(d >= full / 2, "attempt {n}: {d:?} < half of {full:?}");
        }
        assert_eq!(b.failures(), 12);
        b.reset();
        assert!(b.next_delay() <= base);
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
    }
}
