//! The consumer thread: owns the AMQP channel, feeds workers, acks results.
//!
//! One thread holds the broker connection (amiquip channels are not shared
//! between threads), hands deliveries to the worker pool in batches over a
//! bounded channel and acknowledges only when a worker reports that its
//! transaction committed. A batch goes to a worker only when one is idle,
//! so that deliveries arriving while the workers are busy make the next
//! batch larger instead of queueing as small ones: each batch is one
//! transaction, and a commit costs the database about as much for one event
//! as for a hundred. It reconnects by itself with capped backoff. It does
//! not touch the database; the workers do.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
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
    /// How long a batch that is not full may wait for more deliveries
    /// while another worker is busy.
    pub linger: Duration,
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
    /// A batch that is not full has waited its linger.
    Lingered,
    /// Every worker thread is gone.
    WorkersGone,
    /// Deliveries held through a database outage are due back in the queue.
    RequeueDue,
    /// The stop was given.
    Stop,
}

/// The workers' job channel, and the jobs handed out on it (of any
/// connection) whose worker has not reported back yet.
struct Jobs {
    sender: Sender<Job>,
    out: usize,
}

/// One session's bookkeeping.
struct State {
    /// Deliveries handed to workers and not yet settled.
    in_flight: usize,
    /// Deliveries received and not yet handed to a worker.
    ready: Ready,
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
        let mut jobs = Jobs {
            sender: job_tx,
            out: 0,
        };
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
            match self.session(&mut nodes, generation, &mut jobs, &done_rx, &stop) {
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
        drop(jobs);
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
        jobs: &mut Jobs,
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
            ready: Ready::default(),
            stopping: false,
            held: Held::default(),
            // At most half the prefetch window waits on acks.
            unsettled: Unsettled::new(usize::from(self.prefetch) / 2),
        };
        while !(state.stopping && state.in_flight == 0) {
            match self.next_event(&consumer, &state, jobs, done, stop) {
                Event::Deliveries(batch, ended) => {
                    state.unsettled.received(&batch);
                    self.worker.metrics.deliveries.add(batch.len() as u64);
                    state.ready.add(batch);
                    self.dispatch(&mut state, generation, jobs)?;
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
                // here, and the broker has redelivered them; their worker is
                // free again.
                Event::Done(d) if d.generation != generation => {
                    jobs.out -= 1;
                    self.dispatch(&mut state, generation, jobs)?;
                }
                Event::Done(d) => {
                    jobs.out -= 1;
                    state.in_flight -= d.results.len();
                    self.settle(&consumer, &mut retries, d.results, &mut state)?;
                    self.dispatch(&mut state, generation, jobs)?;
                }
                Event::Lingered => self.dispatch(&mut state, generation, jobs)?,
                Event::WorkersGone => return Err(broker::Error::Closed),
                Event::RequeueDue => state.held.requeue(&consumer, &mut state.unsettled)?,
                Event::Stop => {
                    state.stopping = true;
                    state.held.requeue(&consumer, &mut state.unsettled)?;
                    // Deliveries prefetched or ready but not dispatched go
                    // back to the queue when the channel closes.
                    let _ = consumer.cancel();
                }
            }
        }
        state.held.requeue(&consumer, &mut state.unsettled)?;
        state.unsettled.ack_waiting(&consumer)?;
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
        jobs: &Jobs,
        done: &Receiver<Done>,
        stop: &Stop,
    ) -> Event {
        let requeue = state.held.timer();
        let linger = match state
            .ready
            .due_in(jobs.out, self.workers, self.batch, self.linger)
        {
            Some(wait) if !state.stopping => after(wait),
            _ => never(),
        };
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
            recv(linger) -> _ => Event::Lingered,
            recv(stop) -> _ => Event::Stop,
        }
    }

    /// Hands ready deliveries to idle workers, a batch each, while
    /// [`Ready::due_in`] says one is due now. The job channel holds one job
    /// per worker, and jobs of an earlier connection count until their
    /// worker reports back, so with fewer jobs out than workers this never
    /// blocks.
    fn dispatch(
        &self,
        state: &mut State,
        generation: u64,
        jobs: &mut Jobs,
    ) -> Result<(), broker::Error> {
        while !state.stopping
            && state
                .ready
                .due_in(jobs.out, self.workers, self.batch, self.linger)
                == Some(Duration::ZERO)
        {
            let deliveries = state.ready.take(self.batch);
            state.in_flight += deliveries.len();
            jobs.out += 1;
            let job = Job {
                generation,
                deliveries,
            };
            if jobs.sender.send(job).is_err() {
                return Err(broker::Error::Closed);
            }
        }
        Ok(())
    }

    /// Tells the broker what became of a worker's deliveries. Retry copies
    /// are published per delay queue and confirmed together, and only then
    /// are their originals acked. Acks go out as `multiple` acks, each once
    /// every older delivery is settled ([`Unsettled`]).
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
            // Acked as soon as their copies are safe, not left waiting for
            // older deliveries, so that a later group failing (which ends
            // the session) does not send these back for a second copy.
            let originals = group.into_iter().map(|(delivery, _)| delivery).collect();
            state.unsettled.ack_at_once(consumer, originals)?;
        }
        state.unsettled.ack(consumer, acks)
    }
}

