//! Retention: deletes processed events older than `INGEST_RETENTION` (off
//! by default) and idempotency keys older than `INGEST_IDEMPOTENCY_TTL`.
//!
//! Runs beside the relay, deleting in small batches with `SKIP LOCKED` so
//! that it never holds many row locks nor blocks the pipeline, and so that
//! several processes may run it at once.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use log::{info, warn};

use crate::store::{self, Store};

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;

/// How old rows may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ages {
    /// Processed events; `None` keeps them for ever.
    pub events: Option<Duration>,
    /// Idempotency keys.
    pub idempotency_keys: Duration,
}

/// Deletes expired rows until `stop` disconnects.
pub fn run(store: Store, ages: Ages, stop: Receiver<()>) {
    let shortest = ages
        .events
        .map_or(ages.idempotency_keys, |e| e.min(ages.idempotency_keys));
    let every = (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut failing = false;
    loop {
        if let Some(age) = ages.events {
            let deleted = sweep(&stop, &mut failing, "processed events", || {
                store.delete_expired(age, BATCH)
            });
            match deleted {
                None => return,
                Some(0) => {}
                Some(n) => info!("retention: deleted {n} processed events older than {age:?}"),
            }
        }
        let age = ages.idempotency_keys;
        if sweep(&stop, &mut failing, "idempotency keys", || {
            store.purge_idempotency_keys(age, BATCH)
        })
        .is_none()
        {
            return;
        }
        match stop.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// Deletes batches until one comes back short; returns the total, or
/// `None` when asked to stop. The first of a run of failures is logged.
fn sweep(
    stop: &Receiver<()>,
    failing: &mut bool,
    what: &str,
    mut delete: impl FnMut() -> Result<u64, store::Error>,
) -> Option<u64> {
    let mut total = 0;
    loop {
        match delete() {
            Ok(n) => {
                *failing = false;
                total += n;
                if n < BATCH as u64 {
                    return Some(total);
                }
            }
            Err(e) => {
                if !*failing {
                    warn!("retention: cannot delete expired {what}: {e}");
                    *failing = true;
                }
                return Some(total);
            }
        }
        // Between batches, give way to a shutdown.
        if !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
            return None;
        }
    }
}
