//! Bad and hostile input: every malformed, oversized, unauthorized or
//! stalling request gets its own clear answer, writes nothing, and leaves
//! the server serving everyone else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ingestd::Role;
use serde_json::json;
use uuid::Uuid;

use crate::ops::{metric, scrape};
use crate::util::{
    Resp, TestEnv, assert_healthz_instant, get, ingest, post_json, raw_request, request, wait_until,
};

const KEY: &str = "hardening-key-0123456789";

/// How a case reaches the server.
enum Send {
    /// A well-formed request with these headers and body; the API key is
    /// added unless the headers carry `Authorization` or `X-Api-Key`.
    Request(&'static str, String, Vec<(String, String)>, Vec<u8>),
    /// Raw bytes, then, with `true`, the end of the client's sending side.
    Raw(Vec<u8>, bool),
}

struct Case {
    name: &'static str,
    send: Send,
    status: u16,
    code: &'static str,
}

fn case(
    name: &'static str,
    method: &'static str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    status: u16,
    code: &'static str,
) -> Case {
    let headers = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Case {
        name,
        send: Send::Request(method, path.to_string(), headers, body.to_vec()),
        status,
        code,
    }
}

fn raw(
    name: &'static str,
    bytes: Vec<u8>,
    half_close: bool,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        name,
        send: Send::Raw(bytes, half_close),
        status,
        code,
    }
}

fn run(addr: SocketAddr, send: &Send) -> Resp {
    match send {
        Send::Request(method, path, headers, body) => {
            let mut all: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let has_key = all.iter().any(|(k, _)| {
                k.eq_ignore_ascii_case("authorization") || k.eq_ignore_ascii_case("x-api-key")
            });
            if !has_key {
                all.push(("X-Api-Key", KEY));
            }
            request(addr, method, path, &all, body).expect("request")
        }
        Send::Raw(bytes, half_close) => {
            raw_request(addr, bytes, *half_close, Duration::from_secs(10)).expect("raw request")
        }
    }
}

