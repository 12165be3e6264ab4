//! Group commit: many requests' events in one PostgreSQL transaction.
//!
//! Connection threads validate a request's events and hand them, with a
//! reply callback, to a committer thread over a bounded channel, and wait
//! only for the rendered answer to write.
//! A committer takes whatever is waiting (up to the batch limit, never
//! waiting for more), writes every event and outbox row in one transaction,
//! commits, and then runs each callback, which answers the request.
//! Committers take turns: one at a time takes requests and writes them,
//! and what arrives meanwhile waits for the next turn, to go in one
//! transaction (when they did not take turns, an idle committer took the
//! first request that arrived during a commit and wrote it nearly alone,
//! at the cost of a commit each time; BENCHMARKS.md, run 10). A full batch
//! passes the turn on before it is written, so that large requests are
//! written side by side. A `202` still means committed; the fsync is shared instead of paid per request.
//! Requests with client ids or an idempotency key must be checked against
//! earlier ones and may write nothing, so each gets a transaction of its own.
//! This module owns batching and the hand-off, not the SQL (`store`) nor the
//! HTTP answers (`http`).

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use log::{error, warn};

use crate::lifecycle;
use crate::ops::metrics::Metrics;
use crate::store::{NewEvent, Store, Submission, Wakeup, Written};

/// Why an event was not committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitError {
    /// The hand-off queue is full: the database is not keeping up.
    Busy,
    /// The database is unreachable or overloaded.
    Unavailable,
    /// The write failed for another reason (logged by the committer).
    Failed,
}

/// Called exactly once with the fate of a submission, on a committer
/// thread, or at once on the caller's thread when the queue is full.
pub type Reply = Box<dyn FnOnce(Result<Written, CommitError>) + Send>;

struct Pending {
    submission: Submission,
    reply: Reply,
}

/// How committers run.
#[derive(Clone)]
pub struct Settings {
    /// Committer threads.
    pub threads: usize,
    /// Most events in one transaction (a larger request still gets one).
    pub max_batch: usize,
    /// How long an idempotency key is remembered.
    pub key_ttl: Duration,
    /// Capacity of the hand-off queue; beyond it requests get 503 at once.
    pub queue: usize,
    /// How each commit wakes the relays.
    pub wakeup: Wakeup,
    /// Where batch sizes are counted.
    pub metrics: Arc<Metrics>,
}

/// The API's handle on the committers. Dropping every clone stops them
/// once they have written what was already handed over.
#[derive(Clone)]
pub struct Committer {
    queue: Sender<Pending>,
}

impl Committer {
    /// Starts the committer threads.
    pub fn start(store: Store, settings: Settings) -> (Committer, Vec<JoinHandle<()>>) {
        let (tx, rx) = bounded(settings.queue);
        let turn = Arc::new(Mutex::new(()));
        let threads = (0..settings.threads)
            .map(|i| {
                let (rx, store) = (rx.clone(), store.clone());
                let (settings, turn) = (settings.clone(), turn.clone());
                lifecycle::spawn(&format!("commit-{i}"), move || {
                    run(rx, store, &settings, &turn)
                })
            })
            .collect();
        (Committer { queue: tx }, threads)
    }

    /// Hands one request's events to the committers without waiting;
    /// `reply` learns their fate once committed (or not).
    pub fn submit(&self, submission: Submission, reply: Reply) {
        match self.queue.try_send(Pending { submission, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(p)) => deliver(p.reply, Err(CommitError::Busy)),
            Err(TrySendError::Disconnected(p)) => deliver(p.reply, Err(CommitError::Unavailable)),
        }
    }
}

