//! Events as the workers and the API read and change them: lock a batch
//! for processing, mark it processed or record a failed attempt, read one
//! event, and send failed events back through the outbox.

use std::collections::HashMap;
use std::time::Duration;

use postgres::Transaction;
use serde_json::Value;
use uuid::Uuid;

use crate::store::rfc3339;
use crate::store::{Error, Store, Wakeup};

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
    /// A CloudEvent's context attributes; `None` for a plain event.
    pub attributes: Option<Value>,
    /// The W3C `traceparent` it was accepted with.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` it was accepted with.
    pub tracestate: Option<String>,
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
    /// A CloudEvent's context attributes; `None` for a plain event.
    pub attributes: Option<Value>,
    /// The W3C `traceparent` it was accepted with.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` it was accepted with.
    pub tracestate: Option<String>,
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

impl Store {
    /// Sends a failed event back through the outbox: it becomes `pending`
    /// with a fresh retry budget, in the same transaction as its outbox row.
    pub fn retry_event(&self, id: Uuid, wakeup: &Wakeup) -> Result<RetryResult, Error> {
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
        self.commit_waking(tx, wakeup, true)?;
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
        // Run as a command of its own: the relays are in other processes.
        self.commit_waking(tx, &Wakeup::Notify, n > 0)?;
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
                ", last_error, attributes, traceparent, tracestate FROM events WHERE id = $1"
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
            attributes: r.get(9),
            traceparent: r.get(10),
            tracestate: r.get(11),
        }))
    }
}

/// Locks the rows of several events, in id order so that concurrent
/// workers cannot deadlock; missing ids are absent from the map.
pub fn lock(tx: &mut Transaction<'_>, ids: &[Uuid]) -> Result<HashMap<Uuid, LockedEvent>, Error> {
    let lock = tx.prepare_cached(
        "SELECT id, status, attempts, payload, type, key, \
         extract(epoch FROM clock_timestamp() - created_at)::float8, \
         attributes, traceparent, tracestate \
         FROM events WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )?;
    let rows = tx.query(&lock, &[&ids])?;
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
                attributes: r.get(7),
                traceparent: r.get(8),
                tracestate: r.get(9),
            };
            (id, event)
        })
        .collect())
}

/// Marks locked events processed and counts the attempt.
pub fn mark_processed(tx: &mut Transaction<'_>, ids: &[Uuid]) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let processed = tx.prepare_cached(
        "UPDATE events SET status = 'processed', processed_at = now(), \
         attempts = attempts + 1, processed_count = processed_count + 1, last_error = NULL \
         WHERE id = ANY($1)",
    )?;
    tx.execute(&processed, &[&ids])?;
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

    #[test]
    fn error_texts_are_made_storable() {
        assert_eq!(storable_error("plain"), "plain");
        assert_eq!(storable_error("a\0b"), "a\u{fffd}b");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let stored = storable_error(&long);
        assert!(stored.len() <= MAX_ERROR_BYTES && stored.ends_with('…'));
    }
}
