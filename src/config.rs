//! Configuration: one [`Config`] read from `INGEST_*` environment variables.
//!
//! Every variable, its default and its meaning live in [`VARS`], which also
//! feeds `--help` and the README table, so the three cannot drift apart.
//! Values are parsed and validated here, once, at start-up; the rest of the
//! program receives typed values and never reads the environment itself.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::api::auth::ApiKeys;
use crate::api::ratelimit::RateLimit;
use crate::message;

/// One documented configuration variable.
pub struct Var {
    /// The environment variable's name.
    pub name: &'static str,
    /// The default, as the user would write it.
    pub default: &'static str,
    /// What it controls.
    pub help: &'static str,
}

/// Every variable `ingestd` reads, with its default.
pub const VARS: &[Var] = &[
    Var {
        name: "INGEST_HTTP_ADDR",
        default: "127.0.0.1:5001",
        help: "address the HTTP API listens on",
    },
    Var {
        name: "INGEST_HTTP_THREADS",
        default: "8",
        help: "requests that parse a body or query the database handled at once, each on its connection's thread (committers answer ingests)",
    },
    Var {
        name: "INGEST_HTTP_MAX_CONNECTIONS",
        default: "1024",
        help: "open client connections at most; one more is answered 503 and closed",
    },
    Var {
        name: "INGEST_HTTP_MAX_HEADER_BYTES",
        default: "16384",
        help: "largest request line plus headers; larger get 431",
    },
    Var {
        name: "INGEST_HTTP_HEADER_TIMEOUT",
        default: "30s",
        help: "time a client has to send a request's headers (also the keep-alive idle limit); 408 after",
    },
    Var {
        name: "INGEST_HTTP_BODY_TIMEOUT",
        default: "30s",
        help: "time a client has to send a request's body (408 after), and to take in a response",
    },
    Var {
        name: "INGEST_HTTP_BUFFER_BYTES",
        default: "134217728",
        help: "memory for requests held at once (bodies, parsed events, answers), all connections together; beyond it 503",
    },
    Var {
        name: "INGEST_MAX_BODY_BYTES",
        default: "5242880",
        help: "largest request body (a batch), as sent and once decompressed (gzip, deflate); larger bodies get 413",
    },
    Var {
        name: "INGEST_MAX_BATCH",
        default: "1000",
        help: "most events in one batch; more get 413",
    },
    Var {
        name: "INGEST_MAX_PAYLOAD_BYTES",
        default: "1048576",
        help: "largest payload of one event, as compact JSON; larger get 413",
    },
    Var {
        name: "INGEST_MAX_JSON_DEPTH",
        default: "32",
        help: "deepest nesting of arrays and objects in a body (at most 100); deeper get 400",
    },
    Var {
        name: "INGEST_IDEMPOTENCY_TTL",
        default: "24h",
        help: "how long an Idempotency-Key is remembered",
    },
    Var {
        name: "INGEST_API_KEYS",
        default: "",
        help: "comma-separated API keys (16+ characters each) required on ingest and query routes; empty: open",
    },
    Var {
        name: "INGEST_RATE_LIMIT",
        default: "off",
        help: "events per second each API key (each client address when no keys are set) may ingest, with a burst: for example 1000/s,burst=5000; over it, 429 with Retry-After",
    },
    Var {
        name: "INGEST_MESSAGE_FORMAT",
        default: "ingestd",
        help: "message bodies: ingestd (its JSON body, CloudEvents attributes in cloudEvents_* headers) or cloudevents (structured-mode CloudEvents JSON)",
    },
    Var {
        name: "INGEST_CLOUDEVENTS_SOURCE",
        default: "/ingestd",
        help: "the CloudEvents source (a URI reference) of events ingested without CloudEvents",
    },
    Var {
        name: "INGEST_METRICS_AUTH",
        default: "open",
        help: "open, or key to require one of INGEST_API_KEYS on /metrics too (Prometheus sends it as a bearer token)",
    },
    Var {
        name: "INGEST_COMMITTERS",
        default: "2",
        help: "threads writing accepted events, each one transaction per batch",
    },
    Var {
        name: "INGEST_COMMIT_BATCH",
        default: "256",
        help: "most events in one ingest transaction (group commit)",
    },
    Var {
        name: "INGEST_COMMIT_QUEUE",
        default: "512",
        help: "requests waiting for a committer; beyond it the API answers 503 at once",
    },
    Var {
        name: "INGEST_DATABASE_URL",
        default: "postgres://postgres@127.0.0.1:5432/postgres",
        help: "PostgreSQL connection URL or key=value string; several hosts (postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write) are tried in order, and read-write skips a standby to find the primary",
    },
    Var {
        name: "INGEST_DB_SCHEMA",
        default: "public",
        help: "schema holding the tables (created if missing)",
    },
    Var {
        name: "INGEST_DB_POOL_SIZE",
        default: "16",
        help: "maximum pooled PostgreSQL connections per process",
    },
    Var {
        name: "INGEST_DB_TIMEOUT",
        default: "2s",
        help: "wait for a pooled connection before answering 503; also bounds the connection check and /readyz",
    },
    Var {
        name: "INGEST_DB_STATEMENT_TIMEOUT",
        default: "30s",
        help: "statement_timeout of every session; a server silent 5s longer is given up and the connection closed",
    },
    Var {
        name: "INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT",
        default: "5m",
        help: "the server ends a session idle this long inside a transaction (a client that vanished), freeing its locks; longer than a processor spends between two statements, and than INGEST_CONFIRM_TIMEOUT",
    },
    Var {
        name: "INGEST_AMQP_URL",
        default: "amqp://guest:guest@127.0.0.1:5672/%2f",
        help: "RabbitMQ connection URL; the nodes of a cluster comma-separated, sharing credentials, vhost and heartbeat (amqp://u:p@h1:5672,h2:5672,h3:5672/vhost): each connection goes to the first that answers, a reconnection starts at the node after the one lost",
    },
    Var {
        name: "INGEST_AMQP_PREFIX",
        default: "ingest",
        help: "prefix of the exchange and queue names",
    },
    Var {
        name: "INGEST_AMQP_MAX_MESSAGE_BYTES",
        default: "16777216",
        help: "the broker's max_message_size (RabbitMQ 4: 16 MiB; 3.x: 128 MiB); INGEST_MAX_PAYLOAD_BYTES must fit in it",
    },
    Var {
        name: "INGEST_WORKERS",
        default: "4",
        help: "worker threads processing deliveries",
    },
    Var {
        name: "INGEST_PREFETCH",
        default: "256",
        help: "unacknowledged deliveries the consumer may hold (AMQP qos)",
    },
    Var {
        name: "INGEST_WORKER_BATCH",
        default: "64",
        help: "most deliveries a worker handles in one transaction",
    },
    Var {
        name: "INGEST_WORKER_LINGER",
        default: "5ms",
        help: "how long a worker batch that is not full may wait for more deliveries while another worker is busy",
    },
    Var {
        name: "INGEST_RELAY_BATCH",
        default: "500",
        help: "outbox rows the relay claims and publishes per transaction",
    },
    Var {
        name: "INGEST_RELAY_POLL",
        default: "1s",
        help: "how often the relay looks at the outbox when nothing woke it",
    },
    Var {
        name: "INGEST_CONFIRM_TIMEOUT",
        default: "10s",
        help: "wait for publisher confirms before the batch is retried",
    },
    Var {
        name: "INGEST_RETRY_DELAYS",
        default: "1s,5s,30s,2m,10m",
        help: "waits before each retry of a transiently failing event; one more failure dead-letters it",
    },
    Var {
        name: "INGEST_REDELIVER_AFTER",
        default: "30m",
        help: "re-send a pending event with no outbox row and no attempt for this long (its message was lost); longer than the longest retry delay",
    },
    Var {
        name: "INGEST_QUEUE_TYPE",
        default: "classic",
        help: "classic, or quorum for replicated queues on a RabbitMQ cluster",
    },
    Var {
        name: "INGEST_DELIVERY_LIMIT",
        default: "100",
        help: "quorum queues: deliveries of one message before the broker dead-letters it (x-delivery-limit; RabbitMQ 4 would apply 20); its event stays pending and is re-sent after INGEST_REDELIVER_AFTER. Fixed when a queue is created",
    },
    Var {
        name: "INGEST_RETENTION",
        default: "off",
        help: "delete processed events older than this (for example 7d), in small batches; at least INGEST_IDEMPOTENCY_TTL",
    },
    Var {
        name: "INGEST_STATS_INTERVAL",
        default: "2s",
        help: "how often one background thread reads the database figures that /metrics and the status page show",
    },
    Var {
        name: "INGEST_SIMULATED_WORK",
        default: "0ms",
        help: "time the default processor spends per event (for load tests)",
    },
    Var {
        name: "INGEST_SHUTDOWN_TIMEOUT",
        default: "30s",
        help: "longest a graceful shutdown may take before the process exits",
    },
    Var {
        name: "INGEST_LOG",
        default: "info",
        help: "log level: error, warn, info, debug or trace",
    },
    Var {
        name: "INGEST_LOG_FORMAT",
        default: "text",
        help: "text, or json for one JSON object per line",
    },
];

