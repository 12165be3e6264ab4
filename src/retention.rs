//! Retention: deletes processed events older than `INGEST_RETENTION`.
//!
//! Off by default. Runs beside the relay, deleting in small batches with
//! `SKIP LOCKED` so that it never holds many row locks nor blocks the
//! pipeline, and so that several processes may run it at once.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{info, warn};

use crate::store::Store;

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;

/// Deletes expired events until `stop` disconnects.
pub fn run(store: Store, retention: Duration, stop: Receiver<()>) {
    let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut failing = false;
    loop {
        let mut total = 0;
        loop {
            match store.delete_expired(retention, BATCH) {
                Ok(n) => {
                    failing = false;
                    total += n;
                    if n < BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!("retention: cannot delete expired events: {e}");
                        failing = true;
                    }
                    break;
                }
            }
            // Between batches, give way to a shutdown.
            if !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
                return;
            }
        }
        if total > 0 {
            info!("retention: deleted {total} processed events older than {retention:?}");
        }
        match stop.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}
