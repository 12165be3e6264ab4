//! Peers that vanish instead of refusing: the test proxy's blackhole keeps
//! every connection open and takes its bytes without ever delivering them,
//! as a host that dropped off the network (or a stuck proxy) does. Every
//! wait on such a peer is bounded: PostgreSQL by the client's response
//! timeout (`INGEST_DB_STATEMENT_TIMEOUT` + 5 s) and the checkout test
//! (`INGEST_DB_TIMEOUT`), RabbitMQ by AMQP heartbeats and the confirm
//! timeout; and once the peer is back, everything accepted is processed
//! exactly once.

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use ingestd::Role;
use serde_json::json;
use uuid::Uuid;

use crate::ops::{metric, scrape};
use crate::util::{
    TestEnv, amqp_proxy, assert_healthz_instant, db_proxy, get, ingest, parse_response, post_json,
    wait_until,
};

/// `INGEST_DB_STATEMENT_TIMEOUT` in these tests.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);
/// `INGEST_DB_TIMEOUT` in these tests.
const DB_TIMEOUT: Duration = Duration::from_secs(1);
/// `INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT` where a test needs the server
/// to end a vanished client's transaction.
const IDLE_LIMIT: Duration = Duration::from_secs(3);

/// The longest an ingest may wait for its answer when the database
/// vanished under its commit: the response timeout, one checkout, and a
/// second of slack for a loaded machine.
fn ingest_bound() -> Duration {
    STATEMENT_TIMEOUT + ingestd::store::RESPONSE_GRACE + DB_TIMEOUT + Duration::from_secs(1)
}

fn db_vars(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("INGEST_DATABASE_URL", url.to_string()),
        ("INGEST_DB_TIMEOUT", format!("{}ms", DB_TIMEOUT.as_millis())),
        (
            "INGEST_DB_STATEMENT_TIMEOUT",
            format!("{}ms", STATEMENT_TIMEOUT.as_millis()),
        ),
    ]
}

fn borrowed<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn a_blackholed_database_answers_every_ingest_within_the_bound() {
    let env = TestEnv::new("pgblackhole");
    let (proxy, url) = db_proxy();
    let vars = db_vars(&url);
    let app = env.start_with(&borrowed(&vars));
    let addr = app.http_addr().unwrap();
    let mut accepted: Vec<Uuid> = (0..3).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&accepted, Duration::from_secs(10));

    proxy.blackhole();
    // Eight ingests at once: the first batches sit on connections that
    // will never answer, the rest queue behind them.
    let requests: Vec<_> = (0..8)
        .map(|i| {
            thread::spawn(move || {
                let started = Instant::now();
                let resp = post_json(addr, "/v1/events", &json!({ "payload": i }).to_string());
                (resp, started.elapsed())
            })
        })
        .collect();
    assert_healthz_instant(addr);
    let mut slowest = Duration::ZERO;
    for request in requests {
        let (resp, took) = request.join().unwrap();
        slowest = slowest.max(took);
        assert!(took < ingest_bound(), "answered after {took:?}");
        match resp.status {
            // Committed before the blackhole caught its connection.
            202 => accepted.push(Uuid::parse_str(resp.json()["id"].as_str().unwrap()).unwrap()),
            503 => {
                assert_eq!(resp.json()["error"], "unavailable");
                assert!(resp.header("retry-after").is_some());
            }
            other => panic!("answered {other}: {}", String::from_utf8_lossy(&resp.body)),
        }
    }
    eprintln!("slowest ingest answer during the blackhole: {slowest:?}");
    // Once the outage is known, a request fails at once, and /readyz says
    // so within INGEST_DB_TIMEOUT.
    let started = Instant::now();
    let resp = post_json(addr, "/v1/events", r#"{"payload":"late"}"#);
    assert_eq!(resp.status, 503);
    assert!(started.elapsed() < DB_TIMEOUT + Duration::from_millis(500));
    let started = Instant::now();
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["checks"]["postgres"], "down");
    assert!(started.elapsed() < DB_TIMEOUT + Duration::from_millis(500));

    proxy.up();
    wait_until(Duration::from_secs(20), "ingest works again", || {
        let resp = post_json(addr, "/v1/events", r#"{"payload":"back"}"#);
        if resp.status == 202 {
            accepted.push(Uuid::parse_str(resp.json()["id"].as_str().unwrap()).unwrap());
        }
        resp.status == 202
    });
    env.wait_processed(&accepted, Duration::from_secs(30));
    assert_eq!(env.processed_twice(), 0);
    app.shutdown().unwrap();
}