/// Everything the service needs to know, parsed and validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// `INGEST_HTTP_ADDR`: where the API listens; port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// `INGEST_HTTP_THREADS`: how many requests that parse a body or query
    /// the database are handled at once, each on its connection's thread.
    pub http_threads: usize,
    /// `INGEST_MAX_BODY_BYTES`: bodies over this size are refused with 413.
    pub max_body_bytes: usize,
    /// `INGEST_COMMITTERS`: group-commit threads.
    pub committers: usize,
    /// `INGEST_COMMIT_BATCH`: most events per ingest transaction.
    pub commit_batch: usize,
    /// `INGEST_HTTP_MAX_CONNECTIONS`: cap on open client connections.
    pub http_max_connections: usize,
    /// `INGEST_HTTP_MAX_HEADER_BYTES`: cap on a request's line and headers.
    pub http_max_header_bytes: usize,
    /// `INGEST_HTTP_HEADER_TIMEOUT`: deadline for a request's headers.
    pub http_header_timeout: Duration,
    /// `INGEST_HTTP_BODY_TIMEOUT`: deadline for a request's body.
    pub http_body_timeout: Duration,
    /// `INGEST_HTTP_BUFFER_BYTES`: budget for bodies held in memory.
    pub http_buffer_bytes: usize,
    /// `INGEST_MAX_BATCH`: most events in one batch.
    pub max_batch: usize,
    /// `INGEST_MAX_PAYLOAD_BYTES`: largest payload of one event.
    pub max_payload_bytes: usize,
    /// `INGEST_MAX_JSON_DEPTH`: deepest nesting in a body.
    pub max_json_depth: usize,
    /// `INGEST_IDEMPOTENCY_TTL`: how long idempotency keys are remembered.
    pub idempotency_ttl: Duration,
    /// `INGEST_API_KEYS`: the keys clients must present; none: open.
    pub api_keys: ApiKeys,
    /// `INGEST_RATE_LIMIT`: events per second and burst per client.
    pub rate_limit: Option<RateLimit>,
    /// `INGEST_MESSAGE_FORMAT` and `INGEST_CLOUDEVENTS_SOURCE`: how the
    /// relay builds messages.
    pub messages: message::Settings,
    /// `INGEST_METRICS_AUTH`: whether `/metrics` needs a key as well.
    pub metrics_auth: MetricsAuth,
    /// `INGEST_COMMIT_QUEUE`: capacity of the hand-off to committers.
    pub commit_queue: usize,
    /// `INGEST_DATABASE_URL`: PostgreSQL URL or key=value string.
    pub database_url: String,
    /// `INGEST_DB_SCHEMA`: schema of the tables; a plain lowercase identifier.
    pub db_schema: String,
    /// `INGEST_DB_POOL_SIZE`: r2d2 `max_size`.
    pub db_pool_size: u32,
    /// `INGEST_DB_TIMEOUT`: r2d2 `connection_timeout`, also the connect timeout.
    pub db_timeout: Duration,
    /// `INGEST_DB_STATEMENT_TIMEOUT`: PostgreSQL's `statement_timeout`; the
    /// client waits for an answer at most this plus
    /// [`crate::store::RESPONSE_GRACE`].
    pub db_statement_timeout: Duration,
    /// `INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT`: PostgreSQL's
    /// `idle_in_transaction_session_timeout`.
    pub db_idle_tx_timeout: Duration,
    /// `INGEST_AMQP_URL`: `amqp://user:pass@host:port/vhost`, the host
    /// possibly a comma-separated list of nodes.
    pub amqp_url: String,
    /// `INGEST_AMQP_PREFIX`: every exchange and queue name starts with it.
    pub amqp_prefix: String,
    /// `INGEST_AMQP_MAX_MESSAGE_BYTES`: the largest message the broker takes.
    pub amqp_max_message_bytes: usize,
    /// `INGEST_WORKERS`: worker threads.
    pub workers: usize,
    /// `INGEST_PREFETCH`: AMQP `basic.qos` prefetch count.
    pub prefetch: u16,
    /// `INGEST_WORKER_BATCH`: deliveries per worker transaction.
    pub worker_batch: usize,
    /// `INGEST_WORKER_LINGER`: how long a batch that is not full may wait
    /// for more deliveries while another worker is busy.
    pub worker_linger: Duration,
    /// `INGEST_RELAY_BATCH`: outbox rows per relay transaction.
    pub relay_batch: usize,
    /// `INGEST_RELAY_POLL`: fallback poll interval of the relay.
    pub relay_poll: Duration,
    /// `INGEST_CONFIRM_TIMEOUT`: how long the relay waits for confirms.
    pub confirm_timeout: Duration,
    /// `INGEST_RETRY_DELAYS`: the retry schedule; its length is the number
    /// of retries after the first attempt.
    pub retry_delays: Vec<Duration>,
    /// `INGEST_REDELIVER_AFTER`: idle time after which a pending event whose
    /// message is gone is re-sent.
    pub redeliver_after: Duration,
    /// `INGEST_QUEUE_TYPE`: declare quorum queues instead of classic ones.
    pub quorum_queues: bool,
    /// `INGEST_DELIVERY_LIMIT`: the quorum queues' `x-delivery-limit`.
    pub delivery_limit: u32,
    /// `INGEST_RETENTION`: age after which processed events are deleted.
    pub retention: Option<Duration>,
    /// `INGEST_STATS_INTERVAL`: pause between two reads of the database
    /// figures behind `/metrics` and the status page.
    pub stats_interval: Duration,
    /// `INGEST_SIMULATED_WORK`: sleep per event in the default processor.
    pub simulated_work: Duration,
    /// `INGEST_SHUTDOWN_TIMEOUT`: bound on a graceful shutdown.
    pub shutdown_timeout: Duration,
    /// `INGEST_LOG`: log level.
    pub log_level: log::LevelFilter,
    /// `INGEST_LOG_FORMAT`: text or JSON lines.
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Who may read `/metrics` when API keys are configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAuth {
    /// Anyone, like the probes.
    Open,
    /// Only a request with one of the API keys, like the query routes.
    Key,
}

