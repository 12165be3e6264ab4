//! Live figures for the status page (`GET /`) and `GET /v1/stats`.
//!
//! A sampler thread copies this process's counters once a second into a
//! five-minute ring, from which rates and latency percentiles over any recent
//! window are computed; it also asks the broker for queue depths. Figures
//! that live in PostgreSQL (events by status, the outbox, recent failures)
//! are read by a refresher thread of their own, once per
//! `INGEST_STATS_INTERVAL`, with one pooled connection; requests for
//! `/metrics`, `/v1/stats` and the page only copy its last result, so no
//! number of scrapers or viewers adds a query or holds a connection, and a
//! slow or absent database never holds up their answers. This module
//! computes and renders; it does not serve HTTP.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde_json::{Value, json};

use crate::broker::{self, AmqpUrl, Nodes, Topology};
use crate::lifecycle::Stop;
use crate::ops::health::Health;
use crate::ops::metrics::{Metrics, SECONDS};
use crate::store::{self, Count, EXACT_UP_TO, OutboxFigures, StatusCounts, Store};

/// Samples kept: five minutes at one a second.
pub const HISTORY: usize = 300;

/// The page, with `{{name}}` placeholders the server fills.
pub const PAGE: &str = include_str!("status.html");

/// Counters at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the process started.
    pub at: f64,
    /// Events committed by the API.
    pub ingested: u64,
    /// Messages published by the relay.
    pub published: u64,
    /// Events processed.
    pub processed: u64,
    /// Messages dead-lettered (failed events and poison messages).
    pub dead_lettered: u64,
    /// Retries scheduled.
    pub retries: u64,
    /// Ingest-to-processed latency counts per bucket ([`SECONDS`] bounds,
    /// then the overflow), since the process started.
    pub latency_buckets: Vec<u64>,
}

/// Per-second rates between two samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Events committed per second.
    pub ingested: f64,
    /// Messages published per second.
    pub published: f64,
    /// Events processed per second.
    pub processed: f64,
    /// Messages dead-lettered per second.
    pub dead_lettered: f64,
    /// Retries per second.
    pub retries: f64,
}

/// Rates from `old` to `new`; zero when no time passed.
pub fn rates(old: &Sample, new: &Sample) -> Rates {
    let dt = new.at - old.at;
    if dt <= 0.0 {
        return Rates::default();
    }
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt;
    Rates {
        ingested: per(old.ingested, new.ingested),
        published: per(old.published, new.published),
        processed: per(old.processed, new.processed),
        dead_lettered: per(old.dead_lettered, new.dead_lettered),
        retries: per(old.retries, new.retries),
    }
}

/// The `q` quantile (0..1) of the observations between two cumulative
/// snapshots of a histogram with upper `bounds`, interpolated linearly
/// inside the bucket it falls in; `None` without observations. Values past
/// the last bound count as the last bound.
pub fn quantile(bounds: &[f64], old: &[u64], new: &[u64], q: f64) -> Option<f64> {
    let counts: Vec<u64> = new
        .iter()
        .zip(old.iter().chain(std::iter::repeat(&0)))
        .map(|(n, o)| n.saturating_sub(*o))
        .collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0.0;
    for (i, &c) in counts.iter().enumerate() {
        let upper = bounds.get(i).copied().unwrap_or(*bounds.last()?);
        let lower = if i == 0 {
            0.0
        } else {
            bounds[i - 1].min(upper)
        };
        if c > 0 && seen + c as f64 >= rank {
            let within = (rank - seen) / c as f64;
            return Some(lower + (upper - lower) * within);
        }
        seen += c as f64;
    }
    bounds.last().copied()
}

/// Failed events the page lists.
const RECENT_FAILED: i64 = 10;

/// Figures read from PostgreSQL by one refresh.
#[derive(Debug, Clone, Default)]
pub struct DbFigures {
    /// Events by status.
    pub counts: StatusCounts,
    /// The outbox backlog.
    pub outbox: OutboxFigures,
    /// The latest failed events.
    pub recent_failed: Vec<store::FailedEvent>,
}

