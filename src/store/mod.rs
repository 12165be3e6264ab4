//! PostgreSQL: the pool, the schema and every statement on `events` and `outbox`.
//!
//! All SQL lives here, next to the function that runs it, with parameters. The
//! store knows the tables and their transactions; it does not know HTTP, AMQP
//! or what processing an event means.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, NoTls, Transaction};
use r2d2::PooledConnection;

pub mod pool;

pub use pool::{Manager, Outage, RESPONSE_GRACE};
use serde_json::Value;
use uuid::Uuid;

use crate::api::auth::Scope;
use crate::config::Config;

/// The schema, embedded so the binary can create its tables anywhere.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");

/// A fingerprint of [`SCHEMA_SQL`] (64-bit FNV-1a, hex).
pub fn schema_fingerprint() -> String {
    let hash = SCHEMA_SQL.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// A pooled connection.
pub type Conn = PooledConnection<Manager>;

/// The longest one step of a schema migration may take (an index built on
/// a large table).
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(3600);

/// Failures reaching or using PostgreSQL.
#[derive(Debug)]
pub enum Error {
    /// The connection URL could not be parsed.
    Url(postgres::Error),
    /// No pooled connection became free within the pool timeout.
    Pool(r2d2::Error),
    /// A statement or the connection failed.
    Db(postgres::Error),
    /// Rows a write depended on kept changing under it.
    Contended,
    /// The database is known to be unreachable: not tried again until a
    /// probe finds it back (see [`Outage`]).
    Down,
}

impl Error {
    /// True when PostgreSQL is unreachable or overloaded rather than the
    /// statement being wrong: the caller should try again later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Url(_) => false,
            Error::Pool(_) | Error::Contended | Error::Down => true,
            Error::Db(e) => match e.code() {
                // No SQLSTATE: an I/O error or a closed connection.
                None => true,
                Some(code) => {
                    let c = code.code();
                    // 08: connection exception, 53: insufficient resources,
                    // 57P0x: the server is shutting down or starting up.
                    c.starts_with("08") || c.starts_with("53") || c.starts_with("57P0")
                }
            },
        }
    }
}

impl Error {
    /// True when the server cancelled the statement for running longer than
    /// `statement_timeout` (SQLSTATE 57014): the database is slow or a lock
    /// is held, not the statement wrong, so running it again at once, or
    /// piece by piece, would only wait as long again.
    pub fn is_statement_timeout(&self) -> bool {
        matches!(self, Error::Db(e) if e.code() == Some(&SqlState::QUERY_CANCELED))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Url(e) => write!(f, "bad database URL: {e}"),
            Error::Pool(e) => write!(f, "no database connection available: {e}"),
            Error::Contended => write!(f, "the write kept conflicting with concurrent ones"),
            Error::Down => write!(
                f,
                "the database is unreachable (waiting for a probe to succeed)"
            ),
            Error::Db(e) => match e.as_db_error() {
                // postgres::Error's own text is just "db error".
                Some(db) => write!(f, "database error {}: {}", db.code().code(), db.message()),
                None => write!(f, "database error: {e}"),
            },
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Url(e) | Error::Db(e) => Some(e),
            Error::Pool(e) => Some(e),
            Error::Contended | Error::Down => None,
        }
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        Error::Db(e)
    }
}

impl From<r2d2::Error> for Error {
    fn from(e: r2d2::Error) -> Error {
        Error::Pool(e)
    }
}

/// An event validated by the API, waiting to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Its id, chosen before the write so the answer can carry it.
    pub id: Uuid,
    /// The client's payload.
    pub payload: Value,
    /// The client's name for the kind of event.
    pub event_type: Option<String>,
    /// A key for the consumer's use (ordering, partitioning).
    pub key: Option<String>,
    /// The client chose `id`: if it is already stored, this is a replay
    /// (same content) or a conflict (different content), not an error.
    pub client_id: bool,
}

/// One ingest request, written all or nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// The events, in the request's order.
    pub events: Vec<NewEvent>,
    /// The body was an array, even of one event: its answer is a batch's,
    /// and its `Idempotency-Key` stands for the whole list.
    pub batch: bool,
    /// The request's `Idempotency-Key`, in its client's scope.
    pub idempotency_key: Option<IdempotencyKey>,
}

/// An `Idempotency-Key` and the scope of the client that sent it: the same
/// key sent with another API key is another key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// Whose key it is.
    pub scope: Scope,
    /// The header's value, visible ASCII (so without a space).
    pub key: String,
}

impl IdempotencyKey {
    /// The key as `idempotency_keys.key` holds it: the key alone in the
    /// open scope, which is how every earlier version stored every key, so
    /// that they and this one agree on open deployments; otherwise the
    /// scope, a space and the key. A client's key holds no space, so a key
    /// of one scope can never be taken for another's, nor for an open one.
    pub fn stored(&self) -> String {
        if self.scope.is_open() {
            self.key.clone()
        } else {
            format!("{} {}", self.scope.as_str(), self.key)
        }
    }
}

impl Submission {
    /// True when some event's id was chosen by the client.
    pub fn has_client_ids(&self) -> bool {
        self.events.iter().any(|e| e.client_id)
    }

    /// True when the submission must be checked against earlier ones, in a
    /// transaction of its own; otherwise it may share a group commit.
    pub fn is_idempotent(&self) -> bool {
        self.idempotency_key.is_some() || self.has_client_ids()
    }
}

