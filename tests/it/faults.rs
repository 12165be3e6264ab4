//! Outages of one instance's dependencies, made with a TCP proxy so that
//! tests running in parallel keep their services.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ingestd::Role;
use serde_json::json;
use uuid::Uuid;

use crate::util::{
    Load, Proxy, TestEnv, amqp_host_port, db_proxy, get, ingest, parse_response, post_json,
    request, wait_until,
};

/// `INGEST_DB_TIMEOUT` in the tests that cut the database off.
const DB_TIMEOUT: Duration = Duration::from_secs(1);

fn db_timeout_var() -> String {
    format!("{}ms", DB_TIMEOUT.as_millis())
}

#[test]
fn broker_down_at_ingest_still_accepts_and_delivers_later() {
    let env = TestEnv::new("brokerdown");
    let proxy = Proxy::start(&amqp_host_port(), false);
    let amqp = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let app = env.start_with(&[("INGEST_AMQP_URL", &amqp)]);
    let addr = app.http_addr().unwrap();

    let ids: Vec<Uuid> = (0..5).map(|i| ingest(addr, &json!(i))).collect();
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["checks"]["broker_relay"], "down");
    assert_eq!(ready.json()["checks"]["postgres"], "up");
    assert_eq!(
        env.count("SELECT count(*) FROM outbox"),
        5,
        "rows wait in the outbox"
    );
    for id in &ids {
        assert_eq!(env.status(*id).as_deref(), Some("pending"));
    }

    proxy.up();
    env.wait_processed(&ids, Duration::from_secs(30));
    wait_until(Duration::from_secs(10), "readyz back to 200", || {
        get(addr, "/readyz").status == 200
    });

    // The broker goes away mid-stream and comes back: nothing is lost.
    proxy.down();
    let more: Vec<Uuid> = (0..5).map(|i| ingest(addr, &json!(i))).collect();
    proxy.up();
    env.wait_processed(&more, Duration::from_secs(30));
    for id in ids.iter().chain(&more) {
        assert_eq!(env.runs(*id), 1);
    }
    app.shutdown().unwrap();
}

