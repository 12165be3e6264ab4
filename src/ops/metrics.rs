//! Counters and histograms for `GET /metrics`, in the Prometheus text format.
//!
//! Every thread updates plain atomics; nothing here blocks a request for
//! longer than an atomic add (the per-route request counts take a short
//! mutex). Figures that live in PostgreSQL (the outbox backlog) are not
//! read at scrape time: the stats refresher thread reads them once per
//! interval, and a scrape renders its last result, with its age.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::{EXACT_UP_TO, OutboxFigures};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds, cumulative as Prometheus wants.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    // The sum in millionths of the unit, so that it stays an integer.
    sum_micros: AtomicU64,
}

/// Bucket bounds for latencies, in seconds.
pub const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds for batch sizes.
pub const SIZES: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations per bucket, in bound order, then those above the last
    /// bound: not cumulative, so two snapshots can be subtracted.
    pub fn bucket_counts(&self) -> Vec<u64> {
        let mut counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total = self.count.load(Ordering::Relaxed);
        counts.push(total.saturating_sub(counts.iter().sum()));
        counts
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every figure the process exports.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Requests refused by the rate limit, by client label.
    rate_limited: Mutex<BTreeMap<String, u64>>,
    /// Time from a request's arrival to its 202.
    pub ingest_seconds: Histogram,
    /// Events per ingest transaction.
    pub commit_batch_size: Histogram,
    /// Events written by the committers.
    pub events_committed: Counter,
    /// Events an idempotent request found already stored.
    pub events_replayed: Counter,
    /// Messages the relay published and the broker confirmed.
    pub published: Counter,
    /// Time from the first publish of a relay batch to its last confirm.
    pub confirm_seconds: Histogram,
    /// Deliveries received by the consumer.
    pub deliveries: Counter,
    /// Events marked processed.
    pub processed: Counter,
    /// Time a worker spent on one batch, from lock to commit.
    pub processing_seconds: Histogram,
    /// Time from an event's commit by the API to its processing commit.
    pub ingest_to_processed_seconds: Histogram,
    /// Retries scheduled through delay queues.
    pub retries: Counter,
    /// Messages rejected into the dead-letter queue.
    pub dead_lettered: Counter,
    /// Deliveries skipped because their event was already handled.
    pub duplicates: Counter,
    /// Broker connections (re)established by the relay and the consumer.
    pub broker_connects: Counter,
    /// 1 while the broker blocks the relay's publishing (`connection.blocked`).
    pub broker_blocked: Gauge,
    /// Requests waiting for a turn to be handled (`INGEST_HTTP_THREADS`).
    pub http_requests_waiting: Gauge,
    /// Reads of the database figures behind `/metrics` and the status page.
    pub stats_refreshes: Counter,
    /// Those reads that failed (the previous figures were kept).
    pub stats_refresh_failures: Counter,
    /// Time one read of the database figures took.
    pub stats_refresh_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            rate_limited: Mutex::new(BTreeMap::new()),
            ingest_seconds: Histogram::new(SECONDS),
            commit_batch_size: Histogram::new(SIZES),
            events_committed: Counter::default(),
            events_replayed: Counter::default(),
            published: Counter::default(),
            confirm_seconds: Histogram::new(SECONDS),
            deliveries: Counter::default(),
            processed: Counter::default(),
            processing_seconds: Histogram::new(SECONDS),
            ingest_to_processed_seconds: Histogram::new(SECONDS),
            retries: Counter::default(),
            dead_lettered: Counter::default(),
            duplicates: Counter::default(),
            broker_connects: Counter::default(),
            broker_blocked: Gauge::default(),
            http_requests_waiting: Gauge::default(),
            stats_refreshes: Counter::default(),
            stats_refresh_failures: Counter::default(),
            stats_refresh_seconds: Histogram::new(SECONDS),
        }
    }
}