/// What became of a submission written with [`Store::insert_idempotent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Every event is stored: `created[i]` tells whether `ids[i]` was
    /// created now (`false`: an earlier request stored the same event).
    Stored {
        /// Event ids in the request's order.
        ids: Vec<Uuid>,
        /// Which ones this request created.
        created: Vec<bool>,
    },
    /// The `Idempotency-Key` was used before for a different body.
    KeyConflict,
    /// The event at this index has a client id (the `Uuid`) already used
    /// for different content.
    IdConflict(usize, Uuid),
}

/// An event as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// The event's id.
    pub id: Uuid,
    /// `pending`, `processed` or `failed`.
    pub status: String,
    /// Completed processing attempts.
    pub attempts: i32,
    /// The client's payload, as stored: as sent, numbers exact (in plain
    /// decimal), key order and spacing as `jsonb` normalises them.
    pub payload: Value,
    /// The client's name for the kind of event.
    pub event_type: Option<String>,
    /// The client's key for the consumer.
    pub key: Option<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// RFC 3339, UTC, once processed.
    pub processed_at: Option<String>,
    /// The last processing error, if any.
    pub last_error: Option<String>,
}

impl EventRecord {
    /// The JSON body of `GET /v1/events/<id>`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "id": self.id.to_string(),
            "status": self.status,
            "attempts": self.attempts,
            "type": self.event_type,
            "key": self.key,
            "payload": self.payload,
            "created_at": self.created_at,
            "processed_at": self.processed_at,
            "last_error": self.last_error,
        })
    }
}

/// An event as a worker sees it, read under a row lock.
#[derive(Debug, Clone, PartialEq)]
pub struct LockedEvent {
    /// The event's id.
    pub id: Uuid,
    /// Current status; `processed` means a duplicate delivery.
    pub status: String,
    /// Attempts before this one.
    pub attempts: i32,
    /// The client's payload.
    pub payload: Value,
    /// The client's name for the kind of event.
    pub event_type: Option<String>,
    /// The client's key for the consumer.
    pub key: Option<String>,
    /// Seconds since the event was accepted, when it was locked.
    pub age_seconds: f64,
}

/// A lower bound on `created_at` for replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// A timestamp PostgreSQL understands, such as `2026-01-31T12:00:00Z`.
    At(String),
    /// This long before now.
    Ago(Duration),
}

/// What became of a retry request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryResult {
    /// The event is pending again and queued through the outbox.
    Requeued,
    /// No event has this id.
    NotFound,
    /// Only failed events can be retried; the value is the current status.
    NotFailed(String),
}

/// Counts up to this many rows are exact; above it they are estimates
/// from PostgreSQL's statistics, so that reading them stays cheap however
/// large the tables grow.
pub const EXACT_UP_TO: i64 = 10_000;

/// A row count: exact up to [`EXACT_UP_TO`], estimated above.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// The number of rows.
    pub value: i64,
    /// True when `value` is an estimate (the exact count passed the cap).
    pub estimated: bool,
}

impl Count {
    /// An exact count.
    pub fn exact(value: i64) -> Count {
        Count {
            value,
            estimated: false,
        }
    }

    /// An estimate, never below the cap it is known to exceed.
    fn estimate(value: i64) -> Count {
        Count {
            value: value.max(EXACT_UP_TO + 1),
            estimated: true,
        }
    }
}

/// Events by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// Waiting to be processed.
    pub pending: Count,
    /// Done.
    pub processed: Count,
    /// Given up on.
    pub failed: Count,
}

/// The outbox as `/metrics` and the status page show it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OutboxFigures {
    /// Rows waiting to be published.
    pub rows: Count,
    /// Age in seconds of the row the relay claims next (the lowest id), if
    /// any.
    pub oldest_age: Option<f64>,
}

/// Estimates the counts by status that passed the cap. `capped[i]` is the
/// count of status `i` stopped at `EXACT_UP_TO + 1` rows, `live` the
/// table's live rows from PostgreSQL's statistics and `freqs[i]` the share
/// of the status from the planner's statistics (the last `ANALYZE`). When
/// only one status passed the cap, it is the live rows less the exact
/// others, which follows the table closely; when several did, each is its
/// share of the live rows.
pub fn estimate_counts(capped: [i64; 3], live: Option<i64>, freqs: [Option<f64>; 3]) -> [Count; 3] {
    let over: Vec<usize> = (0..3).filter(|&i| capped[i] > EXACT_UP_TO).collect();
    let live = live.unwrap_or(0);
    let mut counts = capped.map(Count::exact);
    match over.as_slice() {
        [] => {}
        [only] => {
            let others: i64 = (0..3).filter(|i| i != only).map(|i| capped[i]).sum();
            counts[*only] = Count::estimate(live - others);
        }
        several => {
            for &i in several {
                let share = freqs[i].unwrap_or(0.0);
                counts[i] = Count::estimate((live as f64 * share).round() as i64);
            }
        }
    }
    counts
}

/// A failed event as the status page lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedEvent {
    /// The event's id.
    pub id: Uuid,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Why it failed.
    pub last_error: Option<String>,
}

/// One claimed outbox row, ready to publish.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// The outbox row id, deleted after the confirm.
    pub outbox_id: i64,
    /// The event id, the message's `message_id`.
    pub event_id: Uuid,
    /// The message body: `{"id", "type", "key", "payload", "created_at"}`
    /// as JSON text.
    pub body: String,
    /// Seconds since the epoch when the event was accepted.
    pub created_epoch: i64,
}

// RFC 3339 in UTC with microseconds, as every timestamp in our JSON.
macro_rules! rfc3339 {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        )
    };
}

