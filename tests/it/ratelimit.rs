//! Rate limits per client (`INGEST_RATE_LIMIT`): `429` with `Retry-After`,
//! counted in events, per API key (or per address without keys), refused
//! on the head when the bucket is empty, nothing written, and counted in
//! `/metrics` under a label that does not reveal the key.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{Resp, TestEnv, get, parse_response, python3, request};

const KEY_A: &str = "key-a-0123456789abcdef";
const KEY_B: &str = "key-b-0123456789abcdef";

fn post(addr: SocketAddr, key: Option<&str>, body: &Value) -> Resp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    request(
        addr,
        "POST",
        "/v1/events",
        &headers,
        body.to_string().as_bytes(),
    )
    .unwrap()
}

fn batch(n: usize) -> Value {
    Value::Array((0..n).map(|i| json!({"payload": i})).collect())
}

fn assert_limited(resp: &Resp) {
    assert_eq!(resp.status, 429, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["error"], "rate_limited");
    let wait: u64 = resp.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
}

/// The samples of `ingestd_rate_limited_total`, as prometheus_client's
/// parser reads `/metrics`: `(client label, value)`.
fn limited_samples(addr: SocketAddr, key: &str) -> Vec<(String, f64)> {
    let text = request(
        addr,
        "GET",
        "/metrics",
        &[("Authorization", &format!("Bearer {key}"))],
        b"",
    )
    .unwrap()
    .body;
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    if family.name == "ingestd_rate_limited":
        for sample in family.samples:
            print(sample.labels["client"], sample.value)
"#;
    python3(&["-c", script], &text)
        .lines()
        .map(|l| {
            let (client, value) = l.split_once(' ').unwrap();
            (client.to_string(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn a_client_over_its_limit_gets_429_and_another_key_is_unaffected() {
    let env = TestEnv::new("rlkeys");
    // One event every ten seconds: nothing refills during the test.
    let app = env.start_with(&[
        ("INGEST_API_KEYS", &format!("{KEY_A},{KEY_B}")),
        ("INGEST_RATE_LIMIT", "0.1/s,burst=5"),
    ]);
    let addr = app.http_addr().unwrap();
    // A batch costs its size: 3 of 5, then 3 more is too many...
    assert_eq!(post(addr, Some(KEY_A), &batch(3)).status, 202);
    assert_limited(&post(addr, Some(KEY_A), &batch(3)));
    // ...but the 2 left are not lost, and then the bucket is empty.
    assert_eq!(post(addr, Some(KEY_A), &batch(2)).status, 202);
    assert_limited(&post(addr, Some(KEY_A), &json!({"payload": "one more"})));
    assert_eq!(env.count("SELECT count(*) FROM events"), 5);
    // Another key has its own bucket.
    assert_eq!(post(addr, Some(KEY_B), &batch(5)).status, 202);
    assert_eq!(env.count("SELECT count(*) FROM events"), 10);

    let samples = limited_samples(addr, KEY_A);
    assert_eq!(samples.len(), 1, "{samples:?}");
    let (label, count) = &samples[0];
    assert_eq!(*count, 2.0);
    assert_eq!(label.len(), 12);
    let text = String::from_utf8(get_metrics(addr)).unwrap();
    assert!(
        !text.contains(KEY_A) && !text.contains("key-a"),
        "the key leaked"
    );
    app.shutdown().unwrap();
}

fn get_metrics(addr: SocketAddr) -> Vec<u8> {
    request(
        addr,
        "GET",
        "/metrics",
        &[("Authorization", &format!("Bearer {KEY_A}"))],
        b"",
    )
    .unwrap()
    .body
}

#[test]
fn an_empty_bucket_refuses_on_the_head_before_the_body_is_read() {
    let env = TestEnv::new("rlhead");
    let app = env.start_with(&[("INGEST_RATE_LIMIT", "0.1/s,burst=1")]);
    let addr = app.http_addr().unwrap();
    assert_eq!(post(addr, None, &json!({"payload": 1})).status, 202);
    // The head announces a body that never comes: the answer must not
    // wait for it.
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    stream
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100000\r\n\r\n",
        )
        .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let took = started.elapsed();
    let resp = parse_response(&raw).unwrap();
    assert_limited(&resp);
    // Well before the body timeout the server would otherwise wait out.
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    assert_eq!(env.count("SELECT count(*) FROM events"), 1);
    // Without keys, the bucket is the address's, labelled as such.
    let metrics = get(addr, "/metrics");
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(
        text.contains("ingestd_rate_limited_total{client=\"address\"} 1"),
        "{text}"
    );
    app.shutdown().unwrap();
}

#[test]
fn a_batch_larger_than_the_burst_passes_from_a_full_bucket_and_then_waits() {
    let env = TestEnv::new("rlburst");
    let app = env.start_with(&[("INGEST_RATE_LIMIT", "0.1/s,burst=2")]);
    let addr = app.http_addr().unwrap();
    assert_eq!(post(addr, None, &batch(4)).status, 202);
    let resp = post(addr, None, &batch(1));
    assert_limited(&resp);
    assert_eq!(env.count("SELECT count(*) FROM events"), 4);
    app.shutdown().unwrap();
}