/// The delivery tags of this channel that are not settled yet, and the
/// deliveries among them whose transaction committed but whose ack waits
/// for an older delivery to settle. Acks go out as one `multiple` ack of a
/// run that starts at the oldest unsettled delivery, so that workers
/// finishing out of order do not cost a frame (and a hand-off to amiquip's
/// I/O thread) per delivery, and a `multiple` ack never covers a delivery
/// another worker still holds or that waits to be requeued. Waiting acks
/// take room in the prefetch window, so once more than `limit` wait (an
/// older delivery is slow, or held through a database outage), they go one
/// by one: one slow event never stalls the deliveries behind it.
struct Unsettled {
    tags: BTreeSet<u64>,
    acks: BTreeMap<u64, amiquip::Delivery>,
    limit: usize,
}

impl Unsettled {
    /// Acks wait while at most `limit` of them do.
    fn new(limit: usize) -> Unsettled {
        Unsettled {
            tags: BTreeSet::new(),
            acks: BTreeMap::new(),
            limit,
        }
    }

    fn received(&mut self, batch: &[amiquip::Delivery]) {
        self.tags
            .extend(batch.iter().map(amiquip::Delivery::delivery_tag));
    }

    /// Rejected or requeued, by a frame of its own.
    fn settled(&mut self, tag: u64) {
        self.tags.remove(&tag);
    }

    /// Acks `deliveries`, whose transactions committed, as soon as the
    /// deliveries before them are settled; see [`Unsettled::flush`].
    fn ack(
        &mut self,
        consumer: &amiquip::Consumer<'_>,
        deliveries: Vec<amiquip::Delivery>,
    ) -> Result<(), broker::Error> {
        self.acks
            .extend(deliveries.into_iter().map(|d| (d.delivery_tag(), d)));
        self.flush(consumer)
    }

    /// Acks `deliveries` now: with the acks waiting before them where they
    /// make a run, the rest one by one.
    fn ack_at_once(
        &mut self,
        consumer: &amiquip::Consumer<'_>,
        deliveries: Vec<amiquip::Delivery>,
    ) -> Result<(), broker::Error> {
        let tags: Vec<u64> = deliveries.iter().map(|d| d.delivery_tag()).collect();
        self.acks
            .extend(deliveries.into_iter().map(|d| (d.delivery_tag(), d)));
        self.ack_run(consumer)?;
        self.ack_each(consumer, tags)
    }

    /// Sends the acks that are due: the run of waiting acks that starts at
    /// the oldest unsettled delivery, as one `multiple` ack of its last, and
    /// every other one too if more than the limit wait.
    fn flush(&mut self, consumer: &amiquip::Consumer<'_>) -> Result<(), broker::Error> {
        self.ack_run(consumer)?;
        if self.acks.len() > self.limit {
            self.ack_waiting(consumer)?;
        }
        Ok(())
    }

    /// Acks the run of waiting acks that starts at the oldest unsettled
    /// delivery, with one `multiple` ack of its last.
    fn ack_run(&mut self, consumer: &amiquip::Consumer<'_>) -> Result<(), broker::Error> {
        let run = leading_run(&self.tags, |tag| self.acks.contains_key(tag));
        if run == 0 {
            return Ok(());
        }
        let last = *self
            .tags
            .iter()
            .nth(run - 1)
            .expect("the run is within the tags");
        let rest = self.tags.split_off(&(last + 1));
        for tag in std::mem::replace(&mut self.tags, rest) {
            let delivery = self.acks.remove(&tag).expect("the run's acks wait");
            if tag == last {
                if run == 1 {
                    consumer.ack(delivery)?;
                } else {
                    consumer.ack_multiple(delivery)?;
                }
            }
        }
        Ok(())
    }

    /// Sends every ack still waiting: those a `multiple` ack can stand for
    /// with one, the others one by one (at the end of a session, before the
    /// channel closes; or when too many wait).
    fn ack_waiting(&mut self, consumer: &amiquip::Consumer<'_>) -> Result<(), broker::Error> {
        self.ack_run(consumer)?;
        let tags: Vec<u64> = self.acks.keys().copied().collect();
        self.ack_each(consumer, tags)
    }