/// The connection pool, bound to one schema.
#[derive(Clone)]
pub struct Store {
    pool: r2d2::Pool<Manager>,
    schema: String,
    pg_config: postgres::Config,
    /// Whether the database is known to be unreachable.
    outage: Arc<Outage>,
}

impl Store {
    /// Builds the pool without connecting yet; connections open on demand.
    pub fn open(config: &Config) -> Result<Store, Error> {
        Store::open_sized(config, config.db_pool_size)
    }

    /// Like [`Store::open`] with an explicit pool size.
    pub fn open_sized(config: &Config, size: u32) -> Result<Store, Error> {
        let mut pg: postgres::Config = config.database_url.parse().map_err(Error::Url)?;
        // Every wait on the server is bounded. A statement that runs longer
        // than statement_timeout is stuck (a lock held by a forgotten
        // session); the server fails it and frees the thread. A server that
        // says nothing for RESPONSE_GRACE longer is gone: the client gives
        // the connection up (a proxy that holds bytes, a host that
        // vanished). The kernel gives up sooner on a host that stopped
        // acknowledging: unacknowledged data after 10 s, an idle connection
        // after 10 s + 3 probes 2 s apart.
        let statement_timeout = config.db_statement_timeout;
        pg.options(&format!(
            "-c search_path={} -c statement_timeout={}ms",
            config.db_schema,
            statement_timeout.as_millis()
        ))
        .connect_timeout(config.db_timeout)
        .tcp_user_timeout(Duration::from_secs(10))
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .response_timeout(statement_timeout + RESPONSE_GRACE)
        .application_name("ingestd");
        let outage = Arc::new(Outage::default());
        let manager = Manager::new(pg.clone(), config.db_timeout, outage.clone());
        let pool = r2d2::Pool::builder()
            .max_size(size)
            .min_idle(Some(1))
            .connection_timeout(config.db_timeout)
            .build_unchecked(manager);
        Ok(Store {
            pool,
            schema: config.db_schema.clone(),
            pg_config: pg,
            outage,
        })
    }

    /// A pooled connection, or an error after the pool timeout.
    pub fn conn(&self) -> Result<Conn, Error> {
        if !self.outage.admits() {
            return Err(Error::Down);
        }
        let conn = self.pool.get();
        if conn.is_err() {
            // No connection within the pool timeout. With every connection
            // checked out the pool is merely busy; otherwise the ones it
            // tried, or is still opening, failed or did not answer.
            let state = self.pool.state();
            let busy = state.idle_connections == 0 && state.connections >= self.pool.max_size();
            if !busy {
                self.outage.observe(false);
            }
        }
        Ok(conn?)
    }

    /// A dedicated connection outside the pool (for `LISTEN`).
    pub fn dedicated(&self) -> Result<Client, Error> {
        Ok(self.pg_config.connect(NoTls)?)
    }

    /// The schema this store works in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The `NOTIFY` channel that wakes relays in other processes.
    pub fn notify_channel(&self) -> String {
        format!("ingestd_outbox_{}", self.schema)
    }

