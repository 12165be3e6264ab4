//! CloudEvents in (the HTTP binding's binary, structured and batched modes,
//! deduplicated on source and id) and out (`cloudEvents_*` headers, or a
//! structured body), W3C trace context from the client to the processor,
//! and the webhook handshake. The official SDK sends the events and pika
//! reads the messages.

use std::net::SocketAddr;
use std::time::Duration;

use ingestd::Role;
use ingestd::api::cloudevents::event_id;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::util::{
    Resp, TestEnv, amqp_url, assert_error, get, python3, queued_messages, request, wait_until,
};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn clients_script() -> String {
    format!(
        "{}/tests/cloudevents_clients.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Runs the Python clients script and returns its JSON lines.
fn python(args: &[&str]) -> Vec<Value> {
    let script = clients_script();
    let stdout = python3(&[&[script.as_str()], args].concat(), b"");
    println!("{stdout}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn post(addr: SocketAddr, headers: &[(&str, &str)], body: &str) -> Resp {
    request(addr, "POST", "/v1/events", headers, body.as_bytes()).unwrap()
}

fn structured(addr: SocketAddr, body: &Value) -> Resp {
    post(
        addr,
        &[("Content-Type", "application/cloudevents+json")],
        &body.to_string(),
    )
}

fn ce(id: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/tests", "type": "t.one", "data": data})
}

fn event(addr: SocketAddr, id: Uuid) -> Value {
    get(addr, &format!("/v1/events/{id}")).json()
}

#[test]
fn the_python_sdk_sends_every_mode_and_its_replays_create_nothing() {
    let env = TestEnv::new("cesdk");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let lines = python(&["send", &format!("http://{addr}/v1/events"), TRACEPARENT]);
    assert_eq!(lines.len(), 8);
    for line in &lines {
        let first = line["attempt"] == "first";
        let status = line["status"].as_u64().unwrap();
        assert_eq!(status, if first { 202 } else { 200 }, "{line}");
        let ids: Vec<Uuid> = line["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| event_id("/tests/sdk", id.as_str().unwrap()))
            .collect();
        let answered: Vec<Uuid> = match line["answer"].get("ids") {
            Some(list) => list
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().parse().unwrap())
                .collect(),
            None => vec![line["answer"]["id"].as_str().unwrap().parse().unwrap()],
        };
        // The original ingestd id, derived from source and id, both times.
        assert_eq!(answered, ids, "{line}");
    }
    assert_eq!(env.count("SELECT count(*) FROM events"), 6);
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE attributes IS NOT NULL"),
        6
    );

    let binary = event(addr, event_id("/tests/sdk", "bin-1"));
    assert_eq!(binary["payload"], json!({"mode": "binary", "n": 1}));
    assert_eq!(binary["type"], "com.example.sdk");
    assert_eq!(binary["key"], "pk-1");
    assert_eq!(binary["attributes"]["subject"], "s-bin-1");
    assert_eq!(binary["attributes"]["source"], "/tests/sdk");
    assert!(binary["attributes"]["time"].is_string());
    assert_eq!(binary["traceparent"], TRACEPARENT);
    let bytes = event(addr, event_id("/tests/sdk", "bin-2"));
    assert_eq!(bytes["payload"], "AAFiaW5hcnk=");
    assert_eq!(bytes["attributes"]["data_base64"], true);
    assert_eq!(
        bytes["attributes"]["datacontenttype"],
        "application/octet-stream"
    );
    let structured = event(addr, event_id("/tests/sdk", "str-1"));
    assert_eq!(structured["attributes"]["myext"], "x-1");
    assert_eq!(structured["payload"], json!({"mode": "structured"}));
    // No traceparent sent: ingestd started a trace.
    let started = structured["traceparent"].as_str().unwrap();
    assert_eq!(
        ingestd::trace::parse_traceparent(started).as_deref(),
        Some(started)
    );
    assert_ne!(started, TRACEPARENT);
    let batched = event(addr, event_id("/tests/sdk", "bat-2"));
    assert_eq!(batched["payload"], json!({"mode": "batched", "i": 2}));

    // Every one is processed once, the processor seeing the attributes.
    let ids: Vec<Uuid> = ["bin-1", "bin-2", "str-1", "bat-0", "bat-1", "bat-2"]
        .iter()
        .map(|id| event_id("/tests/sdk", id))
        .collect();
    env.wait_processed(&ids, Duration::from_secs(30));
    assert_eq!(env.processed_twice(), 0);
    let seen = env
        .processor
        .attributes(ids[0])
        .flatten()
        .expect("attributes");
    assert_eq!(seen["subject"], "s-bin-1");
    assert_eq!(seen["source"], "/tests/sdk");
    assert_eq!(seen["id"], "bin-1");
    let seen = env
        .processor
        .attributes(ids[1])
        .flatten()
        .expect("attributes");
    assert_eq!(seen["data_base64"], true);
    app.shutdown().unwrap();
}

#[test]
fn pika_reads_cloudevents_headers_and_the_clients_traceparent() {
    let env = TestEnv::new("cepika");
    let config = env.config();
    // API and relay only: the messages wait in the queue for pika.
    let api = env.start_role(&config, Role::Api);
    let relay = env.start_role(&config, Role::Relay);
    let addr = api.http_addr().unwrap();
    let resp = post(
        addr,
        &[
            ("Content-Type", "application/json"),
            ("ce-specversion", "1.0"),
            ("ce-id", "p-1"),
            ("ce-source", "/tests/pika"),
            ("ce-type", "com.example.pika"),
            ("ce-subject", "order%2042"),
            ("ce-partitionkey", "pk"),
            ("traceparent", TRACEPARENT),
            ("tracestate", "vendor=abc"),
        ],
        r#"{"n":1.50}"#,
    );
    assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    let cloudevent: Uuid = resp.json()["id"].as_str().unwrap().parse().unwrap();
    let resp = post(
        addr,
        &[
            ("Content-Type", "application/json"),
            ("traceparent", TRACEPARENT),
        ],
        r#"{"payload":{"plain":true},"type":"order.created","key":"k-9"}"#,
    );
    assert_eq!(resp.status, 202);
    let plain: Uuid = resp.json()["id"].as_str().unwrap().parse().unwrap();
    let queue = env.topology().queue;
    wait_until(Duration::from_secs(20), "both messages queued", || {
        queued_messages(&queue) == Some(2)
    });

    let messages = python(&["read", &amqp_url(), &queue, "2"]);
    assert_eq!(messages.len(), 2);
    let by_id = |id: Uuid| {
        messages
            .iter()
            .find(|m| m["message_id"] == id.to_string())
            .unwrap_or_else(|| panic!("no message for {id}: {messages:?}"))
    };
    let m = by_id(cloudevent);
    let h = &m["headers"];
    assert_eq!(h["cloudEvents_specversion"], "1.0");
    assert_eq!(h["cloudEvents_id"], "p-1");
    assert_eq!(h["cloudEvents_source"], "/tests/pika");
    assert_eq!(h["cloudEvents_type"], "com.example.pika");
    assert_eq!(h["cloudEvents_subject"], "order 42");
    assert_eq!(h["cloudEvents_partitionkey"], "pk");
    assert!(h["cloudEvents_time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(h["traceparent"], TRACEPARENT);
    assert_eq!(h["tracestate"], "vendor=abc");
    assert_eq!(m["delivery_mode"], 2);
    assert_eq!(m["type"], "ingestd.event");
    assert_eq!(m["content_type"], "application/json");
    assert_eq!(m["body"]["payload"], json!({"n": 1.50}));
    assert_eq!(
        m["body"]["attributes"]["datacontenttype"],
        "application/json"
    );

    let m = by_id(plain);
    let h = &m["headers"];
    assert_eq!(h["cloudEvents_id"], plain.to_string());
    assert_eq!(h["cloudEvents_source"], "/ingestd");
    assert_eq!(h["cloudEvents_type"], "order.created");
    assert_eq!(h["cloudEvents_partitionkey"], "k-9");
    assert_eq!(h["traceparent"], TRACEPARENT);
    relay.shutdown().unwrap();
    api.shutdown().unwrap();
}

#[test]
fn the_cloudevents_message_format_publishes_structured_events() {
    let env = TestEnv::new("ceformat");
    let config = env.config_with(&[
        ("INGEST_MESSAGE_FORMAT", "cloudevents"),
        ("INGEST_CLOUDEVENTS_SOURCE", "urn:ingestd:test"),
    ]);
    let api = env.start_role(&config, Role::Api);
    let relay = env.start_role(&config, Role::Relay);
    let addr = api.http_addr().unwrap();
    let resp = structured(addr, &ce("f-1", json!({"a": [1, 2]})));
    assert_eq!(resp.status, 202);
    let resp = post(
        addr,
        &[("Content-Type", "application/json")],
        r#"{"payload":"plain"}"#,
    );
    let plain = resp.json()["id"].as_str().unwrap().to_string();
    let queue = env.topology().queue;
    wait_until(Duration::from_secs(20), "both messages queued", || {
        queued_messages(&queue) == Some(2)
    });
    let messages = python(&["read", &amqp_url(), &queue, "2"]);
    let message = messages
        .iter()
        .find(|m| m["body"]["id"] == "f-1")
        .expect("the CloudEvent's message");
    assert_eq!(
        message["content_type"],
        "application/cloudevents+json; charset=utf-8"
    );
    assert_eq!(message["body"]["data"], json!({"a": [1, 2]}));
    assert_eq!(message["body"]["source"], "/tests");
    assert!(message["body"]["traceparent"].is_string());
    let derived = messages
        .iter()
        .find(|m| m["body"]["id"] == plain)
        .expect("the plain event's message");
    assert_eq!(derived["body"]["source"], "urn:ingestd:test");
    assert_eq!(derived["body"]["type"], "ingestd.event");
    assert_eq!(derived["body"]["data"], "plain");
    relay.shutdown().unwrap();
    api.shutdown().unwrap();

    // Workers read the structured messages too (the id is the message_id).
    let app = env.start_role(&config, Role::All);
    let addr = app.http_addr().unwrap();
    let resp = structured(addr, &ce("f-2", json!(7)));
    let id: Uuid = resp.json()["id"].as_str().unwrap().parse().unwrap();
    env.wait_processed(&[id], Duration::from_secs(30));
    app.shutdown().unwrap();
}

#[test]
fn the_same_source_and_id_replays_or_conflicts_item_by_item() {
    let env = TestEnv::new("cededup");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let first = structured(addr, &ce("d-1", json!({"v": 1})));
    assert_eq!(first.status, 202);
    let id = first.json()["id"].as_str().unwrap().to_string();
    assert_eq!(id, event_id("/tests", "d-1").to_string());
    // Same content, key order and spacing aside: a replay.
    let replay = post(
        addr,
        &[(
            "Content-Type",
            "application/cloudevents+json; charset=utf-8",
        )],
        r#"{"data": {"v": 1}, "type": "t.one", "source": "/tests", "id": "d-1", "specversion": "1.0"}"#,
    );
    assert_eq!(replay.status, 200);
    assert_eq!(replay.json()["id"], id);
    assert_eq!(replay.json()["duplicate"], true);
    // Other data, or another attribute: a conflict, nothing written.
    assert_error(
        &structured(addr, &ce("d-1", json!({"v": 2}))),
        409,
        "id_conflict",
    );
    let mut other = ce("d-1", json!({"v": 1}));
    other["subject"] = "changed".into();
    assert_error(&structured(addr, &other), 409, "id_conflict");
    // The same id from another source is another event.
    let mut elsewhere = ce("d-1", json!({"v": 1}));
    elsewhere["source"] = "/elsewhere".into();
    assert_eq!(structured(addr, &elsewhere).status, 202);
    assert_eq!(env.count("SELECT count(*) FROM events"), 2);

    // In a batch, per item: a replayed item is listed as a duplicate...
    let batch = |items: Vec<Value>| {
        post(
            addr,
            &[("Content-Type", "application/cloudevents-batch+json")],
            &Value::Array(items).to_string(),
        )
    };
    let resp = batch(vec![ce("d-1", json!({"v": 1})), ce("d-2", json!(2))]);
    assert_eq!(resp.status, 202);
    assert_eq!(resp.json()["duplicates"], json!([0]));
    // ...and a conflicting one refuses the whole batch, naming it.
    let resp = batch(vec![ce("d-3", json!(3)), ce("d-2", json!("other"))]);
    assert_error(&resp, 409, "id_conflict");
    assert_eq!(resp.json()["index"], 1);
    assert_eq!(env.count("SELECT count(*) FROM events"), 3);
    // One batch holding an event twice stores it once; twice with other
    // content is a conflict within the batch.
    let resp = batch(vec![ce("d-4", json!(4)), ce("d-4", json!(4))]);
    assert_eq!(resp.status, 202);
    assert_eq!(resp.json()["duplicates"], json!([1]));
    assert_eq!(resp.json()["ids"][0], resp.json()["ids"][1]);
    let resp = batch(vec![ce("d-5", json!(5)), ce("d-5", json!("five"))]);
    assert_error(&resp, 409, "id_conflict");
    assert_eq!(resp.json()["index"], 1);
    assert_eq!(env.count("SELECT count(*) FROM events"), 4);
    app.shutdown().unwrap();
}

#[test]
fn invalid_cloudevents_get_clear_errors_and_write_nothing() {
    let env = TestEnv::new("ceinvalid");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"id": "1", "source": "/s", "type": "t"}),
            "specversion is missing",
        ),
        (
            json!({"specversion": "0.3", "id": "1", "source": "/s", "type": "t"}),
            "not supported",
        ),
        (
            json!({"specversion": "1.0", "id": "", "source": "/s", "type": "t"}),
            "id must be",
        ),
        (
            json!({"specversion": "1.0", "id": "1", "type": "t"}),
            "source is missing",
        ),
        (
            json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "Bad-Name": 1}),
            "attribute name",
        ),
        (
            json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": 1, "data_base64": "AA=="}),
            "never both",
        ),
        (
            json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "time": "now"}),
            "RFC 3339",
        ),
    ];
    for (body, reason) in cases {
        let resp = structured(addr, &body);
        assert_error(&resp, 400, "invalid_body");
        let detail = resp.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains(reason), "{body}: {detail}");
    }
    // A batch names the item.
    let resp = post(
        addr,
        &[("Content-Type", "application/cloudevents-batch+json")],
        &json!([ce("ok", json!(1)), {"specversion": "1.0"}]).to_string(),
    );
    assert_error(&resp, 400, "invalid_body");
    assert_eq!(resp.json()["index"], 1);
    // Binary mode: required headers, valid percent-encoding and UTF-8.
    let binary = |extra: &[(&str, &str)]| {
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("ce-specversion", "1.0"),
            ("ce-type", "t"),
        ];
        headers.extend_from_slice(extra);
        post(addr, &headers, "{}")
    };
    assert_error(&binary(&[("ce-id", "1")]), 400, "invalid_body");
    assert_error(
        &binary(&[("ce-id", "1"), ("ce-source", "%E2%28")]),
        400,
        "invalid_body",
    );
    assert_error(
        &binary(&[("ce-id", "1"), ("ce-source", "%zz")]),
        400,
        "invalid_body",
    );
    // An event format other than JSON.
    let resp = post(
        addr,
        &[("Content-Type", "application/cloudevents+avro")],
        "x",
    );
    assert_error(&resp, 415, "unsupported_media_type");
    assert_eq!(env.count("SELECT count(*) FROM events"), 0);
    // Plain ingest is unchanged.
    let resp = post(
        addr,
        &[("Content-Type", "application/json")],
        r#"{"payload":1}"#,
    );
    assert_eq!(resp.status, 202);
    let plain = event(addr, resp.json()["id"].as_str().unwrap().parse().unwrap());
    assert_eq!(plain["attributes"], Value::Null);
    assert!(plain["traceparent"].is_string());
    app.shutdown().unwrap();
}

