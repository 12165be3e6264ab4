//! Retention: deletes processed events older than `INGEST_RETENTION` (off
//! by default) and idempotency keys older than `INGEST_IDEMPOTENCY_TTL`.
//!
//! Runs beside the relay, deleting in small batches with `SKIP LOCKED` so
//! that it never holds many row locks nor blocks the pipeline, and so that
//! several processes may run it at once.

use std::time::Duration;

use log::{info, warn};

use crate::lifecycle::{Failures, Stop};
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
pub fn run(store: Store, ages: Ages, stop: Stop) {
    let shortest = ages
        .events
        .map_or(ages.idempotency_keys, |e| e.min(ages.idempotency_keys));
    let every = (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut failures = Failures::default();
    loop {
        if let Some(age) = ages.events {
            let deleted = sweep(&stop, &mut failures, "processed events", || {
                store.delete_expired(age, BATCH)
            });
            match deleted {
                None => return,
                Some(0) => {}
                Some(n) => info!("retention: deleted {n} processed events older than {age:?}"),
            }
        }
        let age = ages.idempotency_keys;
        if sweep(&stop, &mut failures, "idempotency keys", || {
            store.purge_idempotency_keys(age, BATCH)
        })
        .is_none()
        {
            return;
        }
        if stop.wait(every) {
            return;
        }
    }
}

/// Deletes batches until one comes back short; returns the total, or
/// `None` when asked to stop. The first of a run of failures is logged.
fn sweep(
    stop: &Stop,
    failures: &mut Failures,
    what: &str,
    mut delete: impl FnMut() -> Result<u64, store::Error>,
) -> Option<u64> {
    let mut total = 0;
    loop {
        match delete() {
            Ok(n) => {
                failures.ended();
                total += n;
                if n < BATCH as u64 {
                    return Some(total);
                }
            }
            Err(e) => {
                if failures.first() {
                    warn!("retention: cannot delete expired {what}: {e}");
                }
                return Some(total);
            }
        }
        // Between batches, give way to a shutdown.
        if stop.is_given() {
            return None;
        }
    }
}