    /// Creates the schema and tables if missing. Concurrent callers serialise
    /// on an advisory lock, so several processes may start at once.
    ///
    /// The schema's fingerprint is recorded once applied, so processes
    /// starting beside running ones take no table lock: re-running the DDL
    /// would (`CREATE INDEX IF NOT EXISTS` locks its table) and could
    /// deadlock with live transactions. A deadlock while applying a new
    /// schema is retried.
    pub fn migrate(&self) -> Result<(), Error> {
        // Building an index on a large table may take long: the migration
        // runs without the statement timeout and gives the server up to
        // MIGRATION_TIMEOUT for each step.
        let mut config = self.pg_config.clone();
        config.response_timeout(MIGRATION_TIMEOUT);
        let mut client = config.connect(NoTls)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.migrate_once(&mut client) {
                Err(Error::Db(e))
                    if attempt < 5
                        && e.code().is_some_and(|c| {
                            *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                                || *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
                        }) =>
                {
                    std::thread::sleep(Duration::from_millis(100 * attempt));
                }
                other => return other,
            }
        }
    }

    fn migrate_once(&self, client: &mut Client) -> Result<(), Error> {
        let fingerprint = schema_fingerprint();
        let mut tx = client.transaction()?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            MIGRATION_TIMEOUT.as_millis()
        ))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('ingestd.migrate'))",
            &[],
        )?;
        // The schema name is validated as a plain identifier by `Config`.
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{0}\"; SET LOCAL search_path TO \"{0}\";
             CREATE TABLE IF NOT EXISTS ingestd_schema (
                 fingerprint text PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now());",
            self.schema
        ))?;
        let applied = tx
            .query_opt(
                "SELECT 1 FROM ingestd_schema WHERE fingerprint = $1",
                &[&fingerprint],
            )?
            .is_some();
        if !applied {
            tx.batch_execute(SCHEMA_SQL)?;
            tx.execute(
                "INSERT INTO ingestd_schema (fingerprint) VALUES ($1)",
                &[&fingerprint],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The outbox backlog, cheap at any size: rows counted up to the cap
    /// (through the primary key), beyond it PostgreSQL's live-row count
    /// (`n_live_tup`, which follows inserts and deletes within a second or
    /// so); the age of the lowest id through the primary key.
    pub fn outbox_figures(&self) -> Result<OutboxFigures, Error> {
        let row = self.conn()?.query_one(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT $1) capped), \
                    (SELECT n_live_tup FROM pg_stat_user_tables \
                     WHERE relid = 'outbox'::regclass), \
                    (SELECT extract(epoch FROM now() - created_at)::float8 \
                     FROM outbox ORDER BY id LIMIT 1)",
            &[&(EXACT_UP_TO + 1)],
        )?;
        let capped: i64 = row.get(0);
        let rows = if capped > EXACT_UP_TO {
            Count::estimate(row.get::<_, Option<i64>>(1).unwrap_or(0))
        } else {
            Count::exact(capped)
        };
        Ok(OutboxFigures {
            rows,
            oldest_age: row.get(2),
        })
    }

    /// Pooled connections: (in use, idle).
    pub fn pool_state(&self) -> (u32, u32) {
        let state = self.pool.state();
        (
            state.connections - state.idle_connections,
            state.idle_connections,
        )
    }

    /// Deletes up to `limit` processed events older than `age`; returns how
    /// many. Rows another transaction holds are skipped, not waited for.
    pub fn delete_expired(&self, age: Duration, limit: i64) -> Result<u64, Error> {
        Ok(self.conn()?.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events \
             WHERE status = 'processed' AND processed_at < now() - make_interval(secs => $1) \
             LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&age.as_secs_f64(), &limit],
        )?)
    }

    /// Events by status, cheap at any size: each status is counted up to
    /// the cap through its partial index; above it, see
    /// [`estimate_counts`]. The planner's shares are read only then.
    pub fn count_by_status(&self) -> Result<StatusCounts, Error> {
        let mut conn = self.conn()?;
        let row = conn.query_one(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM events \
                     WHERE status = 'pending' LIMIT $1) p), \
                    (SELECT count(*) FROM (SELECT 1 FROM events \
                     WHERE status = 'processed' LIMIT $1) d), \
                    (SELECT count(*) FROM (SELECT 1 FROM events \
                     WHERE status = 'failed' LIMIT $1) f), \
                    (SELECT n_live_tup FROM pg_stat_user_tables \
                     WHERE relid = 'events'::regclass)",
            &[&(EXACT_UP_TO + 1)],
        )?;
        let capped: [i64; 3] = [row.get(0), row.get(1), row.get(2)];
        let mut freqs = [None; 3];
        if capped.iter().filter(|&&c| c > EXACT_UP_TO).count() > 1 {
            for r in conn.query(
                "SELECT m.v, m.f::float8 FROM pg_stats s, \
                 unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS m(v, f) \
                 WHERE s.schemaname = current_schema() AND s.tablename = 'events' \
                 AND s.attname = 'status'",
                &[],
            )? {
                let i = match r.get::<_, &str>(0) {
                    "pending" => 0,
                    "processed" => 1,
                    "failed" => 2,
                    _ => continue,
                };
                freqs[i] = Some(r.get(1));
            }
        }
        let [pending, processed, failed] = estimate_counts(capped, row.get(3), freqs);
        Ok(StatusCounts {
            pending,
            processed,
            failed,
        })
    }

    /// The most recently created failed events, through the partial index
    /// on failed events.
    pub fn recent_failed(&self, limit: i64) -> Result<Vec<FailedEvent>, Error> {
        let rows = self.conn()?.query(
            concat!(
                "SELECT id, ",
                rfc3339!("created_at"),
                ", last_error FROM events WHERE status = 'failed' ",
                "ORDER BY created_at DESC LIMIT $1"
            ),
            &[&limit],
        )?;
        Ok(rows
            .iter()
            .map(|r| FailedEvent {
                id: r.get(0),
                created_at: r.get(1),
                last_error: r.get(2),
            })
            .collect())
    }

    /// Re-sends, through the outbox, up to `limit` pending events that have
    /// no outbox row and were neither handed to the broker nor attempted
    /// for `idle`: their message was lost by the broker. Marks them attempted, so each is re-sent at most once
    /// per `idle`. Returns how many.
    pub fn resend_lost(&self, idle: Duration, limit: i64) -> Result<u64, Error> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let n = tx.execute(
            "WITH lost AS ( \
               SELECT e.id FROM events e \
               WHERE e.status = 'pending' \
                 AND e.created_at < now() - make_interval(secs => $1) \
                 AND coalesce(e.attempted_at, e.created_at) < now() - make_interval(secs => $1) \
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id) \
               ORDER BY e.created_at LIMIT $2 FOR UPDATE OF e SKIP LOCKED), \
             touched AS (UPDATE events SET attempted_at = now() \
               WHERE id IN (SELECT id FROM lost) RETURNING id) \
             INSERT INTO outbox (event_id) SELECT id FROM touched",
            &[&idle.as_secs_f64(), &limit],
        )?;
        if n > 0 {
            tx.execute("SELECT pg_notify($1, '')", &[&self.notify_channel()])?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Answers whether PostgreSQL responds.
    pub fn ping(&self) -> Result<(), Error> {
        // The checkout runs the pool's check (within INGEST_DB_TIMEOUT even
        // if the server stopped answering); a new connection has just
        // answered.
        self.conn()?;
        Ok(())
    }

    /// Writes one new event and its outbox row; returns its id.
    pub fn insert_event(&self, payload: &Value, notify: bool) -> Result<Uuid, Error> {
        let event = NewEvent {
            id: Uuid::new_v4(),
            payload: payload.clone(),
            event_type: None,
            key: None,
            client_id: false,
        };
        self.insert_events(&[&event], notify)?;
        Ok(event.id)
    }

    /// Writes events and their outbox rows in one transaction, two
    /// statements whatever the batch size. With `notify`, the commit also
    /// wakes relays listening in other processes. Ids must be new.
    pub fn insert_events(&self, events: &[&NewEvent], notify: bool) -> Result<(), Error> {
        let columns = Columns::of(events.iter().copied());
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO events (id, payload, type, key) \
             SELECT * FROM unnest($1::uuid[], $2::jsonb[], $3::text[], $4::text[])",
            &[
                &columns.ids,
                &columns.payloads,
                &columns.types,
                &columns.keys,
            ],
        )?;
        tx.execute(
            "INSERT INTO outbox (event_id) SELECT unnest($1::uuid[])",
            &[&columns.ids],
        )?;
        self.commit_notifying(tx, notify)
    }

    /// Writes a submission that carries client ids or an idempotency key,
    /// all or nothing, in a transaction of its own. A key younger than
    /// `key_ttl`, or a client id already stored, with the same content is a
    /// replay: nothing is written and the stored ids are returned. The same
    /// key or id with different content is a conflict and writes nothing.
    ///
    /// The key is checked first and stands for the whole body: a live key
    /// answers for every event, whatever their ids. A new key is claimed,
    /// and the events are then written as without one (client ids replayed
    /// or refused), in the same transaction, so a refused request does not
    /// use its key up. Unique constraints decide every race: a concurrent
    /// replay waits for the first writer's transaction and then sees its
    /// rows.
    pub fn insert_idempotent(
        &self,
        submission: &Submission,
        key_ttl: Duration,
        notify: bool,
    ) -> Result<Written, Error> {
        let mut conn = self.conn()?;
        // A row seen as a conflict can vanish (an expired key purged, an
        // event deleted by retention) before it is read, and concurrent
        // writers of the same ids can deadlock despite the sorted inserts
        // (PostgreSQL then cancels one): start again in either case.
        for _ in 0..3 {
            match self.try_insert_idempotent(&mut conn, submission, key_ttl, notify) {
                Ok(Some(written)) => return Ok(written),
                Ok(None) => {}
                Err(Error::Db(e)) if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) => {}
                Err(e) => return Err(e),
            }
        }
        Err(Error::Contended)
    }

    /// One attempt of `insert_idempotent`; `None` means start again.
    fn try_insert_idempotent(
        &self,
        conn: &mut Conn,
        submission: &Submission,
        key_ttl: Duration,
        notify: bool,
    ) -> Result<Option<Written>, Error> {
        let mut tx = conn.transaction()?;
        let columns = Columns::of(submission.events.iter());
        if let Some(written) = claim_key(&mut tx, submission, &columns, key_ttl)? {
            return Ok(Some(written));
        }
        // Rows go in id order, so that two batches sharing ids lock them in
        // the same order and one waits for the other instead of deadlocking.
        let inserted: Vec<Uuid> = tx
            .query(
                "INSERT INTO events (id, payload, type, key) \
                 SELECT * FROM unnest($1::uuid[], $2::jsonb[], $3::text[], $4::text[]) AS m \
                 ORDER BY 1 ON CONFLICT (id) DO NOTHING RETURNING id",
                &[
                    &columns.ids,
                    &columns.payloads,
                    &columns.types,
                    &columns.keys,
                ],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let new: HashSet<&Uuid> = inserted.iter().collect();
        let created: Vec<bool> = columns.ids.iter().map(|id| new.contains(id)).collect();
        if created.iter().any(|c| !*c) {
            // Some ids exist: each must hold exactly this item's content,
            // compared as the idempotency fingerprint compares it (jsonb
            // text: key order and spacing do not matter; numbers compare by
            // their stored digits, so 1, 1.0 and 1.00 differ while 1e2 and
            // 100 do not). NULL means the row is gone.
            let rows = tx.query(
                "SELECT m.ord::int, CASE WHEN e.id IS NULL THEN NULL ELSE \
                        e.payload::text = m.payload::text \
                        AND e.type IS NOT DISTINCT FROM m.type \
                        AND e.key IS NOT DISTINCT FROM m.key END \
                 FROM unnest($1::uuid[], $2::jsonb[], $3::text[], $4::text[]) \
                      WITH ORDINALITY AS m(id, payload, type, key, ord) \
                 LEFT JOIN events e ON e.id = m.id \
                 WHERE NOT (m.id = ANY($5)) ORDER BY m.ord",
                &[
                    &columns.ids,
                    &columns.payloads,
                    &columns.types,
                    &columns.keys,
                    &inserted,
                ],
            )?;
            let mut vanished = false;
            for row in &rows {
                let (ord, same): (i32, Option<bool>) = (row.get(0), row.get(1));
                match same {
                    Some(true) => {}
                    Some(false) => {
                        let index = ord as usize - 1;
                        return Ok(Some(Written::IdConflict(index, columns.ids[index])));
                    }
                    None => vanished = true,
                }
            }
            if vanished {
                return Ok(None);
            }
        }
        tx.execute(
            "INSERT INTO outbox (event_id) SELECT unnest($1::uuid[])",
            &[&inserted],
        )?;
        self.commit_notifying(tx, notify && !inserted.is_empty())?;
        Ok(Some(Written::Stored {
            ids: columns.ids,
            created,
        }))
    }

    /// Deletes idempotency keys older than `ttl`, at most `limit` of them;
    /// returns how many.
    pub fn purge_idempotency_keys(&self, ttl: Duration, limit: i64) -> Result<u64, Error> {
        Ok(self.conn()?.execute(
            "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys \
             WHERE created_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&ttl.as_secs_f64(), &limit],
        )?)
    }

    fn commit_notifying(&self, mut tx: Transaction<'_>, notify: bool) -> Result<(), Error> {
        if notify {
            tx.execute("SELECT pg_notify($1, '')", &[&self.notify_channel()])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Sends a failed event back through the outbox: it becomes `pending`
    /// with a fresh retry budget, in the same transaction as its outbox row.
    pub fn retry_event(&self, id: Uuid, notify: bool) -> Result<RetryResult, Error> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let status: Option<String> = tx
            .query_opt("SELECT status FROM events WHERE id = $1 FOR UPDATE", &[&id])?
            .map(|r| r.get(0));
        match status.as_deref() {
            None => return Ok(RetryResult::NotFound),
            Some("failed") => {}
            Some(other) => return Ok(RetryResult::NotFailed(other.to_string())),
        }
        tx.execute(
            "UPDATE events SET status = 'pending', attempts = 0, last_error = NULL WHERE id = $1",
            &[&id],
        )?;
        tx.execute("INSERT INTO outbox (event_id) VALUES ($1)", &[&id])?;
        if notify {
            tx.execute("SELECT pg_notify($1, '')", &[&self.notify_channel()])?;
        }
        tx.commit()?;
        Ok(RetryResult::Requeued)
    }

    /// Sends every failed event created since `since` (all when `None`)
    /// back through the outbox in one transaction; returns how many.
    pub fn replay_failed(&self, since: Option<&Since>) -> Result<u64, Error> {
        let (at, ago) = match since {
            None => (None, None),
            Some(Since::At(ts)) => (Some(ts.as_str()), None),
            Some(Since::Ago(d)) => (None, Some(d.as_secs_f64())),
        };
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let n = tx.execute(
            "WITH r AS (UPDATE events SET status = 'pending', attempts = 0, last_error = NULL \
             WHERE status = 'failed' \
             AND ($1::text IS NULL OR created_at >= $1::text::timestamptz) \
             AND ($2::float8 IS NULL OR created_at >= now() - make_interval(secs => $2)) \
             RETURNING id) INSERT INTO outbox (event_id) SELECT id FROM r",
            &[&at, &ago],
        )?;
        tx.execute("SELECT pg_notify($1, '')", &[&self.notify_channel()])?;
        tx.commit()?;
        Ok(n)
    }

    /// Reads one event for the API.
    pub fn get_event(&self, id: Uuid) -> Result<Option<EventRecord>, Error> {
        let row = self.conn()?.query_opt(
            concat!(
                "SELECT id, status, attempts, payload, type, key, ",
                rfc3339!("created_at"),
                ", ",
                rfc3339!("processed_at"),
                ", last_error FROM events WHERE id = $1"
            ),
            &[&id],
        )?;
        Ok(row.map(|r| EventRecord {
            id: r.get(0),
            status: r.get(1),
            attempts: r.get(2),
            payload: r.get(3),
            event_type: r.get(4),
            key: r.get(5),
            created_at: r.get(6),
            processed_at: r.get(7),
            last_error: r.get(8),
        }))
    }
}

/// Events as the columns of an `unnest` insert.
struct Columns<'a> {
    ids: Vec<Uuid>,
    payloads: Vec<&'a Value>,
    types: Vec<Option<&'a str>>,
    keys: Vec<Option<&'a str>>,
    /// The ids the client chose, `None` for generated ones: part of what
    /// an idempotency key's fingerprint covers.
    client_ids: Vec<Option<Uuid>>,
}