#[test]
fn the_trace_context_reaches_the_processor_and_survives_retries() {
    let env = TestEnv::new("cetrace");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    // The processor fails the first attempt: the retry keeps the trace.
    let resp = post(
        addr,
        &[
            ("Content-Type", "application/json"),
            ("traceparent", TRACEPARENT),
            ("tracestate", "a=1,b=2"),
        ],
        r#"{"payload":{"fail":"transient","times":1}}"#,
    );
    assert_eq!(resp.status, 202);
    let id: Uuid = resp.json()["id"].as_str().unwrap().parse().unwrap();
    env.wait_processed(&[id], Duration::from_secs(30));
    let seen = env.processor.traces(id);
    assert_eq!(seen.len(), 2, "two attempts: {seen:?}");
    for trace in &seen {
        assert_eq!(trace.0.as_deref(), Some(TRACEPARENT));
        assert_eq!(trace.1.as_deref(), Some("a=1,b=2"));
    }
    // A replay under another trace keeps the one the event was accepted
    // with, and is processed no second time.
    let event_body = ce("t-1", json!(1)).to_string();
    let first = post(
        addr,
        &[
            ("Content-Type", "application/cloudevents+json"),
            ("traceparent", TRACEPARENT),
        ],
        &event_body,
    );
    assert_eq!(first.status, 202);
    let other_trace = "00-11111111111111111111111111111111-2222222222222222-01";
    let replay = post(
        addr,
        &[
            ("Content-Type", "application/cloudevents+json"),
            ("traceparent", other_trace),
        ],
        &event_body,
    );
    assert_eq!(replay.status, 200);
    let replayed: Uuid = replay.json()["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(event(addr, replayed)["traceparent"], TRACEPARENT);
    env.wait_processed(&[replayed], Duration::from_secs(30));
    assert_eq!(env.processor.traces(replayed).len(), 1);
    // An invalid traceparent starts a new trace and drops its tracestate.
    let resp = post(
        addr,
        &[
            ("Content-Type", "application/json"),
            ("traceparent", "00-zz-00"),
            ("tracestate", "a=1"),
        ],
        r#"{"payload":2}"#,
    );
    let other = event(addr, resp.json()["id"].as_str().unwrap().parse().unwrap());
    let started = other["traceparent"].as_str().unwrap();
    assert!(
        ingestd::trace::parse_traceparent(started).is_some(),
        "{started}"
    );
    assert_eq!(other["tracestate"], Value::Null);
    app.shutdown().unwrap();
}

#[test]
fn the_webhook_handshake_allows_the_origin_and_names_the_rate() {
    let env = TestEnv::new("cehook");
    let app = env.start_with(&[("INGEST_RATE_LIMIT", "10/s,burst=20")]);
    let addr = app.http_addr().unwrap();
    let resp = request(
        addr,
        "OPTIONS",
        "/v1/events",
        &[("WebHook-Request-Origin", "eventemitter.example.com")],
        b"",
    )
    .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("webhook-allowed-origin"),
        Some("eventemitter.example.com")
    );
    assert_eq!(resp.header("webhook-allowed-rate"), Some("600"));
    assert_eq!(resp.header("allow"), Some("POST, OPTIONS"));
    app.shutdown().unwrap();

    let app = env.start();
    let addr = app.http_addr().unwrap();
    let resp = request(
        addr,
        "OPTIONS",
        "/v1/events",
        &[("WebHook-Request-Origin", "a.example")],
        b"",
    )
    .unwrap();
    assert_eq!(resp.header("webhook-allowed-rate"), Some("*"));
    assert_eq!(env.count("SELECT count(*) FROM events"), 0);
    app.shutdown().unwrap();
}