/// A raw `POST /v1/events` with the key and JSON content type, the given
/// extra header lines and the body as sent (not as announced).
fn raw_post(extra: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\
         Content-Type: application/json\r\n{extra}\r\n"
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[test]
fn bad_input_is_refused_clearly_and_writes_nothing() {
    let env = TestEnv::new("badinput");
    let config = env.config_with(&[
        ("INGEST_API_KEYS", KEY),
        ("INGEST_MAX_BODY_BYTES", "4096"),
        ("INGEST_MAX_BATCH", "5"),
        ("INGEST_MAX_PAYLOAD_BYTES", "512"),
        ("INGEST_MAX_JSON_DEPTH", "8"),
        ("INGEST_HTTP_MAX_HEADER_BYTES", "4096"),
        ("INGEST_HTTP_BODY_TIMEOUT", "1s"),
    ]);
    let app = env.start_role(&config, Role::All);
    let addr = app.http_addr().unwrap();
    let json_ct = ("Content-Type", "application/json");
    let post = |name, headers: &[(&str, &str)], body: &[u8], status, code| {
        case(name, "POST", "/v1/events", headers, body, status, code)
    };
    let deep = format!("{{\"payload\":{}1{}}}", "[".repeat(20), "]".repeat(20));
    let big_payload = json!({ "payload": "x".repeat(600) }).to_string();
    let big_batch = json!(vec![json!({"payload": 1}); 6]).to_string();
    let id = Uuid::new_v4();
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let chunked_big = {
        let chunk = format!("1000\r\n{}\r\n", " ".repeat(4096));
        format!("Transfer-Encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n")
    };

    let cases = vec![
        post(
            "malformed json",
            &[json_ct],
            b"{\"payload\": ",
            400,
            "invalid_json",
        ),
        post(
            "truncated json",
            &[json_ct],
            b"{\"payload\":[1,2",
            400,
            "invalid_json",
        ),
        post("empty body", &[json_ct], b"", 400, "invalid_json"),
        post("blank body", &[json_ct], b" \r\n ", 400, "invalid_json"),
        post(
            "invalid utf-8",
            &[json_ct],
            b"{\"payload\":\"\xff\xfe\"}",
            400,
            "invalid_json",
        ),
        post("non-object body", &[json_ct], b"42", 400, "invalid_body"),
        post(
            "string body",
            &[json_ct],
            b"\"payload\"",
            400,
            "invalid_body",
        ),
        post(
            "missing payload",
            &[json_ct],
            b"{\"data\":1}",
            400,
            "invalid_body",
        ),
        post(
            "null payload",
            &[json_ct],
            b"{\"payload\":null}",
            400,
            "invalid_body",
        ),
        post(
            "nul in payload",
            &[json_ct],
            b"{\"payload\":\"a\\u0000b\"}",
            400,
            "invalid_body",
        ),
        post(
            "type not a string",
            &[json_ct],
            b"{\"payload\":1,\"type\":5}",
            400,
            "invalid_body",
        ),
        post(
            "key too long",
            &[json_ct],
            format!("{{\"payload\":1,\"key\":\"{}\"}}", "k".repeat(256)).as_bytes(),
            400,
            "invalid_body",
        ),
        post(
            "id not a uuid",
            &[json_ct],
            b"{\"payload\":1,\"id\":\"42\"}",
            400,
            "invalid_body",
        ),
        post("deep nesting", &[json_ct], deep.as_bytes(), 400, "too_deep"),
        post("empty batch", &[json_ct], b"[]", 400, "invalid_body"),
        post(
            "bad batch item",
            &[json_ct],
            b"[{\"payload\":1},{\"payload\":null}]",
            400,
            "invalid_body",
        ),
        post(
            "batch with a duplicate id",
            &[json_ct],
            json!([{"id": id.to_string(), "payload": 1}, {"id": id.to_string(), "payload": 2}])
                .to_string()
                .as_bytes(),
            400,
            "invalid_body",
        ),
        post(
            "invalid Idempotency-Key",
            &[json_ct, ("Idempotency-Key", "has space")],
            b"{\"payload\":1}",
            400,
            "invalid_idempotency_key",
        ),
        post(
            "oversize payload",
            &[json_ct],
            big_payload.as_bytes(),
            413,
            "payload_too_large",
        ),
        post(
            "oversize batch",
            &[json_ct],
            big_batch.as_bytes(),
            413,
            "batch_too_large",
        ),
        post(
            "oversize body",
            &[json_ct],
            &[b' '; 5000],
            413,
            "body_too_large",
        ),
        raw(
            "oversize chunked body",
            raw_post(&chunked_big, b""),
            false,
            413,
            "body_too_large",
        ),
        raw(
            "impossible Content-Length",
            raw_post("Content-Length: 18446744073709551615\r\n", b""),
            false,
            413,
            "body_too_large",
        ),
        post(
            "wrong content type",
            &[("Content-Type", "text/plain")],
            b"{\"payload\":1}",
            415,
            "unsupported_media_type",
        ),
        post(
            "missing content type",
            &[],
            b"{\"payload\":1}",
            415,
            "unsupported_media_type",
        ),
        raw(
            "truncated body",
            raw_post("Content-Length: 40\r\n", b"{\"payload\":"),
            true,
            400,
            "bad_request",
        ),
        raw(
            "stalled body",
            raw_post("Content-Length: 40\r\n", b"{\"payload\":"),
            false,
            408,
            "request_timeout",
        ),
        case(
            "wrong method on ingest",
            "GET",
            "/Ingestion/ingest",
            &[],
            b"",
            405,
            "method_not_allowed",
        ),
        case(
            "wrong method on events",
            "PUT",
            "/v1/events",
            &[json_ct],
            b"{}",
            405,
            "method_not_allowed",
        ),
        case(
            "delete an event",
            "DELETE",
            &format!("/v1/events/{id}"),
            &[],
            b"",
            405,
            "method_not_allowed",
        ),
        case(
            "unknown path",
            "POST",
            "/v2/events",
            &[json_ct],
            b"{\"payload\":1}",
            404,
            "not_found",
        ),
        case(
            "invalid id",
            "GET",
            "/v1/events/123",
            &[],
            b"",
            400,
            "invalid_id",
        ),
        case(
            "invalid id to retry",
            "POST",
            "/v1/events/zzz/retry",
            &[],
            b"",
            400,
            "invalid_id",
        ),
        post(
            "missing API key",
            &[json_ct, ("Authorization", "")],
            b"{\"payload\":1}",
            401,
            "unauthorized",
        ),
        post(
            "wrong API key",
            &[json_ct, ("X-Api-Key", "wrong-key-0123456789abcd")],
            b"{\"payload\":1}",
            401,
            "unauthorized",
        ),
        post(
            "key with the wrong scheme",
            &[json_ct, ("Authorization", &format!("Basic {KEY}"))],
            b"{\"payload\":1}",
            401,
            "unauthorized",
        ),
        case(
            "query without a key",
            "GET",
            &format!("/v1/events/{id}"),
            &[("Authorization", "Bearer nope")],
            b"",
            401,
            "unauthorized",
        ),
        raw(
            "one huge header",
            raw_post(&format!("X-Filler: {}\r\n", "a".repeat(8000)), b""),
            false,
            431,
            "header_too_large",
        ),
        raw(
            "header flood",
            raw_post(&many_headers, b""),
            false,
            431,
            "header_too_large",
        ),
        raw(
            "endless header line",
            [b"GET /healthz HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 100_000]].concat(),
            false,
            431,
            "header_too_large",
        ),
        raw(
            "malformed request line",
            b"NONSENSE\r\n\r\n".to_vec(),
            false,
            400,
            "bad_request",
        ),
        raw(
            "malformed header",
            b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n".to_vec(),
            false,
            400,
            "bad_request",
        ),
    ];
    let mut summary = Vec::new();
    for c in &cases {
        let resp = run(addr, &c.send);
        let body = String::from_utf8_lossy(&resp.body).to_string();
        assert_eq!(resp.status, c.status, "{}: {body}", c.name);
        let err = resp.json();
        assert_eq!(err["error"], c.code, "{}: {body}", c.name);
        assert!(
            err["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{}",
            c.name
        );
        match c.status {
            405 => assert!(resp.header("allow").is_some(), "{}: Allow", c.name),
            401 => assert!(resp.header("www-authenticate").is_some(), "{}", c.name),
            _ => {}
        }
        if c.name == "bad batch item" {
            assert_eq!(err["index"], 1);
        }
        for table in ["events", "outbox", "idempotency_keys"] {
            let n = env.count(&format!("SELECT count(*) FROM {table}"));
            assert_eq!(n, 0, "{}: wrote to {table}", c.name);
        }
        // Still serving: an authorized query answers.
        let probe = request(
            addr,
            "GET",
            &format!("/v1/events/{id}"),
            &[("X-Api-Key", KEY)],
            b"",
        )
        .unwrap_or_else(|e| panic!("{}: server no longer answers: {e}", c.name));
        assert_eq!(probe.status, 404, "{}: server still serves", c.name);
        summary.push(format!("{:<32} {} {}", c.name, c.status, c.code));
    }
    eprintln!("bad-input cases:\n{}", summary.join("\n"));
    let ok = request(
        addr,
        "POST",
        "/v1/events",
        &[json_ct, ("X-Api-Key", KEY)],
        b"{\"payload\":1}",
    )
    .unwrap();
    assert_eq!(ok.status, 202);
    app.shutdown().unwrap();
}

/// A client that sends `at_once`, then `bytes` one byte a second, and
/// returns what the server answered.
fn trickle(
    addr: SocketAddr,
    at_once: &'static [u8],
    bytes: &'static [u8],
) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(at_once).unwrap();
        for b in bytes {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            thread::sleep(Duration::from_secs(1));
        }
        // Whatever the server said before it closed.
        let mut answer = String::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read_to_string(&mut answer);
        answer
    })
}