/// A configuration variable that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The variable's name.
    pub var: &'static str,
    /// Why its value was refused.
    pub reason: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.var, self.reason)
    }
}

impl std::error::Error for Error {}

/// Bytes a message holds besides its payload, at most: the id, `type` and
/// `key` (255 bytes each, escaped up to six times), the timestamp and the
/// JSON around them.
pub const MESSAGE_ENVELOPE_BYTES: usize = 4096;

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, Error> {
        Config::from_vars(std::env::vars())
    }

    /// Builds a `Config` from name/value pairs; unknown names are ignored and
    /// missing ones take their default.
    pub fn from_vars<I>(vars: I) -> Result<Config, Error>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let given: HashMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("INGEST_"))
            .collect();
        let get = |name: &'static str| -> (&'static str, &str) {
            let default = VARS
                .iter()
                .find(|v| v.name == name)
                .map(|v| v.default)
                .unwrap_or_else(|| panic!("{name} is missing from VARS"));
            (name, given.get(name).map(String::as_str).unwrap_or(default))
        };

        let config = Config {
            http_addr: parse_with(get("INGEST_HTTP_ADDR"), |s| {
                s.parse::<SocketAddr>()
                    .map_err(|_| "expected host:port, for example 0.0.0.0:5001".into())
            })?,
            http_threads: positive(get("INGEST_HTTP_THREADS"))?,
            max_body_bytes: positive(get("INGEST_MAX_BODY_BYTES"))?,
            http_max_connections: positive(get("INGEST_HTTP_MAX_CONNECTIONS"))?,
            http_max_header_bytes: positive(get("INGEST_HTTP_MAX_HEADER_BYTES"))?,
            http_header_timeout: nonzero_duration(get("INGEST_HTTP_HEADER_TIMEOUT"))?,
            http_body_timeout: nonzero_duration(get("INGEST_HTTP_BODY_TIMEOUT"))?,
            http_buffer_bytes: positive(get("INGEST_HTTP_BUFFER_BYTES"))?,
            max_batch: positive(get("INGEST_MAX_BATCH"))?,
            max_payload_bytes: positive(get("INGEST_MAX_PAYLOAD_BYTES"))?,
            max_json_depth: parse_with(get("INGEST_MAX_JSON_DEPTH"), |s| {
                match s.trim().parse::<usize>() {
                    // serde_json stops at 128 levels with a less clear error.
                    Ok(n) if (1..=100).contains(&n) => Ok(n),
                    _ => Err(format!("{s:?} is not a whole number from 1 to 100")),
                }
            })?,
            idempotency_ttl: nonzero_duration(get("INGEST_IDEMPOTENCY_TTL"))?,
            api_keys: parse_with(get("INGEST_API_KEYS"), ApiKeys::parse)?,
            rate_limit: parse_with(get("INGEST_RATE_LIMIT"), RateLimit::parse)?,
            messages: message::Settings {
                format: parse_with(get("INGEST_MESSAGE_FORMAT"), |s| match s {
                    "ingestd" => Ok(message::Format::Ingestd),
                    "cloudevents" => Ok(message::Format::CloudEvents),
                    _ => Err(format!("{s:?} is neither ingestd nor cloudevents")),
                })?,
                source: parse_with(get("INGEST_CLOUDEVENTS_SOURCE"), |s| {
                    if s.is_empty() || s.chars().any(|c| c.is_control() || c == ' ') {
                        Err("must be a non-empty URI reference without spaces".into())
                    } else {
                        Ok(s.to_string())
                    }
                })?,
            },
            metrics_auth: parse_with(get("INGEST_METRICS_AUTH"), |s| match s {
                "open" => Ok(MetricsAuth::Open),
                "key" => Ok(MetricsAuth::Key),
                _ => Err(format!("{s:?} is neither open nor key")),
            })?,
            committers: positive(get("INGEST_COMMITTERS"))?,
            commit_batch: positive(get("INGEST_COMMIT_BATCH"))?,
            commit_queue: positive(get("INGEST_COMMIT_QUEUE"))?,
            database_url: parse_with(get("INGEST_DATABASE_URL"), database_url)?,
            db_schema: parse_with(get("INGEST_DB_SCHEMA"), identifier)?,
            db_pool_size: positive(get("INGEST_DB_POOL_SIZE"))?,
            db_timeout: nonzero_duration(get("INGEST_DB_TIMEOUT"))?,
            db_statement_timeout: nonzero_duration(get("INGEST_DB_STATEMENT_TIMEOUT"))?,
            db_idle_tx_timeout: nonzero_duration(get("INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT"))?,
            amqp_url: parse_with(get("INGEST_AMQP_URL"), |s| {
                crate::broker::AmqpUrl::parse(s).map(|_| s.to_string())
            })?,
            amqp_prefix: parse_with(get("INGEST_AMQP_PREFIX"), amqp_name)?,
            amqp_max_message_bytes: positive(get("INGEST_AMQP_MAX_MESSAGE_BYTES"))?,
            workers: positive(get("INGEST_WORKERS"))?,
            prefetch: positive(get("INGEST_PREFETCH"))?,
            worker_batch: positive(get("INGEST_WORKER_BATCH"))?,
            worker_linger: parse_with(get("INGEST_WORKER_LINGER"), parse_duration)?,
            relay_batch: positive(get("INGEST_RELAY_BATCH"))?,
            relay_poll: nonzero_duration(get("INGEST_RELAY_POLL"))?,
            confirm_timeout: nonzero_duration(get("INGEST_CONFIRM_TIMEOUT"))?,
            retry_delays: parse_with(get("INGEST_RETRY_DELAYS"), |s| {
                s.split(',')
                    .map(|d| match parse_duration(d)? {
                        d if d.is_zero() => Err("every delay must be greater than zero".into()),
                        d => Ok(d),
                    })
                    .collect()
            })?,
            redeliver_after: nonzero_duration(get("INGEST_REDELIVER_AFTER"))?,
            quorum_queues: parse_with(get("INGEST_QUEUE_TYPE"), |s| match s {
                "classic" => Ok(false),
                "quorum" => Ok(true),
                _ => Err(format!("{s:?} is neither classic nor quorum")),
            })?,
            delivery_limit: parse_with(get("INGEST_DELIVERY_LIMIT"), |s| {
                match s.trim().parse::<u32>() {
                    // The broker reads it as a signed 32-bit number; 0 or
                    // a negative one would not mean "no limit" everywhere.
                    Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(n),
                    _ => Err(format!(
                        "{s:?} is not a whole number from 1 to {}",
                        i32::MAX
                    )),
                }
            })?,
            retention: parse_with(get("INGEST_RETENTION"), |s| match s {
                "off" | "" => Ok(None),
                _ => match parse_duration(s)? {
                    d if d.is_zero() => Err("must be greater than zero, or off".into()),
                    d => Ok(Some(d)),
                },
            })?,
            stats_interval: nonzero_duration(get("INGEST_STATS_INTERVAL"))?,
            simulated_work: parse_with(get("INGEST_SIMULATED_WORK"), parse_duration)?,
            shutdown_timeout: nonzero_duration(get("INGEST_SHUTDOWN_TIMEOUT"))?,
            log_level: parse_with(get("INGEST_LOG"), |s| {
                s.parse::<log::LevelFilter>()
                    .map_err(|_| "expected error, warn, info, debug or trace".into())
            })?,
            log_format: parse_with(get("INGEST_LOG_FORMAT"), |s| match s {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err(format!("{s:?} is neither text nor json")),
            })?,
        };
        config.validate()
    }

    /// Checks between variables, after each was parsed on its own.
    ///
    /// (See [`MESSAGE_ENVELOPE_BYTES`] for the payload limit's check.)
    fn validate(self) -> Result<Config, Error> {
        let longest = self.retry_delays.iter().max().copied().unwrap_or_default();
        if self.redeliver_after <= longest {
            return Err(Error {
                var: "INGEST_REDELIVER_AFTER",
                reason: format!(
                    "must be longer than the longest retry delay ({longest:?}), or events \
                     waiting for a retry would be sent twice"
                ),
            });
        }
        // The relay's transaction idles while it waits for confirms.
        if self.db_idle_tx_timeout <= self.confirm_timeout {
            return Err(Error {
                var: "INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT",
                reason: format!(
                    "must be longer than INGEST_CONFIRM_TIMEOUT ({:?}), or the server would end \
                     the relay's transaction while it waits for the broker's confirms",
                    self.confirm_timeout
                ),
            });
        }
        // A payload the broker would not take could never be published: its
        // message carries the payload and an envelope of at most
        // MESSAGE_ENVELOPE_BYTES (id, type, key, timestamp).
        if self
            .max_payload_bytes
            .saturating_add(MESSAGE_ENVELOPE_BYTES)
            > self.amqp_max_message_bytes
        {
            return Err(Error {
                var: "INGEST_MAX_PAYLOAD_BYTES",
                reason: format!(
                    "{} plus a message envelope of {MESSAGE_ENVELOPE_BYTES} bytes does not fit \
                     in INGEST_AMQP_MAX_MESSAGE_BYTES ({}), the broker's max_message_size: raise \
                     that (and the broker's own setting) or lower the payload limit",
                    self.max_payload_bytes, self.amqp_max_message_bytes
                ),
            });
        }
        // A chunked body is read one byte past the limit, to tell a body
        // of exactly the limit from a longer one.
        if self.http_buffer_bytes <= self.max_body_bytes {
            return Err(Error {
                var: "INGEST_HTTP_BUFFER_BYTES",
                reason: format!(
                    "must be larger than INGEST_MAX_BODY_BYTES ({}), or the largest allowed \
                     body could never be taken in",
                    self.max_body_bytes
                ),
            });
        }
        // An idempotency key must not outlive its events: a replay would
        // then answer with ids that no longer exist (its events deleted),
        // while a client id, its event gone, would be stored and processed
        // again. Processed events are deleted by `processed_at`, never
        // before their `created_at`, which is when their key was stored.
        if let Some(retention) = self.retention
            && retention < self.idempotency_ttl
        {
            return Err(Error {
                var: "INGEST_RETENTION",
                reason: format!(
                    "{retention:?} is shorter than INGEST_IDEMPOTENCY_TTL ({:?}): a replay \
                     within the TTL could find its events deleted; make INGEST_RETENTION at \
                     least INGEST_IDEMPOTENCY_TTL, or shorten the TTL",
                    self.idempotency_ttl
                ),
            });
        }
        // Asking for a key that no request can present would leave the
        // metrics open while the operator believes them closed.
        if self.metrics_auth == MetricsAuth::Key && self.api_keys.is_open() {
            return Err(Error {
                var: "INGEST_METRICS_AUTH",
                reason: "is key, but INGEST_API_KEYS is empty, so there is no key to require"
                    .into(),
            });
        }
        Ok(self)
    }

    /// The `--help` text listing every variable and its default.
    pub fn help() -> String {
        let mut out = String::from("Configuration (environment variables):\n");
        for v in VARS {
            let default = if v.default.is_empty() {
                "none"
            } else {
                v.default
            };
            out.push_str(&format!(
                "  {:<29} {} [default: {default}]\n",
                v.name, v.help
            ));
        }
        out
    }
}

