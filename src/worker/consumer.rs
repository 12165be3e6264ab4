//! The consumer thread: owns the AMQP channel, feeds workers, acks results.
//!
//! One thread holds the broker connection (amiquip channels are not shared
//! between threads), hands each delivery to the worker pool over a bounded
//! channel and acknowledges only when a worker reports that its transaction
//! committed. It reconnects by itself with capped backoff. It does not touch
//! the database; the workers do.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{ConsumerMessage, ConsumerOptions};
use crossbeam_channel::{Receiver, Sender, after, bounded, never, select, unbounded};
use log::{info, warn};

use crate::backoff::Backoff;
use crate::broker::{self, AmqpUrl, ConfirmChannel, Message, Nodes, Topology};
use crate::lifecycle::{self, Stop};
use crate::ops::health::Health;
use crate::worker::{self, Done, Job, Outcome, Worker};

/// What the consumer needs to run.
pub struct Consumer {
    /// Broker address: one node, or the nodes of a cluster.
    pub url: AmqpUrl,
    /// Queue and exchange names.
    pub topology: Topology,
    /// `basic.qos` prefetch count.
    pub prefetch: u16,
    /// Worker threads to start.
    pub workers: usize,
    /// Most deliveries handed to a worker at once.
    pub batch: usize,
    /// TCP and handshake timeout.
    pub connect_timeout: Duration,
    /// What each worker thread runs with.
    pub worker: Worker,
    /// How long to wait for the confirm of a retry copy.
    pub confirm_timeout: Duration,
    /// Where the connection state is published.
    pub health: Arc<Health>,
}

/// What the consumer's loop acts on; see [`Consumer::next_event`].
enum Event {
    /// Deliveries, up to one batch, and the reason consumption ended right
    /// after them, if it did.
    Deliveries(Vec<amiquip::Delivery>, Option<String>),
    /// Consumption ended: the channel closed or the consumer was cancelled.
    Ended(String),
    /// A worker's results.
    Done(Done),
    /// Every worker thread is gone.
    WorkersGone,
    /// Deliveries held through a database outage are due back in the queue.
    RequeueDue,
    /// The stop was given.
    Stop,
}

/// One session's bookkeeping.
struct State {
    /// Deliveries handed to workers and not yet settled.
    in_flight: usize,
    /// The stop was given: no more deliveries are taken.
    stopping: bool,
    /// Deliveries the workers could not process because the database was
    /// unreachable. They go back to the queue only after a backoff, not at
    /// once: requeued at once they came straight back, ran into the same
    /// outage and spun (and, on quorum queues, used up their delivery limit
    /// within seconds). Held meanwhile, they fill the prefetch window, so
    /// the broker stops sending more until they are requeued.
    held: Held,
    /// Delivery tags handed out and not yet acked, rejected or requeued.
    unsettled: Unsettled,
}

enum SessionEnd {
    /// Asked to stop; everything dispatched was settled.
    Stopped,
}

impl Consumer {
    /// Consumes until `stop` disconnects, then lets workers finish and ack
    /// what they hold and returns once all worker threads have exited.
    pub fn run(self, stop: Stop) {
        let (job_tx, job_rx) = bounded::<Job>(self.workers);
        let (done_tx, done_rx) = unbounded::<Done>();
        let workers: Vec<_> = (0..self.workers)
            .map(|i| {
                let (jobs, done) = (job_rx.clone(), done_tx.clone());
                let worker = self.worker.clone();
                lifecycle::spawn(&format!("worker-{i}"), move || {
                    worker::run(worker, jobs, done)
                })
            })
            .collect();
        drop((job_rx, done_tx));

        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut nodes = Nodes::new(self.url.clone());
        let mut generation = 0u64;
        loop {
            generation += 1;
            match self.session(&mut nodes, generation, &job_tx, &done_rx, &stop) {
                Ok(SessionEnd::Stopped) => break,
                Err(e) => {
                    // One log line per state change, not one per retry.
                    if self.connected() {
                        backoff.reset();
                        warn!("consumer: broker connection lost, reconnecting: {e}");
                    } else if backoff.failures() == 0 {
                        warn!("consumer: cannot reach the broker, retrying: {e}");
                    }
                    self.health.set_consumer(false);
                    if stop.wait(backoff.next_delay()) {
                        break;
                    }
                }
            }
        }
        self.health.set_consumer(false);
        drop(job_tx);
        for w in workers {
            let _ = w.join();
        }
        info!("consumer: stopped");
    }

    fn connected(&self) -> bool {
        self.health
            .broker_checks()
            .iter()
            .any(|(name, up)| *name == "broker_consumer" && *up)
    }

