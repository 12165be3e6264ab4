//! The small policies every thread of the service shares: how it is
//! spawned, how it learns to stop, how a signal becomes a message, and how
//! a run of failures is logged once rather than once per retry.

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// The receiving end of the stop signal. Every background thread holds a
/// clone; dropping the one [`Sender`] (see [`Stop::new`]) stops them all at
/// once, since a disconnected channel is seen by every receiver.
#[derive(Debug, Clone)]
pub struct Stop(Receiver<()>);

impl Stop {
    /// A stop signal and the sender whose drop gives it.
    pub fn new() -> (Sender<()>, Stop) {
        let (tx, rx) = bounded(0);
        (tx, Stop(rx))
    }

    /// True once the stop has been given; never waits.
    pub fn is_given(&self) -> bool {
        !matches!(self.0.try_recv(), Err(TryRecvError::Empty))
    }

    /// Waits `pause`, or less if the stop comes first; true when it came.
    pub fn wait(&self, pause: Duration) -> bool {
        !matches!(self.0.recv_timeout(pause), Err(RecvTimeoutError::Timeout))
    }

    /// The channel itself, for a `select!` over several sources.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.0
    }
}

/// A run of failures of one repeated task (a reconnect, a sweep), so that
/// an outage is logged when it starts and when it ends, not at every retry.
#[derive(Debug, Default)]
pub struct Failures {
    failing: bool,
}

impl Failures {
    /// Records a failure; true for the first of a run, which is the one to
    /// log.
    pub fn first(&mut self) -> bool {
        !std::mem::replace(&mut self.failing, true)
    }

    /// Records a success; true when it ends a run of failures.
    pub fn ended(&mut self) -> bool {
        std::mem::replace(&mut self.failing, false)
    }

    /// Whether the last attempt failed.
    pub fn failing(&self) -> bool {
        self.failing
    }
}

/// Spawns a named thread. A thread that cannot be spawned at start-up is a
/// resource the process cannot run without.
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot spawn thread {name}: {e}"))
}

/// Polls `done` until it holds (true) or `deadline` passes (false).
pub fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
    true
}

/// Joins threads until `deadline`; returns the names of those still
/// running then.
pub fn join_until(threads: Vec<JoinHandle<()>>, deadline: Instant) -> Vec<String> {
    let mut late = Vec::new();
    for t in threads {
        if wait_until(deadline, || t.is_finished()) {
            let _ = t.join();
        } else {
            late.push(t.thread().name().unwrap_or("?").to_string());
        }
    }
    late
}

/// A receiver that yields the name of each SIGTERM or SIGINT received,
/// from one dedicated thread.
pub fn signals() -> std::io::Result<Receiver<&'static str>> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let (tx, rx) = bounded(4);
    spawn("signals", move || {
        for signal in signals.forever() {
            let name = if signal == SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            if tx.send(name).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failures_is_reported_once_at_each_end() {
        let mut failures = Failures::default();
        assert!(!failures.ended(), "no run to end yet");
        assert!(failures.first());
        assert!(!failures.first());
        assert!(failures.failing());
        assert!(failures.ended());
        assert!(!failures.ended());
        assert!(failures.first(), "a new run logs again");
    }

    #[test]
    fn dropping_the_sender_stops_every_clone_at_once() {
        let (tx, stop) = Stop::new();
        let other = stop.clone();
        assert!(!stop.is_given());
        assert!(!stop.wait(Duration::from_millis(1)));
        drop(tx);
        assert!(stop.is_given() && other.is_given());
        let started = Instant::now();
        assert!(other.wait(Duration::from_secs(60)));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "no wait once given"
        );
    }
}
