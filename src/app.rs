//! Wiring: starts the threads of a role and stops them in order.
//!
//! [`start`] opens the store, applies the schema, binds the HTTP port and
//! spawns the API, relay and consumer threads that the [`Role`] asks for.
//! [`App::shutdown`] stops them so that nothing accepted is lost: first the
//! HTTP side (finishing requests in flight), then the relay (finishing its
//! batch) and the consumer (letting workers finish and ack), within the
//! configured timeout.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use log::{info, warn};

use crate::api::commit::{self, Committer};
use crate::api::ratelimit::Limiter;
use crate::api::server::Http;
use crate::api::{self, Api, ingest};
use crate::broker::{self, AmqpUrl, Topology};
use crate::cli::Command;
use crate::config::Config;
use crate::lifecycle::{self, Stop, join_until, spawn};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::ops::stats::Stats;
use crate::relay::{self, Relay, retention};
use crate::store::{self, Store, Wakeup};
use crate::worker::consumer::Consumer;
use crate::worker::{DefaultProcessor, Processor, Worker};

/// Which parts of the pipeline this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API, relay and workers in one process.
    All,
    /// Only the HTTP API.
    Api,
    /// Only the outbox relay.
    Relay,
    /// Only the consumer and its workers.
    Worker,
}

impl Role {
    fn api(self) -> bool {
        matches!(self, Role::All | Role::Api)
    }
    fn relay(self) -> bool {
        matches!(self, Role::All | Role::Relay)
    }
    fn worker(self) -> bool {
        matches!(self, Role::All | Role::Worker)
    }
}

/// Failures starting or stopping the service.
#[derive(Debug)]
pub enum Error {
    /// PostgreSQL could not be reached or the schema not applied; the value
    /// names the database without its password.
    Database(String, store::Error),
    /// The HTTP address could not be bound.
    Bind(SocketAddr, String),
    /// Threads still running when the shutdown timeout passed.
    ShutdownTimeout(Vec<String>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Database(url, e) => write!(f, "cannot prepare the database at {url}: {e}"),
            Error::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            Error::ShutdownTimeout(names) => write!(
                f,
                "shutdown timed out waiting for {}; unfinished work stays in the outbox or the queue",
                names.join(", ")
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Database(_, e) => Some(e),
            _ => None,
        }
    }
}

/// A running service.
pub struct App {
    http_addr: Option<SocketAddr>,
    http: Option<Http>,
    background: Vec<JoinHandle<()>>,
    stop: Option<Sender<()>>,
    shutdown_timeout: Duration,
}

/// Runs a command that needs the configuration: a role until SIGTERM or
/// SIGINT, a migration, or a replay.
pub fn run(config: &Config, command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Run(role) => {
            let signals =
                lifecycle::signals().map_err(|e| format!("cannot install signal handlers: {e}"))?;
            let processor = Arc::new(DefaultProcessor {
                work: config.simulated_work,
            });
            info!("{} starting as {role:?}", crate::version());
            let app = start(config, role, processor)?;
            let signal = signals.recv().map_err(|_| "signal thread ended")?;
            info!("received {signal}");
            app.shutdown()?;
        }
        Command::Migrate => migrate(config)?,
        Command::Replay { since } => {
            let n = replay_failed(config, since.as_ref())?;
            println!("requeued {n} failed events");
        }
        // Answered by `main` without the rest of the program.
        Command::Healthcheck | Command::Help | Command::Version => {}
    }
    Ok(())
}

/// Applies the schema without starting anything (`ingestd migrate`).
pub fn migrate(config: &Config) -> Result<(), Error> {
    open_store(config, 1).map(drop)
}

/// Sends failed events back through the outbox (`ingestd replay --failed`).
pub fn replay_failed(config: &Config, since: Option<&store::Since>) -> Result<u64, Error> {
    let store = open_store(config, 1)?;
    store
        .replay_failed(since)
        .map_err(|e| Error::Database(redact_db_url(&config.database_url), e))
}

/// Opens a pool of `size` connections and applies the schema.
fn open_store(config: &Config, size: u32) -> Result<Store, Error> {
    let name = redact_db_url(&config.database_url);
    let store = Store::open(&store::Settings::of(config).sized(size))
        .map_err(|e| Error::Database(name.clone(), e))?;
    store
        .migrate()
        .map_err(|e| Error::Database(name.clone(), e))?;
    info!("database ready: {name} schema {}", config.db_schema);
    Ok(store)
}

