//! The relay: moves outbox rows to the broker (Transactional Outbox).
//!
//! In one transaction it claims a batch of outbox rows with
//! `FOR UPDATE SKIP LOCKED`, deleting them in the same statement, publishes
//! them as persistent messages, waits for the broker's confirms and only then
//! commits. Any failure rolls the transaction back, so the rows stay for the
//! next try; a crash between publish and commit causes a redelivery, which
//! workers skip. While a full batch waits for its confirms, the next one is
//! claimed and published in a second transaction on a second connection, so
//! that the database's work overlaps the broker's; batches commit in order,
//! each after its own confirms, and a batch that fails rolls back with the
//! batch launched behind it.
//! A message the broker refuses (a nack) fails only its own row, which is
//! tried again with backoff and after a few refusals fails its event; a
//! broker that blocks publishers (an alarm) is waited out, the rows staying
//! in the outbox. Only the relay publishes to the broker.

pub mod retention;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amiquip::ConnectionBlockedNotification;
use crossbeam_channel::{Receiver, Sender, TryRecvError, never, select};
use log::{debug, info, warn};
use postgres::fallible_iterator::FallibleIterator;

use crate::backoff::Backoff;
use crate::broker::{self, AmqpUrl, Message, Nodes, Publisher, Topology};
use crate::lifecycle::{Failures, Stop};
use crate::message;
use crate::ops::health::{Health, Link};
use crate::ops::metrics::Metrics;
use crate::store::{self, Store};
use crate::trace::Subject;

/// What the relay needs to run.
pub struct Relay {
    /// Where the outbox lives.
    pub store: Store,
    /// Broker address: one node, or the nodes of a cluster.
    pub url: AmqpUrl,
    /// Exchange and queue names.
    pub topology: Topology,
    /// Rows per transaction.
    pub batch: usize,
    /// Poll interval when nothing wakes the relay.
    pub poll: Duration,
    /// How long to wait for a batch's confirms.
    pub confirm_timeout: Duration,
    /// An event published this long after it was accepted restarts its
    /// idle clock for the lost-message sweeper (half `INGEST_REDELIVER_AFTER`).
    pub late_after: Duration,
    /// TCP and handshake timeout.
    pub connect_timeout: Duration,
    /// How messages are built (`INGEST_MESSAGE_FORMAT`).
    pub messages: message::Settings,
    /// Where the connection state is published.
    pub health: Arc<Health>,
    /// Where publishes are counted.
    pub metrics: Arc<Metrics>,
}

/// Why one relay pass failed.
#[derive(Debug)]
pub enum Error {
    /// The outbox could not be read or updated; the broker may be fine.
    Store(store::Error),
    /// Publishing failed; the connection must be replaced.
    Broker(broker::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Store(e) => e.fmt(f),
            Error::Broker(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Store(e) => Some(e),
            Error::Broker(e) => Some(e),
        }
    }
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Error {
        Error::Store(e)
    }
}

impl From<broker::Error> for Error {
    fn from(e: broker::Error) -> Error {
        Error::Broker(e)
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        Error::Store(e.into())
    }
}