#[test]
fn sigterm_during_a_database_blackhole_exits_in_time_with_every_request_answered() {
    let env = TestEnv::new("pgblackholeterm");
    let (proxy, url) = db_proxy();
    let mut vars = db_vars(&url);
    vars.push(("INGEST_SHUTDOWN_TIMEOUT", "10s".into()));
    let mut binary = env.spawn_binary_with(None, &borrowed(&vars));
    let addr = binary.addr.unwrap();
    ingest(addr, &json!("before"));
    proxy.blackhole();
    // A request whose commit meets the blackhole.
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = r#"{"payload":"caught"}"#;
    stream
        .write_all(
            format!(
                "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    let answer = thread::spawn(move || {
        let mut raw = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stream, &mut raw);
        raw
    });
    let started = Instant::now();
    binary.terminate();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(11), "exit took {took:?}");
    let raw = answer.join().unwrap();
    let resp = parse_response(&raw).expect("the request was answered");
    assert_eq!(resp.status, 503, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(resp.json()["error"], "unavailable");
    eprintln!("exited {took:?} after SIGTERM, the caught request answered 503");
}

#[test]
fn a_blackholed_broker_keeps_ingest_answering_and_loses_nothing() {
    let env = TestEnv::new("mqblackhole");
    let (proxy, url) = amqp_proxy("heartbeat=1");
    let app = env.start_with(&[("INGEST_AMQP_URL", &url), ("INGEST_CONFIRM_TIMEOUT", "2s")]);
    let addr = app.http_addr().unwrap();
    let mut accepted: Vec<Uuid> = (0..3).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&accepted, Duration::from_secs(10));

    proxy.blackhole();
    for i in 0..20 {
        let started = Instant::now();
        accepted.push(ingest(addr, &json!({ "during": i })));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "ingest took {took:?}");
    }
    // Both broker connections notice within a few heartbeats, and say so.
    let started = Instant::now();
    wait_until(Duration::from_secs(15), "both broker checks down", || {
        let ready = get(addr, "/readyz").json();
        ready["checks"]["broker_relay"] == "down" && ready["checks"]["broker_consumer"] == "down"
    });
    eprintln!("broker blackhole noticed after {:?}", started.elapsed());
    assert!(env.count("SELECT count(*) FROM outbox") > 0);

    proxy.up();
    env.wait_processed(&accepted, Duration::from_secs(30));
    assert_eq!(env.processed_twice(), 0);
    wait_until(Duration::from_secs(10), "the outbox drained", || {
        env.count("SELECT count(*) FROM outbox") == 0
    });
    app.shutdown().unwrap();
}

#[test]
fn workers_whose_database_vanishes_process_everything_once_when_it_returns() {
    let env = TestEnv::new("workerblackhole");
    // The API and the relay reach the database directly; only the workers
    // go through the proxy.
    let api = env.start_role(&env.config(), Role::Api);
    let relay = env.start_role(&env.config(), Role::Relay);
    let (proxy, url) = db_proxy();
    let vars = db_vars(&url);
    let workers = env.start_role(&env.config_with(&borrowed(&vars)), Role::Worker);
    let addr = api.http_addr().unwrap();
    let mut accepted: Vec<Uuid> = (0..3).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&accepted, Duration::from_secs(10));

    proxy.blackhole();
    accepted.extend((0..30).map(|i| ingest(addr, &json!({ "during": i }))));
    // Everything is published; none of it can be processed.
    wait_until(Duration::from_secs(10), "the outbox drained", || {
        env.count("SELECT count(*) FROM outbox") == 0
    });
    // Long enough for a worker's transaction to meet the blackhole and be
    // given up (its response timeout), checked by the events staying
    // pending throughout.
    let deadline = Instant::now() + ingest_bound();
    while Instant::now() < deadline {
        assert!(env.count("SELECT count(*) FROM events WHERE status = 'pending'") >= 30);
        thread::sleep(Duration::from_millis(200));
    }
    proxy.up();
    env.wait_processed(&accepted, Duration::from_secs(40));
    assert_eq!(env.processed_twice(), 0);
    workers.shutdown().unwrap();
    relay.shutdown().unwrap();
    api.shutdown().unwrap();
}

