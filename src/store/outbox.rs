//! The outbox as the relay and the sweeper use it: claim rows no other
//! relay holds, delete them after the broker's confirm, back off rows the
//! broker refused, and re-send events whose message the broker lost.

use std::time::Duration;

use postgres::Transaction;
use uuid::Uuid;

use crate::store::events::storable_error;
use crate::store::rfc3339;
use crate::store::{Error, Store, Wakeup};

/// One claimed outbox row, ready to publish.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// The outbox row id, deleted after the confirm.
    pub outbox_id: i64,
    /// The event id, the message's `message_id`.
    pub event_id: Uuid,
    /// The client's name for the kind of event.
    pub event_type: Option<String>,
    /// The client's key for the consumer.
    pub key: Option<String>,
    /// The payload as PostgreSQL writes `jsonb`: JSON text, numbers exact.
    pub payload: String,
    /// When the event was accepted: RFC 3339, UTC.
    pub created_at: String,
    /// Seconds since the epoch when the event was accepted.
    pub created_epoch: i64,
}

/// Claims up to `limit` outbox rows that no other relay holds, oldest first.
/// The rows stay locked until `tx` ends.
pub fn claim_outbox(tx: &mut Transaction<'_>, limit: i64) -> Result<Vec<OutboxRow>, Error> {
    let rows = tx.query(
        concat!(
            "SELECT o.id, e.id, e.type, e.key, e.payload::text, ",
            rfc3339!("e.created_at"),
            ", extract(epoch FROM e.created_at)::bigint ",
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
            event_type: r.get(2),
            key: r.get(3),
            payload: r.get(4),
            created_at: r.get(5),
            created_epoch: r.get(6),
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

impl Store {
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
        // Every relay listens, the one beside this sweeper included.
        self.commit_waking(tx, &Wakeup::Notify, n > 0)?;
        Ok(n)
    }
}
