//! Liveness of the broker connections, shared between the threads that own
//! them and `/readyz`, and the workers' view of the database.
//!
//! Each component sets its own state on connect, on loss and when the broker
//! blocks it, and the broker node its connection is on; nothing else writes
//! here.

use std::sync::Mutex;
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
    relay: Option<LinkState>,
    consumer: Option<LinkState>,
    database: AtomicBool,
}

/// One broker connection: its [`Link`] and the node it is on.
#[derive(Debug)]
struct LinkState {
    link: AtomicU8,
    /// `host:port` of the node while connected.
    node: Mutex<Option<String>>,
}

impl LinkState {
    fn new() -> LinkState {
        LinkState {
            link: AtomicU8::new(Link::Down as u8),
            node: Mutex::new(None),
        }
    }

    fn set(&self, link: Link) {
        self.link.store(link as u8, Ordering::Relaxed);
        if link == Link::Down {
            self.set_node(None);
        }
    }

    fn link(&self) -> Link {
        Link::from_u8(self.link.load(Ordering::Relaxed))
    }

    fn set_node(&self, node: Option<String>) {
        *self.node.lock().unwrap_or_else(|e| e.into_inner()) = node;
    }

    fn node(&self) -> Option<String> {
        self.node.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Health {
    /// Tracks the components that run here; absent ones are not reported.
    pub fn new(relay: bool, consumer: bool) -> Health {
        Health {
            relay: relay.then(LinkState::new),
            consumer: consumer.then(LinkState::new),
            database: AtomicBool::new(true),
        }
    }

    /// Records whether the relay's broker connection is up; down forgets
    /// its node.
    pub fn set_relay(&self, up: bool) {
        self.set_relay_link(if up { Link::Up } else { Link::Down });
    }

    /// Records the state of the relay's broker connection.
    pub fn set_relay_link(&self, link: Link) {
        if let Some(state) = &self.relay {
            state.set(link);
        }
    }

    /// Records the broker node (`host:port`) the relay is connected to.
    pub fn set_relay_node(&self, node: String) {
        if let Some(state) = &self.relay {
            state.set_node(Some(node));
        }
    }

    /// Records whether the consumer's broker connection is up; down
    /// forgets its node.
    pub fn set_consumer(&self, up: bool) {
        if let Some(state) = &self.consumer {
            state.set(if up { Link::Up } else { Link::Down });
        }
    }

    /// Records the broker node (`host:port`) the consumer is connected to.
    pub fn set_consumer_node(&self, node: String) {
        if let Some(state) = &self.consumer {
            state.set_node(Some(node));
        }
    }

    /// Records whether the workers last reached the database; returns the
    /// previous state so that only a change is logged.
    pub fn set_database(&self, up: bool) -> bool {
        self.database.swap(up, Ordering::Relaxed)
    }

    /// `(name, state)` for each broker connection this process runs.
    pub fn broker_links(&self) -> Vec<(&'static str, Link)> {
        self.links()
            .map(|(name, state)| (name, state.link()))
            .collect()
    }

    /// `(name, node)` for each broker connection this process runs: the
    /// `host:port` of the node it is connected to, none while it is down.
    pub fn broker_nodes(&self) -> Vec<(&'static str, Option<String>)> {
        self.links()
            .map(|(name, state)| (name, state.node()))
            .collect()
    }

    fn links(&self) -> impl Iterator<Item = (&'static str, &LinkState)> {
        [
            ("broker_relay", &self.relay),
            ("broker_consumer", &self.consumer),
        ]
        .into_iter()
        .filter_map(|(name, state)| state.as_ref().map(|s| (name, s)))
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

    #[test]
    fn a_link_names_its_node_until_it_goes_down() {
        let health = Health::new(true, true);
        assert_eq!(
            health.broker_nodes(),
            vec![("broker_relay", None), ("broker_consumer", None)]
        );
        health.set_relay(true);
        health.set_relay_node("h2:5673".into());
        health.set_consumer(true);
        health.set_consumer_node("h1:5672".into());
        health.set_relay_link(Link::Blocked);
        assert_eq!(
            health.broker_nodes(),
            vec![
                ("broker_relay", Some("h2:5673".into())),
                ("broker_consumer", Some("h1:5672".into()))
            ]
        );
        health.set_relay(false);
        assert_eq!(health.broker_nodes()[0], ("broker_relay", None));
        // Not run here: not reported.
        let relay_only = Health::new(true, false);
        relay_only.set_consumer_node("h1:5672".into());
        assert_eq!(relay_only.broker_nodes(), vec![("broker_relay", None)]);
    }
}