#[test]
fn stalled_connections_do_not_block_other_clients() {
    let env = TestEnv::new("stalled");
    let config = env.config_with(&[
        ("INGEST_HTTP_HEADER_TIMEOUT", "3s"),
        ("INGEST_HTTP_BODY_TIMEOUT", "3s"),
    ]);
    let app = env.start_role(&config, Role::All);
    let addr = app.http_addr().unwrap();
    // More stalled clients than parse turns (4 in tests): half in
    // their headers, half in their bodies, one byte a second.
    let head: &'static [u8] =
        b"POST /v1/events HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n";
    let body: &'static [u8] = b"{\"payload\":\"slow!\"}";
    let tricklers: Vec<_> = (0..6)
        .map(|_| trickle(addr, b"", head))
        .chain((0..6).map(|_| trickle(addr, head, body)))
        .collect();
    thread::sleep(Duration::from_millis(500));
    // Everyone else is served meanwhile.
    let ids: Vec<Uuid> = (0..40).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&ids, Duration::from_secs(10));
    assert_eq!(get(addr, "/healthz").status, 200);
    // The tricklers are cut off at their deadlines with 408.
    for t in tricklers {
        let answer = t.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    assert_eq!(env.count("SELECT count(*) FROM events"), 40);
    app.shutdown().unwrap();
}