impl<'a> Columns<'a> {
    fn of(events: impl Iterator<Item = &'a NewEvent>) -> Columns<'a> {
        let mut c = Columns {
            ids: Vec::new(),
            payloads: Vec::new(),
            types: Vec::new(),
            keys: Vec::new(),
            client_ids: Vec::new(),
        };
        for e in events {
            c.ids.push(e.id);
            c.payloads.push(&e.payload);
            c.types.push(e.event_type.as_deref());
            c.keys.push(e.key.as_deref());
            c.client_ids.push(e.client_id.then_some(e.id));
        }
        c
    }
}

// SHA-256 of a body's normalised content (jsonb sorts keys, drops
// insignificant whitespace and writes numbers in plain decimal, keeping the
// digits after the point that were sent), over $2 to $5: the payloads,
// types, keys and client-chosen ids (NULL for generated ones) in the
// request's order. One event hashes `[payload, type, key, id]`, as keys
// stored by earlier versions did; a batch hashes
// `{"batch": [[payload, type, key, id], ...]}`, so order matters, and a
// body of one event and a batch of that event differ.
const FINGERPRINT_ONE: &str = "sha256(convert_to(jsonb_build_array(($2::jsonb[])[1], \
                               ($3::text[])[1], ($4::text[])[1], ($5::uuid[])[1])::text, 'UTF8'))";
const FINGERPRINT_BATCH: &str = "sha256(convert_to(jsonb_build_object('batch', \
                                 (SELECT jsonb_agg(jsonb_build_array(p, t, k, i) ORDER BY o) \
                                 FROM unnest($2::jsonb[], $3::text[], $4::text[], $5::uuid[]) \
                                 WITH ORDINALITY AS m(p, t, k, i, o)))::text, 'UTF8'))";

/// Claims the submission's `Idempotency-Key`, if it has one, for its
/// events. `None`: there is no key, or it is now ours (new or expired), and
/// the caller writes the events. `Some`: the key is live, and this is a
/// replay of the whole original answer or a conflict; nothing was written.
fn claim_key(
    tx: &mut Transaction<'_>,
    submission: &Submission,
    columns: &Columns<'_>,
    key_ttl: Duration,
) -> Result<Option<Written>, Error> {
    let (Some(key), Some(first)) = (&submission.idempotency_key, columns.ids.first()) else {
        return Ok(None);
    };
    let key = key.stored();
    let fingerprint = if submission.batch {
        FINGERPRINT_BATCH
    } else {
        FINGERPRINT_ONE
    };
    let content: [&(dyn postgres::types::ToSql + Sync); 5] = [
        &key,
        &columns.payloads,
        &columns.types,
        &columns.keys,
        &columns.client_ids,
    ];
    // A batch's row keeps every id in `event_ids`; `event_id` holds the
    // first, so that a row always names an event (and a process of an
    // earlier version, which reads only `event_id`, sees a conflict).
    let event_ids = submission.batch.then_some(&columns.ids);
    // On conflict the existing row is locked even when the WHERE fails, so
    // it cannot be purged before it is read below.
    let claimed = tx.query_opt(
        &format!(
            "INSERT INTO idempotency_keys (key, event_id, event_ids, fingerprint) \
             VALUES ($1, $6, $7, {fingerprint}) \
             ON CONFLICT (key) DO UPDATE SET event_id = EXCLUDED.event_id, \
                 event_ids = EXCLUDED.event_ids, fingerprint = EXCLUDED.fingerprint, \
                 created_at = now() \
             WHERE idempotency_keys.created_at < now() - make_interval(secs => $8) \
             RETURNING 1"
        ),
        &[&content[..], &[first, &event_ids, &key_ttl.as_secs_f64()]].concat(),
    )?;
    if claimed.is_some() {
        return Ok(None);
    }
    let row = tx.query_one(
        &format!(
            "SELECT coalesce(event_ids, ARRAY[event_id]), fingerprint = {fingerprint} \
             FROM idempotency_keys WHERE key = $1"
        ),
        &content,
    )?;
    Ok(Some(if row.get::<_, bool>(1) {
        let ids: Vec<Uuid> = row.get(0);
        Written::Stored {
            created: vec![false; ids.len()],
            ids,
        }
    } else {
        Written::KeyConflict
    }))
}

/// Claims up to `limit` outbox rows that no other relay holds, oldest first.
/// The rows stay locked until `tx` ends.
pub fn claim_outbox(tx: &mut Transaction<'_>, limit: i64) -> Result<Vec<OutboxRow>, Error> {
    let rows = tx.query(
        concat!(
            "SELECT o.id, e.id, json_build_object('id', e.id, 'type', e.type, 'key', e.key, ",
            "'payload', e.payload, ",
            "'created_at', ",
            rfc3339!("e.created_at"),
            ")::text, extract(epoch FROM e.created_at)::bigint ",
            "FROM outbox o JOIN events e ON e.id = o.event_id ",
            "WHERE o.not_before IS NULL OR o.not_before <= now() ",
            "ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED"
        ),
        &[&limit],
    )?;
    Ok(rows
        .iter()
        .map(|r| OutboxRow {
            outbox_id: r.get(0),
            event_id: r.get(1),
            body: r.get(2),
            created_epoch: r.get(3),
        })
        .collect())
}

/// Deletes published outbox rows.
pub fn delete_outbox(tx: &mut Transaction<'_>, ids: &[i64]) -> Result<u64, Error> {
    Ok(tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&ids])?)
}

