//! The HTTP API: routes, the status query and every bad-input case.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::util::{TestEnv, get, post_json, request};

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

/// One bad request: name, method, path, headers, body, status, error code.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Headers<'a>,
    &'a [u8],
    u16,
    &'a str,
);
type Headers<'a> = &'a [(&'a str, &'a str)];

#[test]
fn bad_input_is_refused_and_writes_nothing() {
    let env = TestEnv::new("badinput");
    let app = env.start_role(
        &env.config_with(&[("INGEST_MAX_BODY_BYTES", "1024")]),
        ingestd::Role::All,
    );
    let addr = app.http_addr().unwrap();
    let json_ct = [("Content-Type", "application/json")];
    let big = format!(r#"{{"payload":"{}"}}"#, "x".repeat(2000));

    let cases: Vec<Case> = vec![
        (
            "malformed json",
            "POST",
            "/v1/events",
            &json_ct,
            b"{\"payload\": ",
            400,
            "invalid_json",
        ),
        (
            "empty body",
            "POST",
            "/v1/events",
            &json_ct,
            b"",
            400,
            "invalid_json",
        ),
        (
            "missing payload",
            "POST",
            "/v1/events",
            &json_ct,
            b"{\"data\":1}",
            400,
            "invalid_body",
        ),
        (
            "null payload",
            "POST",
            "/v1/events",
            &json_ct,
            b"{\"payload\":null}",
            400,
            "invalid_body",
        ),
        (
            "nul in payload",
            "POST",
            "/v1/events",
            &json_ct,
            b"{\"payload\":\"a\\u0000b\"}",
            400,
            "invalid_body",
        ),
        (
            "non-object body",
            "POST",
            "/Ingestion/ingest",
            &json_ct,
            b"[1,2]",
            400,
            "invalid_body",
        ),
        (
            "invalid utf-8",
            "POST",
            "/v1/events",
            &json_ct,
            b"{\"payload\":\"\xff\"}",
            400,
            "invalid_json",
        ),
        (
            "wrong content type",
            "POST",
            "/v1/events",
            &[("Content-Type", "text/plain")],
            b"{\"payload\":1}",
            415,
            "unsupported_media_type",
        ),
        (
            "missing content type",
            "POST",
            "/Ingestion/ingest",
            &[],
            b"{\"payload\":1}",
            415,
            "unsupported_media_type",
        ),
        (
            "oversize body",
            "POST",
            "/v1/events",
            &json_ct,
            big.as_bytes(),
            413,
            "payload_too_large",
        ),
        (
            "unknown path",
            "POST",
            "/v2/events",
            &json_ct,
            b"{\"payload\":1}",
            404,
            "not_found",
        ),
        (
            "wrong method",
            "GET",
            "/Ingestion/ingest",
            &[],
            b"",
            405,
            "method_not_allowed",
        ),
        (
            "delete an event",
            "DELETE",
            "/v1/events/00000000-0000-0000-0000-000000000000",
            &[],
            b"",
            405,
            "method_not_allowed",
        ),
        (
            "invalid id",
            "GET",
            "/v1/events/123",
            &[],
            b"",
            400,
            "invalid_id",
        ),
    ];
    for (name, method, path, headers, body, status, code) in cases {
        let resp = request(addr, method, path, headers, body).expect(name);
        assert_eq!(
            resp.status,
            status,
            "{name}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        let err = resp.json();
        assert_eq!(err["error"], code, "{name}");
        assert!(
            err["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{name}"
        );
        if status == 405 {
            assert!(resp.header("allow").is_some(), "{name}: Allow header");
        }
        assert_eq!(
            env.count("SELECT count(*) FROM events"),
            0,
            "{name} wrote an event"
        );
        assert_eq!(
            env.count("SELECT count(*) FROM outbox"),
            0,
            "{name} wrote an outbox row"
        );
    }
    // The server still serves a good request afterwards.
    assert_eq!(
        post_json(addr, "/v1/events", r#"{"payload":1}"#).status,
        202
    );
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
    assert_eq!(value("ingestd_outbox_rows"), 0.0);
    assert!(value("ingestd_broker_connects_total") >= 2.0);
    assert!(value("ingestd_commit_batch_events_count") >= 1.0);
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

/// Sends raw bytes on a fresh connection and reads until `responses`
/// complete JSON responses arrived, the server closes, or `wait` passes.
fn raw_exchange(
    addr: std::net::SocketAddr,
    bytes: &[u8],
    responses: usize,
    wait: Duration,
) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    stream.write_all(bytes).unwrap();
    let mut out = String::new();
    let mut buf = [0u8; 4096];
    while !(out.matches("HTTP/1.1 ").count() >= responses && out.ends_with('}')) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    out
}

#[test]
fn hostile_requests_do_not_hurt_the_server() {
    let env = TestEnv::new("hostile");
    let app = env.start();
    let addr = app.http_addr().unwrap();

    // A Content-Length no body could have: refused, nothing allocated.
    for _ in 0..10 {
        let answer = raw_exchange(
            addr,
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 18446744073709551615\r\n\r\n",
            1,
            Duration::from_secs(5),
        );
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    // Two ingests pipelined on one connection are both answered, in order,
    // although group commit may commit them in either order.
    let one = "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
               Content-Length: 13\r\n\r\n{\"payload\":1}";
    let last = one.replace("Host: x\r\n", "Host: x\r\nConnection: close\r\n");
    let answer = raw_exchange(
        addr,
        format!("{one}{one}{one}{last}").as_bytes(),
        4,
        Duration::from_secs(10),
    );
    assert_eq!(answer.matches("HTTP/1.1 202").count(), 4, "{answer}");

    // Clients stalled half-way through their requests hold their own
    // connections only; everyone else is served.
    let stalled: Vec<std::net::TcpStream> = (0..16)
        .map(|_| {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Le")
                .unwrap();
            s
        })
        .collect();
    let ids: Vec<Uuid> = (0..20)
        .map(|i| crate::util::ingest(addr, &json!(i)))
        .collect();
    env.wait_processed(&ids, Duration::from_secs(10));
    drop(stalled);
    assert_eq!(get(addr, "/healthz").status, 200);
    app.shutdown()
        .expect("stalled clients do not hold up shutdown");
}