/// Commits until every [`Committer`] is dropped. A committer holds `turn`
/// while it takes requests and, unless they fill a batch, while it writes
/// the plain ones. Requests with an idempotency key each get a transaction
/// of their own, written after the turn is passed on, so committers write
/// those side by side.
fn run(queue: Receiver<Pending>, store: Store, settings: &Settings, turn: &Mutex<()>) {
    loop {
        let mut my_turn = Some(turn.lock().unwrap_or_else(PoisonError::into_inner));
        let Ok(first) = queue.recv() else { break };
        let mut events = first.submission.events.len();
        let mut batch = vec![first];
        // Take what is already waiting, without waiting for more: light
        // traffic gets batches of one and no added latency.
        while events < settings.max_batch {
            match queue.try_recv() {
                Ok(p) => {
                    events += p.submission.events.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        if events >= settings.max_batch {
            // A full batch: nothing is gained by making the next requests
            // wait for it, and large requests are written side by side.
            my_turn = None;
        }
        let (idempotent, plain): (Vec<Pending>, Vec<Pending>) = batch
            .into_iter()
            .partition(|p| p.submission.is_idempotent());
        // A bug must not take a committer down with it: the requests it held
        // are answered 500 as their replies are dropped, and the thread
        // goes on with the next batch.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            if !plain.is_empty() {
                commit(&store, plain, settings);
            }
            drop(my_turn);
            for p in idempotent {
                commit_idempotent(&store, p, settings);
            }
        }));
        if outcome.is_err() {
            error!("commit: a batch panicked; its requests were answered 500");
        }
    }
}

fn commit_idempotent(store: &Store, p: Pending, settings: &Settings) {
    settings.metrics.commit_batch_size.observe(1.0);
    let result = store.insert_idempotent(&p.submission, settings.key_ttl, &settings.wakeup);
    let result = match result {
        Ok(written) => {
            if let Written::Stored { created, .. } = &written {
                let n = created.iter().filter(|c| **c).count();
                settings.metrics.events_committed.add(n as u64);
                let replayed = created.len() - n;
                settings.metrics.events_replayed.add(replayed as u64);
            }
            Ok(written)
        }
        Err(e) if e.is_unavailable() || e.is_statement_timeout() => {
            warn!("commit: database unavailable: {e}");
            Err(CommitError::Unavailable)
        }
        Err(e) => {
            error!("commit: idempotent request refused: {e}");
            Err(CommitError::Failed)
        }
    };
    deliver(p.reply, result);
}

fn commit(store: &Store, batch: Vec<Pending>, settings: &Settings) {
    settings
        .metrics
        .commit_batch_size
        .observe(batch.len() as f64);
    let events: Vec<&NewEvent> = batch.iter().flat_map(|p| &p.submission.events).collect();
    match store.insert_events(&events, &settings.wakeup) {
        Ok(()) => {
            settings.metrics.events_committed.add(events.len() as u64);
            for p in batch {
                let ids = p.submission.events.iter().map(|e| e.id).collect();
                let created = vec![true; p.submission.events.len()];
                deliver(p.reply, Ok(Written::Stored { ids, created }));
            }
        }
        Err(e) if e.is_unavailable() => {
            warn!("commit: database unavailable: {e}");
            answer(batch, Err(CommitError::Unavailable));
        }
        // Too slow, not wrong: one by one, each would wait as long again.
        Err(e) if e.is_statement_timeout() => {
            warn!("commit: batch of {} timed out: {e}", batch.len());
            answer(batch, Err(CommitError::Unavailable));
        }
        Err(e) if batch.len() > 1 => {
            // Something in the batch was refused. Validation should have
            // caught it; write one by one so neighbours do not share its fate.
            warn!(
                "commit: batch of {} failed, retrying one by one: {e}",
                batch.len()
            );
            for p in batch {
                commit(store, vec![p], settings);
            }
        }
        Err(e) => {
            error!(
                "commit: request with event {} refused: {e}",
                batch[0].submission.events[0].id
            );
            answer(batch, Err(CommitError::Failed));
        }
    }
}

fn answer(batch: Vec<Pending>, result: Result<Written, CommitError>) {
    for p in batch {
        deliver(p.reply, result.clone());
    }
}

/// Runs one request's reply on its own: a panic in it (a bug in building
/// one answer) is logged and goes no further, so the replies after it in
/// the same batch, whose events are committed too, are still delivered.
fn deliver(reply: Reply, result: Result<Written, CommitError>) {
    if panic::catch_unwind(AssertUnwindSafe(|| reply(result))).is_err() {
        error!("commit: a reply panicked; the other requests of its batch are answered");
    }
}