/// Restarts the idle clock (`attempted_at`) of events just handed to the
/// broker long after they were accepted (a broker outage held them in the
/// outbox): they wait in a queue, not lost. Without it, after an outage
/// longer than `INGEST_REDELIVER_AFTER`, every event still queued looked
/// lost and was published again. Only such late events are touched, so a
/// relay keeping up writes nothing more; an event a worker holds locked is
/// being handled right now and is skipped, so that the relay never waits
/// for a processor. Returns how many events were touched.
pub fn touch_published(tx: &mut Transaction<'_>, events: &[Uuid]) -> Result<u64, Error> {
    Ok(tx.execute(
        "WITH idle AS (SELECT id FROM events WHERE id = ANY($1) AND status = 'pending' \
                       FOR UPDATE SKIP LOCKED) \
         UPDATE events SET attempted_at = now() WHERE id IN (SELECT id FROM idle)",
        &[&events],
    )?)
}

/// Times the broker may refuse one event's message before the event fails.
pub const MAX_BROKER_REFUSALS: i32 = 5;

/// Records that the broker refused (nacked) the messages of these outbox
/// rows: each is tried again after a backoff (100 ms doubling, at most
/// 30 s), and after [`MAX_BROKER_REFUSALS`] its event becomes `failed` with
/// `reason`, and its row goes. Returns the events that failed.
pub fn refuse_outbox(
    tx: &mut Transaction<'_>,
    ids: &[i64],
    reason: &str,
) -> Result<Vec<Uuid>, Error> {
    let rows = tx.query(
        "UPDATE outbox SET attempts = attempts + 1, \
         not_before = now() + make_interval(secs => least(30, 0.1 * 2 ^ attempts)) \
         WHERE id = ANY($1) RETURNING id, event_id, attempts",
        &[&ids],
    )?;
    let (exhausted, events): (Vec<i64>, Vec<Uuid>) = rows
        .iter()
        .filter(|r| r.get::<_, i32>(2) >= MAX_BROKER_REFUSALS)
        .map(|r| (r.get::<_, i64>(0), r.get::<_, Uuid>(1)))
        .unzip();
    if !exhausted.is_empty() {
        tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&exhausted])?;
        tx.execute(
            "UPDATE events SET status = 'failed', last_error = $2, attempted_at = now() \
             WHERE id = ANY($1) AND status = 'pending'",
            &[&events, &storable_error(reason)],
        )?;
    }
    Ok(events)
}

