//! Operating it: several processes per role, quorum queues, retention,
//! and `/metrics` (its key, and its answers while the database is away).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ingestd::Role;
use serde_json::json;
use uuid::Uuid;

use crate::util::db_proxy;
use crate::util::{Load, TestEnv, get, ingest, request, wait_until};

/// The value of an unlabelled sample in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// One scrape of `/metrics`, without a key.
pub fn scrape(addr: SocketAddr) -> String {
    let resp = get(addr, "/metrics");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    String::from_utf8(resp.body).unwrap()
}

#[test]
fn two_apis_two_relays_three_workers_lose_nothing_and_process_once() {
    let env = TestEnv::new("scaleout");
    let mut apis: Vec<_> = (0..2).map(|_| env.spawn_binary(Some("api"))).collect();
    let mut others: Vec<_> = (0..2)
        .map(|_| env.spawn_binary(Some("relay")))
        .chain((0..3).map(|_| env.spawn_binary(Some("worker"))))
        .collect();

    let loads: Vec<_> = apis
        .iter()
        .map(|a| Load::start(a.addr.unwrap(), 4))
        .collect();
    for load in &loads {
        load.wait_for(300, "load through both APIs");
    }
    let ids: Vec<Uuid> = loads.into_iter().flat_map(Load::stop).collect();

    env.wait_processed(&ids, Duration::from_secs(60));
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE processed_count <> 1"),
        0,
        "every event processed exactly once"
    );
    // A relay deletes its rows only after the broker confirmed them, and a
    // worker may process a message before that: the outbox empties soon
    // after the last event is processed, not necessarily before.
    wait_until(Duration::from_secs(20), "the outbox drained", || {
        env.count("SELECT count(*) FROM outbox") == 0
    });
    for p in apis.iter_mut().chain(others.iter_mut()) {
        p.terminate();
    }
}

#[test]
fn quorum_queues_carry_the_pipeline() {
    let env = TestEnv::new("quorum");
    let app = env.start_with(&[("INGEST_QUEUE_TYPE", "quorum")]);
    let addr = app.http_addr().unwrap();
    let ids: Vec<Uuid> = (0..20).map(|i| ingest(addr, &json!(i))).collect();
    let retried = ingest(addr, &json!({ "fail": "transient", "times": 1 }));
    env.wait_processed(&ids, Duration::from_secs(20));
    env.wait_processed(&[retried], Duration::from_secs(20));
    app.shutdown().unwrap();

    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "type"])
        .output()
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&out.stdout);
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&*env.topology().queue))
        .unwrap_or_else(|| panic!("queue not listed:\n{listing}"));
    assert!(line.contains("quorum"), "{line}");
}

/// `rabbitmqctl`'s arguments of every queue whose name starts with
/// `prefix`, by name.
pub fn queue_arguments(prefix: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "arguments"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(name, args)| (name.to_string(), args.trim().to_string()))
        .collect()
}

#[test]
fn classic_queues_are_created_as_version_2() {
    let env = TestEnv::new("cqv2");
    let app = env.start();
    let id = ingest(app.http_addr().unwrap(), &json!(1));
    env.wait_processed(&[id], Duration::from_secs(20));
    app.shutdown().unwrap();
    let queues = queue_arguments(&format!("{}.", env.name));
    // The events queue, the dead letters and the two delay queues.
    assert_eq!(queues.len(), 4, "{queues:?}");
    for (name, args) in &queues {
        assert!(
            args.contains("x-queue-version") && args.contains(",2}"),
            "{name}: {args}"
        );
    }
}