#[test]
fn database_down_answers_503_quickly_and_recovers() {
    let env = TestEnv::new("dbdown");
    let (proxy, url) = db_proxy();
    let config = env.config_with(&[
        ("INGEST_DATABASE_URL", &url),
        ("INGEST_DB_TIMEOUT", &db_timeout_var()),
    ]);
    let app = env.start_role(&config, Role::Api);
    let addr = app.http_addr().unwrap();
    assert_eq!(
        post_json(addr, "/v1/events", r#"{"payload":1}"#).status,
        202
    );

    proxy.down();
    // Each refusal waits at most one pool checkout (INGEST_DB_TIMEOUT);
    // the slack is for a loaded machine, and is far below the client's own
    // read timeout, which would otherwise be what ends a hung request.
    let bound = DB_TIMEOUT + Duration::from_secs(1);
    for _ in 0..3 {
        let started = Instant::now();
        let resp = post_json(addr, "/v1/events", r#"{"payload":2}"#);
        let took = started.elapsed();
        assert_eq!(resp.status, 503, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(resp.json()["error"], "unavailable");
        assert!(resp.header("retry-after").is_some());
        assert!(took < bound, "503 after {took:?}, bound {bound:?}");
    }
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["checks"]["postgres"], "down");
    let detail = String::from_utf8_lossy(&ready.body).to_lowercase();
    assert!(
        !detail.contains("select") && !detail.contains("error:"),
        "no internals leak"
    );

    proxy.up();
    wait_until(Duration::from_secs(20), "ingest works again", || {
        post_json(addr, "/v1/events", r#"{"payload":3}"#).status == 202
    });
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE payload = '2'"),
        0,
        "refused requests wrote nothing"
    );
    app.shutdown().unwrap();
}

#[test]
fn broker_restarts_mid_stream_lose_nothing() {
    let env = TestEnv::new("brokerbounce");
    let proxy = Proxy::start(&amqp_host_port(), true);
    let amqp = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let app = env.start_with(&[("INGEST_AMQP_URL", &amqp)]);
    let addr = app.http_addr().unwrap();
    let load = Load::start(addr, 4);
    for round in 1..=2 {
        load.wait_for(100, "load under way");
        proxy.down();
        // Ingest goes on while the broker is away.
        load.wait_for(50, &format!("202s during outage {round}"));
        proxy.up();
    }
    let ids = load.stop();
    env.wait_processed(&ids, Duration::from_secs(60));
    let twice = env.processed_twice();
    assert_eq!(twice, 0);
    assert_eq!(env.count("SELECT count(*) FROM runs"), ids.len() as i64);
    app.shutdown().unwrap();
}

#[test]
fn database_restarts_mid_stream_lose_nothing() {
    let env = TestEnv::new("dbbounce");
    let (proxy, url) = db_proxy();
    let config = env.config_with(&[
        ("INGEST_DATABASE_URL", &url),
        ("INGEST_DB_TIMEOUT", &db_timeout_var()),
    ]);
    let app = env.start_role(&config, Role::All);
    let addr = app.http_addr().unwrap();
    let load = Load::start(addr, 4);
    for _ in 0..2 {
        load.wait_for(100, "load under way");
        proxy.down();
        // The outage is real to the service before it ends: ingest is
        // refused and /readyz reports the database down.
        wait_until(Duration::from_secs(10), "ingest refused", || {
            ingest_status(addr) == 503
        });
        wait_until(
            Duration::from_secs(10),
            "readyz reports postgres down",
            || get(addr, "/readyz").json()["checks"]["postgres"] == "down",
        );
        proxy.up();
    }
    wait_until(Duration::from_secs(30), "ingest resumed", || {
        ingest_status(addr) == 202
    });
    let ids = load.stop();
    env.wait_processed(&ids, Duration::from_secs(60));
    let twice = env.processed_twice();
    assert_eq!(twice, 0);
    app.shutdown().unwrap();
}

#[test]
fn shutdown_with_the_broker_down_keeps_events_in_the_outbox() {
    let env = TestEnv::new("downstop");
    let proxy = Proxy::start(&amqp_host_port(), false);
    let amqp = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let config = env.config_with(&[
        ("INGEST_AMQP_URL", &amqp),
        ("INGEST_SHUTDOWN_TIMEOUT", "10s"),
    ]);
    let app = env.start_role(&config, Role::All);
    let addr = app.http_addr().unwrap();
    let ids: Vec<Uuid> = (0..10).map(|i| ingest(addr, &json!(i))).collect();
    app.shutdown().expect("exits within the timeout");
    assert_eq!(env.count("SELECT count(*) FROM outbox"), ids.len() as i64);
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE status = 'pending'"),
        ids.len() as i64
    );
}

fn ingest_status(addr: std::net::SocketAddr) -> u16 {
    post_json(addr, "/v1/events", r#"{"payload":"probe"}"#).status
}

#[test]
fn a_full_commit_queue_answers_503_at_once() {
    let env = TestEnv::new("busy");
    let (proxy, url) = db_proxy();
    // A long checkout, so that "at once" is far from "after a timeout".
    let db_timeout = Duration::from_secs(3);
    let config = env.config_with(&[
        ("INGEST_DATABASE_URL", &url),
        (
            "INGEST_DB_TIMEOUT",
            &format!("{}ms", db_timeout.as_millis()),
        ),
        ("INGEST_COMMITTERS", "1"),
        ("INGEST_COMMIT_QUEUE", "1"),
        ("INGEST_HTTP_THREADS", "8"),
    ]);
    let app = env.start_role(&config, Role::Api);
    let addr = app.http_addr().unwrap();
    proxy.down();
    // The committer hangs on the dead database with one event and one more
    // waits in the queue; every other request is refused at once.
    let start = Arc::new(Barrier::new(8));
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let started = Instant::now();
                let resp = post_json(addr, "/v1/events", r#"{"payload":"x"}"#);
                let code = resp.json()["error"].as_str().unwrap_or("").to_string();
                let retry_after = resp.header("retry-after").is_some();
                (resp.status, code, retry_after, started.elapsed())
            })
        })
        .collect();
    let answers: Vec<_> = requests.into_iter().map(|r| r.join().unwrap()).collect();
    let busy = answers.iter().filter(|a| a.1 == "busy").count();
    assert!(busy >= 4, "{answers:?}");
    for (status, code, retry_after, took) in &answers {
        assert_eq!(*status, 503, "{answers:?}");
        assert!(*retry_after);
        if code == "busy" {
            // Refused without waiting for the database: a small fraction
            // of one checkout, however loaded the machine.
            assert!(*took < db_timeout / 3, "busy after {took:?}: {answers:?}");
        } else {
            // The request in hand and the one queued behind it wait one
            // checkout each at most.
            assert_eq!(code, "unavailable", "{answers:?}");
            assert!(
                *took < 2 * db_timeout + Duration::from_secs(1),
                "{answers:?}"
            );
        }
    }
    proxy.up();
    app.shutdown().unwrap();
}

