//! Outages of one instance's dependencies, made with a TCP proxy so that
//! tests running in parallel keep their services.

use std::time::{Duration, Instant};

use ingestd::Role;
use serde_json::json;
use uuid::Uuid;

use crate::util::{Proxy, TestEnv, db_url, get, ingest, post_json, wait_until};

fn amqp_host_port() -> String {
    let url = ingestd::broker::AmqpUrl::parse(&crate::util::amqp_url()).unwrap();
    format!("{}:{}", url.host, url.port)
}

#[test]
fn broker_down_at_ingest_still_accepts_and_delivers_later() {
    let env = TestEnv::new("brokerdown");
    let proxy = Proxy::start(&amqp_host_port(), false);
    let amqp = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let app = env.start_role(&env.config_with(&[("INGEST_AMQP_URL", &amqp)]), Role::All);
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
    let pg: postgres::Config = db_url().parse().unwrap();
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let proxy = Proxy::start(&format!("127.0.0.1:{port}"), true);
    let url = format!(
        "postgres://{}@{}/{}",
        pg.get_user().unwrap_or("postgres"),
        proxy.addr(),
        pg.get_dbname().unwrap_or("test")
    );
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