impl Relay {
    /// Relays until `stop` disconnects. The batches under way (at most
    /// two) are finished first.
    pub fn run(self, wake: Receiver<()>, stop: Stop) {
        let mut wake = wake;
        let mut nodes = Nodes::new(self.url.clone());
        let mut publisher: Option<Publisher> = None;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut failing = false;
        let mut blocked = Blocked::default();
        while !stop.is_given() {
            // A broker that blocks publishers (a memory or disk alarm) would
            // only make a batch wait for its confirms in vain: rows stay in
            // the outbox until it takes messages again.
            if let Some(p) = &publisher {
                match blocked.update(p.blocked_notifications(), &self.health, &self.metrics) {
                    Change::Closed => {
                        publisher = None;
                        blocked = Blocked::default();
                        self.metrics.broker_blocked.set(0);
                        self.health.set_relay(false);
                        continue;
                    }
                    Change::Unblocked if blocked.spent => {
                        // The batch that met the alarm left the channel in
                        // an unknown state: reconnect now that it is over.
                        publisher = None;
                        blocked = Blocked::default();
                        self.health.set_relay(false);
                        continue;
                    }
                    _ if blocked.reason.is_some() => {
                        let notifications = p.blocked_notifications().clone();
                        select! {
                            recv(stop.receiver()) -> _ => break,
                            // Kept for `update`, which acts on it.
                            recv(notifications) -> note => blocked.pending = note.ok(),
                            default(self.poll) => {},
                        }
                        continue;
                    }
                    _ => {}
                }
            }
            let result = match publisher.as_mut() {
                Some(p) => self.relay_once(p, &stop),
                None => match self.open(&mut nodes) {
                    Ok((p, node)) => {
                        info!("relay: connected to {}", self.url.redacted_at(&node));
                        self.metrics.broker_connects.inc();
                        self.health.set_relay(true);
                        self.health.set_relay_node(node.to_string());
                        publisher = Some(p);
                        continue;
                    }
                    Err(e) => Err(Error::Broker(e)),
                },
            };
            let pause = match result {
                Ok(pass) => {
                    if failing {
                        info!("relay: recovered");
                        failing = false;
                    }
                    backoff.reset();
                    if pass.full {
                        // A full batch: more rows are probably waiting.
                        continue;
                    }
                    self.poll
                }
                Err(e) => {
                    if let Error::Broker(_) = e {
                        // A confirm that timed out because the broker
                        // blocked us: wait for it to unblock, then
                        // reconnect; otherwise reconnect now.
                        if let Some(p) = &publisher {
                            blocked.update(p.blocked_notifications(), &self.health, &self.metrics);
                        }
                        if blocked.reason.is_some() {
                            blocked.spent = true;
                            continue;
                        }
                        publisher = None;
                        self.health.set_relay(false);
                    }
                    // One log line per state change, not one per retry.
                    if !failing {
                        warn!("relay: {e}; retrying with backoff");
                        failing = true;
                    }
                    backoff.next_delay()
                }
            };
            let stop_now = select! {
                recv(stop.receiver()) -> _ => true,
                recv(wake) -> msg => {
                    if msg.is_err() {
                        // The API side is gone; keep polling.
                        wake = never();
                    }
                    false
                },
                default(pause) => false,
            };
            if stop_now {
                break;
            }
        }
        if let Some(p) = publisher {
            p.close();
        }
        self.health.set_relay(false);
        info!("relay: stopped");
    }

    /// Connects to the next node that answers, declares the topology and
    /// opens the confirm channel; returns the node with the publisher.
    fn open(&self, nodes: &mut Nodes) -> Result<(Publisher, broker::Node), broker::Error> {
        let connection = nodes.connect(self.connect_timeout)?;
        let node = nodes.current().cloned().expect("a node just answered");
        Ok((Publisher::on(connection, &self.topology)?, node))
    }

    /// One pass: claim, publish, wait for the confirms, commit, for as
    /// long as batches come full (and `stop` is not given, and the broker
    /// does not block the connection). While the broker confirms one
    /// batch, the next is claimed and published in a second transaction,
    /// on a second pooled connection when the pool has one to spare, so
    /// that the database's work overlaps the confirm wait. Each batch
    /// commits only after its own confirms, in claiming order; a batch that
    /// fails rolls back with the batch launched behind it (which is
    /// published, so its messages come again: workers skip them).
    pub fn relay_once(&self, publisher: &mut Publisher, stop: &Stop) -> Result<Pass, Error> {
        let mut first = self.store.conn()?;
        let Some((mut tx, mut flight)) = self.launch_on(publisher, &mut first)? else {
            // Nothing due.
            return Ok(Pass::default());
        };
        let mut second = None;
        let mut pass = Pass::default();
        loop {
            let next = self.overlap(publisher, stop, &flight, &mut second);
            self.land(publisher, tx, flight, &mut pass)?;
            let Some((next_tx, next_flight)) = next? else {
                return Ok(pass);
            };
            // The roles swap: the batch in flight is on the second
            // connection, the next one goes on the first.
            let next = if self.goes_on(publisher, stop, &next_flight) {
                self.launch_on(publisher, &mut first)
            } else {
                Ok(None)
            };
            self.land(publisher, next_tx, next_flight, &mut pass)?;
            let Some((again_tx, again_flight)) = next? else {
                return Ok(pass);
            };
            tx = again_tx;
            flight = again_flight;
        }
    }