/// Figures read at scrape time from elsewhere.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// The outbox as last read from the database, if it ever was.
    pub outbox: Option<OutboxFigures>,
    /// Seconds since the database figures were last read successfully.
    pub stats_age_seconds: Option<f64>,
    /// Pooled connections in use and idle.
    pub pool_in_use: u32,
    /// Idle pooled connections.
    pub pool_idle: u32,
    /// Open client connections.
    pub http_connections: usize,
    /// Bytes of request bodies, and of answers not yet written, held in
    /// memory.
    pub http_buffered_bytes: usize,
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, route: &'static str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((route, status)).or_default() += 1;
    }

    /// Counts a request refused by the rate limit; `client` is the label
    /// that names its client without revealing its API key.
    pub fn rate_limited(&self, client: &str) {
        let mut map = self.rate_limited.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(client.to_string()).or_default() += 1;
    }

    /// The Prometheus text exposition of everything, with `gauges`.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP ingestd_http_requests_total HTTP requests answered, by route and status.\n\
             # TYPE ingestd_http_requests_total counter\n",
        );
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "ingestd_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP ingestd_rate_limited_total Requests refused with 429 by the rate limit, by \
             client (a digest of its API key, or \"address\" when limits are per address).\n\
             # TYPE ingestd_rate_limited_total counter\n",
        );
        for (client, n) in self
            .rate_limited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "ingestd_rate_limited_total{{client=\"{client}\"}} {n}");
        }
        self.ingest_seconds.render(
            &mut out,
            "ingestd_ingest_duration_seconds",
            "Time from request to committed 202.",
        );
        self.commit_batch_size.render(
            &mut out,
            "ingestd_commit_batch_events",
            "Events per ingest transaction.",
        );
        let counters = [
            (
                &self.events_committed,
                "ingestd_events_committed_total",
                "Events written by the API.",
            ),
            (
                &self.events_replayed,
                "ingestd_events_replayed_total",
                "Events of idempotent requests that were already stored.",
            ),
            (
                &self.published,
                "ingestd_relay_published_total",
                "Messages published and confirmed.",
            ),
            (
                &self.deliveries,
                "ingestd_deliveries_total",
                "Deliveries received by the consumer.",
            ),
            (
                &self.processed,
                "ingestd_events_processed_total",
                "Events marked processed.",
            ),
            (
                &self.retries,
                "ingestd_retries_total",
                "Retries scheduled through delay queues.",
            ),
            (
                &self.dead_lettered,
                "ingestd_dead_lettered_total",
                "Messages sent to the dead-letter queue.",
            ),
            (
                &self.duplicates,
                "ingestd_duplicates_skipped_total",
                "Deliveries of already handled events.",
            ),
            (
                &self.broker_connects,
                "ingestd_broker_connects_total",
                "Broker connections established, including reconnects.",
            ),
            (
                &self.stats_refreshes,
                "ingestd_stats_refreshes_total",
                "Reads of the database figures (outbox, events by status), at most one per INGEST_STATS_INTERVAL.",
            ),
            (
                &self.stats_refresh_failures,
                "ingestd_stats_refresh_failures_total",
                "Reads of the database figures that failed; the previous figures stay.",
            ),
        ];
        for (counter, name, help) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.get()
            );
        }
        self.confirm_seconds.render(
            &mut out,
            "ingestd_relay_confirm_duration_seconds",
            "Time from a batch's first publish to its last confirm.",
        );
        self.processing_seconds.render(
            &mut out,
            "ingestd_processing_duration_seconds",
            "Time a worker spends on one batch, lock to commit.",
        );
        self.ingest_to_processed_seconds.render(
            &mut out,
            "ingestd_ingest_to_processed_seconds",
            "Time from an event's acceptance to its processing.",
        );
        self.stats_refresh_seconds.render(
            &mut out,
            "ingestd_stats_refresh_duration_seconds",
            "Time one read of the database figures took.",
        );
        let gauge = |out: &mut String, name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        if let Some(outbox) = &gauges.outbox {
            gauge(
                &mut out,
                "ingestd_outbox_rows",
                &format!(
                    "Outbox rows waiting to be published, as of ingestd_stats_age_seconds ago: \
                     exact up to {EXACT_UP_TO}, above that PostgreSQL's live-row estimate \
                     (see ingestd_outbox_rows_estimated)."
                ),
                outbox.rows.value.to_string(),
            );
            gauge(
                &mut out,
                "ingestd_outbox_rows_estimated",
                "1 when ingestd_outbox_rows is an estimate, 0 when it is exact.",
                u8::from(outbox.rows.estimated).to_string(),
            );
            gauge(
                &mut out,
                "ingestd_outbox_oldest_age_seconds",
                "Age of the oldest outbox row (the lowest id), as of ingestd_stats_age_seconds ago; 0 when empty.",
                outbox.oldest_age.unwrap_or(0.0).to_string(),
            );
        }
        if let Some(age) = gauges.stats_age_seconds {
            gauge(
                &mut out,
                "ingestd_stats_age_seconds",
                "Seconds since the database figures were last read successfully.",
                age.to_string(),
            );
        }
        for (name, help, value) in [
            (
                "ingestd_db_pool_in_use",
                "Pooled connections in use.",
                gauges.pool_in_use as usize,
            ),
            (
                "ingestd_db_pool_idle",
                "Idle pooled connections.",
                gauges.pool_idle as usize,
            ),
            (
                "ingestd_http_connections",
                "Open client connections.",
                gauges.http_connections,
            ),
            (
                "ingestd_http_buffered_bytes",
                "Bytes of request bodies and unwritten answers held in memory.",
                gauges.http_buffered_bytes,
            ),
            (
                "ingestd_http_requests_waiting",
                "Requests waiting for one of the INGEST_HTTP_THREADS turns to parse a body or query the database.",
                self.http_requests_waiting.get() as usize,
            ),
            (
                "ingestd_broker_blocked",
                "1 while the broker blocks the relay's publishing (a memory or disk alarm).",
                self.broker_blocked.get() as usize,
            ),
        ] {
            gauge(&mut out, name, help, value.to_string());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 2.0, 3.0, 100.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 105.5\nx_count 4\n"), "{out}");
    }

    #[test]
    fn renders_requests_and_gauges() {
        let m = Metrics::default();
        m.request("ingest", 202);
        m.request("ingest", 202);
        m.request("ingest", 400);
        m.published.add(7);
        let text = m.render(&Gauges::default());
        assert!(
            !text.contains("ingestd_outbox_oldest_age_seconds"),
            "no outbox figures before the database was read"
        );
        assert!(!text.contains("ingestd_stats_age_seconds"));
        let text = m.render(&Gauges {
            outbox: Some(OutboxFigures {
                rows: crate::store::Count::exact(3),
                oldest_age: None,
            }),
            stats_age_seconds: Some(0.5),
            ..Gauges::default()
        });
        assert!(text.contains("ingestd_http_requests_total{route=\"ingest\",status=\"202\"} 2\n"));
        assert!(text.contains("ingestd_relay_published_total 7\n"));
        assert!(text.contains("ingestd_outbox_rows 3\n"));
        assert!(text.contains("ingestd_outbox_rows_estimated 0\n"));
        assert!(text.contains("ingestd_outbox_oldest_age_seconds 0\n"));
        assert!(text.contains("ingestd_stats_age_seconds 0.5\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("ingestd_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