/// What every role of one process shares.
struct Shared {
    store: Store,
    url: AmqpUrl,
    topology: Topology,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: Stop,
}

/// Starts `role` with `processor` as the business logic.
pub fn start(config: &Config, role: Role, processor: Arc<dyn Processor>) -> Result<App, Error> {
    let store = open_store(config, config.db_pool_size)?;
    let (stop_tx, stop) = Stop::new();
    let shared = Shared {
        store,
        url: AmqpUrl::parse(&config.amqp_url).expect("Config validated the AMQP URL"),
        topology: Topology::new(&config.amqp_prefix, &config.retry_delays)
            .with_quorum(config.quorum_queues)
            .with_delivery_limit(config.delivery_limit),
        health: Arc::new(Health::new(role.relay(), role.worker())),
        metrics: Arc::new(Metrics::default()),
        stop,
    };
    // Whether a relay runs in this process decides how the commits that
    // write the outbox wake relays.
    let (wake_tx, wake_rx) = bounded::<()>(1);
    let wakeup = if role.relay() {
        Wakeup::Local(wake_tx.clone())
    } else {
        Wakeup::Notify
    };
    let mut app = App {
        http_addr: None,
        http: None,
        background: Vec::new(),
        stop: Some(stop_tx),
        shutdown_timeout: config.shutdown_timeout,
    };
    if role.relay() {
        app.background
            .extend(start_relay(config, &shared, wake_tx, wake_rx));
    }
    if role.worker() {
        app.background
            .push(start_worker(config, &shared, processor));
    }
    if role.api()
        && let Err(e) = start_api(config, shared, wakeup, &mut app)
    {
        let _ = app.shutdown();
        return Err(e);
    }
    Ok(app)
}

/// The relay and the tasks beside it: its `LISTEN` wake-up, the sweeper
/// of lost messages and retention.
fn start_relay(
    config: &Config,
    shared: &Shared,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
) -> Vec<JoinHandle<()>> {
    let Shared { store, stop, .. } = shared;
    let relay = Relay {
        store: store.clone(),
        url: shared.url.clone(),
        topology: shared.topology.clone(),
        batch: config.relay_batch,
        poll: config.relay_poll,
        confirm_timeout: config.confirm_timeout,
        late_after: config.redeliver_after / 2,
        connect_timeout: broker::CONNECT_TIMEOUT,
        messages: config.messages.clone(),
        health: shared.health.clone(),
        metrics: shared.metrics.clone(),
    };
    let ages = retention::Ages {
        events: config.retention,
        idempotency_keys: config.idempotency_ttl,
    };
    let idle = config.redeliver_after;
    // Even beside an API, other processes (more APIs, `ingestd replay`)
    // may write the outbox; their commits NOTIFY.
    let (listen_store, listen_stop) = (store.clone(), stop.clone());
    let relay_stop = stop.clone();
    let (resend_store, resend_stop) = (store.clone(), stop.clone());
    let (retention_store, retention_stop) = (store.clone(), stop.clone());
    vec![
        spawn("relay-listen", move || {
            relay::listen(listen_store, wake_tx, listen_stop)
        }),
        spawn("relay", move || relay.run(wake_rx, relay_stop)),
        spawn("resend", move || {
            relay::resend_lost(resend_store, idle, resend_stop)
        }),
        spawn("retention", move || {
            retention::run(retention_store, ages, retention_stop)
        }),
    ]
}

/// The consumer, which starts the worker threads.
fn start_worker(config: &Config, shared: &Shared, processor: Arc<dyn Processor>) -> JoinHandle<()> {
    let consumer = Consumer {
        url: shared.url.clone(),
        topology: shared.topology.clone(),
        prefetch: config.prefetch,
        workers: config.workers,
        batch: config.worker_batch,
        linger: config.worker_linger,
        connect_timeout: broker::CONNECT_TIMEOUT,
        worker: Worker {
            store: shared.store.clone(),
            processor,
            retries: config.retry_delays.len(),
            health: shared.health.clone(),
            metrics: shared.metrics.clone(),
        },
        confirm_timeout: config.confirm_timeout,
        health: shared.health.clone(),
    };
    let stop = shared.stop.clone();
    spawn("consumer", move || consumer.run(stop))
}