    /// The next batch, claimed and published while `current` waits for its
    /// confirms, on the spare connection (taken from the pool the first
    /// time); `None` when `current` was not full or no connection is
    /// spare.
    fn overlap<'c>(
        &self,
        publisher: &mut Publisher,
        stop: &Stop,
        current: &Flight,
        spare: &'c mut Option<store::Conn>,
    ) -> Result<Option<(postgres::Transaction<'c>, Flight)>, Error> {
        if !self.goes_on(publisher, stop, current) {
            return Ok(None);
        }
        if spare.is_none() {
            *spare = self.store.spare_conn(SPARE_WAIT);
        }
        match spare {
            Some(conn) => self.launch_on(publisher, conn),
            None => Ok(None),
        }
    }

    /// A batch claimed and published in a new transaction on `conn`.
    fn launch_on<'c>(
        &self,
        publisher: &mut Publisher,
        conn: &'c mut store::Conn,
    ) -> Result<Option<(postgres::Transaction<'c>, Flight)>, Error> {
        let mut tx = conn.transaction()?;
        let flight = launch(
            &mut tx,
            publisher,
            self.batch,
            self.late_after,
            &self.messages,
        )?;
        Ok(flight.map(|flight| (tx, flight)))
    }

    /// Whether another batch follows `current` in this pass.
    fn goes_on(&self, publisher: &Publisher, stop: &Stop, current: &Flight) -> bool {
        current.rows.len() >= self.batch
            && !stop.is_given()
            && publisher.blocked_notifications().is_empty()
    }

    /// Waits for the confirms of `flight`, records what the broker refused
    /// and commits `tx`, which deletes the rows published; counts the batch
    /// and its rows in `pass`.
    fn land(
        &self,
        publisher: &mut Publisher,
        mut tx: postgres::Transaction<'_>,
        flight: Flight,
        pass: &mut Pass,
    ) -> Result<(), Error> {
        pass.batches += 1;
        pass.full = flight.rows.len() >= self.batch;
        let sent_at = flight.sent_at;
        let ids = land(&mut tx, publisher, flight, self.confirm_timeout)?;
        if !ids.is_empty() {
            self.metrics
                .confirm_seconds
                .observe_duration(sent_at.elapsed());
        }
        // The claim deleted the rows; the commit makes it so.
        tx.commit()?;
        self.metrics.published.add(ids.len() as u64);
        pass.relayed += ids.len();
        Ok(())
    }
}

/// How long the relay waits for a second pooled connection before it goes
/// on without overlapping batches.
const SPARE_WAIT: Duration = Duration::from_millis(50);

/// What one [`Relay::relay_once`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Rows relayed, over every batch of the pass.
    pub relayed: usize,
    /// Batches claimed in the pass.
    pub batches: usize,
    /// Whether the last batch claimed was full, so that more rows are
    /// probably waiting.
    pub full: bool,
}

/// A claimed batch whose messages were published and whose confirms have
/// not been awaited yet.
pub struct Flight {
    rows: Vec<store::outbox::OutboxRow>,
    /// Their messages, as published.
    messages: Vec<Message>,
    pending: broker::Pending,
    late_before: i64,
    /// When its messages were handed to the broker: its confirm deadline
    /// counts from then, so that a batch waiting behind another is not
    /// idle in its transaction for longer than `INGEST_CONFIRM_TIMEOUT`.
    sent_at: Instant,
}

/// Whether the broker blocks the relay's connection, from its
/// `connection.blocked` notifications.
#[derive(Default)]
struct Blocked {
    /// Why, while blocked.
    reason: Option<String>,
    /// A batch failed while blocked: reconnect once unblocked.
    spent: bool,
    /// A notification taken off the channel while waiting, not yet acted on.
    pending: Option<ConnectionBlockedNotification>,
}

/// What the notifications that arrived changed.
enum Change {
    /// Nothing that needs acting on.
    None,
    /// The broker takes messages again.
    Unblocked,
    /// The connection is gone.
    Closed,
}