/// The database figures as the refresher last left them.
#[derive(Debug, Clone, Default)]
pub struct DbView {
    /// The figures of the last successful read, if there was one.
    pub figures: Option<Arc<DbFigures>>,
    /// Time since that read.
    pub age: Option<Duration>,
    /// True when the last read succeeded.
    pub up: bool,
}

/// What the refresher thread writes and requests read.
#[derive(Default)]
struct DbState {
    figures: Option<Arc<DbFigures>>,
    read_at: Option<Instant>,
    /// The outcome of the last read; `None` before the first.
    last_ok: Option<bool>,
}

/// The live figures of this process.
pub struct Stats {
    started: Instant,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    store: Store,
    interval: Duration,
    samples: Mutex<VecDeque<Sample>>,
    queues: Mutex<(Option<u32>, Option<u32>)>,
    db: Mutex<DbState>,
}

impl Stats {
    /// Figures over `metrics` and `health`, with the database behind
    /// `store` read once per `interval` by [`Stats::run_refresher`].
    pub fn new(
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        store: Store,
        interval: Duration,
    ) -> Stats {
        Stats {
            started: Instant::now(),
            metrics,
            health,
            store,
            interval,
            samples: Mutex::new(VecDeque::with_capacity(HISTORY + 1)),
            queues: Mutex::new((None, None)),
            db: Mutex::new(DbState::default()),
        }
    }

    fn sample(&self) -> Sample {
        let m = &self.metrics;
        Sample {
            at: self.started.elapsed().as_secs_f64(),
            ingested: m.events_committed.get(),
            published: m.published.get(),
            processed: m.processed.get(),
            dead_lettered: m.dead_lettered.get(),
            retries: m.retries.get(),
            latency_buckets: m.ingest_to_processed_seconds.bucket_counts(),
        }
    }

    /// Records one sample; the sampler calls it every second.
    pub fn record(&self) {
        let sample = self.sample();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back(sample);
        while samples.len() > HISTORY + 1 {
            samples.pop_front();
        }
    }

    /// Samples every second and polls queue depths until `stop` disconnects.
    pub fn run_sampler(&self, url: AmqpUrl, topology: Topology, stop: Stop) {
        let mut connection = None;
        let mut nodes = Nodes::new(url);
        // Give the relay and consumer a moment to declare the queues.
        let mut next_probe = Instant::now() + Duration::from_secs(1);
        loop {
            self.record();
            if Instant::now() >= next_probe {
                let depths = probe_queues(&mut connection, &mut nodes, &topology);
                if depths.0.is_none() {
                    // Broker away, or the queues not declared yet: try
                    // again in a while, not every second.
                    next_probe = Instant::now() + Duration::from_secs(3);
                }
                *self.queues.lock().unwrap_or_else(|e| e.into_inner()) = depths;
            }
            if stop.wait(Duration::from_secs(1)) {
                break;
            }
        }
        if let Some(c) = connection {
            let _ = amiquip::Connection::close(c);
        }
    }

