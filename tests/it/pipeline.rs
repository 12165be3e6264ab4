//! The data path end to end, and the exactly-once-in-effect guarantee
//! against duplicate deliveries.

use std::time::Duration;

use ingestd::Role;
use ingestd::broker::{AmqpUrl, Message, Publisher};
use ingestd::ops::health::Health;
use ingestd::ops::metrics::Metrics;
use ingestd::relay;
use ingestd::store::Store;
use ingestd::worker::{Outcome, Worker};
use serde_json::json;
use std::sync::Arc;
use uuid::Uuid;

use crate::ops::{metric, scrape};
use crate::util::{TestEnv, amqp_proxy, amqp_url, get, ingest, python3, wait_until};

#[test]
fn ingest_to_processed_end_to_end() {
    let env = TestEnv::new("e2e");
    let app = env.start();
    let addr = app.http_addr().unwrap();

    let ids: Vec<Uuid> = (0..100).map(|i| ingest(addr, &json!({ "n": i }))).collect();
    env.wait_processed(&ids, Duration::from_secs(20));

    for id in &ids {
        assert_eq!(env.runs(*id), 1, "event {id} processed once");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM outbox"),
        0,
        "outbox drained"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE attempts <> 1 OR processed_at IS NULL"),
        0
    );
    app.shutdown().unwrap();
}

/// With one worker and a prefetch of one, deliveries are handled in queue
/// order, so once an event ingested after the duplicates is processed, the
/// duplicates have been handled too.
fn serial_config(env: &TestEnv) -> ingestd::Config {
    env.config_with(&[("INGEST_WORKERS", "1"), ("INGEST_PREFETCH", "1")])
}

/// Copies of a message arrive while its event is still being processed
/// (another worker holds the event's row) and after it was processed; the
/// processor runs once, and every copy is acknowledged as a duplicate.
#[test]
fn a_message_delivered_twice_is_processed_once() {
    let env = TestEnv::new("dup");
    // Each delivery goes to a worker of its own, so that a copy meets the
    // original in the database rather than waiting behind it.
    let app = env.start_with(&[
        ("INGEST_WORKERS", "3"),
        ("INGEST_WORKER_BATCH", "1"),
        ("INGEST_PREFETCH", "8"),
    ]);
    let addr = app.http_addr().unwrap();
    let counter = |name: &str| metric(&scrape(addr), name).unwrap();

    let id = ingest(addr, &json!({ "hold": true }));
    wait_until(Duration::from_secs(10), "processing under way", || {
        env.processor.calls(id).len() == 1
    });
    // The broker delivers the same message again, twice, while the first
    // delivery is still being processed.
    let body = json!({ "id": id.to_string(), "payload": "once" }).to_string();
    env.publish_raw(body.as_bytes());
    env.publish_raw(body.as_bytes());
    wait_until(Duration::from_secs(10), "both copies delivered", || {
        counter("ingestd_deliveries_total") == 3.0
    });
    assert_eq!(
        env.status(id).as_deref(),
        Some("pending"),
        "the copies arrived while the event was pending"
    );
    env.processor.release();
    env.wait_processed(&[id], Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "both copies skipped", || {
        counter("ingestd_duplicates_skipped_total") == 2.0
    });

    // And twice more once it is processed.
    env.publish_raw(body.as_bytes());
    env.publish_raw(body.as_bytes());
    wait_until(Duration::from_secs(10), "the late copies skipped", || {
        counter("ingestd_duplicates_skipped_total") == 4.0
    });
    wait_until(Duration::from_secs(10), "queue drained", || {
        env.queue_depth(&env.topology().queue) == 0
    });

    assert_eq!(
        env.processor.calls(id).len(),
        1,
        "no copy reached the processor"
    );
    assert_eq!(env.runs(id), 1, "the duplicates were skipped");
    assert_eq!(env.status(id).as_deref(), Some("processed"));
    assert_eq!(counter("ingestd_events_processed_total"), 1.0);
    assert_eq!(env.queue_depth(&env.topology().dead_queue), 0);
    app.shutdown().unwrap();
}

/// The broker's count of unacknowledged deliveries on `queue`.
fn unacked(queue: &str) -> Option<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "messages_unacknowledged"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut fields = l.split_whitespace();
        (fields.next() == Some(queue)).then(|| fields.next()?.parse().ok())?
    })
}

