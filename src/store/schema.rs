//! The schema: `schema.sql`, embedded, and its migration. A fingerprint of
//! the text records that it was applied, so that processes starting beside
//! running ones take no table lock.

use std::time::Duration;

use postgres::{Client, NoTls};

use crate::store::{Error, Store};

/// The schema, embedded so the binary can create its tables anywhere.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");

/// A fingerprint of [`SCHEMA_SQL`] (64-bit FNV-1a, hex).
pub fn schema_fingerprint() -> String {
    let hash = SCHEMA_SQL.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The longest one step of a schema migration may take (an index built on
/// a large table).
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(3600);

impl Store {
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
}