/// Pipelines `request` on `stream` without ever reading an answer, until
/// the server stops taking requests because its answers are not read.
fn write_until_stalled(stream: &mut TcpStream, request: &[u8]) {
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for _ in 0..100_000 {
        if let Err(e) = stream.write_all(request) {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{e}"
            );
            return;
        }
    }
    panic!("the server kept reading requests whose answers were not read");
}

/// Clients that never read their answers hold up only their own
/// connections: not the parse turns (one here), nor what answers queries,
/// nor the committers (one here) that answer ingests.
#[test]
fn clients_that_do_not_read_answers_do_not_block_others() {
    let env = TestEnv::new("noread");
    let config = env.config_with(&[
        ("INGEST_HTTP_THREADS", "1"),
        ("INGEST_COMMITTERS", "1"),
        // Longer than the test's own 20 s wait for an answer.
        ("INGEST_HTTP_BODY_TIMEOUT", "60s"),
    ]);
    let app = env.start_role(&config, Role::Api);
    let addr = app.http_addr().unwrap();

    // A query whose answer is 900 kB, asked again and again.
    let big = ingest(addr, &json!("q".repeat(900_000)));
    let query = format!("GET /v1/events/{big} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut reader_a = TcpStream::connect(addr).unwrap();
    write_until_stalled(&mut reader_a, query.as_bytes());

    // A batch of 1,000 client ids, replayed again and again: each answer,
    // 40 kB of ids, comes from a committer.
    let batch: Vec<serde_json::Value> = (0..1000)
        .map(|_| json!({ "id": Uuid::new_v4().to_string(), "payload": 0 }))
        .collect();
    let batch = serde_json::Value::Array(batch).to_string();
    let replay = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{batch}",
        batch.len()
    );
    let mut reader_b = TcpStream::connect(addr).unwrap();
    write_until_stalled(&mut reader_b, replay.as_bytes());

    // Both stalled clients wait on their own connections; others are served.
    let id = ingest(addr, &json!("served"));
    assert_eq!(get(addr, &format!("/v1/events/{id}")).status, 200);
    assert_eq!(env.count("SELECT count(*) FROM events"), 1002);
    // The answers waiting for them count against the memory budget...
    assert!(buffered_bytes(addr) >= 900_000);
    drop((reader_a, reader_b));
    // ...until their connections end.
    wait_until(Duration::from_secs(10), "the budget is free again", || {
        buffered_bytes(addr) == 0
    });
    app.shutdown().unwrap();
}

fn buffered_bytes(addr: SocketAddr) -> u64 {
    let text = String::from_utf8(get(addr, "/metrics").body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("ingestd_http_buffered_bytes "))
        .expect("ingestd_http_buffered_bytes")
        .parse()
        .unwrap()
}

#[test]
fn a_body_too_costly_to_parse_gets_413_and_writes_nothing() {
    let env = TestEnv::new("costly");
    let app = env.start_with(&[
        ("INGEST_HTTP_BUFFER_BYTES", "2097152"),
        ("INGEST_MAX_BODY_BYTES", "1048576"),
    ]);
    let addr = app.http_addr().unwrap();
    // 400 kB of text, but 200,000 values: tens of megabytes once parsed.
    let body = format!("{{\"payload\":[{}0]}}", "0,".repeat(200_000));
    assert!(ingestd::api::footprint::parsed_bound(body.as_bytes()) > 2_097_152);
    let r = post_json(addr, "/v1/events", &body);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "body_too_large");
    let detail = r.json()["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("JSON values"), "{detail}");
    // Text that is not JSON, or nests too deep, is answered as such, not as
    // too costly.
    let commas = ",".repeat(400_000);
    let r = post_json(addr, "/v1/events", &commas);
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "invalid_json");
    let brackets = "[".repeat(400_000);
    let r = post_json(addr, "/v1/events", &brackets);
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "too_deep");
    // The same number of values in long strings fits.
    let fits = json!({ "payload": vec!["x".repeat(100); 1000] }).to_string();
    assert_eq!(post_json(addr, "/v1/events", &fits).status, 202);
    assert_eq!(env.count("SELECT count(*) FROM events"), 1);
    wait_until(Duration::from_secs(5), "the budget is free again", || {
        buffered_bytes(addr) == 0
    });
    app.shutdown().unwrap();
}

