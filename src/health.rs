//! Liveness of the broker connections, shared between the threads that own
//! them and `/readyz`, and the workers' view of the database.
//!
//! Each component flips its own flag on connect and on loss; nothing else
//! writes here.

use std::sync::atomic::{AtomicBool, Ordering};

/// Connection state of the broker-facing components of this process.
#[derive(Debug, Default)]
pub struct Health {
    relay: Option<AtomicBool>,
    consumer: Option<AtomicBool>,
    database: AtomicBool,
}

impl Health {
    /// Tracks the components that run here; absent ones are not reported.
    pub fn new(relay: bool, consumer: bool) -> Health {
        Health {
            relay: relay.then(|| AtomicBool::new(false)),
            consumer: consumer.then(|| AtomicBool::new(false)),
            database: AtomicBool::new(true),
        }
    }

    /// Records whether the relay's broker connection is up.
    pub fn set_relay(&self, up: bool) {
        if let Some(flag) = &self.relay {
            flag.store(up, Ordering::Relaxed);
        }
    }

    /// Records whether the consumer's broker connection is up.
    pub fn set_consumer(&self, up: bool) {
        if let Some(flag) = &self.consumer {
            flag.store(up, Ordering::Relaxed);
        }
    }

    /// Records whether the workers last reached the database; returns the
    /// previous state so that only a change is logged.
    pub fn set_database(&self, up: bool) -> bool {
        self.database.swap(up, Ordering::Relaxed)
    }

    /// `(name, up)` for each broker connection this process runs.
    pub fn broker_checks(&self) -> Vec<(&'static str, bool)> {
        let mut out = Vec::new();
        if let Some(flag) = &self.relay {
            out.push(("broker_relay", flag.load(Ordering::Relaxed)));
        }
        if let Some(flag) = &self.consumer {
            out.push(("broker_consumer", flag.load(Ordering::Relaxed)));
        }
        out
    }
}