/// Locks an event row for processing; `None` if no such event exists.
pub fn lock_event(tx: &mut Transaction<'_>, id: Uuid) -> Result<Option<LockedEvent>, Error> {
    let row = tx.query_opt(
        "SELECT status, attempts, payload, type, key, \
         extract(epoch FROM clock_timestamp() - created_at)::float8 \
         FROM events WHERE id = $1 FOR UPDATE",
        &[&id],
    )?;
    Ok(row.map(|r| LockedEvent {
        id,
        status: r.get(0),
        attempts: r.get(1),
        payload: r.get(2),
        event_type: r.get(3),
        key: r.get(4),
        age_seconds: r.get(5),
    }))
}

/// Locks the rows of several events, in id order so that concurrent
/// workers cannot deadlock; missing ids are absent from the map.
pub fn lock_events(
    tx: &mut Transaction<'_>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, LockedEvent>, Error> {
    let rows = tx.query(
        "SELECT id, status, attempts, payload, type, key, \
         extract(epoch FROM clock_timestamp() - created_at)::float8 \
         FROM events WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        &[&ids],
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            let id: Uuid = r.get(0);
            let event = LockedEvent {
                id,
                status: r.get(1),
                attempts: r.get(2),
                payload: r.get(3),
                event_type: r.get(4),
                key: r.get(5),
                age_seconds: r.get(6),
            };
            (id, event)
        })
        .collect())
}