impl Blocked {
    /// Takes the notifications that arrived.
    fn update(
        &mut self,
        notifications: &Receiver<ConnectionBlockedNotification>,
        health: &Health,
        metrics: &Metrics,
    ) -> Change {
        let mut change = Change::None;
        loop {
            let notification = match self.pending.take() {
                Some(notification) => notification,
                None => match notifications.try_recv() {
                    Ok(notification) => notification,
                    Err(TryRecvError::Empty) => return change,
                    Err(TryRecvError::Disconnected) => return Change::Closed,
                },
            };
            match notification {
                ConnectionBlockedNotification::Blocked(reason) => {
                    warn!(
                        "relay: the broker blocks publishing ({reason}); rows wait in the outbox"
                    );
                    health.set_relay_link(Link::Blocked);
                    metrics.broker_blocked.set(1);
                    self.reason = Some(reason);
                    change = Change::None;
                }
                ConnectionBlockedNotification::Unblocked => {
                    if self.reason.take().is_some() {
                        info!("relay: the broker takes messages again");
                    }
                    health.set_relay_link(Link::Up);
                    metrics.broker_blocked.set(0);
                    change = Change::Unblocked;
                }
            }
        }
    }
}

/// Claims up to `batch` rows inside `tx` (the claim deletes them) and
/// publishes them with confirms, putting back the rows whose messages the
/// broker refused; returns the outbox ids that were published. Committing
/// is the caller's job; dropping `tx` instead leaves every row for another
/// pass (which is what a crash at this point does).
pub fn publish_claimed(
    tx: &mut postgres::Transaction<'_>,
    publisher: &mut Publisher,
    batch: usize,
    confirm_timeout: Duration,
    late_after: Duration,
    messages: &message::Settings,
) -> Result<Vec<i64>, Error> {
    match launch(tx, publisher, batch, late_after, messages)? {
        Some(flight) => land(tx, publisher, flight, confirm_timeout),
        None => Ok(Vec::new()),
    }
}