/// Workers ack their deliveries with one `multiple` ack; acks of later
/// deliveries wait for an earlier one that another worker is still
/// processing, and such an ack must never settle that one: the broker keeps
/// it unacknowledged (and would redeliver it if the connection dropped)
/// until its own commit, and the channel never sees a tag acked twice.
#[test]
fn acks_of_later_deliveries_wait_for_one_still_in_progress_and_never_settle_it() {
    let env = TestEnv::new("multiack");
    // Up to 32 acks (half the window) may wait.
    let app = env.start_with(&[("INGEST_WORKERS", "2"), ("INGEST_PREFETCH", "64")]);
    let addr = app.http_addr().unwrap();
    let counter = |name: &str| metric(&scrape(addr), name).unwrap();
    let held = ingest(addr, &json!({ "hold": true }));
    wait_until(Duration::from_secs(10), "processing under way", || {
        env.processor.calls(held).len() == 1
    });
    let connects = counter("ingestd_broker_connects_total");
    let later: Vec<Uuid> = (0..30).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&later, Duration::from_secs(20));
    let queue = env.topology().queue;
    // Committed, and their acks wait behind the one in progress.
    assert_eq!(unacked(&queue), Some(31));
    assert_eq!(env.status(held).as_deref(), Some("pending"));

    env.processor.release();
    env.wait_processed(&[held], Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "every delivery acked", || {
        unacked(&queue) == Some(0)
    });
    assert_eq!(env.queue_depth(&queue), 0);
    assert_eq!(
        counter("ingestd_broker_connects_total"),
        connects,
        "no channel error made anything reconnect"
    );
    assert_eq!(counter("ingestd_duplicates_skipped_total"), 0.0);
    app.shutdown().unwrap();
}

/// One slow event does not stall those behind it: once more acks wait than
/// half the prefetch window, they go one by one, and the window keeps
/// admitting deliveries.
#[test]
fn a_slow_delivery_does_not_stall_the_acks_behind_it() {
    let env = TestEnv::new("slowhead");
    // A window of 16: at most 8 acks wait.
    let app = env.start_with(&[("INGEST_WORKERS", "2"), ("INGEST_PREFETCH", "16")]);
    let addr = app.http_addr().unwrap();
    let held = ingest(addr, &json!({ "hold": true }));
    wait_until(Duration::from_secs(10), "processing under way", || {
        env.processor.calls(held).len() == 1
    });
    // Far more than the window, all processed while the first is held.
    let later: Vec<Uuid> = (0..60).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&later, Duration::from_secs(20));
    let queue = env.topology().queue;
    // The last batch's acks leave once its worker reports back.
    wait_until(
        Duration::from_secs(10),
        "the held delivery and at most 8 waiting acks",
        || unacked(&queue).is_some_and(|n| (1..=9).contains(&n)),
    );
    assert_eq!(env.status(held).as_deref(), Some("pending"));
    env.processor.release();
    env.wait_processed(&[held], Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "every delivery acked", || {
        unacked(&queue) == Some(0)
    });
    assert_eq!(env.processed_twice(), 0);
    app.shutdown().unwrap();
}

/// Deliveries that arrive while every worker is busy wait and go to the
/// next free worker as one batch: one transaction for all of them, not one
/// each.
#[test]
fn deliveries_arriving_while_every_worker_is_busy_are_handled_in_one_transaction() {
    let env = TestEnv::new("gather");
    let app = env.start_with(&[("INGEST_WORKERS", "1")]);
    let addr = app.http_addr().unwrap();
    let counter = |name: &str| metric(&scrape(addr), name).unwrap();
    let held = ingest(addr, &json!({ "hold": true }));
    wait_until(Duration::from_secs(10), "processing under way", || {
        env.processor.calls(held).len() == 1
    });
    let later: Vec<Uuid> = (0..20).map(|i| ingest(addr, &json!(i))).collect();
    wait_until(Duration::from_secs(10), "all delivered", || {
        counter("ingestd_deliveries_total") == 21.0
    });
    env.processor.release();
    env.wait_processed(&later, Duration::from_secs(10));
    assert_eq!(env.transactions_of(&later), 1, "one for all twenty");
    app.shutdown().unwrap();
}

