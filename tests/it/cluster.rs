//! Clusters: a broker URL that lists several nodes, a database URL that
//! lists several hosts, and the arguments that make quorum queues keep
//! their promises. The other nodes and hosts are test proxies in front of
//! the one shared broker and database, refusing, holding or cutting what
//! goes through them, so that each test fails over on its own.

use std::time::Duration;

use amiquip::{AmqpValue, FieldTable, QueueDeclareOptions};
use ingestd::broker::{self, AmqpUrl, Message, Publisher};
use serde_json::json;
use uuid::Uuid;

use crate::ops::queue_arguments;
use crate::pipeline::Policy;
use crate::util::{
    Proxy, TestEnv, amqp_host_port, amqp_nodes_url, amqp_url, db_host_port, db_hosts_url, get,
    ingest, post_json, wait_until,
};

/// The broker node each of the relay and the consumer is on, as `/readyz`
/// names them, once both are up.
fn nodes_in_use(addr: std::net::SocketAddr) -> Option<(String, String)> {
    let ready = get(addr, "/readyz");
    let body = ready.json();
    let node = |name: &str| body["nodes"][name].as_str().map(str::to_string);
    match (ready.status, node("broker_relay"), node("broker_consumer")) {
        (200, Some(relay), Some(consumer)) => Some((relay, consumer)),
        _ => None,
    }
}

#[test]
fn a_blackholed_first_node_is_passed_over_for_the_next() {
    let env = TestEnv::new("nodeshole");
    // The first node accepts connections and never answers, as a host that
    // dropped off the network; each connect gives up on it after the
    // connect timeout.
    let vanished = Proxy::start(&amqp_host_port(), true);
    vanished.blackhole();
    let real = amqp_host_port();
    let url = amqp_nodes_url(&[vanished.addr().to_string(), real.clone()], "heartbeat=2");
    let app = env.start_with(&[("INGEST_AMQP_URL", &url)]);
    let addr = app.http_addr().unwrap();

    let ids: Vec<Uuid> = (0..10).map(|i| ingest(addr, &json!(i))).collect();
    // Published by the relay and consumed by the consumer through the only
    // node that answers.
    env.wait_processed(&ids, Duration::from_secs(40));
    wait_until(Duration::from_secs(20), "both links up", || {
        nodes_in_use(addr).is_some()
    });
    assert_eq!(nodes_in_use(addr), Some((real.clone(), real.clone())));
    let stats = get(addr, "/v1/stats").json();
    assert_eq!(stats["nodes"]["broker_relay"], real);
    assert_eq!(stats["nodes"]["broker_consumer"], real);
    assert_eq!(env.processed_twice(), 0);
    app.shutdown().unwrap();
}

#[test]
fn relay_and_consumer_move_to_the_next_node_when_theirs_goes_away() {
    let env = TestEnv::new("nodesmove");
    let first = Proxy::start(&amqp_host_port(), true);
    let real = amqp_host_port();
    let url = amqp_nodes_url(&[first.addr().to_string(), real.clone()], "heartbeat=1");
    let app = env.start_with(&[("INGEST_AMQP_URL", &url)]);
    let addr = app.http_addr().unwrap();
    let on_first = (first.addr().to_string(), first.addr().to_string());
    wait_until(
        Duration::from_secs(20),
        "both links up on the first node",
        || nodes_in_use(addr).as_ref() == Some(&on_first),
    );
    let mut ids: Vec<Uuid> = (0..5).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&ids, Duration::from_secs(20));

    // The first node goes away: every connection through it is cut and new
    // ones are refused.
    first.down();
    ids.extend((0..5).map(|i| ingest(addr, &json!({ "after": i }))));
    wait_until(
        Duration::from_secs(30),
        "both links up on the second node",
        || nodes_in_use(addr) == Some((real.clone(), real.clone())),
    );
    ids.extend((0..5).map(|i| ingest(addr, &json!({ "moved": i }))));
    env.wait_processed(&ids, Duration::from_secs(30));
    for id in &ids {
        assert_eq!(env.runs(*id), 1, "event {id}");
    }
    app.shutdown().unwrap();
}

