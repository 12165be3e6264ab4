//! A log-linear latency histogram in the style of HdrHistogram.
//!
//! It owns recording, merging and percentile queries of durations. Values are
//! kept in nanoseconds: exactly below 256 ns, and above that in 128 linear
//! buckets per power of two, so a bucket is never wider than 1/128 of its
//! lower bound (under 0.8%) all the way from 1 µs to 60 s, in a fixed 30 KiB.
//! Each client thread records into its own histogram and the totals are merged
//! once at the end, so the hot path takes no lock. It deliberately knows
//! nothing of coordinated omission: the caller chooses the instant a latency
//! is measured from.

use std::time::Duration;

/// Linear buckets per power of two, as a power of two.
const SUB_BITS: u32 = 7;
const HALF: usize = 1 << SUB_BITS;
/// Values above this are counted in the last bucket; `max` stays exact.
const MAX_NANOS: u64 = 60_000_000_000;
const BUCKETS: usize = index_of(MAX_NANOS) + 1;

/// Counts of latencies in log-linear buckets, with the exact extremes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    min: u64,
    max: u64,
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[index_of(nanos.min(MAX_NANOS))] += 1;
        self.total += 1;
        self.min = self.min.min(nanos);
        self.max = self.max.max(nanos);
    }

    /// Adds every count of `other` to this histogram.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// How many latencies were recorded.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// The largest latency recorded, exactly; `None` when empty.
    pub fn max(&self) -> Option<Duration> {
        (self.total > 0).then(|| Duration::from_nanos(self.max))
    }

    /// The latency that `percent` of the recorded ones are at or below, to
    /// within half a bucket; `None` when empty.
    pub fn percentile(&self, percent: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        // The rank of the wanted value, counting from 1, as HdrHistogram
        // does: p50 of 1..=100 is 50, and p100 is the maximum.
        let rank = ((percent / 100.0 * self.total as f64).ceil() as u64).clamp(1, self.total);
        if rank == self.total {
            return self.max();
        }
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = bucket(index);
                // The middle of the bucket halves the worst-case error; the
                // exact extremes are better still where they fall inside it.
                let value = (low + width / 2).clamp(self.min, self.max);
                return Some(Duration::from_nanos(value));
            }
        }
        Some(Duration::from_nanos(self.max))
    }
}

/// The bucket a value in nanoseconds falls in: the value itself below
/// `2 * HALF`, then `HALF` buckets per power of two.
const fn index_of(nanos: u64) -> usize {
    let bits = u64::BITS - nanos.leading_zeros();
    let shift = bits.saturating_sub(SUB_BITS + 1);
    shift as usize * HALF + (nanos >> shift) as usize
}

/// The lowest value and the width of a bucket, in nanoseconds.
fn bucket(index: usize) -> (u64, u64) {
    if index < 2 * HALF {
        return (index as u64, 1);
    }
    let shift = index / HALF - 1;
    let sub = (index % HALF + HALF) as u64;
    (sub << shift, 1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn assert_near(got: Option<Duration>, want: Duration) {
        let got = got.expect("the histogram is not empty").as_secs_f64();
        let want = want.as_secs_f64();
        assert!(
            (got - want).abs() <= want * 0.01,
            "got {got}s, want {want}s within 1%"
        );
    }

    #[test]
    fn every_value_lands_in_a_narrow_bucket_that_holds_it() {
        // Small values one by one, then a spread of large ones up to the cap.
        let mut values: Vec<u64> = (0..5000).collect();
        let mut x = 12345u64;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            values.push((x >> 20) % MAX_NANOS);
        }
        values.extend([255, 256, 257, 511, 512, 1023, 1024, MAX_NANOS]);
        for v in values {
            let (low, width) = bucket(index_of(v));
            assert!(low <= v && v < low + width, "{v} not in [{low}, +{width})");
            assert!(width == 1 || width * 128 <= low, "bucket of {v} too wide");
        }
        assert_eq!(index_of(MAX_NANOS), BUCKETS - 1);
    }

    #[test]
    fn empty_has_no_percentiles() {
        let h = Histogram::new();
        assert_eq!(h.percentile(50.0), None);
        assert_eq!(h.max(), None);
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn uniform_distribution_percentiles() {
        let mut h = Histogram::new();
        for n in 1..=100_000 {
            h.record(micros(n));
        }
        assert_near(h.percentile(50.0), micros(50_000));
        assert_near(h.percentile(90.0), micros(90_000));
        assert_near(h.percentile(99.0), micros(99_000));
        assert_near(h.percentile(99.9), micros(99_900));
        assert_eq!(h.percentile(100.0), Some(micros(100_000)));
        assert_eq!(h.max(), Some(micros(100_000)));
        assert_near(h.percentile(0.0), micros(1));
    }

    #[test]
    fn constant_distribution_is_exact() {
        let mut h = Histogram::new();
        for _ in 0..1000 {
            h.record(Duration::from_nanos(1_234_567));
        }
        for p in [0.0, 50.0, 99.9, 100.0] {
            assert_eq!(h.percentile(p), Some(Duration::from_nanos(1_234_567)));
        }
    }

    #[test]
    fn rare_slow_requests_show_only_in_the_tail() {
        let mut h = Histogram::new();
        for n in 0..1000 {
            h.record(if n % 100 == 0 {
                micros(100_000)
            } else {
                micros(1000)
            });
        }
        assert_near(h.percentile(50.0), micros(1000));
        assert_near(h.percentile(99.0), micros(1000));
        assert_near(h.percentile(99.1), micros(100_000));
        assert_eq!(h.max(), Some(micros(100_000)));
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let (mut odd, mut even, mut all) = (Histogram::new(), Histogram::new(), Histogram::new());
        for n in 1..=10_000 {
            let d = micros(n * 7);
            if n % 2 == 1 {
                odd.record(d)
            } else {
                even.record(d)
            }
            all.record(d);
        }
        odd.merge(&even);
        assert_eq!(odd, all);
        assert_eq!(odd.len(), 10_000);
        assert_eq!(odd.max(), Some(micros(70_000)));
        assert_near(odd.percentile(50.0), micros(35_000));
    }

    #[test]
    fn merging_an_empty_histogram_changes_nothing() {
        let mut h = Histogram::new();
        h.record(micros(5));
        let before = h.clone();
        h.merge(&Histogram::new());
        assert_eq!(h, before);
    }

    #[test]
    fn values_beyond_the_range_keep_an_exact_max() {
        let mut h = Histogram::new();
        for _ in 0..99 {
            h.record(micros(500));
        }
        h.record(Duration::from_secs(120));
        assert_eq!(h.max(), Some(Duration::from_secs(120)));
        assert_near(h.percentile(50.0), micros(500));
        assert_eq!(h.percentile(100.0), Some(Duration::from_secs(120)));
    }
}