/// The worker commits, and the ack then never reaches the broker (its
/// connection vanished in between): the broker delivers the message again
/// and the worker skips it, so the event is processed once.
#[test]
fn an_ack_lost_after_the_commit_is_redelivered_and_skipped() {
    let env = TestEnv::new("lostack");
    let (proxy, url) = amqp_proxy("heartbeat=1");
    let app = env.start_with(&[("INGEST_AMQP_URL", &url)]);
    let addr = app.http_addr().unwrap();
    let counter = |name: &str| metric(&scrape(addr), name).unwrap();

    let id = ingest(addr, &json!({ "hold": true }));
    wait_until(Duration::from_secs(10), "processing under way", || {
        env.processor.calls(id).len() == 1
    });
    // From now on nothing the consumer sends reaches the broker: the ack
    // for the commit below is lost on its way.
    proxy.blackhole();
    env.processor.release();
    env.wait_processed(&[id], Duration::from_secs(10));
    wait_until(
        Duration::from_secs(20),
        "the consumer lost its broker",
        || get(addr, "/readyz").json()["checks"]["broker_consumer"] == "down",
    );
    assert_eq!(counter("ingestd_duplicates_skipped_total"), 0.0);

    proxy.up();
    wait_until(Duration::from_secs(30), "the redelivery skipped", || {
        counter("ingestd_duplicates_skipped_total") == 1.0
    });
    wait_until(Duration::from_secs(10), "queue drained", || {
        env.queue_depth(&env.topology().queue) == 0
    });
    assert_eq!(counter("ingestd_deliveries_total"), 2.0, "delivered again");
    assert_eq!(env.processor.calls(id).len(), 1, "the processor ran once");
    assert_eq!(env.runs(id), 1);
    let attempts: i32 = env
        .sql()
        .query_one("SELECT attempts FROM events WHERE id = $1", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1);
    app.shutdown().unwrap();
}

/// The outbox has no foreign key to the events: a row whose event is gone
/// (deleted by hand) is dropped by the claim and published to no one.
#[test]
fn an_outbox_row_whose_event_is_gone_is_dropped_unpublished() {
    let env = TestEnv::new("orphan");
    let config = serial_config(&env);
    env.sql()
        .execute(
            "INSERT INTO outbox (event_id) VALUES ($1)",
            &[&Uuid::new_v4()],
        )
        .unwrap();
    let store = Store::open(&ingestd::store::Settings::of(&config).sized(2)).unwrap();
    let sentinel = crate::util::insert_event(&store, &json!("after"), false);
    let relay_app = env.start_role(&config, Role::Relay);
    wait_until(Duration::from_secs(10), "outbox drained", || {
        env.count("SELECT count(*) FROM outbox") == 0
    });
    relay_app.shutdown().unwrap();
    assert_eq!(
        env.queue_depth(&env.topology().queue),
        1,
        "only the sentinel's message was published"
    );
    let worker_app = env.start_role(&config, Role::Worker);
    env.wait_processed(&[sentinel], Duration::from_secs(10));
    worker_app.shutdown().unwrap();
}

#[test]
fn a_relay_crash_between_publish_and_delete_is_processed_once() {
    let env = TestEnv::new("relaycrash");
    let config = serial_config(&env);
    let store = Store::open(&ingestd::store::Settings::of(&config).sized(2)).unwrap();
    let id = crate::util::insert_event(&store, &json!("crash"), false);

    // A relay claims and publishes the row, then dies before deleting it:
    // its transaction rolls back and the row stays in the outbox.
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    let mut publisher = Publisher::open(&url, &env.topology(), Duration::from_secs(5)).unwrap();
    {
        let mut conn = store.conn().unwrap();
        let mut tx = conn.transaction().unwrap();
        let published = relay::publish_claimed(
            &mut tx,
            &mut publisher,
            10,
            Duration::from_secs(5),
            Duration::from_secs(60),
            &ingestd::message::Settings::default(),
        )
        .unwrap();
        assert_eq!(published.len(), 1);
        drop(tx);
    }
    publisher.close();
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 1);
    assert_eq!(env.queue_depth(&env.topology().queue), 1);

    // A new relay publishes the row again.
    let relay_app = env.start_role(&config, Role::Relay);
    wait_until(Duration::from_secs(10), "outbox drained", || {
        env.count("SELECT count(*) FROM outbox") == 0
    });
    assert_eq!(
        env.queue_depth(&env.topology().queue),
        2,
        "the message is in the queue twice"
    );

    // Workers see both copies; a later event proves both were handled.
    let worker_app = env.start_role(&config, Role::Worker);
    let sentinel = crate::util::insert_event(&store, &json!("after"), true);
    env.wait_processed(&[id, sentinel], Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "queue drained", || {
        env.queue_depth(&env.topology().queue) == 0
    });
    assert_eq!(env.runs(id), 1, "processed once despite two deliveries");
    worker_app.shutdown().unwrap();
    relay_app.shutdown().unwrap();
}

/// A relay over this environment's schema with a pool of `pool`
/// connections and batches of `batch` rows, to run passes by hand.
fn relay(env: &TestEnv, pool: u32, batch: usize) -> relay::Relay {
    let config = env.config();
    relay::Relay {
        store: Store::open(&ingestd::store::Settings::of(&config).sized(pool)).unwrap(),
        url: AmqpUrl::parse(&amqp_url()).unwrap(),
        topology: env.topology(),
        batch,
        poll: Duration::from_secs(1),
        confirm_timeout: Duration::from_secs(5),
        late_after: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(5),
        messages: ingestd::message::Settings::default(),
        health: Arc::new(Health::new(true, false)),
        metrics: Arc::new(Metrics::default()),
    }
}