/// Parses `500ms`, `2s`, `5m`, `1h` or `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit; write for example 500ms, 2s, 5m, 1h or 7d"))?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} does not start with a whole number"))?;
    let secs = |mult: u64| Duration::from_secs(n.saturating_mul(mult));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(secs(1)),
        "m" => Ok(secs(60)),
        "h" => Ok(secs(3600)),
        "d" => Ok(secs(86_400)),
        _ => Err(format!("unknown unit {unit:?}; use ms, s, m, h or d")),
    }
}

fn parse_with<T>(
    (var, value): (&'static str, &str),
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, Error> {
    parse(value).map_err(|reason| Error { var, reason })
}

fn positive<T>(input: (&'static str, &str)) -> Result<T, Error>
where
    T: std::str::FromStr + Default + PartialEq,
{
    parse_with(input, |s| match s.trim().parse::<T>() {
        Ok(n) if n != T::default() => Ok(n),
        _ => Err(format!("{s:?} is not a positive whole number in range")),
    })
}

/// A PostgreSQL URL or key=value string that the client can use: one or
/// several hosts, and any `target_session_attrs` it knows.
fn database_url(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let config: postgres::Config = s
        .parse()
        .map_err(|e| format!("not a PostgreSQL URL or key=value string: {e}"))?;
    let (hosts, ports) = (config.get_hosts().len(), config.get_ports().len());
    if ports > 1 && ports != hosts {
        return Err(format!(
            "{hosts} hosts but {ports} ports: give one port, or one per host"
        ));
    }
    Ok(s.to_string())
}

fn nonzero_duration(input: (&'static str, &str)) -> Result<Duration, Error> {
    parse_with(input, |s| match parse_duration(s)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    })
}

/// A PostgreSQL schema name we can embed without quoting surprises.
fn identifier(s: &str) -> Result<String, String> {
    // 48, not PostgreSQL's 63: the NOTIFY channel name adds 15 bytes.
    let ok = !s.is_empty()
        && s.len() <= 48
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} must be a lowercase identifier of at most 48 characters: a-z, 0-9 and _, \
             not starting with a digit"
        ))
    }
}