/// A commit that runs into the statement timeout (a lock held elsewhere) is
/// answered 503 for its whole batch at once, not retried request by
/// request, each waiting the timeout again.
#[test]
fn a_statement_timeout_answers_its_whole_batch_at_once() {
    let env = TestEnv::new("stmttimeout");
    let config = env.config_with(&[
        ("INGEST_DB_STATEMENT_TIMEOUT", "1s"),
        ("INGEST_COMMITTERS", "1"),
        ("INGEST_HTTP_THREADS", "8"),
    ]);
    let app = env.start_role(&config, Role::Api);
    let addr = app.http_addr().unwrap();
    let mut sql = env.sql();
    let mut lock = sql.transaction().unwrap();
    lock.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let started = Instant::now();
    let requests: Vec<_> = (0..6)
        .map(|i| {
            std::thread::spawn(move || {
                post_json(addr, "/v1/events", &json!({ "payload": i }).to_string())
            })
        })
        .collect();
    for r in requests {
        let resp = r.join().unwrap();
        assert_eq!(resp.status, 503, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(resp.json()["error"], "unavailable");
    }
    // Two rounds of the 1 s timeout at most (the first request alone, then
    // everyone who queued behind it), with slack; one by one would take six.
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "answered after {took:?}"
    );
    lock.rollback().unwrap();
    assert_eq!(env.count("SELECT count(*) FROM events"), 0);
    app.shutdown().unwrap();
}

/// Requests carrying an `Idempotency-Key` each get a transaction of their
/// own, so an outage must refuse each of them promptly, not one after the
/// other's checkout; a refused request must not use its key up.
#[test]
fn keyed_requests_during_a_database_outage_are_refused_promptly_and_keep_their_key() {
    let env = TestEnv::new("keyeddown");
    let (proxy, url) = db_proxy();
    let config = env.config_with(&[
        ("INGEST_DATABASE_URL", &url),
        ("INGEST_DB_TIMEOUT", &db_timeout_var()),
        // One committer serves the keyed requests one after another, and
        // no stats refresher takes a probe in their place: the worst case
        // for a queue of keyed requests.
        ("INGEST_COMMITTERS", "1"),
        ("INGEST_STATS_INTERVAL", "1h"),
    ]);
    let app = env.start_role(&config, Role::Api);
    let addr = app.http_addr().unwrap();
    let keyed = |key: &str, body: &str| {
        let headers = [
            ("Content-Type", "application/json"),
            ("Idempotency-Key", key),
        ];
        let started = Instant::now();
        let resp = request(addr, "POST", "/v1/events", &headers, body.as_bytes()).unwrap();
        (resp, started.elapsed())
    };
    let one = r#"{"payload":{"order":7}}"#;
    let batch = r#"[{"payload":1},{"payload":2}]"#;

    proxy.down();
    let bound = DB_TIMEOUT + Duration::from_secs(1);
    // One client retrying the same keys, as a client told to retry does.
    for _ in 0..3 {
        for (key, body) in [("order-7", one), ("batch-1", batch)] {
            let (resp, took) = keyed(key, body);
            assert_eq!(resp.status, 503, "{}", String::from_utf8_lossy(&resp.body));
            assert_eq!(resp.json()["error"], "unavailable");
            assert!(resp.header("retry-after").is_some());
            assert!(took < bound, "{key}: 503 after {took:?}, bound {bound:?}");
        }
    }
    // Many clients at once, each with its own key.
    let start = Arc::new(Barrier::new(8));
    let burst: Vec<_> = (0..8)
        .map(|i| {
            let start = start.clone();
            std::thread::spawn(move || {
                let key = format!("burst-{i}");
                let headers = [
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", &key),
                ];
                start.wait();
                let started = Instant::now();
                let resp = request(addr, "POST", "/v1/events", &headers, b"{\"payload\":0}");
                (resp.unwrap().status, started.elapsed())
            })
        })
        .collect();
    let answers: Vec<(u16, Duration)> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    for (status, took) in &answers {
        assert_eq!(*status, 503, "{answers:?}");
        assert!(*took < bound, "{answers:?}, bound {bound:?}");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM events"),
        0,
        "nothing written"
    );
    assert_eq!(env.count("SELECT count(*) FROM idempotency_keys"), 0);

    proxy.up();
    let mut first = None;
    wait_until(Duration::from_secs(20), "the key accepted", || {
        let (resp, _) = keyed("order-7", one);
        if resp.status == 202 {
            first = Some(resp.json()["id"].as_str().unwrap().to_string());
        }
        resp.status == 202
    });
    let (again, _) = keyed("order-7", one);
    assert_eq!(again.status, 200, "{:?}", again.json());
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(again.json()["id"].as_str(), first.as_deref());
    let (batch_resp, _) = keyed("batch-1", batch);
    assert_eq!(batch_resp.status, 202, "{:?}", batch_resp.json());
    assert_eq!(env.count("SELECT count(*) FROM events"), 3);
    assert_eq!(env.count("SELECT count(*) FROM idempotency_keys"), 2);
    app.shutdown().unwrap();
}