/// One pass of `relay` on a publisher of its own, opened before `first`
/// runs.
fn relay_pass(
    env: &TestEnv,
    relay: &relay::Relay,
    first: impl FnOnce(),
) -> Result<relay::Pass, relay::Error> {
    let mut publisher =
        Publisher::open(&relay.url, &env.topology(), Duration::from_secs(5)).unwrap();
    first();
    let (_stop_tx, stop) = ingestd::lifecycle::Stop::new();
    let pass = relay.relay_once(&mut publisher, &stop);
    publisher.close();
    pass
}

/// `count` events in one transaction, their outbox rows left for a relay
/// run by hand.
fn outbox_events(store: &Store, count: usize) -> Vec<Uuid> {
    let events: Vec<ingestd::store::NewEvent> = (0..count)
        .map(|n| crate::util::plain_event(json!({ "n": n })))
        .collect();
    let refs: Vec<&ingestd::store::NewEvent> = events.iter().collect();
    let wakeup = ingestd::store::Wakeup::Local(crossbeam_channel::bounded(1).0);
    store.insert_events(&refs, &wakeup).unwrap();
    events.into_iter().map(|e| e.id).collect()
}

/// While one batch waits for its confirms the next is claimed and
/// published on a second connection: one pass relays every full batch,
/// each committed once, and the events are processed once each.
#[test]
fn a_relay_pass_overlaps_full_batches_and_relays_each_row_once() {
    let env = TestEnv::new("overlap");
    let relay = relay(&env, 2, 10);
    let ids = outbox_events(&relay.store, 55);
    let pass = relay_pass(&env, &relay, || ()).unwrap();
    assert_eq!(
        pass,
        relay::Pass {
            relayed: 55,
            batches: 6,
            full: false
        },
        "five full batches and the rest, in one pass"
    );
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 0);
    wait_until(Duration::from_secs(10), "55 messages queued", || {
        env.queue_depth(&env.topology().queue) == 55
    });
    let worker_app = env.start_role(&serial_config(&env), Role::Worker);
    env.wait_processed(&ids, Duration::from_secs(20));
    worker_app.shutdown().unwrap();
    assert_eq!(env.processed_twice(), 0);
    for id in &ids {
        assert_eq!(env.runs(*id), 1, "event {id} processed once");
    }
}

/// With no connection to spare, a pass relays one batch and says more
/// rows wait; nothing is held up.
#[test]
fn a_relay_pass_without_a_spare_connection_relays_one_batch() {
    let env = TestEnv::new("nospare");
    let relay = relay(&env, 1, 10);
    outbox_events(&relay.store, 25);
    let pass = relay_pass(&env, &relay, || ()).unwrap();
    assert_eq!(
        pass,
        relay::Pass {
            relayed: 10,
            batches: 1,
            full: true
        }
    );
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 15);
}

/// The first batch of a pass fails at its commit (a deferred trigger
/// refuses the deletion of its oldest row) after the second batch was
/// launched behind it: both roll back, every row stays in the outbox, and
/// the second batch's messages were published (workers skip such copies).
#[test]
fn a_failed_batch_in_a_pass_rolls_back_the_batch_launched_behind_it() {
    let env = TestEnv::new("overlapfail");
    let relay = relay(&env, 2, 10);
    outbox_events(&relay.store, 30);
    let oldest = env.count("SELECT min(id) FROM outbox");
    env.sql()
        .batch_execute(&format!(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$;
             CREATE CONSTRAINT TRIGGER refuse_oldest AFTER DELETE ON outbox
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
               WHEN (OLD.id = {oldest}) EXECUTE FUNCTION refuse();"
        ))
        .unwrap();
    let result = relay_pass(&env, &relay, || ());
    assert!(matches!(result, Err(relay::Error::Store(_))), "{result:?}");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox"),
        30,
        "neither batch committed"
    );
    wait_until(Duration::from_secs(10), "both batches published", || {
        env.queue_depth(&env.topology().queue) == 20
    });
}

