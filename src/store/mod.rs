//! PostgreSQL: the pool and every statement ingestd runs.
//!
//! All SQL lives under this folder, next to the function that runs it, with
//! parameters; one file per client: [`ingest`] (the API's writes),
//! [`outbox`] (the relay and the sweeper), [`events`] (the workers, and the
//! API's reads and retries), [`upkeep`] (retention and the figures) and
//! [`schema`] (the migration). The store knows the tables and their
//! transactions; it does not know HTTP, AMQP or what processing an event
//! means: it returns rows and counts, and the callers render them.

pub mod events;
pub mod ingest;
pub mod outbox;
pub mod pool;
pub mod schema;
pub mod upkeep;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, NoTls, Transaction};
use r2d2::PooledConnection;

pub use events::{EventRecord, LockedEvent, RetryResult, Since};
pub use ingest::{BASE64_MARKER, IdempotencyKey, NewEvent, Submission, Written};
pub use outbox::OutboxRow;
pub use pool::{Manager, Outage, RESPONSE_GRACE};
pub use schema::{MIGRATION_TIMEOUT, SCHEMA_SQL, schema_fingerprint};
pub use upkeep::{Count, EXACT_UP_TO, FailedEvent, OutboxFigures, StatusCounts, estimate_counts};

use crate::config::Config;

/// A pooled connection.
pub type Conn = PooledConnection<Manager>;

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
pub(crate) use rfc3339;

/// What the store is opened with: the `INGEST_DB_*` part of the
/// configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `INGEST_DATABASE_URL`.
    pub url: String,
    /// `INGEST_DB_SCHEMA`: every table lives in it.
    pub schema: String,
    /// `INGEST_DB_POOL_SIZE`.
    pub pool_size: u32,
    /// `INGEST_DB_TIMEOUT`: to connect, and to get a pooled connection.
    pub timeout: Duration,
    /// `INGEST_DB_STATEMENT_TIMEOUT`.
    pub statement_timeout: Duration,
    /// `INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT`.
    pub idle_in_transaction_timeout: Duration,
}

impl Settings {
    /// The store's part of `config`.
    pub fn of(config: &Config) -> Settings {
        Settings {
            url: config.database_url.clone(),
            schema: config.db_schema.clone(),
            pool_size: config.db_pool_size,
            timeout: config.db_timeout,
            statement_timeout: config.db_statement_timeout,
            idle_in_transaction_timeout: config.db_idle_tx_timeout,
        }
    }

    /// The same with a pool of `size` connections.
    pub fn sized(mut self, size: u32) -> Settings {
        self.pool_size = size;
        self
    }
}

/// How a transaction that wrote outbox rows wakes the relays. One fact
/// decides it: whether a relay runs in this process.
#[derive(Debug, Clone)]
pub enum Wakeup {
    /// A relay runs in this process: its channel is nudged after the commit.
    Local(crossbeam_channel::Sender<()>),
    /// Relays run in other processes: the commit carries a `NOTIFY` on the
    /// store's channel, which their listeners forward.
    Notify,
}

impl Wakeup {
    /// Nudges this process's relay, after a commit that wrote outbox rows;
    /// relays elsewhere got the commit's `NOTIFY`.
    fn nudge(&self) {
        if let Wakeup::Local(wake) = self {
            // A full channel means a wake-up is already pending.
            let _ = wake.try_send(());
        }
    }
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
    pub fn open(settings: &Settings) -> Result<Store, Error> {
        let mut pg: postgres::Config = settings.url.parse().map_err(Error::Url)?;
        // Every wait on the server is bounded. A statement that runs longer
        // than statement_timeout is stuck (a lock held by a forgotten
        // session); the server fails it and frees the thread. A server that
        // says nothing for RESPONSE_GRACE longer is gone: the client gives
        // the connection up (a proxy that holds bytes, a host that
        // vanished). The kernel gives up sooner on a host that stopped
        // acknowledging: unacknowledged data after 10 s, an idle connection
        // after 10 s + 3 probes 2 s apart.
        //
        // The hot statements are prepared once per connection
        // (`prepare_cached`); plan_cache_mode keeps them planned for their
        // parameters each time, as unnamed statements were: a generic plan
        // of the relay's claim (`LIMIT $1`) cost the server a quarter more
        // CPU per event than the custom one.
        //
        // A transaction whose client fell silent (the same proxy, a
        // client that froze) would keep its row locks for as long as the
        // server keeps the session: the server ends it once it has idled
        // for INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT. That must outlast what
        // ingestd's own transactions wait for between two statements: the
        // relay's confirms, a processor's work.
        let statement_timeout = settings.statement_timeout;
        pg.options(&format!(
            "-c search_path={} -c statement_timeout={}ms -c idle_in_transaction_session_timeout={}ms \
             -c plan_cache_mode=force_custom_plan",
            settings.schema,
            statement_timeout.as_millis(),
            settings.idle_in_transaction_timeout.as_millis()
        ))
        .connect_timeout(settings.timeout)
        .tcp_user_timeout(Duration::from_secs(10))
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .response_timeout(statement_timeout + RESPONSE_GRACE)
        .application_name("ingestd");
        let outage = Arc::new(Outage::default());
        let manager = Manager::new(pg.clone(), settings.timeout, outage.clone());
        let pool = r2d2::Pool::builder()
            .max_size(settings.pool_size)
            .min_idle(Some(1))
            .connection_timeout(settings.timeout)
            .build_unchecked(manager);
        Ok(Store {
            pool,
            schema: settings.schema.clone(),
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

    /// A second pooled connection for work that can do without one: an
    /// idle connection at once, or a new one if the pool has room and it
    /// opens within `wait`; `None`, without waiting, when every connection
    /// is in use, and when the database is down (which only the callers of
    /// [`Store::conn`] report).
    pub fn spare_conn(&self, wait: Duration) -> Option<Conn> {
        if !self.outage.admits() {
            return None;
        }
        if let Some(conn) = self.pool.try_get() {
            return Some(conn);
        }
        let state = self.pool.state();
        if state.connections >= self.pool.max_size() {
            return None;
        }
        self.pool.get_timeout(wait).ok()
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

    /// Pooled connections: (in use, idle).
    pub fn pool_state(&self) -> (u32, u32) {
        let state = self.pool.state();
        (
            state.connections - state.idle_connections,
            state.idle_connections,
        )
    }

    /// Answers whether PostgreSQL responds.
    pub fn ping(&self) -> Result<(), Error> {
        // The checkout runs the pool's check (within INGEST_DB_TIMEOUT even
        // if the server stopped answering); a new connection has just
        // answered.
        self.conn()?;
        Ok(())
    }

    /// Commits `tx`, which wrote outbox rows when `wrote`, and wakes the
    /// relays as `wakeup` says: a `NOTIFY` that takes effect with the
    /// commit, or a nudge of this process's relay once it has.
    fn commit_waking(
        &self,
        mut tx: Transaction<'_>,
        wakeup: &Wakeup,
        wrote: bool,
    ) -> Result<(), Error> {
        if wrote && matches!(wakeup, Wakeup::Notify) {
            let notify = tx.prepare_cached("SELECT pg_notify($1, '')")?;
            tx.execute(&notify, &[&self.notify_channel()])?;
        }
        tx.commit()?;
        if wrote {
            wakeup.nudge();
        }
        Ok(())
    }
}