    fn session(
        &self,
        nodes: &mut Nodes,
        generation: u64,
        jobs: &Sender<Job>,
        done: &Receiver<Done>,
        stop: &Stop,
    ) -> Result<SessionEnd, broker::Error> {
        let mut connection = nodes.connect(self.connect_timeout)?;
        let node = nodes.current().cloned().expect("a node just answered");
        self.topology.declare(&mut connection)?;
        let channel = connection.open_channel(None)?;
        // Retry copies go out on their own confirm channel, so that a copy
        // is safely in its delay queue before the original is acked.
        let mut retries = ConfirmChannel::open(&mut connection)?;
        channel.qos(0, self.prefetch, false)?;
        let queue = channel.queue_declare_passive(&*self.topology.queue)?;
        let consumer = queue.consume(ConsumerOptions::default())?;
        self.health.set_consumer(true);
        self.health.set_consumer_node(node.to_string());
        self.worker.metrics.broker_connects.inc();
        info!(
            "consumer: connected to {} queue {}",
            self.url.redacted_at(&node),
            self.topology.queue
        );

        let mut state = State {
            in_flight: 0,
            stopping: false,
            held: Held::default(),
            unsettled: Unsettled::default(),
        };
        while !(state.stopping && state.in_flight == 0) {
            match self.next_event(&consumer, &state, done, stop) {
                Event::Deliveries(batch, ended) => {
                    state.in_flight += batch.len();
                    state.unsettled.dispatched(&batch);
                    self.worker.metrics.deliveries.add(batch.len() as u64);
                    // Blocks while every worker is busy; prefetch bounds
                    // what waits behind it in the broker's buffer.
                    if jobs
                        .send(Job {
                            generation,
                            deliveries: batch,
                        })
                        .is_err()
                    {
                        return Err(broker::Error::Closed);
                    }
                    if let Some(reason) = ended {
                        warn!("consumer: consumption ended: {reason}");
                        return Err(broker::Error::Closed);
                    }
                }
                Event::Ended(reason) => {
                    warn!("consumer: consumption ended: {reason}");
                    return Err(broker::Error::Closed);
                }
                // Results from an earlier connection: their tags are void
                // here, and the broker has redelivered them.
                Event::Done(d) if d.generation != generation => {}
                Event::Done(d) => {
                    state.in_flight -= d.results.len();
                    self.settle(&consumer, &mut retries, d.results, &mut state)?;
                }
                Event::WorkersGone => return Err(broker::Error::Closed),
                Event::RequeueDue => state.held.requeue(&consumer, &mut state.unsettled)?,
                Event::Stop => {
                    state.stopping = true;
                    state.held.requeue(&consumer, &mut state.unsettled)?;
                    // Deliveries prefetched but not dispatched go back to the
                    // queue when the channel closes.
                    let _ = consumer.cancel();
                }
            }
        }
        state.held.requeue(&consumer, &mut state.unsettled)?;
        drop(consumer);
        retries.close();
        let _ = channel.close();
        let _ = connection.close();
        Ok(SessionEnd::Stopped)
    }

    /// Waits for the next thing to act on: the loop's one `select!`. Once
    /// stopping, only workers' results are waited for.
    fn next_event(
        &self,
        consumer: &amiquip::Consumer<'_>,
        state: &State,
        done: &Receiver<Done>,
        stop: &Stop,
    ) -> Event {
        let requeue = state.held.timer();
        let deliveries = if state.stopping {
            never()
        } else {
            consumer.receiver().clone()
        };
        let stop = if state.stopping {
            never()
        } else {
            stop.receiver().clone()
        };
        select! {
            recv(deliveries) -> msg => match msg {
                Ok(ConsumerMessage::Delivery(delivery)) => {
                    // Take what else is already here, up to one batch: an
                    // idle pipeline dispatches at once, a busy one in
                    // batches.
                    let mut batch = vec![delivery];
                    while batch.len() < self.batch {
                        match consumer.receiver().try_recv() {
                            Ok(ConsumerMessage::Delivery(d)) => batch.push(d),
                            Ok(other) => return Event::Deliveries(batch, Some(format!("{other:?}"))),
                            Err(_) => break,
                        }
                    }
                    Event::Deliveries(batch, None)
                }
                Ok(other) => Event::Ended(format!("{other:?}")),
                Err(_) => Event::Ended("the channel closed".into()),
            },
            recv(done) -> msg => msg.map_or(Event::WorkersGone, Event::Done),
            recv(requeue) -> _ => Event::RequeueDue,
            recv(stop) -> _ => Event::Stop,
        }
    }