/// Batches in flight on one confirm channel: a message returned as
/// unroutable fails its own batch, not the one awaited before it, and
/// leaves nothing behind for the next.
#[test]
fn a_return_fails_only_the_batch_its_message_was_in() {
    let env = TestEnv::new("returns");
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    let mut conn = ingestd::broker::connect(&url, Duration::from_secs(5)).unwrap();
    env.topology().declare(&mut conn).unwrap();
    let mut channel = ingestd::broker::ConfirmChannel::open(&mut conn).unwrap();
    let queue = env.topology().queue;
    let batch = |tag: &str, n: usize| -> Vec<Message> {
        (0..n)
            .map(|i| Message::json(format!("{tag}-{i}"), b"{}".to_vec()))
            .collect()
    };
    let wait = Duration::from_secs(10);
    // The default exchange routes by queue name: the second batch goes
    // nowhere, and its returns may arrive while the first is awaited.
    let (a, b, c) = (batch("a", 3), batch("b", 2), batch("c", 2));
    let routed = channel.publish("", &queue, &a).unwrap();
    let nowhere = format!("{queue}.nowhere");
    let lost = channel.publish("", &nowhere, &b).unwrap();
    assert_eq!(
        channel.await_confirms(routed, &a, wait).unwrap(),
        vec![true; 3]
    );
    assert!(matches!(
        channel.await_confirms(lost, &b, wait),
        Err(ingestd::broker::Error::Unroutable)
    ));
    let again = channel.publish("", &queue, &c).unwrap();
    assert_eq!(
        channel.await_confirms(again, &c, wait).unwrap(),
        vec![true; 2]
    );
    channel.close();
    let _ = conn.close();
    wait_until(wait, "the routed messages queued", || {
        env.queue_depth(&queue) == 5
    });
}

/// A batch reaches amiquip's I/O thread as a few large buffers (the
/// vendored `basic_publish_all`): pika reads every message whole and in
/// order, bodies larger than a frame and than a buffer included.
#[test]
fn a_published_batch_arrives_whole_and_in_order_with_large_bodies_split_into_frames() {
    let env = TestEnv::new("pubbatch");
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    let mut publisher = Publisher::open(&url, &env.topology(), Duration::from_secs(5)).unwrap();
    // Larger than a frame (128 KiB) and than the 128 KiB buffer; and
    // bodies of exactly a frame's room (131,072 less 8 bytes of framing)
    // and one byte more.
    let big = "x".repeat(300_000);
    let frame = 131_072 - 8;
    let exact = |n: usize, len: usize| {
        let shell = json!({ "n": n, "pad": "" }).to_string().len();
        "x".repeat(len - shell)
    };
    let (at_frame, past_frame) = (exact(3, frame), exact(4, frame + 1));
    let pad = |n: usize| match n {
        3 => at_frame.as_str(),
        4 => past_frame.as_str(),
        _ if n % 100 == 7 => big.as_str(),
        _ => "",
    };
    let messages: Vec<Message> = (0..600)
        .map(|n| {
            // An empty body is a content header and no body frame.
            let body = if n == 5 {
                Vec::new()
            } else {
                json!({ "n": n, "pad": pad(n) }).to_string().into_bytes()
            };
            Message::json(n.to_string(), body)
        })
        .collect();
    let taken = publisher
        .publish_each(&messages, Duration::from_secs(20))
        .unwrap();
    assert_eq!(taken, vec![true; 600], "every message confirmed");
    publisher.close();
    let script = format!(
        "{}/tests/cloudevents_clients.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let queue = env.topology().queue;
    let out = python3(&[&script, "read", &amqp_url(), &queue, "600"], b"");
    let got: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 600);
    for (n, m) in got.iter().enumerate() {
        assert_eq!(m["message_id"], n.to_string(), "in publishing order");
        if n == 5 {
            assert_eq!(m["body"], serde_json::Value::Null, "the empty body");
            continue;
        }
        assert_eq!(m["body"]["n"], n);
        assert_eq!(m["body"]["pad"], pad(n), "message {n} whole");
    }
}

#[test]
fn a_poison_message_is_dead_lettered_and_does_not_block() {
    let env = TestEnv::new("poison");
    let app = env.start_role(&serial_config(&env), Role::All);
    let addr = app.http_addr().unwrap();

    env.publish_raw(b"this is not json");
    env.publish_raw(
        json!({ "id": Uuid::new_v4().to_string(), "payload": 1 })
            .to_string()
            .as_bytes(),
    );
    let id = ingest(addr, &json!("behind the poison"));
    env.wait_processed(&[id], Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "two dead letters", || {
        env.queue_depth(&env.topology().dead_queue) == 2
    });
    app.shutdown().unwrap();
}