    /// Reads the database figures once, with one pooled connection, and
    /// keeps them for requests to copy. A failure keeps the previous
    /// figures (their age tells how old they are) and marks PostgreSQL
    /// down; it is logged once per outage.
    pub fn refresh(&self) {
        let started = Instant::now();
        self.metrics.stats_refreshes.inc();
        let read = || -> Result<DbFigures, store::Error> {
            Ok(DbFigures {
                counts: self.store.count_by_status()?,
                outbox: self.store.outbox_figures()?,
                recent_failed: self.store.recent_failed(RECENT_FAILED)?,
            })
        };
        let result = read();
        self.metrics
            .stats_refresh_seconds
            .observe_duration(started.elapsed());
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(figures) => {
                if db.last_ok == Some(false) {
                    info!("stats: database figures available again");
                }
                db.figures = Some(Arc::new(figures));
                db.read_at = Some(Instant::now());
                db.last_ok = Some(true);
            }
            Err(e) => {
                self.metrics.stats_refresh_failures.inc();
                if db.last_ok == Some(false) {
                    debug!("stats: database figures still unavailable: {e}");
                } else {
                    warn!("stats: database figures unavailable, keeping the last ones: {e}");
                }
                db.last_ok = Some(false);
            }
        }
    }

    /// Refreshes the database figures every interval until `stop`
    /// disconnects. The interval runs from the end of one read to the start
    /// of the next, so a slow database gets no more than one read in
    /// flight and a pause after it. The caller did the first read.
    pub fn run_refresher(&self, stop: Stop) {
        while !stop.wait(self.interval) {
            self.refresh();
        }
    }

    /// The database figures as last read; never touches the database.
    pub fn db(&self) -> DbView {
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        DbView {
            figures: db.figures.clone(),
            age: db.read_at.map(|at| at.elapsed()),
            up: db.last_ok == Some(true),
        }
    }

    /// The `GET /v1/stats` document.
    pub fn snapshot(&self) -> Value {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let now = self.sample();
        // Rates and latency over the last five seconds.
        let window_start = samples
            .iter()
            .rev()
            .find(|s| now.at - s.at >= 5.0)
            .or(samples.front())
            .cloned()
            .unwrap_or_default();
        let r = rates(&window_start, &now);
        let q = |p| {
            quantile(
                SECONDS,
                &window_start.latency_buckets,
                &now.latency_buckets,
                p,
            )
            .map(|s| round(s * 1000.0, 2))
        };
        let mut history = json!({
            "interval_s": 1, "ingested": [], "processed": [], "failed": [],
            "p50_ms": [], "p99_ms": [],
        });
        for pair in samples.iter().collect::<Vec<_>>().windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let r = rates(a, b);
            let pq = |p| {
                quantile(SECONDS, &a.latency_buckets, &b.latency_buckets, p)
                    .map(|s| round(s * 1000.0, 2))
            };
            for (key, value) in [
                ("ingested", json!(round(r.ingested, 1))),
                ("processed", json!(round(r.processed, 1))),
                ("failed", json!(round(r.dead_lettered, 1))),
                ("p50_ms", json!(pq(0.5))),
                ("p99_ms", json!(pq(0.99))),
            ] {
                if let Some(list) = history[key].as_array_mut() {
                    list.push(value);
                }
            }
        }
        let db = self.db();
        let (queue_depth, dead_depth) = *self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let mut health = serde_json::Map::new();
        health.insert("postgres".into(), if db.up { "up" } else { "down" }.into());
        let links = self.health.broker_links();
        let node_list = self.health.broker_nodes();
        let mut nodes = serde_json::Map::new();
        for name in ["broker_relay", "broker_consumer"] {
            let state = match links.iter().find(|(n, _)| *n == name) {
                Some((_, link)) => link.as_str(),
                None => "not run here",
            };
            health.insert(name.into(), state.into());
            let node = node_list
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, node)| node.clone());
            nodes.insert(name.into(), node.into());
        }
        // Before the first successful read there are no figures to show,
        // which is not the same as zeros.
        let (events, outbox, recent_failed) = match &db.figures {
            Some(f) => {
                let c = &f.counts;
                let o = &f.outbox;
                (
                    json!({
                        "pending": c.pending.value,
                        "processed": c.processed.value,
                        "failed": c.failed.value,
                        "estimated": estimated(&[
                            ("pending", c.pending),
                            ("processed", c.processed),
                            ("failed", c.failed),
                        ]),
                    }),
                    json!({
                        "rows": o.rows.value,
                        "oldest_age_s": round(o.oldest_age.unwrap_or(0.0), 1),
                        "estimated": estimated(&[("rows", o.rows)]),
                    }),
                    f.recent_failed.as_slice(),
                )
            }
            None => (
                json!({ "pending": null, "processed": null, "failed": null, "estimated": [] }),
                json!({ "rows": null, "oldest_age_s": null, "estimated": [] }),
                &[][..],
            ),
        };
        json!({
            "version": crate::version(),
            "uptime_s": round(now.at, 1),
            "health": health,
            "nodes": nodes,
            "events": events,
            "outbox": outbox,
            "db_figures": {
                "age_s": db.age.map(|a| round(a.as_secs_f64(), 1)),
                "interval_s": self.interval.as_secs_f64(),
                "exact_up_to": EXACT_UP_TO,
            },
            "queue": { "depth": queue_depth, "dead": dead_depth },
            "rates": {
                "ingested": round(r.ingested, 1),
                "published": round(r.published, 1),
                "processed": round(r.processed, 1),
                "failed": round(r.dead_lettered, 1),
                "retries": round(r.retries, 1),
                "dead_lettered": round(r.dead_lettered, 1),
            },
            "latency_ms": { "p50": q(0.5), "p99": q(0.99) },
            "history": history,
            "recent_failed": recent_failed.iter().map(|f| json!({
                "id": f.id.to_string(), "created_at": f.created_at, "last_error": f.last_error,
            })).collect::<Vec<_>>(),
            // The retry route is always served; the field lets the page
            // hide its buttons for a server without it.
            "retry_enabled": true,
        })
    }

    /// The status page with the current figures filled in, so that it is
    /// readable without JavaScript. When `locked` (API keys are required),
    /// it carries no figures and asks for a key, and its script fetches
    /// them from `/v1/stats` with that key.
    pub fn page(&self, locked: bool) -> String {
        render_page(&if locked { Value::Null } else { self.snapshot() })
    }
}