/// The refused-connection twin of the blackhole test: with the database
/// refusing connections, SIGTERM ends the process within
/// `INGEST_SHUTDOWN_TIMEOUT`, exit status 0, every request in hand answered
/// and every delivery the workers could not process back in the queue.
#[test]
fn sigterm_while_the_database_is_down_exits_in_time_with_every_request_answered() {
    let env = TestEnv::new("pgdownterm");
    let (proxy, url) = db_proxy();
    let shutdown_timeout = Duration::from_secs(10);
    let mut binary = env.spawn_binary_with(
        None,
        &[
            ("INGEST_DATABASE_URL", &url),
            ("INGEST_DB_TIMEOUT", &db_timeout_var()),
            ("INGEST_SHUTDOWN_TIMEOUT", "10s"),
        ],
    );
    let addr = binary.addr.unwrap();
    let before = ingest(addr, &json!("before"));
    env.wait_processed(&[before], Duration::from_secs(10));

    proxy.down();
    wait_until(Duration::from_secs(10), "ingest refused", || {
        ingest_status(addr) == 503
    });
    // A delivery the workers cannot process now: the consumer holds it for
    // a requeue when shutdown begins.
    let stranded = Uuid::new_v4();
    env.publish_raw(
        json!({ "id": stranded.to_string(), "payload": 1 })
            .to_string()
            .as_bytes(),
    );
    let queue = env.topology().queue.to_string();
    wait_until(Duration::from_secs(10), "the delivery taken", || {
        env.queue_depth(&queue) == 0
    });
    // A request in hand: its head and half its body arrive before SIGTERM,
    // the rest just after.
    let body = br#"{"payload":"slow"}"#;
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        slow,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    slow.write_all(&body[..8]).unwrap();
    // More requests sent whole at the moment of the signal.
    let start = Arc::new(Barrier::new(5));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let body = json!({ "payload": { "at_sigterm": i } }).to_string();
                post_json(addr, "/v1/events", &body)
            })
        })
        .collect();
    start.wait();
    let started = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &binary.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    slow.write_all(&body[8..]).unwrap();
    let mut raw = Vec::new();
    let _ = slow.read_to_end(&mut raw);
    let status = binary.child.wait().unwrap();
    let took = started.elapsed();
    let log = binary.log.take().unwrap().join().unwrap().join("\n");
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(took < shutdown_timeout, "exit took {took:?}; log:\n{log}");

    let resp = parse_response(&raw).expect("the request in hand was answered");
    assert_eq!(resp.status, 503, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(resp.json()["error"], "unavailable");
    for client in clients {
        let resp = client.join().unwrap();
        assert_eq!(resp.status, 503, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(resp.json()["error"], "unavailable");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM events"),
        1,
        "nothing written"
    );
    wait_until(
        Duration::from_secs(5),
        "the stranded delivery requeued",
        || env.queue_depth(&queue) == 1,
    );
    eprintln!("exited {took:?} after SIGTERM with the database down");
}