/// A worker over this environment's schema, to hand batches to directly.
fn worker(env: &TestEnv) -> Worker {
    let config = env.config();
    Worker {
        store: Store::open(&ingestd::store::Settings::of(&config).sized(2)).unwrap(),
        processor: env.processor.clone(),
        retries: config.retry_delays.len(),
        health: Arc::new(Health::new(false, true)),
        metrics: Arc::new(Metrics::default()),
    }
}

fn message(id: Uuid) -> Vec<u8> {
    json!({ "id": id.to_string(), "payload": null })
        .to_string()
        .into_bytes()
}

#[test]
fn copies_of_one_message_in_one_batch_are_processed_once() {
    let env = TestEnv::new("batchdup");
    let worker = worker(&env);
    let id = crate::util::insert_event(&worker.store, &json!("copied"), false);
    let other = crate::util::insert_event(&worker.store, &json!("other"), false);
    let (a, b) = (message(id), message(other));

    let outcomes = worker.handle_batch(&[&a, &b, &a, &a]);
    assert_eq!(
        outcomes,
        [Outcome::Ack; 4],
        "copies are acknowledged, not dead-lettered"
    );
    assert_eq!(env.runs(id), 1);
    assert_eq!(env.runs(other), 1);
    assert_eq!(env.status(id).as_deref(), Some("processed"));

    // A later batch of the same messages changes nothing.
    assert_eq!(worker.handle_batch(&[&b, &a]), [Outcome::Ack; 2]);
    assert_eq!(env.count("SELECT sum(processed_count) FROM events"), 2);
}

#[test]
fn one_failing_event_does_not_fail_its_batch() {
    let env = TestEnv::new("batchfail");
    let worker = worker(&env);
    let store = &worker.store;
    let good: Vec<Uuid> = (0..5)
        .map(|i| crate::util::insert_event(store, &json!(i), false))
        .collect();
    let bad = crate::util::insert_event(store, &json!({ "fail": "permanent" }), false);
    let flaky =
        crate::util::insert_event(store, &json!({ "fail": "transient", "times": 1 }), false);

    let mut bodies: Vec<Vec<u8>> = good.iter().map(|id| message(*id)).collect();
    bodies.insert(2, message(bad));
    bodies.insert(4, message(flaky));
    bodies.push(b"poison".to_vec());
    bodies.push(message(Uuid::new_v4()));
    let refs: Vec<&[u8]> = bodies.iter().map(|b| &b[..]).collect();

    let outcomes = worker.handle_batch(&refs);
    let expected = [
        Outcome::Ack,
        Outcome::Ack,
        Outcome::Reject, // permanent failure
        Outcome::Ack,
        Outcome::Retry {
            step: 0,
            attempt: 2,
        }, // transient failure
        Outcome::Ack,
        Outcome::Ack,
        Outcome::Reject, // poison
        Outcome::Reject, // unknown event
    ];
    assert_eq!(outcomes, expected);
    for id in &good {
        assert_eq!(env.runs(*id), 1);
    }
    assert_eq!(env.status(bad).as_deref(), Some("failed"));
    assert_eq!(env.status(flaky).as_deref(), Some("pending"));
    assert_eq!(env.runs(bad) + env.runs(flaky), 0);
}

#[test]
fn a_pending_event_whose_message_was_lost_is_sent_again() {
    let env = TestEnv::new("lostmsg");
    let sql = |q: &str| env.sql().batch_execute(q).unwrap();
    let lost = Uuid::new_v4();
    let waiting = Uuid::new_v4();
    let retrying = Uuid::new_v4();
    // An event accepted two hours ago whose message the broker lost: no
    // outbox row, no attempt since.
    sql(&format!(
        "INSERT INTO events (id, payload, created_at) VALUES ('{lost}', '1', now() - interval '2 hours')"
    ));
    // An old event that had an attempt a moment ago: its retry copy is in a
    // delay queue, so it must not be sent again.
    sql(&format!(
        "INSERT INTO events (id, payload, created_at, attempted_at, attempts) \
         VALUES ('{retrying}', '2', now() - interval '2 hours', now(), 1)"
    ));
    // An old event still in the outbox: the relay will send it; once only.
    sql(&format!(
        "INSERT INTO events (id, payload, created_at) VALUES ('{waiting}', '3', now() - interval '2 hours');
         INSERT INTO outbox (event_id) VALUES ('{waiting}')"
    ));
    let app = env.start_with(&[("INGEST_REDELIVER_AFTER", "1h")]);
    env.wait_processed(&[lost, waiting], Duration::from_secs(20));
    assert_eq!(env.runs(lost), 1);
    assert_eq!(env.runs(waiting), 1);
    assert_eq!(
        env.status(retrying).as_deref(),
        Some("pending"),
        "not re-sent"
    );
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 0);
    app.shutdown().unwrap();
}