    /// Tells the broker what became of a worker's deliveries. Retry copies
    /// are published per delay queue and confirmed together, and only then
    /// are their originals acked. Acks go out together, as one `multiple`
    /// ack where they cover every earlier unsettled delivery.
    fn settle(
        &self,
        consumer: &amiquip::Consumer<'_>,
        retries: &mut ConfirmChannel,
        results: Vec<(amiquip::Delivery, Outcome)>,
        state: &mut State,
    ) -> Result<(), broker::Error> {
        let mut copies: BTreeMap<usize, Vec<(amiquip::Delivery, Message)>> = BTreeMap::new();
        let mut acks = Vec::with_capacity(results.len());
        for (delivery, outcome) in results {
            if !matches!(outcome, Outcome::Requeue) {
                // The database answered for this one.
                state.held.backoff.reset();
            }
            match outcome {
                Outcome::Ack => acks.push(delivery),
                Outcome::Reject => {
                    state.unsettled.settled(delivery.delivery_tag());
                    consumer.reject(delivery, false)?;
                    self.worker.metrics.dead_lettered.inc();
                }
                Outcome::Requeue => state.held.hold(delivery),
                Outcome::Retry { step, attempt } => {
                    let copy = Message::retry(&delivery.properties, &delivery.body, attempt);
                    copies.entry(step).or_default().push((delivery, copy));
                }
            }
        }
        for (step, group) in copies {
            let messages: Vec<Message> = group.iter().map(|(_, m)| m.clone()).collect();
            let queue = self.topology.delay_queue(step);
            retries.publish_confirmed("", &queue, &messages, self.confirm_timeout)?;
            self.worker.metrics.retries.add(group.len() as u64);
            // Acked as soon as their copies are safe, so that a later group
            // failing does not send these back for a second copy.
            let originals = group.into_iter().map(|(delivery, _)| delivery).collect();
            state.unsettled.ack(consumer, originals)?;
        }
        state.unsettled.ack(consumer, acks)
    }
}

/// The delivery tags of this channel that are not settled yet, so that one
/// `multiple` ack can stand for a run of acks without covering a delivery
/// that another worker still holds or that waits to be requeued.
#[derive(Default)]
struct Unsettled(BTreeSet<u64>);

impl Unsettled {
    fn dispatched(&mut self, batch: &[amiquip::Delivery]) {
        self.0
            .extend(batch.iter().map(amiquip::Delivery::delivery_tag));
    }

    fn settled(&mut self, tag: u64) {
        self.0.remove(&tag);
    }

    /// Acks `deliveries`: the longest run of them that starts at the oldest
    /// unsettled delivery with one `multiple` ack, the rest one by one.
    fn ack(
        &mut self,
        consumer: &amiquip::Consumer<'_>,
        mut deliveries: Vec<amiquip::Delivery>,
    ) -> Result<(), broker::Error> {
        deliveries.sort_by_key(amiquip::Delivery::delivery_tag);
        let tags: Vec<u64> = deliveries.iter().map(|d| d.delivery_tag()).collect();
        let run = leading_run(&self.0, &tags);
        for tag in &tags {
            self.0.remove(tag);
        }
        let mut rest = deliveries.into_iter();
        if run > 1 {
            // The last of the run acks it all; the others need no frame.
            let last = rest.nth(run - 1).expect("the run is within the acks");
            consumer.ack_multiple(last)?;
        }
        for delivery in rest {
            consumer.ack(delivery)?;
        }
        Ok(())
    }
}

/// How many of `acks` (sorted) are the oldest tags of `unsettled` in a row:
/// a `multiple` ack of the last of them settles exactly those.
fn leading_run(unsettled: &BTreeSet<u64>, acks: &[u64]) -> usize {
    unsettled
        .iter()
        .zip(acks)
        .take_while(|(pending, ack)| pending == ack)
        .count()
}

/// Deliveries waiting to be requeued, and when.
struct Held {
    deliveries: Vec<amiquip::Delivery>,
    at: Option<Instant>,
    /// From 100 ms, doubling to 5 s while the database stays unreachable.
    backoff: Backoff,
}

impl Default for Held {
    fn default() -> Held {
        Held {
            deliveries: Vec::new(),
            at: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        }
    }
}

impl Held {
    fn hold(&mut self, delivery: amiquip::Delivery) {
        self.deliveries.push(delivery);
        if self.at.is_none() {
            self.at = Some(Instant::now() + self.backoff.next_delay());
        }
    }

    /// Fires when the held deliveries are due.
    fn timer(&self) -> Receiver<Instant> {
        match self.at {
            Some(at) => after(at.saturating_duration_since(Instant::now())),
            None => never(),
        }
    }

    /// Requeues every held delivery now.
    fn requeue(
        &mut self,
        consumer: &amiquip::Consumer<'_>,
        unsettled: &mut Unsettled,
    ) -> Result<(), broker::Error> {
        self.at = None;
        for delivery in self.deliveries.drain(..) {
            unsettled.settled(delivery.delivery_tag());
            consumer.nack(delivery, true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn a_multiple_ack_covers_only_the_oldest_unsettled_tags_in_a_row() {
        // Everything outstanding is acked: one frame for all.
        assert_eq!(leading_run(&set(&[1, 2, 3]), &[1, 2, 3]), 3);
        // Tag 2 is still held by another worker: the run stops before it.
        assert_eq!(leading_run(&set(&[1, 2, 3, 4]), &[1, 3, 4]), 1);
        // The oldest unsettled delivery is not among the acks: no run.
        assert_eq!(leading_run(&set(&[5, 6, 7]), &[6, 7]), 0);
        // Settled tags below are gone from the set and do not matter.
        assert_eq!(leading_run(&set(&[10, 11, 20]), &[10, 11]), 2);
        assert_eq!(leading_run(&set(&[]), &[]), 0);
    }
}
