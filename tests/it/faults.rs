//! Outages of one instance's dependencies, made with a TCP proxy so that
//! tests running in parallel keep their services.

use std::time::{Duration, Instant};

use ingestd::Role;
use serde_json::json;
use uuid::Uuid;

use crate::util::{
    Load, Proxy, TestEnv, amqp_host_port, db_proxy, get, ingest, post_json, wait_until,
};

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
    let config = env.config_with(&[("INGEST_DATABASE_URL", &url), ("INGEST_DB_TIMEOUT", "1s")]);
    let app = env.start_role(&config, Role::Api);
    let addr = app.http_addr().unwrap();
    assert_eq!(
        post_json(addr, "/v1/events", r#"{"payload":1}"#).status,
        202
    );

    proxy.down();
    for _ in 0..3 {
        let started = Instant::now();
        let resp = post_json(addr, "/v1/events", r#"{"payload":2}"#);
        assert_eq!(resp.status, 503, "{}", String::from_utf8_lossy(&resp.body));
        assert_eq!(resp.json()["error"], "unavailable");
        assert!(resp.header("retry-after").is_some());
        // The client's own read timeout would catch a hung request; this
        // just reports how long the refusal took if it ever regresses.
        eprintln!("503 after {:?}", started.elapsed());
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
    let config = env.config_with(&[("INGEST_DATABASE_URL", &url), ("INGEST_DB_TIMEOUT", "1s")]);
    let app = env.start_role(&config, Role::All);
    let addr = app.http_addr().unwrap();
    let load = Load::start(addr, 4);
    for _ in 0..2 {
        load.wait_for(100, "load under way");
        proxy.down();
        std::thread::sleep(Duration::from_millis(1500));
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
    let config = env.config_with(&[
        ("INGEST_DATABASE_URL", &url),
        ("INGEST_DB_TIMEOUT", "3s"),
        ("INGEST_COMMITTERS", "1"),
        ("INGEST_COMMIT_QUEUE", "1"),
        ("INGEST_HTTP_THREADS", "8"),
    ]);
    let app = env.start_role(&config, Role::Api);
    let addr = app.http_addr().unwrap();
    proxy.down();
    // The committer hangs on the dead database with one event and one more
    // waits in the queue; every other request is refused at once.
    let requests: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
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
            eprintln!("busy answered after {took:?}");
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
