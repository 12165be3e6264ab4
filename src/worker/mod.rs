//! Workers: turn one delivery into one database transaction.
//!
//! A worker locks the event row, skips it if it was already processed (a
//! redelivery), otherwise runs the [`Processor`] inside the same transaction
//! and marks the event processed before committing. It reports an [`Outcome`]
//! back to the consumer thread, which alone talks to the broker; a worker never
//! acks, publishes or sleeps to retry.

pub mod consumer;

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::Delivery;
use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};
use postgres::Transaction;
use serde_json::Value;
use uuid::Uuid;

use crate::message;
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::store::{self, Store, events};
use crate::trace::Subject;

/// An event handed to a [`Processor`].
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's id.
    pub id: Uuid,
    /// The client's payload, as stored. Its numbers are exact: serde_json
    /// keeps each as its text (`Number::as_str`), in PostgreSQL's plain
    /// decimal (`1e3` arrives as `1000`, `1.50` as `1.50`), and `as_f64`,
    /// `as_i64` or `as_u64` read it when it fits.
    pub payload: Value,
    /// The client's name for the kind of event.
    pub event_type: Option<String>,
    /// The client's key, for ordering or partitioning downstream.
    pub key: Option<String>,
    /// This attempt's number, starting at 1.
    pub attempt: i32,
    /// A CloudEvent's context attributes (`specversion`, `id`, `source`,
    /// `type` and any others it had, its trace context apart); `None` for
    /// an event ingested without CloudEvents. `data_base64: true` says the
    /// payload is a string holding its data in base64.
    pub attributes: Option<Value>,
    /// The W3C `traceparent` the event was accepted with (the caller's, or
    /// one ingestd started); the same on every attempt.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that came with it, if any.
    pub tracestate: Option<String>,
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
/// atomically with the event's status change, or not at all. Several events
/// may share one transaction; when any of them fails, the transaction rolls
/// back and each event is run again on its own, so `process` can be called
/// more than once for an event, but only one call's effects ever commit.
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
    /// The database could not be reached: requeue for another try now.
    Requeue,
    /// A transient failure: republish to the delay queue of retry step
    /// `step` (0-based), then ack; the copy carries `attempt`, the number of
    /// the attempt it is for.
    Retry {
        /// Index into the retry schedule.
        step: usize,
        /// The number of the next attempt.
        attempt: i32,
    },
}

/// Deliveries on their way to a worker, handled in one transaction.
/// `generation` names the broker connection they came from: delivery tags
/// mean nothing on another connection.
#[derive(Debug)]
pub struct Job {
    /// The consumer connection's generation.
    pub generation: u64,
    /// The deliveries, in the order the broker sent them.
    pub deliveries: Vec<Delivery>,
}

/// Handled deliveries on their way back to the consumer.
#[derive(Debug)]
pub struct Done {
    /// Copied from the [`Job`].
    pub generation: u64,
    /// Each delivery with what to tell the broker about it.
    pub results: Vec<(Delivery, Outcome)>,
}

/// What a worker thread works with.
#[derive(Clone)]
pub struct Worker {
    /// Where events live.
    pub store: Store,
    /// The business logic.
    pub processor: Arc<dyn Processor>,
    /// Retries after the first attempt (the length of the retry schedule).
    pub retries: usize,
    /// Shared by the workers so that a database outage is logged once.
    pub health: Arc<Health>,
    /// Where processing is counted.
    pub metrics: Arc<Metrics>,
}

/// Runs jobs until the sending side disconnects.
pub fn run(worker: Worker, jobs: Receiver<Job>, done: Sender<Done>) {
    for job in jobs {
        let messages: Vec<(Result<Uuid, String>, i32)> = job
            .deliveries
            .iter()
            .map(|d| {
                let id = message::delivery_event_id(&d.properties, &d.body);
                (id, message::attempt(&d.properties).unwrap_or(1))
            })
            .collect();
        let outcomes = worker.handle_ids(messages);
        let reply = Done {
            generation: job.generation,
            results: job.deliveries.into_iter().zip(outcomes).collect(),
        };
        if done.send(reply).is_err() {
            break;
        }
    }
}

/// Why a batch could not be handled in one transaction.
enum BatchError {
    /// The database failed: requeue everything.
    Store(store::Error),
    /// The processor failed on an event: handle the batch one by one.
    Processor(ProcessError),
}

impl From<store::Error> for BatchError {
    fn from(e: store::Error) -> BatchError {
        BatchError::Store(e)
    }
}

impl From<postgres::Error> for BatchError {
    fn from(e: postgres::Error) -> BatchError {
        BatchError::Store(e.into())
    }
}

