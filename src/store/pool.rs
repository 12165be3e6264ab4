//! PostgreSQL connections whose every wait is bounded, and the memory of an
//! outage.
//!
//! A server that refuses or resets connections is noticed at once. One
//! that vanishes, or a proxy that accepts and holds bytes, says nothing, and
//! without bounds every thread that touched it would wait for the kernel's
//! retransmission limit (about 15 minutes). Here: the socket connects
//! within `INGEST_DB_TIMEOUT`; the kernel gives up on a host that stopped
//! acknowledging (`tcp_user_timeout`, keepalives); a server silent for
//! `statement_timeout` plus [`RESPONSE_GRACE`] is given up by the client,
//! which closes the connection (the patched `postgres` crate's response
//! timeout); and the pool's checkout test waits at most
//! `INGEST_DB_TIMEOUT`, as does a new connection's whole startup. Once a
//! connect or a check fails, or a checkout times out while the pool is not
//! merely busy, [`Outage`] remembers that the database is gone, so that the callers queued behind get their
//! error at once instead of each waiting its own full timeout, while one
//! probe at a time finds out when the database is back. This module owns
//! connections and their failures; it runs no statements of its own but the
//! check.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use r2d2::ManageConnection;
use r2d2_postgres::PostgresConnectionManager;

/// How much longer than `statement_timeout` the client waits for the
/// server before it gives up on a connection: a statement the server
/// cancels answers within it, so silence beyond it means the server, or the
/// network to it, is gone.
pub const RESPONSE_GRACE: Duration = Duration::from_secs(5);

/// How often, during an outage, one caller may try the database again.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// r2d2_postgres's manager with a checkout test that cannot hang (it waits
/// at most `check_timeout`; r2d2_postgres's own test has no deadline, so a
/// pooled connection to a vanished server held its caller for the kernel's
/// timeout), and that tells the [`Outage`] what it finds.
#[derive(Debug)]
pub struct Manager {
    inner: PostgresConnectionManager<NoTls>,
    check_timeout: Duration,
    outage: Arc<Outage>,
}

impl Manager {
    /// A manager for `config`, checking connections within `check_timeout`.
    pub fn new(config: postgres::Config, check_timeout: Duration, outage: Arc<Outage>) -> Manager {
        Manager {
            inner: PostgresConnectionManager::new(config, NoTls),
            check_timeout,
            outage,
        }
    }
}

impl ManageConnection for Manager {
    type Connection = Client;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Client, postgres::Error> {
        let connected = self.inner.connect();
        self.outage.observe(connected.is_ok());
        connected
    }

    fn is_valid(&self, client: &mut Client) -> Result<(), postgres::Error> {
        // During a known outage a connection from before it is not worth a
        // round trip: each would cost its caller `check_timeout`, one idle
        // connection after another. A probe finds the database back by
        // opening a new connection.
        if self.outage.is_down() {
            return Err(postgres::Error::__private_api_timeout());
        }
        let valid = client.is_valid(self.check_timeout);
        self.outage.observe(valid.is_ok());
        valid
    }

    fn has_broken(&self, client: &mut Client) -> bool {
        // A connection closed under its user (the server went away, or it
        // stopped answering and the client gave it up) is discarded. One
        // closed connection is not an outage (an administrator may have
        // ended its session): the next connect or check decides.
        client.is_closed()
    }
}

/// Whether the database is known to be unreachable, and when it may be
/// tried again. Healthy, it costs one atomic load per checkout.
#[derive(Debug, Default)]
pub struct Outage {
    down: AtomicBool,
    /// When the last probe started, during an outage.
    last_probe: Mutex<Option<Instant>>,
}

impl Outage {
    /// True if the caller may use the database now: always when it is not
    /// known to be down; during an outage, for one caller once
    /// [`PROBE_INTERVAL`] has passed since the last probe began or the
    /// last failure was seen (the probe), and false for everyone else.
    pub fn admits(&self) -> bool {
        self.admits_at(Instant::now())
    }

    fn admits_at(&self, now: Instant) -> bool {
        if !self.down.load(Ordering::Acquire) {
            return true;
        }
        let mut last = self.last_probe.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(at) if now.saturating_duration_since(at) < PROBE_INTERVAL => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    /// Records what a connect, a check or a returned connection showed.
    pub fn observe(&self, healthy: bool) {
        if !healthy {
            // The next probe waits from the end of a failure, not from the
            // start of the last probe: a probe of a refused database waits
            // out the whole checkout timeout, so callers served one after
            // another (a committer's keyed requests) would each become the
            // next probe and wait a whole timeout of their own.
            *self.last_probe.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        let was_down = self.down.swap(!healthy, Ordering::AcqRel);
        if was_down && healthy {
            log::info!("postgres: reachable again");
        } else if !was_down && !healthy {
            log::warn!("postgres: unreachable; requests fail at once until a probe succeeds");
        }
    }

    /// True while the database is known to be unreachable.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_admits_one_probe_per_interval() {
        let outage = Outage::default();
        let now = Instant::now();
        assert!(
            outage.admits_at(now) && outage.admits_at(now),
            "healthy: everyone"
        );
        outage.observe(false);
        assert!(outage.is_down());
        let t0 = Instant::now() + PROBE_INTERVAL;
        assert!(
            !outage.admits_at(Instant::now()),
            "not right after a failure"
        );
        assert!(outage.admits_at(t0), "the first caller probes");
        assert!(!outage.admits_at(t0), "the others fail at once");
        assert!(!outage.admits_at(t0 + PROBE_INTERVAL / 2));
        assert!(
            outage.admits_at(t0 + PROBE_INTERVAL),
            "a probe again after the interval"
        );
        // A failure, such as the end of that probe, starts the wait again.
        outage.observe(false);
        assert!(!outage.admits_at(Instant::now()));
        outage.observe(true);
        assert!(!outage.is_down());
        assert!(outage.admits_at(t0) && outage.admits_at(t0));
    }
}