/// The HTTP server, its handler, the committers and the figures
/// of the status page.
fn start_api(config: &Config, shared: Shared, wakeup: Wakeup, app: &mut App) -> Result<(), Error> {
    let Shared {
        store,
        url,
        topology,
        health,
        metrics,
        stop,
    } = shared;
    let limiter = config
        .rate_limit
        .map(|limit| Arc::new(Limiter::new(limit, Some(metrics.clone()))));
    let server = api::server::bind(config, &metrics, limiter.clone())
        .map_err(|e| Error::Bind(config.http_addr, e.to_string()))?;
    let settings = commit::Settings {
        threads: config.committers,
        max_batch: config.commit_batch,
        queue: config.commit_queue,
        key_ttl: config.idempotency_ttl,
        wakeup: wakeup.clone(),
        metrics: metrics.clone(),
    };
    let (committer, committers) = Committer::start(store.clone(), settings);
    let stats = Arc::new(Stats::new(
        metrics.clone(),
        health.clone(),
        store.clone(),
        config.stats_interval,
    ));
    // The first read of the database figures happens before the port
    // serves, so no request sees the figures missing while the database is
    // up; after it, only the refresher thread reads them, and request
    // threads copy its last result.
    stats.refresh();
    let (refresher, refresher_stop) = (stats.clone(), stop.clone());
    app.background.push(spawn("stats-db", move || {
        refresher.run_refresher(refresher_stop)
    }));
    let sampler = stats.clone();
    app.background.push(spawn("stats", move || {
        sampler.run_sampler(url, topology, stop)
    }));
    let api = Arc::new(Api {
        store,
        committer,
        max_body_bytes: config.max_body_bytes,
        limits: ingest::Limits {
            max_batch: config.max_batch,
            max_payload_bytes: config.max_payload_bytes,
            max_depth: config.max_json_depth,
        },
        keys: config.api_keys.clone(),
        metrics_auth: config.metrics_auth,
        limiter,
        wakeup,
        health,
        metrics,
        stats,
        server: server.clone(),
    });
    let http = Http::start(server, api, config.http_threads, committers);
    if let Some(addr) = http.addr() {
        info!("http: listening on {addr}");
    }
    app.http_addr = http.addr();
    app.http = Some(http);
    Ok(())
}

impl App {
    /// The bound HTTP address, when this role serves HTTP.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Stops gracefully: HTTP first, then the relay and the consumer. Returns
    /// an error naming the threads still busy when the timeout passed.
    pub fn shutdown(mut self) -> Result<(), Error> {
        let deadline = Instant::now() + self.shutdown_timeout;
        info!("shutting down");
        // HTTP first: no request is taken any more, and every answer given
        // (a 202 among them) reaches its client.
        let mut late = self.http.take().map_or_else(Vec::new, |h| h.stop(deadline));
        // Disconnecting the stop channel tells every background thread at once.
        drop(self.stop.take());
        late.extend(join_until(std::mem::take(&mut self.background), deadline));
        if late.is_empty() {
            info!("shutdown complete");
            Ok(())
        } else {
            warn!("shutdown timed out");
            Err(Error::ShutdownTimeout(late))
        }
    }
}

/// A database URL without its password, every host listed, for messages.
pub fn redact_db_url(url: &str) -> String {
    match url.parse::<postgres::Config>() {
        Ok(c) => {
            let ports = c.get_ports();
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let host = match h {
                        postgres::config::Host::Tcp(h) if h.contains(':') => format!("[{h}]"),
                        postgres::config::Host::Tcp(h) => h.clone(),
                        postgres::config::Host::Unix(p) => p.display().to_string(),
                    };
                    // One port for all hosts, or one per host.
                    let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                    format!("{host}:{port}")
                })
                .collect();
            let hosts = if hosts.is_empty() {
                "localhost:5432".to_string()
            } else {
                hosts.join(",")
            };
            format!(
                "postgres://{}@{hosts}/{}",
                c.get_user().unwrap_or(""),
                c.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "(unparsable database URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_db_url("postgres://u:secret@db:6543/app"),
            "postgres://u@db:6543/app"
        );
        assert_eq!(
            redact_db_url("host=h user=u password=secret dbname=d"),
            "postgres://u@h:5432/d"
        );
        assert_eq!(
            redact_db_url(
                "postgres://u:secret@h1:5432,h2:5433/app?target_session_attrs=read-write"
            ),
            "postgres://u@h1:5432,h2:5433/app"
        );
        assert_eq!(
            redact_db_url("host=h1,h2 port=6000 user=u password=secret dbname=d"),
            "postgres://u@h1:6000,h2:6000/d"
        );
    }
}