/// The names of the counts that are estimates.
fn estimated(counts: &[(&'static str, Count)]) -> Vec<&'static str> {
    counts
        .iter()
        .filter(|(_, c)| c.estimated)
        .map(|(name, _)| *name)
        .collect()
}

/// Fills the page's placeholders from a stats document; `null` leaves
/// every figure blank and shows the API key form.
pub fn render_page(s: &Value) -> String {
    let text = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // An estimated count reads "~12345", as the page's script writes it.
    let count = |group: &str, key: &str| {
        let marked = s[group]["estimated"]
            .as_array()
            .is_some_and(|names| names.iter().any(|n| n == key));
        let value = text(&s[group][key]);
        if marked { format!("~{value}") } else { value }
    };
    let or_unknown = |v: &Value| {
        if v.is_null() {
            "?".to_string()
        } else {
            text(v)
        }
    };
    // "on host:port" after a connection's state, nothing while it has none.
    let on_node = |v: &Value| match v.as_str() {
        Some(node) => format!("on {node}"),
        None => String::new(),
    };
    let failed_rows: String = s["recent_failed"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|f| {
                    format!(
                        "<tr class=\"failed-event\" data-id=\"{id}\"><td>{id}</td><td>{at}</td><td>{err}</td><td></td></tr>",
                        id = escape(&text(&f["id"])),
                        at = escape(&text(&f["created_at"])),
                        err = escape(&text(&f["last_error"])),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let fields: Vec<(&str, String)> = vec![
        ("version", text(&s["version"])),
        ("uptime", text(&s["uptime_s"])),
        ("postgres", text(&s["health"]["postgres"])),
        ("broker_relay", text(&s["health"]["broker_relay"])),
        ("broker_consumer", text(&s["health"]["broker_consumer"])),
        ("node_relay", on_node(&s["nodes"]["broker_relay"])),
        ("node_consumer", on_node(&s["nodes"]["broker_consumer"])),
        ("pending", count("events", "pending")),
        ("processed", count("events", "processed")),
        ("failed", count("events", "failed")),
        ("outbox_rows", count("outbox", "rows")),
        ("outbox_age", text(&s["outbox"]["oldest_age_s"])),
        ("queue_depth", or_unknown(&s["queue"]["depth"])),
        ("dead_depth", or_unknown(&s["queue"]["dead"])),
        ("rate_ingested", text(&s["rates"]["ingested"])),
        ("rate_published", text(&s["rates"]["published"])),
        ("rate_processed", text(&s["rates"]["processed"])),
        ("rate_failed", text(&s["rates"]["failed"])),
        ("rate_retries", text(&s["rates"]["retries"])),
        ("rate_dead", text(&s["rates"]["dead_lettered"])),
        ("p50", text(&s["latency_ms"]["p50"])),
        ("p99", text(&s["latency_ms"]["p99"])),
        (
            "key_form",
            if s.is_null() { "" } else { "hidden" }.to_string(),
        ),
    ];
    let mut page = PAGE.to_string();
    for (name, value) in fields {
        page = page.replace(&format!("{{{{{name}}}}}"), &escape(&value));
    }
    page.replace("{{failed_rows}}", &failed_rows)
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn probe_queues(
    connection: &mut Option<amiquip::Connection>,
    nodes: &mut Nodes,
    topology: &Topology,
) -> (Option<u32>, Option<u32>) {
    let result = (|| -> Result<(u32, u32), broker::Error> {
        if connection.is_none() {
            *connection = Some(nodes.connect(broker::CONNECT_TIMEOUT)?);
        }
        let c = connection.as_mut().expect("just connected");
        let channel = c.open_channel(None)?;
        let depth = |name: &str| -> Result<u32, broker::Error> {
            Ok(channel
                .queue_declare_passive(name)?
                .declared_message_count()
                .unwrap_or(0))
        };
        let depths = (depth(&topology.queue)?, depth(&topology.dead_queue)?);
        let _ = channel.close();
        Ok(depths)
    })();
    match result {
        Ok((depth, dead)) => (Some(depth), Some(dead)),
        Err(e) => {
            debug!("stats: queue depths unavailable: {e}");
            *connection = None;
            (None, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, ingested: u64, processed: u64) -> Sample {
        Sample {
            at,
            ingested,
            processed,
            ..Sample::default()
        }
    }

    #[test]
    fn rates_over_a_window() {
        let r = rates(&sample(10.0, 100, 50), &sample(15.0, 600, 300));
        assert_eq!(r.ingested, 100.0);
        assert_eq!(r.processed, 50.0);
        assert_eq!(
            rates(&sample(1.0, 5, 5), &sample(1.0, 9, 9)),
            Rates::default()
        );
        // A counter never goes back; a restart would, and must not show as
        // a negative rate.
        assert_eq!(rates(&sample(0.0, 9, 0), &sample(1.0, 5, 0)).ingested, 0.0);
    }

    #[test]
    fn quantiles_from_histogram_deltas() {
        let bounds = [1.0, 2.0, 4.0];
        // 100 observations: 50 in (0,1], 40 in (1,2], 10 in (2,4].
        let old = [10, 10, 10, 10];
        let new = [60, 50, 20, 10];
        assert_eq!(quantile(&bounds, &old, &new, 0.5), Some(1.0));
        let p90 = quantile(&bounds, &old, &new, 0.9).unwrap();
        assert!((p90 - 2.0).abs() < 1e-9, "{p90}");
        let p99 = quantile(&bounds, &old, &new, 0.99).unwrap();
        assert!((p99 - 3.8).abs() < 1e-9, "{p99}");
        let p25 = quantile(&bounds, &old, &new, 0.25).unwrap();
        assert!((p25 - 0.5).abs() < 1e-9, "{p25}");
        assert_eq!(quantile(&bounds, &new, &new, 0.5), None);
        // Past the last bound counts as the last bound.
        assert_eq!(
            quantile(&bounds, &[0, 0, 0, 0], &[0, 0, 0, 3], 0.5),
            Some(4.0)
        );
    }

    #[test]
    fn the_page_is_filled_and_escaped() {
        let doc = json!({
            "version": "ingestd 1", "uptime_s": 3.5,
            "health": {"postgres": "up", "broker_relay": "up", "broker_consumer": "not run here"},
            "nodes": {"broker_relay": "rabbit-2:5672", "broker_consumer": null},
            "events": {"pending": 1, "processed": 20001, "failed": 3, "estimated": ["processed"]},
            "outbox": {"rows": 4, "oldest_age_s": 0.5, "estimated": []},
            "queue": {"depth": null, "dead": 0},
            "rates": {"ingested": 1.5, "published": 1.0, "processed": 1.0, "failed": 0.0,
                      "retries": 0.0, "dead_lettered": 0.0},
            "latency_ms": {"p50": null, "p99": 9.5},
            "recent_failed": [{"id": "x", "created_at": "t", "last_error": "<script>alert(1)</script>"}],
        });
        let page = render_page(&doc);
        assert!(!page.contains("{{"), "unfilled placeholder");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!page.contains("<script>alert(1)"));
        assert!(page.contains("data-id=\"x\""));
        assert!(
            page.contains(">on rabbit-2:5672<"),
            "the relay's node is named"
        );
        assert!(page.contains("id=\"node-broker-consumer\" class=\"muted\"><"));
        assert!(page.contains(">~20001<"), "an estimate is marked");
        assert!(page.contains(">4<"), "an exact count is not");
        assert!(page.len() < 50 * 1024, "the page is {} bytes", page.len());
    }
}