/// Marks locked events processed and counts the attempt.
pub fn mark_processed_many(tx: &mut Transaction<'_>, ids: &[Uuid]) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    tx.execute(
        "UPDATE events SET status = 'processed', processed_at = now(), \
         attempts = attempts + 1, processed_count = processed_count + 1, last_error = NULL \
         WHERE id = ANY($1)",
        &[&ids],
    )?;
    Ok(())
}

/// Marks a locked event processed and counts the attempt.
pub fn mark_processed(tx: &mut Transaction<'_>, id: Uuid) -> Result<(), Error> {
    tx.execute(
        "UPDATE events SET status = 'processed', processed_at = now(), \
         attempts = attempts + 1, processed_count = processed_count + 1, last_error = NULL \
         WHERE id = $1",
        &[&id],
    )?;
    Ok(())
}

/// Records a failed attempt; with `give_up` the event becomes `failed`.
pub fn record_failure(
    tx: &mut Transaction<'_>,
    id: Uuid,
    error: &str,
    give_up: bool,
) -> Result<(), Error> {
    tx.execute(
        "UPDATE events SET attempts = attempts + 1, last_error = $2, attempted_at = now(), \
         status = CASE WHEN $3 THEN 'failed' ELSE status END \
         WHERE id = $1 AND status = 'pending'",
        &[&id, &storable_error(error), &give_up],
    )?;
    Ok(())
}

/// Longest `last_error` stored, in bytes.
pub const MAX_ERROR_BYTES: usize = 2048;

/// A processor's error text as PostgreSQL can always store it: U+0000,
/// which `text` refuses, becomes U+FFFD, and the text is cut to
/// [`MAX_ERROR_BYTES`] on a character boundary. Stored as it came, a NUL
/// made recording the failure fail, so the event stayed `pending` while
/// its delivery was dead-lettered, and it was re-sent for ever.
pub fn storable_error(error: &str) -> String {
    let mut text = error.replace('\0', "\u{fffd}");
    if text.len() > MAX_ERROR_BYTES {
        let mut cut = MAX_ERROR_BYTES - '…'.len_utf8();
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: i64 = EXACT_UP_TO + 1;

    #[test]
    fn error_texts_are_made_storable() {
        assert_eq!(storable_error("plain"), "plain");
        assert_eq!(storable_error("a\0b"), "a\u{fffd}b");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let stored = storable_error(&long);
        assert!(stored.len() <= MAX_ERROR_BYTES && stored.ends_with('…'));
    }

    #[test]
    fn counts_under_the_cap_are_exact() {
        let [p, d, f] = estimate_counts([3, 0, EXACT_UP_TO], Some(99), [None; 3]);
        assert_eq!(
            (p, d, f),
            (Count::exact(3), Count::exact(0), Count::exact(EXACT_UP_TO))
        );
    }

    #[test]
    fn one_status_over_the_cap_is_the_rest_of_the_live_rows() {
        let [p, d, f] = estimate_counts([5, CAP, 2], Some(1_000_000), [None; 3]);
        assert_eq!(p, Count::exact(5));
        assert_eq!(f, Count::exact(2));
        assert_eq!(d.value, 1_000_000 - 7);
        assert!(d.estimated);
        // Statistics that lag behind never bring an estimate under the cap.
        let [_, d, _] = estimate_counts([5, CAP, 2], Some(40), [None; 3]);
        assert_eq!(d, Count::estimate(CAP));
        assert_eq!(d.value, CAP);
    }

    #[test]
    fn several_over_the_cap_share_the_live_rows() {
        let freqs = [Some(0.25), Some(0.75), None];
        let [p, d, f] = estimate_counts([CAP, CAP, 9], Some(2_000_000), freqs);
        assert_eq!((p.value, p.estimated), (500_000, true));
        assert_eq!((d.value, d.estimated), (1_500_000, true));
        assert_eq!(f, Count::exact(9));
        // Without statistics all that is known is that the cap was passed.
        let [p, _, _] = estimate_counts([CAP, CAP, 0], None, [None; 3]);
        assert_eq!((p.value, p.estimated), (CAP, true));
    }
}
