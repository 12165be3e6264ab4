//! Workers: turn one delivery into one database transaction.
//!
//! A worker locks the event row, skips it if it was already processed (a
//! redelivery), otherwise runs the [`Processor`] inside the same transaction
//! and marks the event processed before committing. It reports an [`Outcome`]
//! back to the consumer thread, which alone talks to the broker; a worker never
//! acks, publishes or sleeps to retry.

use std::time::Duration;

use amiquip::Delivery;
use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, warn};
use postgres::Transaction;
use serde_json::Value;
use uuid::Uuid;

use crate::store::{self, Store};

/// Attempts after which a transient failure is given up and dead-lettered.
pub const MAX_ATTEMPTS: i32 = 5;

/// An event handed to a [`Processor`].
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's id.
    pub id: Uuid,
    /// The client's payload.
    pub payload: Value,
    /// This attempt's number, starting at 1.
    pub attempt: i32,
}

/// Why processing an event did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessError {
    /// Worth trying again later (a downstream timeout, a lock conflict).
    Transient(String),
    /// Can never succeed (invalid content); the event is failed at once.
    Permanent(String),
}

impl std::fmt::Display for ProcessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessError::Transient(m) => write!(f, "transient: {m}"),
            ProcessError::Permanent(m) => write!(f, "permanent: {m}"),
        }
    }
}

impl std::error::Error for ProcessError {}

/// The business logic run once per event.
///
/// It receives the worker's open transaction, so whatever it writes commits
/// atomically with the event's status change, or not at all.
pub trait Processor: Send + Sync {
    /// Handles one event; an error rolls back everything it wrote.
    fn process(&self, tx: &mut Transaction<'_>, event: &Event) -> Result<(), ProcessError>;
}

/// The binary's processor: records the event as processed, optionally after
/// simulated work (`INGEST_SIMULATED_WORK`) for load tests.
#[derive(Debug, Clone, Default)]
pub struct DefaultProcessor {
    /// Time spent per event.
    pub work: Duration,
}

impl Processor for DefaultProcessor {
    fn process(&self, _tx: &mut Transaction<'_>, _event: &Event) -> Result<(), ProcessError> {
        if !self.work.is_zero() {
            std::thread::sleep(self.work);
        }
        Ok(())
    }
}

/// What the consumer should tell the broker about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Processed now, or already processed before: acknowledge.
    Ack,
    /// Can never be processed: reject without requeue (dead-letter).
    Reject,
    /// Could not be handled now (database down, transient error): requeue.
    Requeue,
}

/// A delivery on its way to a worker. `generation` names the broker
/// connection it came from: delivery tags mean nothing on another connection.
#[derive(Debug)]
pub struct Job {
    /// The consumer connection's generation.
    pub generation: u64,
    /// The delivery itself.
    pub delivery: Delivery,
}

/// A handled delivery on its way back to the consumer.
#[derive(Debug)]
pub struct Done {
    /// Copied from the [`Job`].
    pub generation: u64,
    /// Copied from the [`Job`].
    pub delivery: Delivery,
    /// What to tell the broker.
    pub outcome: Outcome,
}

/// Runs jobs until the sending side disconnects.
pub fn run(jobs: Receiver<Job>, done: Sender<Done>, store: Store, processor: &dyn Processor) {
    for job in jobs {
        let outcome = handle(&store, processor, &job.delivery.body);
        let reply = Done {
            generation: job.generation,
            delivery: job.delivery,
            outcome,
        };
        if done.send(reply).is_err() {
            break;
        }
    }
}

/// Extracts the event id from a message body `{"id": "<uuid>", ...}`.
pub fn parse_message(body: &[u8]) -> Result<Uuid, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .ok_or("body has no string \"id\"")?;
    Uuid::parse_str(id).map_err(|e| format!("id {id:?} is not a UUID: {e}"))
}

/// Handles one message body and says what to do with the delivery.
pub fn handle(store: &Store, processor: &dyn Processor, body: &[u8]) -> Outcome {
    let id = match parse_message(body) {
        Ok(id) => id,
        Err(e) => {
            error!("poison message dead-lettered: {e}");
            return Outcome::Reject;
        }
    };
    match process(store, processor, id) {
        Ok(outcome) => outcome,
        Err(e) => {
            warn!("event {id}: requeued, the database failed: {e}");
            Outcome::Requeue
        }
    }
}

fn process(store: &Store, processor: &dyn Processor, id: Uuid) -> Result<Outcome, store::Error> {
    let mut conn = store.conn()?;
    let mut tx = conn.transaction()?;
    let event = match store::lock_event(&mut tx, id)? {
        Some(e) => e,
        None => {
            error!("event {id}: no such event, message dead-lettered");
            return Ok(Outcome::Reject);
        }
    };
    if event.status != "pending" {
        debug!(
            "event {id}: already {}, duplicate delivery skipped",
            event.status
        );
        return Ok(Outcome::Ack);
    }
    let attempt = event.attempts + 1;
    let input = Event {
        id,
        payload: event.payload,
        attempt,
    };
    match processor.process(&mut tx, &input) {
        Ok(()) => {
            store::mark_processed(&mut tx, id)?;
            tx.commit()?;
            debug!("event {id}: processed");
            Ok(Outcome::Ack)
        }
        Err(err) => {
            // Undo whatever the processor wrote, then record the attempt.
            tx.rollback()?;
            let give_up = match &err {
                ProcessError::Permanent(_) => true,
                ProcessError::Transient(_) => attempt >= MAX_ATTEMPTS,
            };
            let mut tx = conn.transaction()?;
            store::record_failure(&mut tx, id, &err.to_string(), give_up)?;
            tx.commit()?;
            if give_up {
                warn!("event {id}: failed after attempt {attempt}: {err}");
                Ok(Outcome::Reject)
            } else {
                warn!("event {id}: attempt {attempt} failed, will retry: {err}");
                Ok(Outcome::Requeue)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_message_ids() {
        let id = Uuid::new_v4();
        let body = format!(r#"{{"id":"{id}","payload":1}}"#);
        assert_eq!(parse_message(body.as_bytes()), Ok(id));
        assert!(parse_message(b"not json").is_err());
        assert!(parse_message(b"{}").is_err());
        assert!(parse_message(br#"{"id":"nope"}"#).is_err());
        assert!(parse_message(br#"{"id":7}"#).is_err());
    }
}