#[test]
fn a_database_url_whose_first_host_refuses_uses_the_next() {
    let env = TestEnv::new("pghosts");
    let refusing = Proxy::start(&db_host_port(), false);
    let url = db_hosts_url(
        &[refusing.addr().to_string(), db_host_port()],
        "target_session_attrs=read-write",
    );
    let app = env.start_with(&[("INGEST_DATABASE_URL", &url), ("INGEST_DB_TIMEOUT", "2s")]);
    let addr = app.http_addr().unwrap();
    assert_eq!(get(addr, "/readyz").json()["checks"]["postgres"], "up");
    let ids: Vec<Uuid> = (0..5).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&ids, Duration::from_secs(20));
    assert_eq!(refusing.forwarded(), 0);
    app.shutdown().unwrap();
}

#[test]
fn pooled_connections_move_to_the_next_host_when_theirs_goes_away() {
    let env = TestEnv::new("pgmove");
    // The first host plays a primary that fails; the second, the same
    // server reached directly, the standby promoted in its place.
    let primary = Proxy::start(&db_host_port(), true);
    let url = db_hosts_url(
        &[primary.addr().to_string(), db_host_port()],
        "target_session_attrs=read-write",
    );
    let app = env.start_with(&[("INGEST_DATABASE_URL", &url), ("INGEST_DB_TIMEOUT", "1s")]);
    let addr = app.http_addr().unwrap();
    let mut ids: Vec<Uuid> = (0..5).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&ids, Duration::from_secs(20));
    let before = primary.forwarded();
    assert!(before > 0, "the pool connected to the first host");

    primary.down();
    // The pooled connections through it are broken; each is replaced by
    // one to the next host, and ingest answers 202 again.
    wait_until(
        Duration::from_secs(30),
        "ingest works on the next host",
        || {
            let resp = post_json(addr, "/v1/events", r#"{"payload":"moved"}"#);
            if resp.status == 202 {
                ids.push(Uuid::parse_str(resp.json()["id"].as_str().unwrap()).unwrap());
            }
            resp.status == 202
        },
    );
    ids.extend((0..5).map(|i| ingest(addr, &json!({ "after": i }))));
    env.wait_processed(&ids, Duration::from_secs(30));
    assert_eq!(
        primary.forwarded(),
        before,
        "nothing went to the host that failed"
    );
    assert_eq!(env.processed_twice(), 0);
    app.shutdown().unwrap();
}

/// What a quorum queue refuses is every publish while the channel finds no
/// leader for it, not one message: a refusal fails the whole batch, which
/// the relay then publishes again on a new connection (to the next node)
/// instead of counting it against each event. Here a policy caps the queue
/// at no messages, with reject-publish: a quorum queue takes the first
/// message and refuses the ones after it, once it has told the channel it
/// is full.
#[test]
fn a_refusal_by_a_quorum_queue_fails_the_whole_batch() {
    let env = TestEnv::new("qqrefused");
    let _policy = Policy::set(
        &format!("{}-refuse", env.name),
        &format!("^{}\\.events$", env.name),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    );
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    let topology = env.topology().with_quorum(true);
    let mut publisher = Publisher::open(&url, &topology, Duration::from_secs(5)).unwrap();
    let message = |id: &str| Message::json(id, b"{}".to_vec());
    let first = publisher.publish_each(&[message("first")], Duration::from_secs(5));
    assert_eq!(first.unwrap(), [true]);
    // A batch the queue refuses, in part or whole, fails as a whole.
    let mut n = 0;
    wait_until(Duration::from_secs(10), "a batch refused", || {
        n += 1;
        let batch = [message(&format!("{n}a")), message(&format!("{n}b"))];
        match publisher.publish_each(&batch, Duration::from_secs(5)) {
            Ok(taken) => {
                assert_eq!(taken, [true, true], "a refusal must fail the batch");
                false
            }
            Err(broker::Error::Nacked) => true,
            Err(e) => panic!("{e}"),
        }
    });
    publisher.close();
}