/// A request's parsed events count against the budget until it is
/// answered, not only its raw body while it arrives: while a request waits
/// for its commit (held here by a lock on the events table), it holds its
/// share, and a second one that would not fit beside it gets `503 busy`.
#[test]
fn parsed_events_stay_counted_until_the_answer() {
    let env = TestEnv::new("heldparsed");
    let body = json!({ "payload": vec!["x".repeat(50); 2000] }).to_string();
    let bound = ingestd::api::footprint::parsed_bound(body.as_bytes());
    let budget = (bound + bound / 2).to_string();
    let app = env.start_with(&[
        ("INGEST_HTTP_BUFFER_BYTES", &budget),
        ("INGEST_MAX_BODY_BYTES", &(body.len() + 1).to_string()),
    ]);
    let addr = app.http_addr().unwrap();
    let mut sql = env.sql();
    let mut lock = sql.transaction().unwrap();
    lock.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let first = {
        let body = body.clone();
        thread::spawn(move || post_json(addr, "/v1/events", &body))
    };
    // The raw body is gone once parsed; what stays reserved is the parsed
    // events' bound, while the request waits for its commit.
    wait_until(
        Duration::from_secs(10),
        "the parsed request is held",
        || buffered_bytes(addr) == bound as u64,
    );
    let second = post_json(addr, "/v1/events", &body);
    assert_eq!(
        second.status,
        503,
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    assert_eq!(second.json()["error"], "busy");
    assert!(second.header("retry-after").is_some());
    lock.commit().unwrap();
    assert_eq!(first.join().unwrap().status, 202);
    wait_until(Duration::from_secs(5), "the budget is free again", || {
        buffered_bytes(addr) == 0
    });
    assert_eq!(post_json(addr, "/v1/events", &body).status, 202);
    assert_eq!(env.count("SELECT count(*) FROM events"), 2);
    app.shutdown().unwrap();
}

#[test]
fn hostile_requests_do_not_hurt_the_server() {
    let env = TestEnv::new("hostile");
    let app = env.start();
    let addr = app.http_addr().unwrap();

    // Two ingests pipelined on one connection are both answered, in order,
    // although group commit may commit them in either order.
    let one = "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
               Content-Length: 13\r\n\r\n{\"payload\":1}";
    let last = one.replace("Host: x\r\n", "Host: x\r\nConnection: close\r\n");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{one}{one}{one}{last}").as_bytes())
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer.matches("HTTP/1.1 202").count(), 4, "{answer}");

    // A request in an HTTP version the server does not speak is answered
    // 505 and ends the connection: what follows (its body, or a request
    // hidden in it) is never read as a request.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /v1/events HTTP/2.0\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n\
          GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 505"), "{answer}");
    assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");

    // Clients stalled half-way through their requests hold their own
    // connections only; everyone else is served, and shutdown does not
    // wait for them.
    let stalled: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Le")
                .unwrap();
            s
        })
        .collect();
    let ids: Vec<Uuid> = (0..20).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&ids, Duration::from_secs(10));
    app.shutdown()
        .expect("stalled clients do not hold up shutdown");
    drop(stalled);
}

#[test]
fn connections_beyond_the_cap_are_refused_at_once() {
    let env = TestEnv::new("conncap");
    let app = env.start_with(&[("INGEST_HTTP_MAX_CONNECTIONS", "6")]);
    let addr = app.http_addr().unwrap();
    let held: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(addr).unwrap()).collect();
    wait_until(Duration::from_secs(5), "the server refuses a 7th", || {
        let resp = raw_request(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            false,
            Duration::from_secs(5),
        );
        resp.is_ok_and(|r| {
            r.status == 503
                && r.header("retry-after").is_some()
                && r.json()["error"] == "too_many_connections"
        })
    });
    drop(held);
    wait_until(
        Duration::from_secs(10),
        "served again once they close",
        || request(addr, "GET", "/healthz", &[], b"").is_ok_and(|r| r.status == 200),
    );
    app.shutdown().unwrap();
}