/// A delivery requeued because the database is unreachable comes back
/// after a growing delay, not at once: without it, it spun through the
/// consumer as fast as the broker could redeliver it.
#[test]
fn requeues_back_off_while_the_database_is_down() {
    let env = TestEnv::new("requeuebackoff");
    let (proxy, url) = db_proxy();
    let vars = db_vars(&url);
    let app = env.start_with(&borrowed(&vars));
    let addr = app.http_addr().unwrap();
    proxy.down();
    let id = Uuid::new_v4();
    env.publish_raw(
        json!({ "id": id.to_string(), "payload": 1 })
            .to_string()
            .as_bytes(),
    );
    wait_until(Duration::from_secs(30), "the first redelivery", || {
        metric(&scrape(addr), "ingestd_deliveries_total") >= Some(2.0)
    });
    let started = Instant::now();
    wait_until(Duration::from_secs(20), "four more deliveries", || {
        metric(&scrape(addr), "ingestd_deliveries_total") >= Some(6.0)
    });
    // Delays of 200, 400, 800 and 1600 ms (the first, 100 ms, came before
    // the second delivery), each cut by up to half by jitter: at least 1.5 s
    // in all; a delay that did not grow would take at most 0.8 s.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "four requeues in {took:?}"
    );
    proxy.up();
    app.shutdown().unwrap();
}

/// A transaction whose client vanished after taking a row lock (its
/// connection caught in a blackhole, the server still holding the session)
/// is ended by the server once it has idled for
/// `INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT`, so the lock is freed for the
/// other workers instead of blocking the event until the connection dies.
#[test]
fn a_vanished_transaction_frees_its_row_locks_in_bounded_time() {
    let env = TestEnv::new("bhlocks");
    let (proxy, url) = db_proxy();
    let config = env.config_with(&[
        ("INGEST_DATABASE_URL", url.as_str()),
        (
            "INGEST_DB_STATEMENT_TIMEOUT",
            &format!("{}ms", STATEMENT_TIMEOUT.as_millis()),
        ),
        ("INGEST_CONFIRM_TIMEOUT", "1s"),
        (
            "INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT",
            &format!("{}ms", IDLE_LIMIT.as_millis()),
        ),
    ]);
    let store = ingestd::store::Store::open(&ingestd::store::Settings::of(&config).sized(1))
        .expect("store");
    let id = crate::util::insert_event(&store, &json!({ "locked": true }), false);
    let mut conn = store.conn().expect("connection through the proxy");
    let mut tx = conn.transaction().unwrap();
    tx.execute("SELECT 1 FROM events WHERE id = $1 FOR UPDATE", &[&id])
        .unwrap();
    proxy.blackhole();
    let vanished = Instant::now();

    // Another session, straight to the server, waits for the lock.
    let mut other = env.sql();
    other
        .batch_execute("SET lock_timeout = '20s'")
        .expect("lock timeout");
    other
        .execute("SELECT 1 FROM events WHERE id = $1 FOR UPDATE", &[&id])
        .expect("the lock is freed");
    let waited = vanished.elapsed();
    let bound = IDLE_LIMIT + Duration::from_secs(3);
    assert!(
        waited < bound,
        "the lock was held {waited:?} (bound {bound:?})"
    );
    assert!(
        waited >= IDLE_LIMIT - Duration::from_millis(200),
        "freed after {waited:?}: sooner than the idle limit, so not by it"
    );
    drop(tx);
    drop(conn);
    proxy.up();
}
