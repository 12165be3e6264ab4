//! Group commit: many requests' events in one PostgreSQL transaction.
//!
//! HTTP threads validate an event and hand it, with a reply callback, to a
//! committer thread over a bounded channel; they do not wait. A committer
//! takes whatever is waiting (up to the batch limit, never waiting for more),
//! writes every event and outbox row in one transaction, commits, and then
//! runs each callback, which answers the request. A `202` still means
//! committed; the fsync is shared instead of paid per request. This module owns batching and the hand-off, not the SQL
//! (`store`) nor the HTTP answers (`http`).

use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::metrics::Metrics;
use crate::store::{NewEvent, Store};
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use log::{error, warn};

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

/// Called exactly once with the fate of a submitted event, on a committer
/// thread, or at once on the caller's thread when the queue is full.
pub type Reply = Box<dyn FnOnce(Result<(), CommitError>) + Send>;

struct Pending {
    event: NewEvent,
    reply: Reply,
}

/// How committers run.
#[derive(Clone)]
pub struct Settings {
    /// Committer threads.
    pub threads: usize,
    /// Most events in one transaction.
    pub max_batch: usize,
    /// Capacity of the hand-off queue; beyond it requests get 503 at once.
    pub queue: usize,
    /// `NOTIFY` relays in other processes after each commit.
    pub notify: bool,
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
    /// Starts the committer threads; `wake` is signalled after each commit.
    pub fn start(
        store: Store,
        settings: Settings,
        wake: Option<Sender<()>>,
    ) -> (Committer, Vec<JoinHandle<()>>) {
        let (tx, rx) = bounded(settings.queue);
        let threads = (0..settings.threads)
            .map(|i| {
                let (rx, store, wake) = (rx.clone(), store.clone(), wake.clone());
                let settings = settings.clone();
                thread::Builder::new()
                    .name(format!("commit-{i}"))
                    .spawn(move || run(rx, store, &settings, wake))
                    .expect("spawn committer thread")
            })
            .collect();
        (Committer { queue: tx }, threads)
    }

    /// Hands one event to the committers without waiting; `reply` learns
    /// its fate once it is committed (or could not be).
    pub fn submit(&self, event: NewEvent, reply: Reply) {
        match self.queue.try_send(Pending { event, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(p)) => (p.reply)(Err(CommitError::Busy)),
            Err(TrySendError::Disconnected(p)) => (p.reply)(Err(CommitError::Unavailable)),
        }
    }
}

fn run(queue: Receiver<Pending>, store: Store, settings: &Settings, wake: Option<Sender<()>>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        // Take what is already waiting, without waiting for more: light
        // traffic gets batches of one and no added latency.
        while batch.len() < settings.max_batch {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        settings
            .metrics
            .commit_batch_size
            .observe(batch.len() as f64);
        commit(&store, batch, settings);
        if let Some(wake) = &wake {
            let _ = wake.try_send(());
        }
    }
}

fn commit(store: &Store, batch: Vec<Pending>, settings: &Settings) {
    let events: Vec<&NewEvent> = batch.iter().map(|p| &p.event).collect();
    match store.insert_events(&events, settings.notify) {
        Ok(()) => {
            settings.metrics.events_committed.add(batch.len() as u64);
            answer(batch, Ok(()));
        }
        Err(e) if e.is_unavailable() => {
            warn!("commit: database unavailable: {e}");
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
            error!("commit: event {} refused: {e}", batch[0].event.id);
            answer(batch, Err(CommitError::Failed));
        }
    }
}

fn answer(batch: Vec<Pending>, result: Result<(), CommitError>) {
    for p in batch {
        (p.reply)(result);
    }
}
