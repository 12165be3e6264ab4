//! Liveness of the broker connections, shared between the threads that own
//! them and `/readyz`, and the workers' view of the database.
//!
//! Each component sets its own state on connect, on loss and when the broker
//! blocks it; nothing else writes here.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// The state of one broker connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Not connected.
    Down,
    /// Connected and working.
    Up,
    /// Connected, but the broker refuses to take messages for now
    /// (`connection.blocked`: a memory or disk alarm).
    Blocked,
}

impl Link {
    /// `"down"`, `"up"` or `"blocked"`, as `/readyz` and the status page say.
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Down => "down",
            Link::Up => "up",
            Link::Blocked => "blocked",
        }
    }

    fn from_u8(v: u8) -> Link {
        match v {
            1 => Link::Up,
            2 => Link::Blocked,
            _ => Link::Down,
        }
    }
}

/// Connection state of the broker-facing components of this process.
#[derive(Debug, Default)]
pub struct Health {
    relay: Option<AtomicU8>,
    consumer: Option<AtomicU8>,
    database: AtomicBool,
}

impl Health {
    /// Tracks the components that run here; absent ones are not reported.
    pub fn new(relay: bool, consumer: bool) -> Health {
        Health {
            relay: relay.then(|| AtomicU8::new(Link::Down as u8)),
            consumer: consumer.then(|| AtomicU8::new(Link::Down as u8)),
            database: AtomicBool::new(true),
        }
    }

    /// Records whether the relay's broker connection is up.
    pub fn set_relay(&self, up: bool) {
        self.set_relay_link(if up { Link::Up } else { Link::Down });
    }

    /// Records the state of the relay's broker connection.
    pub fn set_relay_link(&self, link: Link) {
        if let Some(state) = &self.relay {
            state.store(link as u8, Ordering::Relaxed);
        }
    }

    /// Records whether the consumer's broker connection is up.
    pub fn set_consumer(&self, up: bool) {
        if let Some(state) = &self.consumer {
            let link = if up { Link::Up } else { Link::Down };
            state.store(link as u8, Ordering::Relaxed);
        }
    }

    /// Records whether the workers last reached the database; returns the
    /// previous state so that only a change is logged.
    pub fn set_database(&self, up: bool) -> bool {
        self.database.swap(up, Ordering::Relaxed)
    }

    /// `(name, state)` for each broker connection this process runs.
    pub fn broker_links(&self) -> Vec<(&'static str, Link)> {
        let mut out = Vec::new();
        if let Some(state) = &self.relay {
            out.push(("broker_relay", Link::from_u8(state.load(Ordering::Relaxed))));
        }
        if let Some(state) = &self.consumer {
            out.push((
                "broker_consumer",
                Link::from_u8(state.load(Ordering::Relaxed)),
            ));
        }
        out
    }

    /// `(name, up)` for each broker connection this process runs; a blocked
    /// connection is not up.
    pub fn broker_checks(&self) -> Vec<(&'static str, bool)> {
        self.broker_links()
            .into_iter()
            .map(|(name, link)| (name, link == Link::Up))
            .collect()
    }

    /// True if the relay's connection is blocked by the broker.
    pub fn relay_blocked(&self) -> bool {
        self.broker_links()
            .iter()
            .any(|(name, link)| *name == "broker_relay" && *link == Link::Blocked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_relay_is_reported_blocked_and_not_up() {
        let health = Health::new(true, false);
        assert_eq!(health.broker_links(), vec![("broker_relay", Link::Down)]);
        health.set_relay(true);
        assert_eq!(health.broker_checks(), vec![("broker_relay", true)]);
        health.set_relay_link(Link::Blocked);
        assert_eq!(health.broker_links(), vec![("broker_relay", Link::Blocked)]);
        assert_eq!(health.broker_checks(), vec![("broker_relay", false)]);
        assert!(health.relay_blocked());
        assert_eq!(Link::Blocked.as_str(), "blocked");
    }
}