/// The lost-message sweeper tells "published, waiting in a queue" from
/// "lost": events accepted long ago and published only now (the outbox
/// held them through a broker outage; no worker is running, so their
/// messages wait in the queue) are not re-sent, while one handed over long
/// ago and gone from the queue is, in the same pass.
#[test]
fn the_sweeper_re_sends_lost_events_but_not_queued_ones() {
    let env = TestEnv::new("sweeper");
    let config = env.config_with(&[("INGEST_REDELIVER_AFTER", "2s")]);
    let api = env.start_role(&config, Role::Api);
    let addr = api.http_addr().unwrap();
    let queued: Vec<Uuid> = (0..5).map(|i| ingest(addr, &json!(i))).collect();
    // An hour-long broker outage: no relay ran since they were accepted.
    env.sql()
        .execute(
            "UPDATE events SET created_at = now() - interval '1 hour'",
            &[],
        )
        .unwrap();
    let queue = env.topology().queue.to_string();
    // The broker is back; no worker runs, so the messages wait in the queue.
    let relay = env.start_role(&config, Role::Relay);
    wait_until(Duration::from_secs(10), "five messages queued", || {
        crate::util::queued_messages(&queue) == Some(5)
    });
    // One more was handed over long ago and never arrived: its message was
    // lost.
    let lost = Uuid::new_v4();
    env.sql()
        .execute(
            "INSERT INTO events (id, payload, created_at, attempted_at) \
             VALUES ($1, '\"lost\"', now() - interval '1 hour', now() - interval '1 hour')",
            &[&lost],
        )
        .unwrap();
    wait_until(Duration::from_secs(20), "the lost event re-sent", || {
        env.queue_depth(&queue) == 6
    });
    // The pass that found the lost one left the queued ones alone.
    assert_eq!(env.queue_depth(&queue), 6);
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 0);
    let sent_once = env
        .sql()
        .query_one(
            "SELECT count(*) FROM events WHERE id = ANY($1) \
             AND attempted_at > now() - interval '1 minute'",
            &[&queued],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(
        sent_once, 5,
        "the queued events' clocks restarted when published"
    );
    relay.shutdown().unwrap();
    api.shutdown().unwrap();
}

/// An attempt counts once and the next never starts before its delay: when
/// the original of a retry comes back (its delayed copy was never
/// confirmed: the consumer's connection dropped, the confirm timed out), it
/// does not run again at once with the next attempt number; the delayed
/// copy is scheduled again instead. The copy itself then runs.
#[test]
fn an_original_back_after_its_retry_copy_was_lost_waits_for_the_delay() {
    let env = TestEnv::new("retrytwice");
    let worker = worker(&env);
    let id = crate::util::insert_event(
        &worker.store,
        &json!({ "fail": "transient", "times": 1 }),
        false,
    );
    let original = message(id);
    let retry = Outcome::Retry {
        step: 0,
        attempt: 2,
    };
    assert_eq!(worker.handle_messages(&[(&original, 1)]), [retry]);
    assert_eq!(env.processor.calls(id).len(), 1);
    // The copy was not confirmed, so the original comes back, alone or in a
    // batch: the processor does not run, and the attempt is not counted
    // again.
    assert_eq!(worker.handle_messages(&[(&original, 1)]), [retry]);
    let other = crate::util::insert_event(&worker.store, &json!("other"), false);
    assert_eq!(
        worker.handle_messages(&[(&original, 1), (&message(other), 1)]),
        [retry, Outcome::Ack]
    );
    assert_eq!(env.processor.calls(id).len(), 1, "not run again early");
    let attempts: i32 = env
        .sql()
        .query_one("SELECT attempts FROM events WHERE id = $1", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1, "the failed attempt counted once");
    // The delayed copy, for attempt 2, runs and succeeds.
    assert_eq!(worker.handle_messages(&[(&original, 2)]), [Outcome::Ack]);
    assert_eq!(env.status(id).as_deref(), Some("processed"));
    assert_eq!(env.processor.calls(id).len(), 2);
}

/// Removes a broker policy when dropped.
pub struct Policy(String);

impl Policy {
    /// Sets policy `name` on the queues matching `pattern`.
    pub fn set(name: &str, pattern: &str, definition: &str) -> Policy {
        let status = std::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "set_policy",
                name,
                pattern,
                definition,
                "--apply-to",
                "queues",
            ])
            .status()
            .expect("run rabbitmqctl");
        assert!(status.success(), "rabbitmqctl set_policy failed");
        Policy(name.to_string())
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "clear_policy", &self.0])
            .status();
    }
}