    /// Acks, one frame each, those of `tags` whose ack still waits.
    fn ack_each(
        &mut self,
        consumer: &amiquip::Consumer<'_>,
        tags: Vec<u64>,
    ) -> Result<(), broker::Error> {
        for tag in tags {
            if let Some(delivery) = self.acks.remove(&tag) {
                self.tags.remove(&tag);
                consumer.ack(delivery)?;
            }
        }
        Ok(())
    }
}

/// How many of the oldest tags of `unsettled`, in a row, have their ack
/// waiting (`waits`): a `multiple` ack of the last of them settles exactly
/// those.
fn leading_run(unsettled: &BTreeSet<u64>, waits: impl Fn(&u64) -> bool) -> usize {
    unsettled.iter().take_while(|tag| waits(tag)).count()
}

/// Deliveries received and not yet handed to a worker, oldest first, and
/// since when the oldest of them waits.
#[derive(Default)]
struct Ready {
    deliveries: VecDeque<amiquip::Delivery>,
    since: Option<Instant>,
}

impl Ready {
    fn add(&mut self, batch: Vec<amiquip::Delivery>) {
        if self.deliveries.is_empty() {
            self.since = Some(Instant::now());
        }
        self.deliveries.extend(batch);
    }

    /// The oldest `batch` deliveries. Those left keep the oldest one's
    /// clock: they may go early, never late.
    fn take(&mut self, batch: usize) -> Vec<amiquip::Delivery> {
        let n = batch.min(self.deliveries.len());
        let taken = self.deliveries.drain(..n).collect();
        if self.deliveries.is_empty() {
            self.since = None;
        }
        taken
    }

    /// When the next batch is due: see [`batch_due_in`].
    fn due_in(
        &self,
        busy: usize,
        workers: usize,
        batch: usize,
        linger: Duration,
    ) -> Option<Duration> {
        let waited = self.since.map_or(Duration::ZERO, |t| t.elapsed());
        batch_due_in(self.deliveries.len(), waited, busy, workers, batch, linger)
    }
}

/// How long until a batch of `ready` deliveries, the oldest of which has
/// waited `waited`, goes to a worker; `None` while none can (nothing ready,
/// or every worker busy). A full batch goes at once, and so does any batch
/// when every worker is idle, so an idle pipeline adds no delay. While some
/// worker is busy, a batch that is not full waits up to `linger` for more.
fn batch_due_in(
    ready: usize,
    waited: Duration,
    busy: usize,
    workers: usize,
    batch: usize,
    linger: Duration,
) -> Option<Duration> {
    if ready == 0 || busy >= workers {
        None
    } else if ready >= batch || busy == 0 {
        Some(Duration::ZERO)
    } else {
        Some(linger.saturating_sub(waited))
    }
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
        // Acks that waited behind them are due now.
        unsettled.flush(consumer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn a_batch_goes_when_full_or_idle_and_otherwise_waits_its_linger() {
        let ms = Duration::from_millis;
        let due = |ready, waited, busy| batch_due_in(ready, ms(waited), busy, 4, 64, ms(5));
        // Nothing ready, or no worker free: nothing is due.
        assert_eq!(due(0, 0, 0), None);
        assert_eq!(due(64, 9, 4), None);
        // Every worker idle: even one delivery goes at once.
        assert_eq!(due(1, 0, 0), Some(Duration::ZERO));
        // A full batch goes at once to a free worker.
        assert_eq!(due(64, 0, 3), Some(Duration::ZERO));
        assert_eq!(due(200, 0, 1), Some(Duration::ZERO));
        // Some worker busy: a batch that is not full waits out its linger.
        assert_eq!(due(10, 0, 1), Some(ms(5)));
        assert_eq!(due(10, 3, 2), Some(ms(2)));
        assert_eq!(due(10, 7, 2), Some(Duration::ZERO));
    }

    #[test]
    fn a_multiple_ack_covers_only_the_oldest_unsettled_tags_in_a_row() {
        let run = |unsettled: &[u64], waiting: &[u64]| {
            let waiting = set(waiting);
            leading_run(&set(unsettled), |tag| waiting.contains(tag))
        };
        // Everything outstanding is acked: one frame for all.
        assert_eq!(run(&[1, 2, 3], &[1, 2, 3]), 3);
        // Tag 2 is still held by another worker: the run stops before it,
        // and the acks of 3 and 4 wait for it.
        assert_eq!(run(&[1, 2, 3, 4], &[1, 3, 4]), 1);
        // The oldest unsettled delivery is not among the acks: no run.
        assert_eq!(run(&[5, 6, 7], &[6, 7]), 0);
        // Settled tags below are gone from the set and do not matter.
        assert_eq!(run(&[10, 11, 20], &[10, 11]), 2);
        assert_eq!(run(&[], &[]), 0);
    }
}
