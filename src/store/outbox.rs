//! The outbox as the relay and the sweeper use it: claim (and delete) rows
//! no other relay holds, committed after the broker's confirm, back off rows the
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
    /// The outbox row id.
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
    /// Times the broker refused this row's message before.
    pub refusals: i32,
    /// When the outbox row was written, seconds since the epoch (kept if
    /// the row has to be put back).
    pub queued_epoch: f64,
    /// A CloudEvent's context attributes as `jsonb` text; `None` for a
    /// plain event.
    pub attributes: Option<String>,
    /// The W3C `traceparent` the event was accepted with.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` the event was accepted with.
    pub tracestate: Option<String>,
}

/// The claim: takes up to `$1` due outbox rows no other relay holds,
/// oldest first, deletes them and returns them with their events. The ids
/// go through an array, so that the deletion and the join look them up by
/// index: written as `id IN (SELECT ...)`, PostgreSQL hashed the whole
/// outbox and the whole events table for every batch.
pub const CLAIM_SQL: &str = concat!(
    "WITH claimed AS (DELETE FROM outbox WHERE id = ANY(ARRAY(",
    "SELECT id FROM outbox WHERE not_before IS NULL OR not_before <= now() ",
    "ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)) ",
    "RETURNING id, event_id, attempts, created_at) ",
    "SELECT c.id, e.id, e.type, e.key, e.payload::text, ",
    rfc3339!("e.created_at"),
    ", extract(epoch FROM e.created_at)::bigint, c.attempts, ",
    "extract(epoch FROM c.created_at)::float8, e.attributes::text, e.traceparent, e.tracestate ",
    "FROM claimed c JOIN events e ON e.id = c.event_id ORDER BY c.id"
);

/// Claims up to `limit` outbox rows that no other relay holds, oldest
/// first, and deletes them in `tx`, in one statement ([`CLAIM_SQL`]):
/// committing `tx` after the broker's confirms is what removes them;
/// dropping it puts them back. A row whose event no longer exists is
/// deleted and not returned.
pub fn claim_outbox(tx: &mut Transaction<'_>, limit: i64) -> Result<Vec<OutboxRow>, Error> {
    let claim = tx.prepare_cached(CLAIM_SQL)?;
    let rows = tx.query(&claim, &[&limit])?;
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
            refusals: r.get(7),
            queued_epoch: r.get(8),
            attributes: r.get(9),
            traceparent: r.get(10),
            tracestate: r.get(11),
        })
        .collect())
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

/// Records that the broker refused (nacked) the messages of these claimed
/// rows, which the claim deleted: each is put back, to be tried again
/// after a backoff (100 ms doubling, at most 30 s), and after
/// [`MAX_BROKER_REFUSALS`] its event becomes `failed` with `reason` and
/// its row stays gone. Returns the events that failed.
pub fn refuse_outbox(
    tx: &mut Transaction<'_>,
    rows: &[&OutboxRow],
    reason: &str,
) -> Result<Vec<Uuid>, Error> {
    let (exhausted, again): (Vec<&OutboxRow>, Vec<&OutboxRow>) = rows
        .iter()
        .partition(|r| r.refusals + 1 >= MAX_BROKER_REFUSALS);
    if !again.is_empty() {
        let ids: Vec<i64> = again.iter().map(|r| r.outbox_id).collect();
        let events: Vec<Uuid> = again.iter().map(|r| r.event_id).collect();
        let refusals: Vec<i32> = again.iter().map(|r| r.refusals).collect();
        let queued: Vec<f64> = again.iter().map(|r| r.queued_epoch).collect();
        tx.execute(
            "INSERT INTO outbox (id, event_id, attempts, not_before, created_at) \
             SELECT id, event_id, attempts + 1, \
                    now() + make_interval(secs => least(30, 0.1 * 2 ^ attempts)), \
                    to_timestamp(queued) \
             FROM unnest($1::bigint[], $2::uuid[], $3::int[], $4::float8[]) \
                  AS r(id, event_id, attempts, queued)",
            &[&ids, &events, &refusals, &queued],
        )?;
    }
    let events: Vec<Uuid> = exhausted.iter().map(|r| r.event_id).collect();
    if !events.is_empty() {
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
