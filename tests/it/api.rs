//! The HTTP API: routes, the status query, metrics and keep-alive bursts.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::util::{TestEnv, get, post_json};

#[test]
fn legacy_route_accepts_the_original_body() {
    let env = TestEnv::new("legacy");
    let app = env.start();
    let addr = app.http_addr().unwrap();

    let resp = post_json(addr, "/Ingestion/ingest", r#"{"payload":"Test masivo"}"#);
    assert_eq!(resp.status, 202);
    let body = resp.json();
    assert_eq!(body["status"], "pending");
    let id = Uuid::parse_str(body["id"].as_str().unwrap()).unwrap();
    assert_eq!(resp.header("location"), Some(&*format!("/v1/events/{id}")));
    assert_eq!(resp.header("content-type"), Some("application/json"));

    env.wait_processed(&[id], Duration::from_secs(10));
    let event = get(addr, &format!("/v1/events/{id}")).json();
    assert_eq!(event["payload"], "Test masivo");
    app.shutdown().unwrap();
}

#[test]
fn status_query_shows_the_event_lifecycle() {
    let env = TestEnv::new("status");
    let app = env.start();
    let addr = app.http_addr().unwrap();

    let resp = post_json(
        addr,
        "/v1/events",
        r#"{"payload":{"order":42,"items":[1,2]}}"#,
    );
    assert_eq!(resp.status, 202);
    let id = Uuid::parse_str(resp.json()["id"].as_str().unwrap()).unwrap();
    env.wait_processed(&[id], Duration::from_secs(10));

    let resp = get(addr, &format!("/v1/events/{id}"));
    assert_eq!(resp.status, 200);
    let event = resp.json();
    assert_eq!(event["id"], id.to_string());
    assert_eq!(event["status"], "processed");
    assert_eq!(event["attempts"], 1);
    assert_eq!(event["payload"], json!({"order":42,"items":[1,2]}));
    assert!(event["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(event["processed_at"].as_str().is_some());
    assert!(event["last_error"].is_null());

    let unknown = get(addr, &format!("/v1/events/{}", Uuid::new_v4()));
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "event_not_found");
    let invalid = get(addr, "/v1/events/not-a-uuid");
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.json()["error"], "invalid_id");

    assert_eq!(get(addr, "/healthz").status, 200);
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 200, "{:?}", ready.json());
    assert_eq!(ready.json()["checks"]["postgres"], "up");
    app.shutdown().unwrap();
}

#[test]
fn metrics_follow_the_pipeline() {
    let env = TestEnv::new("metrics");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let ids: Vec<Uuid> = (0..5)
        .map(|i| crate::util::ingest(addr, &json!(i)))
        .collect();
    assert_eq!(post_json(addr, "/v1/events", "{").status, 400);
    env.wait_processed(&ids, Duration::from_secs(10));

    let resp = get(addr, "/metrics");
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(resp.body).unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("ingestd_http_requests_total{route=\"ingest\",status=\"202\"}"),
        5.0
    );
    assert_eq!(
        value("ingestd_http_requests_total{route=\"ingest\",status=\"400\"}"),
        1.0
    );
    assert_eq!(value("ingestd_events_committed_total"), 5.0);
    assert_eq!(value("ingestd_ingest_duration_seconds_count"), 5.0);
    assert_eq!(value("ingestd_relay_published_total"), 5.0);
    assert_eq!(value("ingestd_events_processed_total"), 5.0);
    assert_eq!(value("ingestd_deliveries_total"), 5.0);
    // The outbox figures are read in the background, once per interval.
    crate::util::wait_until(
        Duration::from_secs(10),
        "the outbox figures catch up",
        || {
            let text = String::from_utf8(get(addr, "/metrics").body).unwrap();
            text.lines().any(|l| l == "ingestd_outbox_rows 0")
        },
    );
    assert!(value("ingestd_broker_connects_total") >= 2.0);
    assert!(value("ingestd_commit_batch_events_count") >= 1.0);
    // The scrape's own connection is open; a GET holds no body.
    assert!(value("ingestd_http_connections") >= 1.0);
    assert_eq!(value("ingestd_http_buffered_bytes"), 0.0);
    assert_eq!(value("ingestd_events_replayed_total"), 0.0);
    app.shutdown().unwrap();
}

#[test]
fn a_burst_of_keep_alive_connections_is_served() {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::{Arc, Barrier};

    let env = TestEnv::new("burst");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let n = 32;
    let (opened, answered) = (Arc::new(Barrier::new(n)), Arc::new(Barrier::new(n)));
    // Every client opens its connection at the same moment and keeps it
    // open until all have been answered, as a connection pool does: a
    // connection left without a server thread would wait for ever.
    let clients: Vec<_> = (0..n)
        .map(|_| {
            let (opened, answered) = (opened.clone(), answered.clone());
            std::thread::spawn(move || {
                opened.wait();
                let result = (|| -> std::io::Result<(String, std::net::TcpStream)> {
                    let mut stream = std::net::TcpStream::connect(addr)?;
                    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")?;
                    let mut status = String::new();
                    BufReader::new(stream.try_clone()?).read_line(&mut status)?;
                    Ok((status, stream))
                })();
                answered.wait();
                result.map(|(status, _stream)| status)
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let failed: Vec<_> = results
        .iter()
        .filter(|r| !r.as_ref().is_ok_and(|s| s.contains(" 200 ")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {n} connections were not served: {failed:?}",
        failed.len()
    );
    app.shutdown().unwrap();
}