/// A queue that exists without a version argument (made by an earlier
/// ingestd, so version 1 on RabbitMQ 3.10 and 3.11) is used as it is: the
/// broker would refuse a redeclaration that names a version.
#[test]
fn an_existing_queue_without_a_version_is_used_as_it_is() {
    let env = TestEnv::new("cqv1");
    let topology = env.topology();
    let url = ingestd::broker::AmqpUrl::parse(&crate::util::amqp_url()).unwrap();
    let mut conn = ingestd::broker::connect(&url, Duration::from_secs(5)).unwrap();
    let channel = conn.open_channel(None).unwrap();
    let mut arguments = amiquip::FieldTable::new();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        amiquip::AmqpValue::LongString(topology.dead_exchange.clone()),
    );
    channel
        .queue_declare(
            &*topology.queue,
            amiquip::QueueDeclareOptions {
                durable: true,
                arguments,
                ..amiquip::QueueDeclareOptions::default()
            },
        )
        .unwrap();
    conn.close().unwrap();

    let app = env.start();
    let id = ingest(app.http_addr().unwrap(), &json!(1));
    env.wait_processed(&[id], Duration::from_secs(20));
    app.shutdown().unwrap();
    let queues = queue_arguments(&format!("{}.", env.name));
    let (_, events) = queues
        .iter()
        .find(|(name, _)| *name == topology.queue)
        .expect("the events queue");
    assert!(!events.contains("x-queue-version"), "{events}");
    let (_, dead) = queues
        .iter()
        .find(|(name, _)| *name == topology.dead_queue)
        .expect("the dead-letter queue");
    assert!(
        dead.contains("x-queue-version"),
        "new queues get version 2: {dead}"
    );
}

#[test]
fn retention_deletes_old_processed_events_only() {
    let env = TestEnv::new("retention");
    let app = env.start_with(&[("INGEST_RETENTION", "1h"), ("INGEST_IDEMPOTENCY_TTL", "1h")]);
    let addr = app.http_addr().unwrap();
    let old: Vec<Uuid> = (0..3).map(|i| ingest(addr, &json!(i))).collect();
    let recent = ingest(addr, &json!("recent"));
    env.wait_processed(&old, Duration::from_secs(10));
    env.wait_processed(&[recent], Duration::from_secs(10));
    let failed = ingest(addr, &json!({ "fail": "permanent" }));
    wait_until(Duration::from_secs(10), "failed", || {
        env.status(failed).as_deref() == Some("failed")
    });
    // Age some events past the retention window.
    let aged = [old.clone(), vec![failed]].concat();
    env.sql()
        .execute(
            "UPDATE events SET processed_at = now() - interval '2 hours', \
             created_at = now() - interval '2 hours' WHERE id = ANY($1)",
            &[&aged],
        )
        .unwrap();
    // An outbox row left for an aged event (as a relay crash leaves one),
    // not due yet, so only retention can remove it.
    env.sql()
        .execute(
            "INSERT INTO outbox (event_id, not_before) VALUES ($1, now() + interval '1 day')",
            &[&old[0]],
        )
        .unwrap();
    app.shutdown().unwrap();

    // The retention pass runs at start-up, then every 15 minutes for 1h.
    let app = env.start_with(&[("INGEST_RETENTION", "1h"), ("INGEST_IDEMPOTENCY_TTL", "1h")]);
    wait_until(
        Duration::from_secs(10),
        "old processed events deleted",
        || env.count("SELECT count(*) FROM events") == 2,
    );
    assert_eq!(env.status(recent).as_deref(), Some("processed"));
    assert_eq!(
        env.status(failed).as_deref(),
        Some("failed"),
        "failed events are kept"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM outbox"),
        0,
        "the outbox row of a deleted event went with it"
    );
    app.shutdown().unwrap();
}