/// A message the broker refuses (a nack: here every publish to this test's
/// events queue, which a policy caps at zero messages with reject-publish)
/// does not stall the relay: its row is tried again with a growing delay,
/// and after five refusals its event fails with the reason, visible and
/// retryable, while the relay keeps its connection and ingest answers 202.
#[test]
fn messages_the_broker_refuses_fail_their_events_after_a_few_tries() {
    let env = TestEnv::new("refused");
    let policy = Policy::set(
        &format!("{}-refuse", env.name),
        &format!("^{}\\.events$", env.name),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    );
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let started = std::time::Instant::now();
    let ids: Vec<Uuid> = (0..3).map(|i| ingest(addr, &json!(i))).collect();
    wait_until(Duration::from_secs(30), "the refused events failed", || {
        env.count("SELECT count(*) FROM events WHERE status = 'failed'") == 3
    });
    // Refusals 1 to 4 were each followed by a delay of 100, 200, 400 and
    // 800 ms before the next try.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "five refusals in {took:?}"
    );
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 0);
    let event = crate::util::get(addr, &format!("/v1/events/{}", ids[0])).json();
    assert_eq!(event["status"], "failed");
    assert!(
        event["last_error"].as_str().unwrap().contains("refused"),
        "{event}"
    );
    // The relay never gave up its connection over it.
    let metrics = String::from_utf8(crate::util::get(addr, "/metrics").body).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "ingestd_broker_connects_total 2"),
        "one connection each for the relay and the consumer:\n{metrics}"
    );
    // Once the broker takes messages again, the events can be retried.
    drop(policy);
    for id in &ids {
        let resp = crate::util::request(addr, "POST", &format!("/v1/events/{id}/retry"), &[], b"")
            .unwrap();
        assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    }
    env.wait_processed(&ids, Duration::from_secs(20));
    app.shutdown().unwrap();
}

/// The statements of the hot paths are prepared once per connection and
/// run again as they are: the server parses and plans each once, and the
/// client saves the prepare round trip after the first time.
#[test]
fn hot_statements_are_prepared_once_per_connection() {
    let env = TestEnv::new("prepared");
    let store = Store::open(&ingestd::store::Settings::of(&env.config()).sized(1)).unwrap();
    let wakeup = ingestd::store::Wakeup::Local(crossbeam_channel::bounded(1).0);
    for i in 0..3 {
        let event = crate::util::plain_event(json!(i));
        store.insert_events(&[&event], &wakeup).unwrap();
        let mut conn = store.conn().unwrap();
        let mut tx = conn.transaction().unwrap();
        ingestd::store::events::lock(&mut tx, &[event.id]).unwrap();
        ingestd::store::events::mark_processed(&mut tx, &[event.id]).unwrap();
        tx.commit().unwrap();
    }
    // One pooled connection did all of it; its prepared statements:
    let mut conn = store.conn().unwrap();
    let rows = conn
        .query(
            "SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements \
             WHERE statement LIKE 'WITH e AS (INSERT INTO events%' \
                OR statement LIKE 'INSERT INTO events%' OR statement LIKE 'INSERT INTO outbox%' \
                OR statement LIKE 'UPDATE events SET status = ''processed''%' \
                OR statement LIKE 'SELECT id, status, attempts%FOR UPDATE'",
            &[],
        )
        .unwrap();
    let runs: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // The events and their outbox rows are one statement.
    assert_eq!(runs.len(), 3, "each prepared once: {runs:#?}");
    for (statement, executions) in &runs {
        assert_eq!(*executions, 3, "run three times as prepared: {statement}");
    }
}

/// The relay's claim looks rows up by index however large the outbox is
/// (a broker outage leaves a backlog): no sequential scan of the outbox or
/// of the events for a batch.
#[test]
fn the_claim_uses_indexes_on_a_large_outbox() {
    let env = TestEnv::new("claimplan");
    let mut sql = env.sql();
    sql.batch_execute(
        "INSERT INTO events (id, payload) SELECT gen_random_uuid(), '{}' \
         FROM generate_series(1, 20000); \
         INSERT INTO outbox (event_id) SELECT id FROM events; \
         ANALYZE events; ANALYZE outbox;",
    )
    .unwrap();
    let mut tx = sql.transaction().unwrap();
    let plan: Vec<String> = tx
        .query(
            &format!(
                "EXPLAIN (COSTS OFF) {}",
                ingestd::store::outbox::CLAIM_SQL.replace("$1", "500")
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.rollback().unwrap();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(plan.contains("Index Scan using outbox_pkey"), "{plan}");
    assert!(plan.contains("Index Scan using events_pkey"), "{plan}");
}