/// An AMQP name prefix: letters, digits, `.`, `-` and `_`.
fn amqp_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} may hold only letters, digits, '.', '-' and '_'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, Error> {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_parse() {
        let c = with(&[]).unwrap();
        assert_eq!(c.http_addr, "127.0.0.1:5001".parse().unwrap());
        assert_eq!(c.db_schema, "public");
        assert_eq!(c.amqp_prefix, "ingest");
        assert_eq!(c.db_timeout, Duration::from_secs(2));
        assert_eq!(c.db_statement_timeout, Duration::from_secs(30));
        assert_eq!(c.max_body_bytes, 5 << 20);
        assert_eq!(c.max_batch, 1000);
        assert_eq!(c.idempotency_ttl, Duration::from_secs(86_400));
        assert!(c.api_keys.is_open());
        let c = with(&[("INGEST_API_KEYS", "secret-key-0123456789")]).unwrap();
        assert!(!format!("{c:?}").contains("secret-key"));
        assert_eq!(
            with(&[("INGEST_MAX_JSON_DEPTH", "101")]).unwrap_err().var,
            "INGEST_MAX_JSON_DEPTH"
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let e = with(&[("INGEST_WORKERS", "zero")]).unwrap_err();
        assert_eq!(e.var, "INGEST_WORKERS");
        assert!(e.to_string().starts_with("invalid INGEST_WORKERS: "));
        assert_eq!(
            with(&[("INGEST_WORKERS", "0")]).unwrap_err().var,
            "INGEST_WORKERS"
        );
        assert_eq!(
            with(&[("INGEST_DB_SCHEMA", "Robert'); DROP")])
                .unwrap_err()
                .var,
            "INGEST_DB_SCHEMA"
        );
        assert_eq!(
            with(&[("INGEST_HTTP_ADDR", "localhost")]).unwrap_err().var,
            "INGEST_HTTP_ADDR"
        );
        assert_eq!(
            with(&[("INGEST_AMQP_URL", "http://x")]).unwrap_err().var,
            "INGEST_AMQP_URL"
        );
        assert_eq!(
            with(&[("INGEST_PREFETCH", "70000")]).unwrap_err().var,
            "INGEST_PREFETCH"
        );
    }

    #[test]
    fn cluster_urls_list_their_nodes_and_hosts() {
        let c = with(&[(
            "INGEST_AMQP_URL",
            "amqp://u:p@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/%2f",
        )])
        .unwrap();
        let url = crate::broker::AmqpUrl::parse(&c.amqp_url).unwrap();
        assert_eq!(url.nodes.len(), 3);
        for bad in ["amqp://h1,,h3", "amqp://h1,h2:x/", "amqp://h1,"] {
            let e = with(&[("INGEST_AMQP_URL", bad)]).unwrap_err();
            assert_eq!(e.var, "INGEST_AMQP_URL", "{bad}");
            assert!(e.to_string().contains("node"), "{e}");
        }
        let primary = "postgres://postgres@127.0.0.1:5432,127.0.0.1:5433/postgres\
                       ?target_session_attrs=read-write";
        let c = with(&[("INGEST_DATABASE_URL", primary)]).unwrap();
        assert_eq!(c.database_url, primary);
        let pg: postgres::Config = c.database_url.parse().unwrap();
        assert_eq!(pg.get_hosts().len(), 2);
        assert_eq!(
            pg.get_target_session_attrs(),
            postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert!(with(&[("INGEST_DATABASE_URL", "host=a,b port=1,2 user=u")]).is_ok());
        for bad in [
            "postgres://u@h1,h2/db?target_session_attrs=primary-ish",
            "host=a,b,c port=1,2",
            "postgres://u@h:port/db",
            " ",
        ] {
            let e = with(&[("INGEST_DATABASE_URL", bad)]).unwrap_err();
            assert_eq!(e.var, "INGEST_DATABASE_URL", "{bad}");
        }
    }

    #[test]
    fn the_delivery_limit_is_positive_and_fits_the_broker() {
        assert_eq!(with(&[]).unwrap().delivery_limit, 100);
        let c = with(&[("INGEST_DELIVERY_LIMIT", "5")]).unwrap();
        assert_eq!(c.delivery_limit, 5);
        for bad in ["0", "-1", "2147483648", "many"] {
            assert_eq!(
                with(&[("INGEST_DELIVERY_LIMIT", bad)]).unwrap_err().var,
                "INGEST_DELIVERY_LIMIT",
                "{bad}"
            );
        }
    }

    #[test]
    fn retry_schedule() {
        let c = with(&[]).unwrap();
        assert_eq!(c.retry_delays.len(), 5);
        assert_eq!(c.retry_delays[4], Duration::from_secs(600));
        let c = with(&[("INGEST_RETRY_DELAYS", "100ms, 2s")]).unwrap();
        assert_eq!(
            c.retry_delays,
            [Duration::from_millis(100), Duration::from_secs(2)]
        );
        assert!(with(&[("INGEST_RETRY_DELAYS", "1s,0s")]).is_err());
        assert!(with(&[("INGEST_RETRY_DELAYS", "")]).is_err());
        assert_eq!(c.retention, None);
        let c = with(&[("INGEST_RETENTION", "7d"), ("INGEST_QUEUE_TYPE", "quorum")]).unwrap();
        assert_eq!(c.retention, Some(Duration::from_secs(7 * 86_400)));
        assert!(c.quorum_queues);
        assert_eq!(
            with(&[("INGEST_QUEUE_TYPE", "stream")]).unwrap_err().var,
            "INGEST_QUEUE_TYPE"
        );
        assert_eq!(
            with(&[("INGEST_LOG_FORMAT", "xml")]).unwrap_err().var,
            "INGEST_LOG_FORMAT"
        );
        let e = with(&[("INGEST_REDELIVER_AFTER", "5m")]).unwrap_err();
        assert_eq!(
            e.var, "INGEST_REDELIVER_AFTER",
            "shorter than the 10m delay"
        );
        let e = with(&[("INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT", "10s")]).unwrap_err();
        assert_eq!(
            e.var, "INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT",
            "not longer than the 10s confirm timeout"
        );
        let e = with(&[("INGEST_HTTP_BUFFER_BYTES", "1000000")]).unwrap_err();
        assert_eq!(e.var, "INGEST_HTTP_BUFFER_BYTES", "below the 5 MiB body");
        let equal = [
            ("INGEST_HTTP_BUFFER_BYTES", "1000000"),
            ("INGEST_MAX_BODY_BYTES", "1000000"),
        ];
        assert!(with(&equal).is_err(), "a chunked body reads one byte more");
        let larger = [
            ("INGEST_HTTP_BUFFER_BYTES", "1000001"),
            ("INGEST_MAX_BODY_BYTES", "1000000"),
        ];
        assert!(with(&larger).is_ok());
        // A payload limit the broker's message limit cannot hold.
        let e = with(&[("INGEST_AMQP_MAX_MESSAGE_BYTES", "1000000")]).unwrap_err();
        assert_eq!(e.var, "INGEST_MAX_PAYLOAD_BYTES");
        assert!(
            e.reason.contains("INGEST_AMQP_MAX_MESSAGE_BYTES (1000000)"),
            "{}",
            e.reason
        );
        let fits = [
            ("INGEST_AMQP_MAX_MESSAGE_BYTES", "1000000"),
            ("INGEST_MAX_PAYLOAD_BYTES", "900000"),
        ];
        assert!(with(&fits).is_ok());
    }

    #[test]
    fn retention_shorter_than_the_idempotency_ttl_is_refused() {
        let e = with(&[("INGEST_RETENTION", "1h")]).unwrap_err();
        assert_eq!(e.var, "INGEST_RETENTION", "below the 24h default TTL");
        let text = e.to_string();
        assert!(
            text.contains("INGEST_RETENTION") && text.contains("INGEST_IDEMPOTENCY_TTL"),
            "{text}"
        );
        let short = [
            ("INGEST_RETENTION", "1h"),
            ("INGEST_IDEMPOTENCY_TTL", "90m"),
        ];
        assert_eq!(with(&short).unwrap_err().var, "INGEST_RETENTION");
        // Equal is enough: events are deleted by processed_at, which is
        // never before the key was stored.
        let equal = [("INGEST_RETENTION", "1h"), ("INGEST_IDEMPOTENCY_TTL", "1h")];
        assert_eq!(
            with(&equal).unwrap().retention,
            Some(Duration::from_secs(3600))
        );
        let longer = [("INGEST_RETENTION", "2d"), ("INGEST_IDEMPOTENCY_TTL", "1d")];
        assert!(with(&longer).is_ok());
        assert!(with(&[("INGEST_RETENTION", "off")]).is_ok());
    }

    #[test]
    fn metrics_auth_and_stats_interval() {
        let c = with(&[]).unwrap();
        assert_eq!(c.metrics_auth, MetricsAuth::Open);
        assert_eq!(c.stats_interval, Duration::from_secs(2));
        let key = ("INGEST_API_KEYS", "metrics-key-0123456789");
        let c = with(&[key, ("INGEST_METRICS_AUTH", "key")]).unwrap();
        assert_eq!(c.metrics_auth, MetricsAuth::Key);
        let e = with(&[("INGEST_METRICS_AUTH", "key")]).unwrap_err();
        assert_eq!(e.var, "INGEST_METRICS_AUTH", "no key to require");
        assert_eq!(
            with(&[key, ("INGEST_METRICS_AUTH", "bearer")])
                .unwrap_err()
                .var,
            "INGEST_METRICS_AUTH"
        );
        assert_eq!(
            with(&[("INGEST_STATS_INTERVAL", "0s")]).unwrap_err().var,
            "INGEST_STATS_INTERVAL"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3w").is_err());
    }

    #[test]
    fn every_var_is_read() {
        // A variable documented in VARS but never looked up would silently do
        // nothing; `get` panics on the reverse case, so together they keep the
        // table and the parser in step.
        let src = include_str!("config.rs");
        for v in VARS {
            assert!(
                src.matches(&format!("get(\"{}\")", v.name)).count() >= 1,
                "{} is documented but never read",
                v.name
            );
        }
    }
}