#[test]
fn bodies_beyond_the_memory_budget_get_503() {
    let env = TestEnv::new("budget");
    // Room for the slow body and its parsed event, not for another body
    // of about its size beside it.
    let app = env.start_with(&[
        ("INGEST_HTTP_BUFFER_BYTES", "17500"),
        ("INGEST_MAX_BODY_BYTES", "8000"),
    ]);
    let addr = app.http_addr().unwrap();
    // One client announces 7012 bytes and sends them slowly: its body
    // holds 7012 bytes of the budget until it is done.
    let body = json!({ "payload": "x".repeat(7000) }).to_string();
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    slow.write_all(&body.as_bytes()[..100]).unwrap();
    // Only once the server holds the slow body: a request sent before it
    // could take the budget first, and the slow body would be the one
    // refused.
    wait_until(Duration::from_secs(5), "the slow body is held", || {
        buffered_bytes(addr) >= body.len() as u64
    });
    let other = json!({ "payload": "y".repeat(6000) }).to_string();
    let r = post_json(addr, "/v1/events", &other);
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "busy");
    assert!(r.header("retry-after").is_some());
    // Small bodies still fit.
    assert_eq!(
        post_json(addr, "/v1/events", r#"{"payload":1}"#).status,
        202
    );
    // Once the slow body is in, its share of the budget comes back.
    slow.write_all(&body.as_bytes()[100..]).unwrap();
    let mut answer = String::new();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    // (It is given back when the request is dropped, just after the
    // answer is written.)
    wait_until(Duration::from_secs(5), "the budget is free again", || {
        post_json(addr, "/v1/events", &other).status == 202
    });
    app.shutdown().unwrap();
}

/// A body's share of the budget grows as its bytes arrive: clients that
/// announce large bodies and send nothing cannot use it up.
#[test]
fn announced_bodies_do_not_take_the_budget_before_they_arrive() {
    let env = TestEnv::new("announced");
    let app = env.start_with(&[
        ("INGEST_HTTP_BUFFER_BYTES", "1400000"),
        ("INGEST_MAX_BODY_BYTES", "1048576"),
    ]);
    let addr = app.http_addr().unwrap();
    let stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(
                b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                  Content-Length: 1000000\r\n\r\n{\"payload\":\"",
            )
            .unwrap();
            s
        })
        .collect();
    // Each holds the first 64 KiB step of the budget, not its megabyte.
    wait_until(
        Duration::from_secs(5),
        "the stalled bodies hold 64 KiB each",
        || buffered_bytes(addr) == 8 * 65536,
    );
    // Eight announced megabytes would be eight times the budget; what they
    // sent is a few bytes, so a real 300 kB body still fits.
    let body = json!({ "payload": "z".repeat(300_000) }).to_string();
    let r = post_json(addr, "/v1/events", &body);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    drop(stalled);
    app.shutdown().unwrap();
}

/// A client still sending a body when the server refuses it reads the
/// answer: the server closes lingering, reading and discarding what the
/// client sends until it is done, instead of closing at once, which makes
/// the kernel reset the connection under the client's writes.
#[test]
fn clients_still_sending_a_refused_body_read_the_answer() {
    let env = TestEnv::new("linger");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    // More than the socket buffers of both sides hold: the client is still
    // writing when the answer comes.
    let body = vec![b'x'; 24 << 20];
    let mut chunked = Vec::new();
    for chunk in body.chunks(64 << 10) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = |framing: &str| {
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             {framing}\r\n"
        )
    };
    let length = format!("Content-Length: {}\r\n", body.len());
    let cases = [
        // refused on its head (the announced length), the body never read
        (head(&length), &body, 413, "body_too_large"),
        // refused by the application once it has read past the limit, the
        // rest of the body left unread
        (
            head("Transfer-Encoding: chunked\r\n"),
            &chunked,
            413,
            "body_too_large",
        ),
        // refused by the server before there is a request
        (
            head(&format!("X-Padding: {}\r\n{length}", "p".repeat(20_000))),
            &body,
            431,
            "header_too_large",
        ),
    ];
    for (head, body, status, code) in cases {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let body = body.clone();
        let sending = thread::spawn(move || -> std::io::Result<()> {
            writer.write_all(head.as_bytes())?;
            for chunk in body.chunks(64 << 10) {
                writer.write_all(chunk)?;
            }
            writer.shutdown(std::net::Shutdown::Write)
        });
        let mut raw = Vec::new();
        let read = stream.read_to_end(&mut raw);
        let sent = sending.join().unwrap();
        assert!(sent.is_ok(), "{code}: the client's writes failed: {sent:?}");
        read.unwrap_or_else(|e| panic!("{code}: reading the answer failed: {e}"));
        let resp = crate::util::parse_response(&raw).unwrap();
        assert_eq!(resp.status, status, "{code}");
        assert_eq!(resp.json()["error"], code);
    }
    assert_eq!(
        post_json(addr, "/v1/events", r#"{"payload":1}"#).status,
        202
    );
    app.shutdown().unwrap();
}