impl Worker {
    /// Handles first deliveries (attempt 1) of message bodies; see
    /// [`Worker::handle_messages`].
    pub fn handle_batch(&self, bodies: &[&[u8]]) -> Vec<Outcome> {
        let messages: Vec<(&[u8], i32)> = bodies.iter().map(|b| (*b, 1)).collect();
        self.handle_messages(&messages)
    }

    /// Handles message bodies, each with the attempt it is for, in one
    /// transaction when every event succeeds, and says what to do with each
    /// delivery.
    pub fn handle_messages(&self, messages: &[(&[u8], i32)]) -> Vec<Outcome> {
        let ids = messages
            .iter()
            .map(|(body, attempt)| (message::event_id(body), *attempt))
            .collect();
        self.handle_ids(ids)
    }

    /// Handles deliveries by event id (or the reason a message names none),
    /// each with the attempt it is for; see [`Worker::handle_messages`].
    pub fn handle_ids(&self, messages: Vec<(Result<Uuid, String>, i32)>) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Reject; messages.len()];
        let mut ids = Vec::with_capacity(messages.len());
        for (i, (id, attempt)) in messages.into_iter().enumerate() {
            match id {
                Ok(id) => ids.push((i, id, attempt)),
                Err(e) => error!("poison message dead-lettered: {e}"),
            }
        }
        if let [(i, id, attempt)] = ids[..] {
            outcomes[i] = self.handle(id, attempt);
            return outcomes;
        }
        match self.process_batch(&ids, &mut outcomes) {
            Ok(()) => self.database_up(),
            Err(BatchError::Store(e)) if e.is_unavailable() => {
                self.database_down(&e);
                for (i, _, _) in &ids {
                    outcomes[*i] = Outcome::Requeue;
                }
            }
            Err(BatchError::Store(_)) | Err(BatchError::Processor(_)) => {
                // The whole batch rolled back; redo it one event at a time so
                // that only the failing event takes the failure path.
                for (i, id, attempt) in &ids {
                    outcomes[*i] = self.handle(*id, *attempt);
                }
            }
        }
        outcomes
    }

    fn process_batch(
        &self,
        ids: &[(usize, Uuid, i32)],
        outcomes: &mut [Outcome],
    ) -> Result<(), BatchError> {
        let started = Instant::now();
        let mut conn = self.store.conn()?;
        let mut tx = conn.transaction()?;
        let unique: Vec<Uuid> = ids
            .iter()
            .map(|(_, id, _)| *id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut events = events::lock(&mut tx, &unique)?;
        let mut processed = Vec::with_capacity(ids.len());
        let mut seen = HashSet::with_capacity(ids.len());
        for &(i, id, attempt) in ids {
            let first_sight = seen.insert(id);
            outcomes[i] = match events.remove(&id) {
                // Removed on first sight, so a second copy of the same
                // message in this batch lands here.
                None if !first_sight => {
                    self.metrics.duplicates.inc();
                    Outcome::Ack
                }
                None => {
                    error!("event {id}: no such event, message dead-lettered");
                    Outcome::Reject
                }
                Some(event) if event.status != "pending" => {
                    debug!(
                        "{}: already {}, duplicate delivery skipped",
                        Subject(id, event.traceparent.as_deref()),
                        event.status
                    );
                    self.metrics.duplicates.inc();
                    Outcome::Ack
                }
                Some(event) if event.attempts >= attempt => self.reschedule(id, event.attempts),
                Some(event) => {
                    let input = Event {
                        id,
                        payload: event.payload,
                        event_type: event.event_type,
                        key: event.key,
                        attempt: event.attempts + 1,
                        attributes: event.attributes,
                        traceparent: event.traceparent,
                        tracestate: event.tracestate,
                    };
                    if let Err(e) = self.run_processor(&mut tx, &input) {
                        return Err(BatchError::Processor(e));
                    }
                    processed.push((id, event.age_seconds));
                    Outcome::Ack
                }
            };
        }
        let ids: Vec<Uuid> = processed.iter().map(|(id, _)| *id).collect();
        events::mark_processed(&mut tx, &ids)?;
        tx.commit()?;
        self.metrics.processed.add(processed.len() as u64);
        let took = started.elapsed().as_secs_f64();
        for (_, age) in &processed {
            self.metrics.ingest_to_processed_seconds.observe(age + took);
        }
        self.metrics
            .processing_seconds
            .observe_duration(started.elapsed());
        debug!("processed {} events in one transaction", processed.len());
        Ok(())
    }

    fn database_up(&self) {
        if !self.health.set_database(true) {
            info!("workers: database reachable again");
        }
    }

    fn database_down(&self, e: &store::Error) {
        // One line per outage, not one per requeued message.
        if self.health.set_database(false) {
            warn!("workers: database unavailable, requeueing deliveries: {e}");
        }
    }

    /// Handles one event, whose message is for `attempt`, alone: a batch
    /// of one, so that a failure is this event's only.
    pub fn handle(&self, id: Uuid, attempt: i32) -> Outcome {
        let mut outcome = [Outcome::Reject];
        match self.process_batch(&[(0, id, attempt)], &mut outcome) {
            Ok(()) => {
                self.database_up();
                let [outcome] = outcome;
                outcome
            }
            Err(BatchError::Store(e)) if e.is_unavailable() => {
                self.database_down(&e);
                debug!("event {id}: requeued: {e}");
                Outcome::Requeue
            }
            // Not an outage (a statement timeout, a constraint, a
            // transaction the processor left aborted): requeueing would
            // loop, so it counts as a failed attempt. What the processor
            // wrote was rolled back with the transaction.
            Err(BatchError::Store(e)) => {
                let err = ProcessError::Transient(format!("database error: {e}"));
                self.fail_attempt(id, attempt, &err)
            }
            Err(BatchError::Processor(err)) => self.fail_attempt(id, attempt, &err),
        }
    }

    /// The outcome for a message whose attempt already ran and was recorded
    /// (`attempts` finished): the original of a retry that came back
    /// because its delayed copy was never confirmed (the consumer's
    /// connection dropped, the confirm timed out). Running it now would
    /// start the next attempt before its delay, and count it; instead the
    /// delayed copy is scheduled again, for the attempt after those
    /// recorded.
    fn reschedule(&self, id: Uuid, attempts: i32) -> Outcome {
        let step = (attempts - 1).max(0) as usize;
        if step < self.retries {
            debug!("event {id}: attempt {attempts} already recorded; its retry is rescheduled");
            Outcome::Retry {
                step,
                attempt: attempts + 1,
            }
        } else {
            error!("event {id}: {attempts} attempts recorded but still pending, dead-lettered");
            Outcome::Reject
        }
    }

    /// Records a failed attempt in its own transaction and decides between
    /// a retry and the dead-letter queue.
    /// `message_attempt` is the attempt the delivery was for.
    fn fail_attempt(&self, id: Uuid, message_attempt: i32, err: &ProcessError) -> Outcome {
        let result = (|| -> Result<Outcome, store::Error> {
            let mut conn = self.store.conn()?;
            let mut tx = conn.transaction()?;
            let Some(event) = events::lock(&mut tx, &[id])?.remove(&id) else {
                return Ok(Outcome::Reject);
            };
            if event.status != "pending" {
                return Ok(Outcome::Ack);
            }
            let attempt = event.attempts + 1;
            let step = (attempt - 1) as usize;
            let subject = Subject(id, event.traceparent.as_deref());
            let retry = match err {
                ProcessError::Permanent(_) => None,
                ProcessError::Transient(_) => (step < self.retries).then_some(Outcome::Retry {
                    step,
                    attempt: attempt + 1,
                }),
            };
            events::record_failure(&mut tx, id, &err.to_string(), retry.is_none())?;
            tx.commit()?;
            Ok(match retry {
                Some(outcome) => {
                    warn!("{subject}: attempt {attempt} failed, will retry: {err}");
                    outcome
                }
                None => {
                    warn!("{subject}: failed after attempt {attempt}, dead-lettered: {err}");
                    Outcome::Reject
                }
            })
        })();
        match result {
            Ok(outcome) => outcome,
            Err(e) if e.is_unavailable() => {
                self.database_down(&e);
                Outcome::Requeue
            }
            // The event is still `pending`: dead-lettered, it would wait
            // for the sweeper (INGEST_REDELIVER_AFTER). Most often its row
            // is locked by a session whose client vanished mid-transaction,
            // until the server ends it (INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT).
            // The message goes through the longest delay queue and this
            // attempt runs again then, its number unchanged, so an error
            // that keeps coming back costs one try per delay, not a loop.
            Err(e) if self.retries > 0 => {
                warn!("event {id}: cannot record a failed attempt, trying it again later: {e}");
                Outcome::Retry {
                    step: self.retries - 1,
                    attempt: message_attempt,
                }
            }
            Err(e) => {
                error!("event {id}: cannot record a failed attempt, dead-lettered: {e}");
                Outcome::Reject
            }
        }
    }

    /// Runs the processor; a panic counts as a transient failure, so a
    /// payload that crashes business logic takes the retry path and cannot
    /// kill the worker thread.
    fn run_processor(&self, tx: &mut Transaction<'_>, event: &Event) -> Result<(), ProcessError> {
        catch_unwind(AssertUnwindSafe(|| self.processor.process(tx, event))).unwrap_or_else(|_| {
            let subject = Subject(event.id, event.traceparent.as_deref());
            error!("{subject}: the processor panicked");
            Err(ProcessError::Transient("the processor panicked".into()))
        })
    }
}