/// The first half of [`publish_claimed`]: claims up to `batch` rows in
/// `tx` and publishes their messages without waiting for the confirms;
/// `None` when no row was due.
pub fn launch(
    tx: &mut postgres::Transaction<'_>,
    publisher: &mut Publisher,
    batch: usize,
    late_after: Duration,
    messages: &message::Settings,
) -> Result<Option<Flight>, Error> {
    let rows = store::outbox::claim_outbox(tx, batch as i64)?;
    if rows.is_empty() {
        return Ok(None);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Events accepted this long ago are published late (the outbox held
    // them through a broker outage): their idle clock restarts in `land`.
    let late_before = now.saturating_sub(late_after.as_secs()) as i64;
    let built: Vec<Message> = rows
        .iter()
        .map(|r| Message::for_event(r, now, messages))
        .collect();
    let pending = publisher.publish(&built)?;
    Ok(Some(Flight {
        rows,
        messages: built,
        pending,
        late_before,
        sent_at: Instant::now(),
    }))
}

/// The second half of [`publish_claimed`]: waits for the confirms of
/// `flight`, whose rows `tx` claimed, until `confirm_timeout` after its
/// publish, and puts back the rows whose messages the broker refused;
/// returns the outbox ids published.
pub fn land(
    tx: &mut postgres::Transaction<'_>,
    publisher: &mut Publisher,
    flight: Flight,
    confirm_timeout: Duration,
) -> Result<Vec<i64>, Error> {
    let Flight {
        rows,
        messages,
        pending,
        late_before,
        sent_at,
    } = flight;
    let left = (sent_at + confirm_timeout).saturating_duration_since(Instant::now());
    let taken = publisher.await_confirms(pending, &messages, left)?;
    let (mut published, mut late, mut refused) = (Vec::with_capacity(rows.len()), vec![], vec![]);
    for (row, taken) in rows.iter().zip(taken) {
        let event = row.event_id;
        if taken {
            debug!("{}: published", Subject(event, row.traceparent.as_deref()));
            published.push(row.outbox_id);
            if row.created_epoch < late_before {
                late.push(event);
            }
        } else {
            warn!(
                "{}: the broker refused its message; trying again later",
                Subject(event, row.traceparent.as_deref())
            );
            refused.push(row);
        }
    }
    if !late.is_empty() {
        store::outbox::touch_published(tx, &late)?;
    }
    if !refused.is_empty() {
        let failed = store::outbox::refuse_outbox(tx, &refused, BROKER_REFUSED)?;
        for id in failed {
            warn!(
                "event {id}: the broker refused its message {} times; the event failed",
                store::outbox::MAX_BROKER_REFUSALS
            );
        }
    }
    Ok(published)
}

/// The `last_error` of an event whose message the broker kept refusing.
const BROKER_REFUSED: &str = "the broker refused the event's message (a nack) too many times; \
                              see its max_message_size, queue length limits and alarms";

/// Forwards PostgreSQL `NOTIFY`s on the store's channel to `wake`, so a relay
/// wakes at once when an API in another process commits. Reconnects by itself
/// and returns when `stop` disconnects.
pub fn listen(store: Store, wake: Sender<()>, stop: Stop) {
    let channel = store.notify_channel();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let result = store.dedicated().and_then(|mut client| {
            client.batch_execute(&format!("LISTEN \"{channel}\""))?;
            backoff.reset();
            debug!("relay: listening on {channel}");
            loop {
                if stop.is_given() {
                    return Ok(());
                }
                let woke = client
                    .notifications()
                    .timeout_iter(Duration::from_millis(250))
                    .next()?
                    .is_some();
                if woke {
                    let _ = wake.try_send(());
                } else if client.is_closed() {
                    return Ok(());
                }
            }
        });
        if let Err(e) = result
            && backoff.failures() == 0
        {
            warn!("relay: LISTEN connection failed, falling back to polling until it returns: {e}");
        }
        if stop.wait(backoff.next_delay()) {
            return;
        }
    }
}

/// Re-sends pending events whose message the broker lost (no outbox row and
/// no attempt for `idle`), by putting them back in the outbox, until `stop`
/// disconnects. RabbitMQ moves a message from a delay queue back to the
/// events exchange at most once, and a quorum queue may dead-letter a
/// message requeued too often; the database, not the broker, decides that
/// an event is done.
pub fn resend_lost(store: Store, idle: Duration, stop: Stop) {
    let every = (idle / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut failures = Failures::default();
    loop {
        match store.resend_lost(idle, 1000) {
            Ok(n) => {
                if failures.ended() {
                    info!("relay: looking for lost events again");
                }
                if n > 0 {
                    warn!("relay: re-sent {n} pending events whose messages were lost");
                }
            }
            Err(e) if failures.first() => warn!("relay: cannot look for lost events: {e}"),
            Err(_) => {}
        }
        if stop.wait(every) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_relay_follows_the_brokers_notifications() {
        let health = Health::new(true, false);
        health.set_relay(true);
        let metrics = Metrics::default();
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut blocked = Blocked::default();
        assert!(matches!(
            blocked.update(&rx, &health, &metrics),
            Change::None
        ));
        tx.send(ConnectionBlockedNotification::Blocked(
            "low on memory".into(),
        ))
        .unwrap();
        assert!(matches!(
            blocked.update(&rx, &health, &metrics),
            Change::None
        ));
        assert_eq!(blocked.reason.as_deref(), Some("low on memory"));
        assert!(health.relay_blocked());
        assert_eq!(metrics.broker_blocked.get(), 1);
        // The wait takes the unblocking off the channel; update still acts
        // on it (it once was dropped there, and the relay stayed blocked).
        tx.send(ConnectionBlockedNotification::Unblocked).unwrap();
        blocked.pending = rx.recv().ok();
        assert!(matches!(
            blocked.update(&rx, &health, &metrics),
            Change::Unblocked
        ));
        assert_eq!(blocked.reason, None);
        assert!(!health.relay_blocked());
        assert_eq!(metrics.broker_blocked.get(), 0);
        drop(tx);
        assert!(matches!(
            blocked.update(&rx, &health, &metrics),
            Change::Closed
        ));
    }
}