/// A request refused on its head alone (no API key, not JSON, a bad
/// idempotency key, too large, a body on a route that takes none, no such
/// route or method) is answered before its body arrives: the server reads and buffers none of it, and closes.
#[test]
fn bodies_refused_on_their_head_are_never_read() {
    let env = TestEnv::new("headcheck");
    let app = env.start_with(&[("INGEST_API_KEYS", KEY)]);
    let addr = app.http_addr().unwrap();
    let json = "Content-Type: application/json\r\n";
    let key = format!("X-Api-Key: {KEY}\r\n");
    let megabyte = "Content-Length: 1000000\r\n";
    let cases = [
        (
            "POST /v1/events",
            format!("{json}{megabyte}"),
            401,
            "unauthorized",
        ),
        (
            "POST /v1/events",
            format!("X-Api-Key: not-the-key-0123456789\r\n{json}{megabyte}"),
            401,
            "unauthorized",
        ),
        (
            "POST /Ingestion/ingest",
            format!("{json}Transfer-Encoding: chunked\r\n"),
            401,
            "unauthorized",
        ),
        // small bodies too
        (
            "POST /v1/events",
            format!("{json}Content-Length: 500\r\n"),
            401,
            "unauthorized",
        ),
        // an open route takes no body
        ("GET /healthz", megabyte.to_string(), 413, "body_too_large"),
        (
            "POST /v1/events",
            format!("{key}Content-Type: text/plain\r\n{megabyte}"),
            415,
            "unsupported_media_type",
        ),
        (
            "POST /v1/events",
            format!("{key}{json}Content-Encoding: br\r\n{megabyte}"),
            415,
            "unsupported_encoding",
        ),
        (
            "POST /Ingestion/ingest",
            format!("{key}{json}Content-Encoding: gzip, gzip\r\n{megabyte}"),
            415,
            "unsupported_encoding",
        ),
        (
            "POST /v1/events",
            format!("{key}{json}Idempotency-Key: \r\n{megabyte}"),
            400,
            "invalid_idempotency_key",
        ),
        (
            "POST /v1/events",
            format!("{key}{json}Content-Length: 6000000\r\n"),
            413,
            "body_too_large",
        ),
        (
            "POST /v1/nowhere",
            format!("{key}{json}{megabyte}"),
            404,
            "not_found",
        ),
        (
            "PUT /v1/events",
            format!("{key}{json}{megabyte}"),
            405,
            "method_not_allowed",
        ),
    ];
    for (line, headers, status, code) in cases {
        let head = format!("{line} HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        // Far less than the body deadline: only an answer given without
        // the body arrives in time.
        let resp = raw_request(addr, head.as_bytes(), false, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{line} ({code}): no answer without the body: {e}"));
        assert_eq!(resp.status, status, "{line} ({code})");
        assert_eq!(resp.json()["error"], code, "{line}");
        assert_eq!(resp.header("connection"), Some("close"), "{line}");
        if status == 401 {
            assert!(resp.header("www-authenticate").is_some());
        }
        if code == "unsupported_encoding" {
            assert_eq!(resp.header("accept-encoding"), Some("gzip, deflate"));
        }
        assert_eq!(buffered_bytes(addr), 0, "{line} ({code}): nothing held");
    }
    // Counted as the handler counts its answers.
    let metrics = String::from_utf8(get(addr, "/metrics").body).unwrap();
    for line in [
        "ingestd_http_requests_total{route=\"ingest\",status=\"401\"} 4",
        "ingestd_http_requests_total{route=\"healthz\",status=\"413\"} 1",
        "ingestd_http_requests_total{route=\"unmatched\",status=\"404\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    // Nothing was written, and a request with the key is served.
    assert_eq!(env.count("SELECT count(*) FROM events"), 0);
    let r = request(
        addr,
        "POST",
        "/v1/events",
        &[("Content-Type", "application/json"), ("X-Api-Key", KEY)],
        br#"{"payload":1}"#,
    )
    .unwrap();
    assert_eq!(r.status, 202);
    app.shutdown().unwrap();
}

/// A response must be taken in whole within `INGEST_HTTP_BODY_TIMEOUT`,
/// not within that time per write: a client reading a large answer a
/// trickle at a time is cut off once the time is up, and the thread and
/// memory its answer held come back.
#[test]
fn a_client_reading_an_answer_too_slowly_is_cut_off() {
    let env = TestEnv::new("slowreader");
    let app = env.start_with(&[
        ("INGEST_MAX_BODY_BYTES", "10485760"),
        ("INGEST_MAX_PAYLOAD_BYTES", "10000000"),
        ("INGEST_HTTP_BODY_TIMEOUT", "2s"),
    ]);
    let addr = app.http_addr().unwrap();
    // More than the kernel's socket buffers take in (4 MiB at most on the
    // sending side): the server must wait for the client to read.
    let payload = "x".repeat(9_000_000);
    let r = post_json(
        addr,
        "/v1/events",
        &json!({ "payload": payload }).to_string(),
    );
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_str().unwrap().to_string();

    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(format!("GET /v1/events/{id} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    // About 1.3 MB a second, for as long as the test watches: each write
    // of the answer makes progress well within the timeout, the whole
    // cannot.
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let reading = reading.clone();
        thread::spawn(move || {
            let mut received = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while reading.load(Ordering::SeqCst) {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received += n,
                }
                thread::sleep(Duration::from_millis(50));
            }
            received
        })
    };
    // The server gives up the connection (its thread and the answer's
    // memory) while the client is still reading.
    wait_until(
        Duration::from_secs(15),
        "the connection is given up",
        || {
            let text = String::from_utf8(get(addr, "/metrics").body).unwrap();
            text.lines().any(|l| l == "ingestd_http_connections 1")
        },
    );
    assert_eq!(buffered_bytes(addr), 0);
    reading.store(false, Ordering::SeqCst);
    let received = reader.join().unwrap();
    assert!(received < payload.len(), "received {received} bytes");
    app.shutdown().unwrap();
}

/// Requests are handled on their connections' own threads, and those that
/// parse a body or query the database at most `INGEST_HTTP_THREADS` at
/// once (one here). While a retry holds the one turn (waiting on a row
/// lock), an ingest and an event query wait for theirs, as
/// `ingestd_http_requests_waiting` shows; the liveness probe, the figures
/// and the metrics, which take no turn, are answered at once meanwhile.
#[test]
fn requests_take_turns_to_parse_and_query_and_probes_never_wait() {
    let env = TestEnv::new("turns");
    let config = env.config_with(&[("INGEST_HTTP_THREADS", "1")]);
    let app = env.start_role(&config, Role::Api);
    let addr = app.http_addr().unwrap();
    let id = ingest(addr, &json!("locked"));
    env.sql()
        .execute("UPDATE events SET status = 'failed' WHERE id = $1", &[&id])
        .unwrap();

    let mut sql = env.sql();
    let mut lock = sql.transaction().unwrap();
    let holder: i32 = lock
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    lock.execute("SELECT 1 FROM events WHERE id = $1 FOR UPDATE", &[&id])
        .unwrap();
    let retry = thread::spawn(move || post_json(addr, &format!("/v1/events/{id}/retry"), ""));
    let mut watcher = env.sql();
    wait_until(
        Duration::from_secs(10),
        "the retry waits on the row lock",
        || {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    &[&holder],
                )
                .unwrap()
                .get(0);
            waiting == 1
        },
    );

    // An ingest, then a query, wait for the turn the retry holds.
    let waiting =
        |n: f64| move || metric(&scrape(addr), "ingestd_http_requests_waiting") == Some(n);
    let ingesting = thread::spawn(move || post_json(addr, "/v1/events", r#"{"payload":"waits"}"#));
    wait_until(
        Duration::from_secs(10),
        "the ingest waits its turn",
        waiting(1.0),
    );
    let querying = thread::spawn(move || get(addr, &format!("/v1/events/{id}")));
    wait_until(
        Duration::from_secs(10),
        "the query waits its turn",
        waiting(2.0),
    );
    // Nothing else does.
    let started = Instant::now();
    assert_healthz_instant(addr);
    assert_eq!(get(addr, "/v1/stats").status, 200);
    assert_eq!(get(addr, "/metrics").status, 200);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "answers took {took:?}");
    assert_eq!(env.count("SELECT count(*) FROM events"), 1);

    // Once the lock goes, the retry, the ingest and the query are answered.
    lock.rollback().unwrap();
    assert_eq!(retry.join().unwrap().status, 202);
    let resp = ingesting.join().unwrap();
    assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(querying.join().unwrap().status, 200);
    assert_eq!(
        metric(&scrape(addr), "ingestd_http_requests_waiting"),
        Some(0.0)
    );
    assert_eq!(env.count("SELECT count(*) FROM events"), 2);
    app.shutdown().unwrap();
}