/// The `rabbitmqctl` arguments of `queue`, which must exist.
fn arguments_of(env: &TestEnv, queue: &str) -> String {
    queue_arguments(&format!("{}.", env.name))
        .into_iter()
        .find(|(name, _)| name == queue)
        .unwrap_or_else(|| panic!("queue {queue} not listed"))
        .1
}

#[test]
fn quorum_queues_get_a_delivery_limit_and_at_least_once_dead_lettering() {
    let env = TestEnv::new("qqargs");
    let app = env.start_with(&[
        ("INGEST_QUEUE_TYPE", "quorum"),
        ("INGEST_DELIVERY_LIMIT", "7"),
    ]);
    let addr = app.http_addr().unwrap();
    let id = ingest(addr, &json!(1));
    // A retry goes through a delay queue and is dead-lettered back to the
    // events exchange.
    let retried = ingest(addr, &json!({ "fail": "transient", "times": 1 }));
    env.wait_processed(&[id, retried], Duration::from_secs(20));
    app.shutdown().unwrap();

    let topology = env.topology();
    let dead_lettering = [
        topology.queue.clone(),
        topology.delay_queue(0),
        topology.delay_queue(1),
    ];
    for queue in &dead_lettering {
        let args = arguments_of(&env, queue);
        assert!(
            args.contains(r#"{"x-queue-type","quorum"}"#),
            "{queue}: {args}"
        );
        assert!(
            args.contains(r#"{"x-delivery-limit",7}"#),
            "{queue}: {args}"
        );
        assert!(
            args.contains(r#"{"x-dead-letter-strategy","at-least-once"}"#),
            "{queue}: {args}"
        );
        assert!(
            args.contains(r#"{"x-overflow","reject-publish"}"#),
            "{queue}: {args}"
        );
    }
    // The dead letters go nowhere further: a limit, no strategy.
    let dead = arguments_of(&env, &topology.dead_queue);
    assert!(dead.contains(r#"{"x-delivery-limit",7}"#), "{dead}");
    assert!(!dead.contains("x-dead-letter-strategy"), "{dead}");
}

/// An events queue made by an earlier ingestd, without the delivery limit
/// and the dead-letter strategy, is used as it is: the broker refuses a
/// redeclaration that adds them.
#[test]
fn an_existing_quorum_queue_without_the_new_arguments_is_used_as_it_is() {
    let env = TestEnv::new("qqold");
    let topology = env.topology();
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    let mut conn = broker::connect(&url, Duration::from_secs(5)).unwrap();
    let channel = conn.open_channel(None).unwrap();
    let mut arguments = FieldTable::new();
    arguments.insert(
        "x-queue-type".into(),
        AmqpValue::LongString("quorum".into()),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AmqpValue::LongString(topology.dead_exchange.clone()),
    );
    channel
        .queue_declare(
            &*topology.queue,
            QueueDeclareOptions {
                durable: true,
                arguments,
                ..QueueDeclareOptions::default()
            },
        )
        .unwrap();
    conn.close().unwrap();

    let app = env.start_with(&[("INGEST_QUEUE_TYPE", "quorum")]);
    let addr = app.http_addr().unwrap();
    let ids: Vec<Uuid> = (0..3).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&ids, Duration::from_secs(20));
    app.shutdown().unwrap();
    let events = arguments_of(&env, &topology.queue);
    assert!(
        !events.contains("x-delivery-limit"),
        "kept as it was: {events}"
    );
    assert!(!events.contains("x-dead-letter-strategy"), "{events}");
    let delay = arguments_of(&env, &topology.delay_queue(0));
    assert!(
        delay.contains(r#"{"x-dead-letter-strategy","at-least-once"}"#),
        "new queues get them: {delay}"
    );
}