#[test]
fn metrics_can_require_an_api_key() {
    let env = TestEnv::new("metricsauth");
    let key = "metrics-key-0123456789";
    let app = env.start_with(&[("INGEST_API_KEYS", key), ("INGEST_METRICS_AUTH", "key")]);
    let addr = app.http_addr().unwrap();

    let refused = get(addr, "/metrics");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["error"], "unauthorized");
    assert!(refused.header("www-authenticate").is_some());
    let wrong = [("Authorization", "Bearer not-the-key-0123456789")];
    assert_eq!(
        request(addr, "GET", "/metrics", &wrong, b"")
            .unwrap()
            .status,
        401
    );
    // Prometheus sends the key as a bearer token.
    let bearer = format!("Bearer {key}");
    let resp = request(addr, "GET", "/metrics", &[("Authorization", &bearer)], b"").unwrap();
    assert_eq!(resp.status, 200);
    let text = String::from_utf8(resp.body).unwrap();
    assert_eq!(
        metric(
            &text,
            "ingestd_http_requests_total{route=\"metrics\",status=\"401\"}"
        ),
        Some(2.0),
        "the refusals are counted:\n{text}"
    );
    let resp = request(addr, "GET", "/metrics", &[("X-Api-Key", key)], b"").unwrap();
    assert_eq!(resp.status, 200);
    // The probes and the page's shell stay open.
    for open in ["/healthz", "/"] {
        assert_eq!(get(addr, open).status, 200, "{open}");
    }
    app.shutdown().unwrap();

    // By default the metrics stay open beside keys.
    let app = env.start_with(&[("INGEST_API_KEYS", key)]);
    let addr = app.http_addr().unwrap();
    assert_eq!(get(addr, "/metrics").status, 200);
    assert_eq!(get(addr, "/v1/stats").status, 401);
    app.shutdown().unwrap();
}

/// With PostgreSQL cut off, `/metrics`, `/v1/stats` and the page answer at
/// once from the refresher's last read, saying how old it is, instead of
/// waiting `INGEST_DB_TIMEOUT` for a pooled connection; once the database
/// is back, the figures are fresh again.
#[test]
fn metrics_and_stats_answer_from_the_last_read_while_the_database_is_down() {
    let env = TestEnv::new("statsdbdown");
    let (proxy, url) = db_proxy();
    let db_timeout = Duration::from_secs(5);
    let config = env.config_with(&[
        ("INGEST_DATABASE_URL", &url),
        ("INGEST_DB_TIMEOUT", "5s"),
        ("INGEST_STATS_INTERVAL", "200ms"),
    ]);
    // The API alone: no relay drains the outbox.
    let app = env.start_role(&config, Role::Api);
    let addr = app.http_addr().unwrap();
    for i in 0..3 {
        ingest(addr, &json!(i));
    }
    wait_until(
        Duration::from_secs(10),
        "the figures show the 3 rows",
        || metric(&scrape(addr), "ingestd_outbox_rows") == Some(3.0),
    );

    proxy.down();
    wait_until(
        Duration::from_secs(20),
        "the refresher notices the outage",
        || metric(&scrape(addr), "ingestd_stats_refresh_failures_total") >= Some(1.0),
    );
    let mut last_age = 0.0;
    for _ in 0..3 {
        for path in ["/metrics", "/v1/stats", "/"] {
            let started = Instant::now();
            let resp = get(addr, path);
            let took = started.elapsed();
            assert_eq!(resp.status, 200, "{path}");
            // A wait for a pooled connection would take the whole timeout.
            assert!(took < db_timeout / 2, "{path} took {took:?}");
        }
        let text = scrape(addr);
        assert_eq!(metric(&text, "ingestd_outbox_rows"), Some(3.0), "{text}");
        let age = metric(&text, "ingestd_stats_age_seconds").unwrap();
        assert!(age > last_age, "the age grows: {age} after {last_age}");
        last_age = age;
        let stats = get(addr, "/v1/stats").json();
        assert_eq!(stats["health"]["postgres"], "down");
        assert_eq!(stats["events"]["pending"], 3);
        assert!(
            stats["db_figures"]["age_s"].as_f64().unwrap() > 0.0,
            "{stats}"
        );
    }

    proxy.up();
    wait_until(Duration::from_secs(30), "fresh figures again", || {
        let stats = get(addr, "/v1/stats").json();
        stats["health"]["postgres"] == "up"
            && stats["db_figures"]["age_s"]
                .as_f64()
                .is_some_and(|age| age < 1.0)
    });
    app.shutdown().unwrap();
}
