//! ingestd patch: a deadline shared by a connection and the read side of
//! its socket, so that a slow client cannot hold a connection's thread for
//! longer than the server allows.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When reads on a connection must be done by.
///
/// `ClientConnection` sets it while it waits for a request head or a body it
/// buffers; the read side of the socket checks it before every read and
/// shortens the socket's read timeout to match.
pub struct Deadline {
    state: Mutex<State>,
}

struct State {
    // reads fail with `TimedOut` from this instant on; `None` means no deadline
    at: Option<Instant>,

    // set once the connection is to close: reads fail from then on, for good
    closed: bool,
}

/// What a read may do now.
pub enum Remaining {
    /// No deadline is set.
    Unbounded,
    /// This long is left.
    Left(Instant, Duration),
    /// The deadline has passed.
    Expired,
    /// The connection is closing.
    Closed,
}

impl Deadline {
    pub fn new() -> Arc<Deadline> {
        Arc::new(Deadline {
            state: Mutex::new(State {
                at: None,
                closed: false,
            }),
        })
    }

    /// Reads must be done within `timeout` from now; `None` lifts the deadline.
    pub fn set(&self, timeout: Option<Duration>) {
        let at = timeout.map(|t| Instant::now().checked_add(t).unwrap_or_else(far_future));
        self.lock().at = at;
    }

    /// Like `set`, but only if no deadline is set now.
    pub fn set_if_unbounded(&self, timeout: Duration) {
        let mut state = self.lock();
        if state.at.is_none() {
            state.at = Some(Instant::now().checked_add(timeout).unwrap_or_else(far_future));
        }
    }

    /// Makes every later read fail, so that nothing more is taken from the
    /// client (not even an unread body being drained) before the connection
    /// closes.
    pub fn close(&self) {
        self.lock().closed = true;
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// True if a deadline is set and has passed, or the connection is closing.
    pub fn expired(&self) -> bool {
        match self.remaining() {
            Remaining::Expired | Remaining::Closed => true,
            _ => false,
        }
    }

    pub fn remaining(&self) -> Remaining {
        let state = self.lock();
        if state.closed {
            return Remaining::Closed;
        }
        match state.at {
            None => Remaining::Unbounded,
            Some(at) => {
                let now = Instant::now();
                if at <= now {
                    Remaining::Expired
                } else {
                    Remaining::Left(at, at - now)
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // the state is plain data, valid even if a holder panicked
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn far_future() -> Instant {
    // decades: far enough to mean "no deadline" for a connection
    Instant::now() + Duration::from_secs(1 << 30)
}
