//! Batches, `type` and `key`, idempotency keys (for one event or a whole
//! batch) and client ids, API keys.

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use ingestd::Role;
use ingestd::api::commit::{self, Committer};
use ingestd::broker::{self, AmqpUrl};
use ingestd::ops::metrics::Metrics;
use ingestd::store::{NewEvent, Store, Submission, Written};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::util::{PrivateDatabase, Resp, TestEnv, amqp_url, get, post_json, request, wait_until};

const JSON: (&str, &str) = ("Content-Type", "application/json");

fn post_with(addr: SocketAddr, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut all = vec![JSON];
    all.extend_from_slice(headers);
    request(addr, "POST", "/v1/events", &all, body.as_bytes()).expect("POST")
}

fn ids_of(resp: &Resp) -> Vec<Uuid> {
    resp.json()["ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no ids in {:?}", resp.json()))
        .iter()
        .map(|v| Uuid::parse_str(v.as_str().unwrap()).unwrap())
        .collect()
}

fn id_of(resp: &Resp) -> Uuid {
    Uuid::parse_str(resp.json()["id"].as_str().unwrap()).unwrap()
}

#[test]
fn a_batch_is_written_all_or_nothing_in_order() {
    let env = TestEnv::new("batch");
    let app = env.start_with(&[("INGEST_MAX_BATCH", "5")]);
    let addr = app.http_addr().unwrap();

    let resp = post_json(
        addr,
        "/v1/events",
        r#"[{"payload":{"n":0},"type":"order.created","key":"customer-7"},
            {"payload":"one"},
            {"payload":[2],"type":"order.paid"}]"#,
    );
    assert_eq!(resp.status, 202, "{:?}", resp.json());
    assert_eq!(resp.json()["duplicates"], json!([]));
    let ids = ids_of(&resp);
    assert_eq!(ids.len(), 3);
    env.wait_processed(&ids, Duration::from_secs(10));
    let first = get(addr, &format!("/v1/events/{}", ids[0])).json();
    assert_eq!(first["payload"], json!({"n": 0}));
    assert_eq!(first["type"], "order.created");
    assert_eq!(first["key"], "customer-7");
    let second = get(addr, &format!("/v1/events/{}", ids[1])).json();
    assert_eq!(
        (&second["payload"], &second["type"]),
        (&json!("one"), &Value::Null)
    );
    assert_eq!(
        get(addr, &format!("/v1/events/{}", ids[2])).json()["type"],
        "order.paid"
    );

    // One bad item refuses the whole batch, naming its index.
    let resp = post_json(
        addr,
        "/v1/events",
        r#"[{"payload":1},{"payload":2},{"payload":null}]"#,
    );
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"], "invalid_body");
    assert_eq!(resp.json()["index"], 2);
    let resp = post_json(
        addr,
        "/v1/events",
        &json!(vec![json!({"payload": 1}); 6]).to_string(),
    );
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["error"], "batch_too_large");
    assert_eq!(env.count("SELECT count(*) FROM events"), 3);
    app.shutdown().unwrap();
}

/// PostgreSQL's `jsonb` writes numbers out in full (`1.7976931348623157e308`
/// as 309 digits); what the API accepted must read back as the same
/// numbers, both from the event route and in the worker's message.
#[test]
fn numbers_at_the_edges_of_f64_read_back_as_sent() {
    let env = TestEnv::new("bignum");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let body = r#"{"payload":[1.7976931348623157e308,-1.7976931348623157e308,5e-324,
        2.2250738585072014e-308,-3.2675064205661847e+252,12345678901234567890123,0.1]}"#;
    let resp = post_json(addr, "/v1/events", body);
    assert_eq!(resp.status, 202, "{:?}", resp.json());
    let id = id_of(&resp);
    env.wait_processed(&[id], Duration::from_secs(10));
    let event = get(addr, &format!("/v1/events/{id}"));
    assert_eq!(
        event.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&event.body)
    );
    // Written out in plain decimal, each is still the number sent.
    let as_f64 = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_f64().unwrap())
            .collect()
    };
    let sent: Value = serde_json::from_str(body).unwrap();
    assert_eq!(as_f64(&event.json()["payload"]), as_f64(&sent["payload"]));
    assert_eq!(
        event.json()["payload"][5].to_string(),
        "12345678901234567890123"
    );
    app.shutdown().unwrap();
}

/// The payload of the precision tests, as sent and as PostgreSQL stores
/// it: every digit kept, exponents written out, trailing zeros kept.
const PRECISE_SENT: &str = r#"{"big":123456789012345678901234567890,"neg":-98765432109876543210987,
    "dec":1.00,"pi":3.14159265358979323846264338327950288,"money":12345678901234567.89,
    "exp":1.50e3,"small":-2.5e-20,"list":[18446744073709551616,0.1000]}"#;
const PRECISE_STORED: &str = r#"{"big":123456789012345678901234567890,"neg":-98765432109876543210987,
    "dec":1.00,"pi":3.14159265358979323846264338327950288,"money":12345678901234567.89,
    "exp":1500,"small":-0.000000000000000000025,"list":[18446744073709551616,0.1000]}"#;

/// Numbers beyond f64 keep every digit on every path: the stored `jsonb`,
/// `GET /v1/events/<id>`, the message the relay publishes and the
/// processor's `Event.payload`. Before, they went through f64:
/// `123456789012345678901234567890` came back as `1.2345678901234568e+29`.
#[test]
fn big_integers_and_decimals_keep_every_digit_to_the_processor() {
    let env = TestEnv::new("precise");
    let config = env.config();
    // No workers at first: the message stays queued for the test to read.
    let api = env.start_role(&config, Role::Api);
    let relay = env.start_role(&config, Role::Relay);
    let addr = api.http_addr().unwrap();
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    let mut conn = broker::connect(&url, Duration::from_secs(5)).unwrap();
    env.topology().declare(&mut conn).unwrap();
    let channel = conn.open_channel(None).unwrap();

    let resp = post_json(
        addr,
        "/v1/events",
        &format!(r#"{{"payload":{PRECISE_SENT}}}"#),
    );
    assert_eq!(resp.status, 202, "{:?}", resp.json());
    let id = id_of(&resp);
    let expected: Value = serde_json::from_str(PRECISE_STORED).unwrap();

    let stored: Value = env
        .sql()
        .query_one("SELECT payload FROM events WHERE id = $1", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(stored, expected, "the stored jsonb");
    let text: String = env
        .sql()
        .query_one("SELECT payload::text FROM events WHERE id = $1", &[&id])
        .unwrap()
        .get(0);
    assert!(
        text.contains("\"big\": 123456789012345678901234567890"),
        "{text}"
    );

    let event = get(addr, &format!("/v1/events/{id}"));
    assert_eq!(event.json()["payload"], expected, "GET");
    let raw = String::from_utf8(event.body.clone()).unwrap();
    for digits in [
        "123456789012345678901234567890",
        "3.14159265358979323846264338327950288",
    ] {
        assert!(raw.contains(digits), "{raw}");
    }

    let queue = env.topology().queue;
    wait_until(Duration::from_secs(10), "the message is queued", || {
        env.queue_depth(&queue) == 1
    });
    let got = channel
        .basic_get(queue.clone(), false)
        .unwrap()
        .expect("a message");
    let body: Value = serde_json::from_slice(&got.delivery.body).unwrap();
    assert_eq!(body["payload"], expected, "the message");
    // Back to the queue, for a worker.
    got.delivery.nack(&channel, true).unwrap();
    let _ = conn.close();

    let worker = env.start_role(&config, Role::Worker);
    env.wait_processed(&[id], Duration::from_secs(10));
    let seen = env.processor.payload(id).expect("the processor ran");
    assert_eq!(seen, expected, "the processor's Event.payload");
    assert_eq!(
        seen["big"].as_number().unwrap().as_str(),
        "123456789012345678901234567890"
    );
    assert_eq!(seen["list"][0].as_u64(), None, "past u64, kept as text");
    assert_eq!(seen["exp"].as_i64(), Some(1500));
    worker.shutdown().unwrap();
    relay.shutdown().unwrap();
    api.shutdown().unwrap();
}

/// `1e400`, past f64, is stored as the 401-digit integer it denotes (and
/// counts as 401 bytes against the payload limit); a number PostgreSQL's
/// `numeric` cannot hold is refused with `400 invalid_body` naming it.
#[test]
fn huge_exponents_are_stored_written_out_or_refused_past_numeric() {
    let env = TestEnv::new("exponent");
    let app = env.start_with(&[("INGEST_MAX_PAYLOAD_BYTES", "1000")]);
    let addr = app.http_addr().unwrap();
    let resp = post_json(addr, "/v1/events", r#"{"payload":[1e400,-1e-400]}"#);
    assert_eq!(resp.status, 202, "{:?}", resp.json());
    let id = id_of(&resp);
    let expected: Value =
        serde_json::from_str(&format!("[1{},-0.{}1]", "0".repeat(400), "0".repeat(399))).unwrap();
    assert_eq!(
        get(addr, &format!("/v1/events/{id}")).json()["payload"],
        expected
    );
    env.wait_processed(&[id], Duration::from_secs(10));
    assert_eq!(env.processor.payload(id), Some(expected));

    // Written out, 1e999 is 1,000 digits, and 1,002 bytes with its brackets.
    assert_eq!(
        post_json(addr, "/v1/events", r#"{"payload":1e999}"#).status,
        202
    );
    let resp = post_json(addr, "/v1/events", r#"{"payload":[1e999]}"#);
    assert_eq!(
        (resp.status, &resp.json()["error"]),
        (413, &json!("payload_too_large"))
    );

    for (body, index) in [
        (r#"{"payload":{"n":1e131072}}"#, None),
        (r#"[{"payload":1},{"payload":[2.5e-16383]}]"#, Some(1)),
    ] {
        let resp = post_json(addr, "/v1/events", body);
        assert_eq!(resp.status, 400, "{body}");
        let error = resp.json();
        assert_eq!(error["error"], "invalid_body", "{body}");
        let detail = error["detail"].as_str().unwrap();
        assert!(detail.contains("cannot be stored"), "{detail}");
        assert_eq!(error.get("index").and_then(Value::as_u64), index, "{body}");
    }
    assert_eq!(env.count("SELECT count(*) FROM events"), 2);
    app.shutdown().unwrap();
}

/// The API's measure of a number as stored, which its payload limit and its
/// refusals rest on, agrees with PostgreSQL's own `jsonb` on every case.
#[test]
fn stored_number_lengths_match_postgresql() {
    let env = TestEnv::new("numlen");
    let mut sql = env.sql();
    let long = format!("0.{}1", "0".repeat(16_382));
    let too_long = format!("0.{}1", "0".repeat(16_383));
    let wide = format!("9{}", "9".repeat(131_071));
    let too_wide = format!("1{}", "0".repeat(131_072));
    let cases = [
        "0",
        "-0",
        "-0.00",
        "7",
        "-12",
        "1.00",
        "1e3",
        "1E+3",
        "1e+0005",
        "1.50e1",
        "10e-1",
        "123.456e-1",
        "0.001",
        "-0.001",
        "0.0e5",
        "5e-324",
        "1.7976931348623157e308",
        "1e400",
        "-1e-400",
        "1e131071",
        "0.1e131072",
        "1e131072",
        "1e-16383",
        "-1e-16383",
        "0e-16383",
        "1e-16384",
        "0e-16384",
        "1.5e-16383",
        "0e1073741822",
        "0e1073741823",
        "1e1073741822",
        "123456789012345678901234567890",
        &long,
        &too_long,
        &wide,
        &too_wide,
    ];
    for text in cases {
        let postgres: Option<i32> = sql
            .query_one("SELECT length($1::text::jsonb::text)", &[&text])
            .ok()
            .map(|r| r.get(0));
        let ours = ingestd::api::ingest::stored_number_len(text);
        assert_eq!(ours, postgres.map(|n| n as usize), "{:.40}", text);
    }
}

#[test]
fn type_and_key_travel_in_the_message() {
    let env = TestEnv::new("typekey");
    let config = env.config();
    // No workers: the message stays in the queue for the test to read.
    let api = env.start_role(&config, Role::Api);
    let relay = env.start_role(&config, Role::Relay);
    let addr = api.http_addr().unwrap();
    // Declared here too, so the queue exists before the relay connects.
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    let mut conn = broker::connect(&url, Duration::from_secs(5)).unwrap();
    env.topology().declare(&mut conn).unwrap();
    let channel = conn.open_channel(None).unwrap();
    let resp = post_json(
        addr,
        "/Ingestion/ingest",
        r#"{"payload":{"total":12.5},"type":"order.created","key":"customer-7"}"#,
    );
    assert_eq!(resp.status, 202);
    let id = id_of(&resp);
    let queue = env.topology().queue;
    wait_until(Duration::from_secs(10), "the message is queued", || {
        env.queue_depth(&queue) == 1
    });
    let got = channel.basic_get(queue, true).unwrap().expect("a message");
    let body: Value = serde_json::from_slice(&got.delivery.body).unwrap();
    assert_eq!(body["id"], id.to_string());
    assert_eq!(body["type"], "order.created");
    assert_eq!(body["key"], "customer-7");
    assert_eq!(body["payload"], json!({"total": 12.5}));
    let _ = conn.close();
    api.shutdown().unwrap();
    relay.shutdown().unwrap();
}

#[test]
fn an_idempotency_key_replays_the_first_answer() {
    let env = TestEnv::new("idemkey");
    let app = env.start_with(&[("INGEST_IDEMPOTENCY_TTL", "1h")]);
    let addr = app.http_addr().unwrap();
    let key = ("Idempotency-Key", "order-42");

    let first = post_with(addr, &[key], r#"{"payload":{"a":1,"b":[1,2]},"type":"t"}"#);
    assert_eq!(first.status, 202);
    let id = id_of(&first);
    // The same event, written differently, is a replay.
    let again = post_with(
        addr,
        &[key],
        r#"{ "type": "t", "payload": {"b": [1, 2], "a": 1} }"#,
    );
    assert_eq!(again.status, 200, "{:?}", again.json());
    assert_eq!(id_of(&again), id);
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(
        again.header("location"),
        Some(format!("/v1/events/{id}").as_str())
    );
    // The same key for anything else is a conflict.
    for other in [
        r#"{"payload":{"a":2,"b":[1,2]},"type":"t"}"#,
        r#"{"payload":{"a":1,"b":[1,2]}}"#,
        r#"{"payload":{"a":1,"b":[1,2]},"type":"t","key":"k"}"#,
    ] {
        let resp = post_with(addr, &[key], other);
        assert_eq!(resp.status, 409, "{other}");
        assert_eq!(resp.json()["error"], "idempotency_conflict");
    }
    // The key applies to the legacy route too.
    let legacy = request(
        addr,
        "POST",
        "/Ingestion/ingest",
        &[JSON, key],
        br#"{"payload":{"a":1,"b":[1,2]},"type":"t"}"#,
    )
    .unwrap();
    assert_eq!((legacy.status, id_of(&legacy)), (200, id));
    assert_eq!(env.count("SELECT count(*) FROM events"), 1);
    let metrics = String::from_utf8(get(addr, "/metrics").body).unwrap();
    assert!(
        metrics.contains("\ningestd_events_replayed_total 2\n"),
        "{metrics}"
    );
    env.wait_processed(&[id], Duration::from_secs(10));
    assert_eq!(env.runs(id), 1);

    // Once the key expires it may be used again: it is aged past the TTL
    // in the database rather than waited for.
    let aged = env
        .sql()
        .execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '2 hours' WHERE key = $1",
            &[&key.1],
        )
        .unwrap();
    assert_eq!(aged, 1);
    let later = post_with(addr, &[key], r#"{"payload":"new"}"#);
    assert_eq!(later.status, 202, "{:?}", later.json());
    assert_ne!(id_of(&later), id);
    app.shutdown().unwrap();
}

#[test]
fn sixteen_concurrent_replays_of_one_key_make_one_event() {
    let env = TestEnv::new("idemrace");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let start = Arc::new(Barrier::new(16));
    let answers: Vec<Resp> = (0..16)
        .map(|_| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                post_with(
                    addr,
                    &[("Idempotency-Key", "race-1")],
                    r#"{"payload":"once"}"#,
                )
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(statuses, [vec![200; 15], vec![202]].concat());
    let id = id_of(&answers[0]);
    assert!(answers.iter().all(|r| id_of(r) == id));
    assert_eq!(env.count("SELECT count(*) FROM events"), 1);
    env.wait_processed(&[id], Duration::from_secs(10));
    assert_eq!(env.runs(id), 1);
    assert_eq!(env.processed_twice(), 0);
    app.shutdown().unwrap();
}

/// Events, outbox rows and idempotency keys stored. With no relay running,
/// outbox rows stay, so every write shows in these counts.
fn rows(env: &TestEnv) -> (i64, i64, i64) {
    (
        env.count("SELECT count(*) FROM events"),
        env.count("SELECT count(*) FROM outbox"),
        env.count("SELECT count(*) FROM idempotency_keys"),
    )
}

#[test]
fn an_idempotency_key_makes_a_whole_batch_idempotent() {
    let env = TestEnv::new("idembatch");
    let app = env.start_role(&env.config(), Role::Api);
    let addr = app.http_addr().unwrap();
    let key = ("Idempotency-Key", "batch-42");
    let batch = r#"[{"payload":{"a":1,"b":[1,2]},"type":"t"},{"payload":"two","key":"k"}]"#;

    let first = post_with(addr, &[key], batch);
    assert_eq!(first.status, 202, "{:?}", first.json());
    assert_eq!(first.json()["duplicates"], json!([]));
    let ids = ids_of(&first);
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    assert_eq!(rows(&env), (2, 2, 1));

    // The same batch, written differently, replays the first answer on
    // either route: the same ids in the same order, every item a duplicate.
    let same =
        r#"[ {"type": "t", "payload": {"b": [1, 2], "a": 1}}, {"key": "k", "payload": "two"} ]"#;
    for path in ["/v1/events", "/Ingestion/ingest"] {
        let again = request(addr, "POST", path, &[JSON, key], same.as_bytes()).unwrap();
        assert_eq!(again.status, 200, "{path}: {:?}", again.json());
        assert_eq!(ids_of(&again), ids, "{path}");
        assert_eq!(again.json()["duplicates"], json!([0, 1]), "{path}");
    }
    assert_eq!(rows(&env), (2, 2, 1));

    // Any other body under the key is a conflict and writes nothing.
    let id = Uuid::new_v4();
    for other in [
        // Another payload.
        r#"[{"payload":{"a":2,"b":[1,2]},"type":"t"},{"payload":"two","key":"k"}]"#.to_string(),
        // The same events in another order.
        r#"[{"payload":"two","key":"k"},{"payload":{"a":1,"b":[1,2]},"type":"t"}]"#.to_string(),
        // One event fewer, or one more.
        r#"[{"payload":{"a":1,"b":[1,2]},"type":"t"}]"#.to_string(),
        r#"[{"payload":{"a":1,"b":[1,2]},"type":"t"},{"payload":"two","key":"k"},{"payload":3}]"#
            .to_string(),
        // A number written otherwise: 1 and 1.0 differ, as for one event.
        r#"[{"payload":{"a":1.0,"b":[1,2]},"type":"t"},{"payload":"two","key":"k"}]"#.to_string(),
        // An id of the client's own on an item.
        format!(
            r#"[{{"payload":{{"a":1,"b":[1,2]}},"type":"t","id":"{id}"}},{{"payload":"two","key":"k"}}]"#
        ),
    ] {
        let resp = post_with(addr, &[key], &other);
        assert_eq!(resp.status, 409, "{other}");
        assert_eq!(resp.json()["error"], "idempotency_conflict", "{other}");
    }
    assert_eq!(rows(&env), (2, 2, 1));

    // Another key is another request.
    let other = post_with(addr, &[("Idempotency-Key", "batch-43")], batch);
    assert_eq!(other.status, 202);
    assert!(ids_of(&other).iter().all(|id| !ids.contains(id)));
    assert_eq!(rows(&env), (4, 4, 2));
    app.shutdown().unwrap();
}

#[test]
fn one_idempotency_key_for_an_event_and_a_batch_conflicts() {
    let env = TestEnv::new("idemshape");
    let app = env.start_role(&env.config(), Role::Api);
    let addr = app.http_addr().unwrap();
    let event = r#"{"payload":{"order":7},"type":"t"}"#;
    let batch = format!("[{event}]");

    // First one event, then a batch of that same event.
    let single_key = ("Idempotency-Key", "first-single");
    assert_eq!(post_with(addr, &[single_key], event).status, 202);
    let resp = post_with(addr, &[single_key], &batch);
    assert_eq!(resp.status, 409, "{:?}", resp.json());
    assert_eq!(resp.json()["error"], "idempotency_conflict");
    assert_eq!(rows(&env), (1, 1, 1));

    // First the batch, then the event alone.
    let batch_key = ("Idempotency-Key", "first-batch");
    let first = post_with(addr, &[batch_key], &batch);
    assert_eq!(first.status, 202);
    let resp = post_with(addr, &[batch_key], event);
    assert_eq!(resp.status, 409, "{:?}", resp.json());
    assert_eq!(resp.json()["error"], "idempotency_conflict");
    assert_eq!(rows(&env), (2, 2, 2));

    // Each key still replays its own first answer, in its own shape.
    let again = post_with(addr, &[single_key], event);
    assert_eq!(
        (again.status, &again.json()["duplicate"]),
        (200, &json!(true))
    );
    let again = post_with(addr, &[batch_key], &batch);
    assert_eq!(again.status, 200);
    assert_eq!(ids_of(&again), ids_of(&first));
    assert_eq!(rows(&env), (2, 2, 2));
    app.shutdown().unwrap();
}

#[test]
fn concurrent_batches_with_one_key_create_once() {
    let env = TestEnv::new("idembatchrace");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let start = Arc::new(Barrier::new(16));
    let answers: Vec<Resp> = (0..16)
        .map(|_| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                post_with(
                    addr,
                    &[("Idempotency-Key", "race-batch")],
                    r#"[{"payload":1},{"payload":2},{"payload":3}]"#,
                )
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(statuses, [vec![200; 15], vec![202]].concat());
    let ids = ids_of(&answers[0]);
    assert_eq!(ids.len(), 3);
    assert!(answers.iter().all(|r| ids_of(r) == ids));
    for replay in answers.iter().filter(|r| r.status == 200) {
        assert_eq!(replay.json()["duplicates"], json!([0, 1, 2]));
    }
    assert_eq!(env.count("SELECT count(*) FROM events"), 3);
    assert_eq!(env.count("SELECT count(*) FROM idempotency_keys"), 1);
    env.wait_processed(&ids, Duration::from_secs(10));
    assert!(ids.iter().all(|id| env.runs(*id) == 1));
    assert_eq!(env.processed_twice(), 0);
    app.shutdown().unwrap();
}

/// The key is checked first and covers the whole body; under a new key,
/// item ids are replayed or refused as without one, in the same
/// transaction, so a refused batch leaves its key unused.
#[test]
fn a_batch_key_and_item_ids_work_together() {
    let env = TestEnv::new("idembatchids");
    let app = env.start_role(&env.config(), Role::Api);
    let addr = app.http_addr().unwrap();
    let known = Uuid::new_v4();
    let stored = json!([{ "id": known.to_string(), "payload": 0 }]).to_string();
    assert_eq!(post_json(addr, "/v1/events", &stored).status, 202);

    // A new key: the known item is a duplicate, the other is created.
    let k1 = ("Idempotency-Key", "with-ids-1");
    let body = json!([{ "id": known.to_string(), "payload": 0 }, { "payload": 1 }]).to_string();
    let first = post_with(addr, &[k1], &body);
    assert_eq!(first.status, 202, "{:?}", first.json());
    assert_eq!(first.json()["duplicates"], json!([0]));
    let ids = ids_of(&first);
    assert_eq!(ids[0], known);
    assert_eq!(rows(&env), (2, 2, 1));
    // Its replay answers with the same ids, all of them duplicates now.
    let again = post_with(addr, &[k1], &body);
    assert_eq!(again.status, 200);
    assert_eq!(ids_of(&again), ids);
    assert_eq!(again.json()["duplicates"], json!([0, 1]));
    // The item's id is part of the body the key stands for.
    let without_id = json!([{ "payload": 0 }, { "payload": 1 }]).to_string();
    let resp = post_with(addr, &[k1], &without_id);
    assert_eq!(resp.status, 409);
    assert_eq!(resp.json()["error"], "idempotency_conflict");
    assert_eq!(rows(&env), (2, 2, 1));

    // A new key with an item id used for other content: the item's
    // conflict, nothing written, and the key is not used up.
    let k2 = ("Idempotency-Key", "with-ids-2");
    let changed = json!([{ "payload": 2 }, { "id": known.to_string(), "payload": "changed" }]);
    let resp = post_with(addr, &[k2], &changed.to_string());
    assert_eq!(resp.status, 409, "{:?}", resp.json());
    assert_eq!(resp.json()["error"], "id_conflict");
    assert_eq!(resp.json()["index"], 1);
    assert_eq!(rows(&env), (2, 2, 1));
    let resp = post_with(addr, &[k2], r#"[{"payload":2}]"#);
    assert_eq!(resp.status, 202, "{:?}", resp.json());
    assert_eq!(rows(&env), (3, 3, 2));

    // Without the key, the ids alone still replay their items.
    let resp = post_json(addr, "/v1/events", &stored);
    assert_eq!(resp.status, 200);
    assert_eq!(ids_of(&resp), vec![known]);
    assert_eq!(rows(&env), (3, 3, 2));
    app.shutdown().unwrap();
}

/// A schema from before batch keys (no `idempotency_keys.event_ids`, an
/// older fingerprint) upgrades in place, and the keys it holds still
/// replay.
#[test]
fn a_schema_without_batch_keys_upgrades_in_place() {
    let env = TestEnv::new("idemupgrade");
    let old = Uuid::new_v4();
    // The earlier version's tables and its way of storing a key.
    env.sql()
        .batch_execute(&format!(
            "ALTER TABLE idempotency_keys DROP COLUMN event_ids;
             DELETE FROM ingestd_schema;
             INSERT INTO ingestd_schema (fingerprint) VALUES ('0123456789abcdef');
             INSERT INTO events (id, payload) VALUES ('{old}', '{{\"n\": 1}}');
             INSERT INTO idempotency_keys (key, event_id, fingerprint) VALUES ('old-key', '{old}',
                 sha256(convert_to(jsonb_build_array('{{\"n\": 1}}'::jsonb, NULL::text,
                     NULL::text, NULL::uuid)::text, 'UTF8')));"
        ))
        .unwrap();
    let app = env.start_role(&env.config(), Role::Api);
    let addr = app.http_addr().unwrap();

    let replay = post_with(
        addr,
        &[("Idempotency-Key", "old-key")],
        r#"{"payload":{"n":1}}"#,
    );
    assert_eq!(replay.status, 200, "{:?}", replay.json());
    assert_eq!(id_of(&replay), old);
    let key = ("Idempotency-Key", "new-batch");
    let first = post_with(addr, &[key], r#"[{"payload":1},{"payload":2}]"#);
    assert_eq!(first.status, 202, "{:?}", first.json());
    let again = post_with(addr, &[key], r#"[{"payload":1},{"payload":2}]"#);
    assert_eq!((again.status, ids_of(&again)), (200, ids_of(&first)));
    // Without API keys a key is stored as it is, as earlier versions stored
    // every key, so that they and this one see each other's keys.
    assert_eq!(
        env.count("SELECT count(*) FROM idempotency_keys WHERE key = 'new-batch'"),
        1
    );
    assert_eq!(env.count("SELECT count(*) FROM events"), 3);
    assert_eq!(
        env.count("SELECT count(*) FROM ingestd_schema WHERE fingerprint <> '0123456789abcdef'"),
        1
    );
    app.shutdown().unwrap();
}

#[test]
fn client_ids_make_batch_items_idempotent() {
    let env = TestEnv::new("clientids");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let item = |i: usize, payload: Value| json!({ "id": ids[i].to_string(), "payload": payload });
    let batch = json!([item(0, json!(0)), item(1, json!(1)), item(2, json!(2))]).to_string();

    let first = post_json(addr, "/v1/events", &batch);
    assert_eq!(first.status, 202, "{:?}", first.json());
    assert_eq!(ids_of(&first), ids);
    let replay = post_json(addr, "/v1/events", &batch);
    assert_eq!(replay.status, 200);
    assert_eq!(replay.json()["duplicates"], json!([0, 1, 2]));
    assert_eq!(ids_of(&replay), ids);

    // A changed item is a conflict, and the new item beside it is not
    // written either.
    let fresh = Uuid::new_v4();
    let changed = json!([
        item(0, json!(0)),
        item(1, json!("changed")),
        { "id": fresh.to_string(), "payload": 3 }
    ]);
    let resp = post_json(addr, "/v1/events", &changed.to_string());
    assert_eq!(resp.status, 409);
    assert_eq!(resp.json()["error"], "id_conflict");
    assert_eq!(resp.json()["index"], 1);
    assert_eq!(env.count("SELECT count(*) FROM events"), 3);

    // Old and new items together: the new one is created.
    let mixed = json!([item(2, json!(2)), { "id": fresh.to_string(), "payload": 3 }]);
    let resp = post_json(addr, "/v1/events", &mixed.to_string());
    assert_eq!(resp.status, 202);
    assert_eq!(resp.json()["duplicates"], json!([0]));
    assert_eq!(ids_of(&resp), vec![ids[2], fresh]);

    // A single event may carry its own id too.
    let single = json!({ "id": ids[0].to_string(), "payload": 0 }).to_string();
    let resp = post_json(addr, "/v1/events", &single);
    assert_eq!((resp.status, id_of(&resp)), (200, ids[0]));
    let resp = post_json(
        addr,
        "/v1/events",
        &json!({ "id": ids[0].to_string(), "payload": 9 }).to_string(),
    );
    assert_eq!(resp.status, 409);
    assert_eq!(resp.json()["error"], "id_conflict");

    // Content compares as JSON text after normalising key order and
    // spacing, as the idempotency fingerprint does: 1 and 1.0 differ.
    let obj = Uuid::new_v4();
    let resp = post_json(
        addr,
        "/v1/events",
        &format!(r#"{{"id":"{obj}","payload":{{"a":1,"b":[1,2]}}}}"#),
    );
    assert_eq!(resp.status, 202);
    let resp = post_json(
        addr,
        "/v1/events",
        &format!(r#"{{ "payload" : {{ "b" : [1, 2], "a" : 1 }}, "id" : "{obj}" }}"#),
    );
    assert_eq!(resp.status, 200, "same content, other order");
    let resp = post_json(
        addr,
        "/v1/events",
        &format!(r#"{{"id":"{obj}","payload":{{"a":1.0,"b":[1,2]}}}}"#),
    );
    assert_eq!(
        (resp.status, &resp.json()["error"]),
        (409, &json!("id_conflict"))
    );

    let all = [ids.clone(), vec![fresh, obj]].concat();
    env.wait_processed(&all, Duration::from_secs(10));
    assert_eq!(env.count("SELECT count(*) FROM events"), 5);
    assert!(all.iter().all(|id| env.runs(*id) == 1));
    app.shutdown().unwrap();
}

/// Idempotency compares numbers as PostgreSQL stores them: by their digits,
/// trailing zeros included, after writing exponents out. `1.0` and `1.00`
/// are different content; `1.0`, `10e-1` and `0.10e1` are the same. Before,
/// numbers went through f64, so `1.0` and `1.00` replayed each other, and
/// so did two integers past 2^53 that differ in their last digit.
#[test]
fn numbers_are_compared_as_stored_for_idempotency() {
    let env = TestEnv::new("idemnums");
    let app = env.start_role(&env.config(), Role::Api);
    let addr = app.http_addr().unwrap();

    let key = ("Idempotency-Key", "amount-1");
    let first = post_with(addr, &[key], r#"{"payload":{"amount":1.0}}"#);
    assert_eq!(first.status, 202, "{:?}", first.json());
    for same in [
        r#"{"payload":{"amount":10e-1}}"#,
        r#"{"payload":{"amount":0.10e1}}"#,
    ] {
        let resp = post_with(addr, &[key], same);
        assert_eq!((resp.status, id_of(&resp)), (200, id_of(&first)), "{same}");
    }
    for other in [
        r#"{"payload":{"amount":1.00}}"#,
        r#"{"payload":{"amount":1}}"#,
    ] {
        let resp = post_with(addr, &[key], other);
        assert_eq!(resp.status, 409, "{other}");
        assert_eq!(resp.json()["error"], "idempotency_conflict", "{other}");
    }

    // The same rule for a batch under a key, and for client ids.
    let key = ("Idempotency-Key", "batch-amounts");
    let batch = r#"[{"payload":123456789012345678901234567890},{"payload":2.50}]"#;
    assert_eq!(post_with(addr, &[key], batch).status, 202);
    let near = r#"[{"payload":123456789012345678901234567891},{"payload":2.50}]"#;
    assert_eq!(
        post_with(addr, &[key], near).status,
        409,
        "the last digit counts"
    );
    let zeros = r#"[{"payload":123456789012345678901234567890},{"payload":2.5}]"#;
    assert_eq!(
        post_with(addr, &[key], zeros).status,
        409,
        "trailing zeros count"
    );
    let written_out = r#"[{"payload":1.23456789012345678901234567890e29},{"payload":25.0e-1}]"#;
    assert_eq!(post_with(addr, &[key], written_out).status, 200);

    let id = Uuid::new_v4();
    let with_id = |payload: &str| format!(r#"{{"id":"{id}","payload":{payload}}}"#);
    assert_eq!(post_json(addr, "/v1/events", &with_id("1.0")).status, 202);
    assert_eq!(
        post_json(addr, "/v1/events", &with_id("0.10e1")).status,
        200
    );
    let resp = post_json(addr, "/v1/events", &with_id("1.00"));
    assert_eq!(
        (resp.status, &resp.json()["error"]),
        (409, &json!("id_conflict"))
    );
    assert_eq!(rows(&env), (4, 4, 2));
    app.shutdown().unwrap();
}

/// With API keys, an `Idempotency-Key` belongs to the API key that sent it:
/// two clients using the same one get their own events and never see each
/// other's ids. The database keeps a hash of the API key, never the key.
/// Client-chosen event ids stay global, as the events' primary key.
#[test]
fn idempotency_keys_are_scoped_per_api_key() {
    let env = TestEnv::new("idemscope");
    let keys = format!("{KEY},{OTHER_KEY}");
    let app = env.start_role(&env.config_with(&[("INGEST_API_KEYS", &keys)]), Role::Api);
    let addr = app.http_addr().unwrap();
    let bearer = format!("Bearer {KEY}");
    let one = [
        ("Authorization", bearer.as_str()),
        ("Idempotency-Key", "order-1"),
    ];
    let other = [("X-Api-Key", OTHER_KEY), ("Idempotency-Key", "order-1")];
    let body = r#"{"payload":{"order":1}}"#;

    let first = post_with(addr, &one, body);
    assert_eq!(first.status, 202, "{:?}", first.json());
    let theirs = post_with(addr, &other, body);
    assert_eq!(
        theirs.status,
        202,
        "not the first client's replay: {:?}",
        theirs.json()
    );
    assert_ne!(id_of(&theirs), id_of(&first));
    // Each replays its own, and conflicts only with itself.
    let again = post_with(addr, &one, body);
    assert_eq!((again.status, id_of(&again)), (200, id_of(&first)));
    let again = post_with(addr, &other, body);
    assert_eq!((again.status, id_of(&again)), (200, id_of(&theirs)));
    assert_eq!(
        post_with(addr, &other, r#"{"payload":{"order":2}}"#).status,
        409
    );
    assert_eq!(rows(&env), (2, 2, 2));
    // Batches too, and the Bearer and X-Api-Key forms of one key agree.
    let batch = r#"[{"payload":1},{"payload":2}]"#;
    let k2 = ("Idempotency-Key", "batch-1");
    let mine = post_with(addr, &[("Authorization", &bearer), k2], batch);
    let same = post_with(addr, &[("X-Api-Key", KEY), k2], batch);
    assert_eq!((same.status, ids_of(&same)), (200, ids_of(&mine)));
    let theirs = post_with(addr, &[("X-Api-Key", OTHER_KEY), k2], batch);
    assert_eq!(theirs.status, 202);
    assert!(ids_of(&theirs).iter().all(|id| !ids_of(&mine).contains(id)));

    let stored: Vec<String> = env
        .sql()
        .query("SELECT key FROM idempotency_keys ORDER BY key", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert!(
        stored
            .iter()
            .all(|k| !k.contains("0123456789abcdef") && !k.contains("key-")),
        "{stored:?}"
    );
    assert_eq!(stored.iter().filter(|k| k.ends_with(" order-1")).count(), 2);

    // A client-chosen id is the event's own, whichever key sends it.
    let id = Uuid::new_v4();
    let event = format!(r#"{{"id":"{id}","payload":1}}"#);
    assert_eq!(post_with(addr, &[("X-Api-Key", KEY)], &event).status, 202);
    let replay = post_with(addr, &[("X-Api-Key", OTHER_KEY)], &event);
    assert_eq!((replay.status, id_of(&replay)), (200, id));
    let changed = format!(r#"{{"id":"{id}","payload":2}}"#);
    let resp = post_with(addr, &[("X-Api-Key", OTHER_KEY)], &changed);
    assert_eq!(
        (resp.status, &resp.json()["error"]),
        (409, &json!("id_conflict"))
    );
    app.shutdown().unwrap();
}

/// Batches that share client ids, written at once in different orders,
/// lock their rows in the same order: each is stored or replayed, never
/// refused by a deadlock, and every id is stored once. A deadlock would be
/// retried silently, so the test counts them: it runs in a database of its
/// own, whose `pg_stat_database.deadlocks` only it can move.
#[test]
fn concurrent_batches_sharing_ids_do_not_deadlock() {
    let env = TestEnv::new("idorder");
    let db = PrivateDatabase::create(&env.name);
    let config = env.config_with(&[("INGEST_DATABASE_URL", &db.url)]);
    ingestd::app::migrate(&config).unwrap();
    // The counter is live: a deadlock made on purpose is counted.
    postgres::Client::connect(&db.url, postgres::NoTls)
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE {}.pair (n int PRIMARY KEY); INSERT INTO {0}.pair VALUES (1), (2)",
            env.name
        ))
        .unwrap();
    let start = Arc::new(Barrier::new(2));
    let crossed: Vec<bool> = [(1, 2), (2, 1)]
        .map(|(first, second): (i32, i32)| {
            let (url, schema, start) = (db.url.clone(), env.name.clone(), start.clone());
            thread::spawn(move || {
                let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                let mut tx = c.transaction().unwrap();
                let update = format!("UPDATE {schema}.pair SET n = n WHERE n = $1");
                tx.execute(&update, &[&first]).unwrap();
                start.wait();
                tx.execute(&update, &[&second]).is_err()
            })
        })
        .map(|t| t.join().unwrap())
        .into();
    assert_eq!(crossed.iter().filter(|e| **e).count(), 1, "one deadlock");
    let before = db.deadlocks();
    assert_eq!(before, 1, "the deliberate deadlock is counted");

    let store = Store::open(&ingestd::store::Settings::of(&config).sized(8)).unwrap();
    let events: Vec<NewEvent> = (0..1000)
        .map(|n| NewEvent {
            id: Uuid::new_v4(),
            payload: json!(n),
            event_type: None,
            key: None,
            client_id: true,
            attributes: None,
            trace: None,
        })
        .collect();
    let start = Arc::new(Barrier::new(8));
    let results: Vec<Result<Written, String>> = (0..8)
        .map(|t| {
            let (store, start) = (store.clone(), start.clone());
            let mut events = events.clone();
            events.rotate_left(t * 125);
            if t % 2 == 1 {
                events.reverse();
            }
            let submission = Submission {
                events,
                batch: true,
                idempotency_key: None,
            };
            thread::spawn(move || {
                start.wait();
                store
                    .insert_idempotent(
                        &submission,
                        Duration::from_secs(60),
                        &ingestd::store::Wakeup::Notify,
                    )
                    .map_err(|e| e.to_string())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut created = 0;
    for r in results {
        match r {
            Ok(Written::Stored { created: c, .. }) => {
                created += c.iter().filter(|c| **c).count();
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(created, 1000, "each id created by exactly one writer");
    let mut check = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    let count = |c: &mut postgres::Client, table: &str| -> i64 {
        c.query_one(&format!("SELECT count(*) FROM {}.{table}", env.name), &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(count(&mut check, "events"), 1000);
    assert_eq!(count(&mut check, "outbox"), 1000);
    // Closing every session makes each report its statistics.
    drop((check, store));
    assert_eq!(db.deadlocks() - before, 0, "no deadlock was retried");
}

const KEY: &str = "key-one-0123456789abcdef";
const OTHER_KEY: &str = "key-two-0123456789abcdef";

#[test]
fn api_keys_guard_the_ingest_and_query_routes() {
    let env = TestEnv::new("apikeys");
    let keys = format!("{KEY},{OTHER_KEY}");
    let mut binary =
        env.spawn_binary_with(None, &[("INGEST_API_KEYS", &keys), ("INGEST_LOG", "debug")]);
    let addr = binary.addr.unwrap();
    let body = br#"{"payload":1}"#;
    let bearer = format!("Bearer {KEY}");

    for headers in [
        vec![JSON],
        vec![JSON, ("Authorization", "Bearer wrong-key-0123456789abcd")],
        vec![JSON, ("Authorization", KEY)],
        vec![JSON, ("X-Api-Key", "")],
    ] {
        let resp = request(addr, "POST", "/v1/events", &headers, body).unwrap();
        assert_eq!(resp.status, 401, "{headers:?}");
        assert_eq!(resp.json()["error"], "unauthorized");
        assert_eq!(
            resp.header("www-authenticate"),
            Some("Bearer realm=\"ingestd\"")
        );
    }
    assert_eq!(env.count("SELECT count(*) FROM events"), 0);

    let resp = request(
        addr,
        "POST",
        "/v1/events",
        &[JSON, ("Authorization", &bearer)],
        body,
    )
    .unwrap();
    assert_eq!(resp.status, 202);
    let id = id_of(&resp);
    let resp = request(
        addr,
        "POST",
        "/Ingestion/ingest",
        &[JSON, ("X-Api-Key", OTHER_KEY)],
        body,
    )
    .unwrap();
    assert_eq!(resp.status, 202);

    let event = format!("/v1/events/{id}");
    assert_eq!(get(addr, &event).status, 401);
    assert_eq!(get(addr, "/v1/stats").status, 401);
    assert_eq!(
        request(addr, "POST", &format!("{event}/retry"), &[], b"")
            .unwrap()
            .status,
        401
    );
    let resp = request(addr, "GET", &event, &[("Authorization", &bearer)], b"").unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        request(addr, "GET", "/v1/stats", &[("X-Api-Key", KEY)], b"")
            .unwrap()
            .status,
        200
    );
    // Probes, metrics and the page's shell stay open.
    for open in ["/healthz", "/metrics", "/"] {
        assert_eq!(get(addr, open).status, 200, "{open}");
    }
    wait_until(
        Duration::from_secs(10),
        "/readyz answers without a key",
        || get(addr, "/readyz").status == 200,
    );

    binary.terminate();
    let log = binary.log.take().unwrap().join().unwrap().join("\n");
    assert!(!log.is_empty());
    assert!(
        !log.contains("key-one") && !log.contains("key-two"),
        "{log}"
    );
}

/// One committer thread over `env`'s schema, to submit to directly.
fn one_committer(env: &TestEnv) -> (Committer, Vec<std::thread::JoinHandle<()>>) {
    committers(env, 1)
}

/// `threads` committer threads over `env`'s schema.
fn committers(env: &TestEnv, threads: usize) -> (Committer, Vec<std::thread::JoinHandle<()>>) {
    let settings = commit::Settings {
        threads,
        max_batch: 100,
        key_ttl: Duration::from_secs(60),
        queue: 16,
        wakeup: ingestd::store::Wakeup::Notify,
        metrics: Arc::new(Metrics::default()),
    };
    let store = Store::open(&ingestd::store::Settings::of(&env.config()).sized(2)).unwrap();
    Committer::start(store, settings)
}

/// Holds an exclusive lock on `events` until the returned transaction
/// ends: a committer's insert waits for it.
fn lock_events(sql: &mut postgres::Client) -> postgres::Transaction<'_> {
    let mut lock = sql.transaction().unwrap();
    lock.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    lock
}

/// Sessions waiting for a lock on `events`.
fn waiting_for_events(env: &TestEnv) -> i64 {
    env.count("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'events'::regclass")
}

/// Drops the last handle on the committers and waits for their threads.
fn stop_committers(committer: Committer, threads: Vec<std::thread::JoinHandle<()>>) {
    drop(committer);
    for t in threads {
        t.join().expect("the committer threads end cleanly");
    }
}

/// A submission of one new event with payload `n`.
fn one_event(n: i32) -> Submission {
    Submission {
        events: vec![NewEvent {
            id: Uuid::new_v4(),
            payload: json!(n),
            event_type: None,
            key: None,
            client_id: false,
            attributes: None,
            trace: None,
        }],
        batch: false,
        idempotency_key: None,
    }
}

/// Committers take turns: while one writes (held here on a table lock),
/// the other does not take the next request and write it nearly alone;
/// every request that arrives meanwhile waits for the next turn, and all of
/// them go in one transaction.
#[test]
fn requests_arriving_during_a_commit_go_together_in_the_next_one() {
    let env = TestEnv::new("turns");
    let (committer, threads) = committers(&env, 2);
    let mut sql = env.sql();
    let lock = lock_events(&mut sql);
    let waiting = || waiting_for_events(&env);
    let (tx, rx) = std::sync::mpsc::channel();
    let submit = |n: i32| {
        let tx = tx.clone();
        let submission = one_event(n);
        let id = submission.events[0].id;
        committer.submit(
            submission,
            Box::new(move |r| tx.send((n, r.is_ok())).unwrap()),
        );
        id
    };
    let first = submit(0);
    wait_until(
        Duration::from_secs(10),
        "the first committer waits for the lock",
        || waiting() == 1,
    );
    let later: Vec<Uuid> = (1..=10).map(submit).collect();
    // The second committer left them queued: no second transaction waits.
    assert_eq!(waiting(), 1);
    lock.commit().unwrap();
    for _ in 0..11 {
        let (n, ok) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every reply is called");
        assert!(ok, "request {n} committed");
    }
    assert_eq!(
        env.transactions_of(&later),
        1,
        "the ten went in one transaction"
    );
    let mut all = later.clone();
    all.push(first);
    assert_eq!(env.transactions_of(&all), 2, "and the first in its own");
    stop_committers(committer, threads);
}

/// A batch that fills a transaction does not keep the turn while it is
/// written: the next request, here another full one, is written beside it.
#[test]
fn a_full_batch_passes_the_turn_on_before_it_is_written() {
    let env = TestEnv::new("fullturn");
    let (committer, threads) = committers(&env, 2);
    let mut sql = env.sql();
    let lock = lock_events(&mut sql);
    let waiting = || waiting_for_events(&env);
    // As many events as the helper's max_batch: each fills a transaction.
    let full = || Submission {
        events: (0..100).map(|n| one_event(n).events.remove(0)).collect(),
        batch: true,
        idempotency_key: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    for n in 0..2 {
        let tx = tx.clone();
        committer.submit(full(), Box::new(move |r| tx.send((n, r.is_ok())).unwrap()));
    }
    wait_until(
        Duration::from_secs(10),
        "both committers write at once",
        || waiting() == 2,
    );
    lock.commit().unwrap();
    for _ in 0..2 {
        let (n, ok) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every reply is called");
        assert!(ok, "request {n} committed");
    }
    assert_eq!(env.count("SELECT count(*) FROM events"), 200);
    stop_committers(committer, threads);
}

/// A panic in one reply of a committed batch spares the replies after it:
/// every request whose events committed hears so. The batch is made by
/// holding the committer on a table lock while two requests queue behind.
#[test]
fn a_panicking_reply_spares_the_other_replies_of_its_batch() {
    let env = TestEnv::new("replypanic");
    let (committer, threads) = one_committer(&env);
    let one = one_event;
    let mut sql = env.sql();
    let lock = lock_events(&mut sql);
    let (tx, rx) = std::sync::mpsc::channel();
    let first = tx.clone();
    committer.submit(
        one(1),
        Box::new(move |r| first.send((1, r.is_ok())).unwrap()),
    );
    // The committer is now waiting for the lock with the first request;
    // the next two queue and make the next batch.
    wait_until(
        Duration::from_secs(10),
        "the committer waits for the lock",
        || waiting_for_events(&env) > 0,
    );
    let second = tx.clone();
    committer.submit(
        one(2),
        Box::new(move |r| {
            second.send((2, r.is_ok())).unwrap();
            panic!("a bug in one reply");
        }),
    );
    committer.submit(one(3), Box::new(move |r| tx.send((3, r.is_ok())).unwrap()));
    lock.commit().unwrap();
    let mut heard: Vec<(i32, bool)> = (0..3)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("every reply is called")
        })
        .collect();
    heard.sort();
    assert_eq!(heard, vec![(1, true), (2, true), (3, true)]);
    assert_eq!(env.count("SELECT count(*) FROM events"), 3);
    stop_committers(committer, threads);
}

/// A panic in a commit batch (here, in a request's reply, after the commit)
/// spares its committer: the thread goes on, and the next request is
/// written and answered.
#[test]
fn a_panic_in_a_commit_batch_spares_the_committer() {
    let env = TestEnv::new("commitpanic");
    let (committer, threads) = one_committer(&env);
    let one = one_event;
    let (tx, rx) = std::sync::mpsc::channel();
    let first = tx.clone();
    committer.submit(
        one(1),
        Box::new(move |result| {
            first.send(result.is_ok()).unwrap();
            panic!("a bug in a reply");
        }),
    );
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    // The only committer thread survived the panic: it takes the next one.
    committer.submit(
        one(2),
        Box::new(move |result| tx.send(result.is_ok()).unwrap()),
    );
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "the committer answers after a panic"
    );
    assert_eq!(env.count("SELECT count(*) FROM events"), 2);
    stop_committers(committer, threads);
}

/// Plain events are written with their outbox rows in one statement, in
/// the request's order, and the commit wakes relays as the wake-up says:
/// a `NOTIFY` for relays in other processes, sent only by a write that
/// committed; a nudge of the local relay otherwise, with no `NOTIFY`.
#[test]
fn one_statement_writes_events_and_outbox_rows_in_order_and_wakes_the_relays() {
    use postgres::fallible_iterator::FallibleIterator;

    let env = TestEnv::new("onestmt");
    let store = Store::open(&ingestd::store::Settings::of(&env.config()).sized(2)).unwrap();
    let mut listener = env.sql();
    let channel = store.notify_channel();
    listener
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .unwrap();
    let event = |n: i64| crate::util::plain_event(json!({ "n": n }));

    // A nudge for this process's relay, and no NOTIFY.
    let (nudge, nudged) = crossbeam_channel::bounded(1);
    let local: Vec<NewEvent> = (0..50).map(event).collect();
    store
        .insert_events(
            &local.iter().collect::<Vec<_>>(),
            &ingestd::store::Wakeup::Local(nudge),
        )
        .unwrap();
    assert!(
        nudged.try_recv().is_ok(),
        "the local relay is nudged at once"
    );

    // A write that fails (an id already stored) commits nothing and
    // notifies nobody.
    let again = [&local[0], &local[1]];
    store
        .insert_events(&again, &ingestd::store::Wakeup::Notify)
        .expect_err("an id already stored");

    // Notifications arrive in commit order: a sentinel sent now comes
    // before the write's, and first only if neither write above sent one.
    env.sql()
        .batch_execute(&format!("NOTIFY \"{channel}\", 'sentinel'"))
        .unwrap();
    let notifying: Vec<NewEvent> = (50..60).map(event).collect();
    store
        .insert_events(
            &notifying.iter().collect::<Vec<_>>(),
            &ingestd::store::Wakeup::Notify,
        )
        .unwrap();
    let received: Vec<(String, String)> = listener
        .notifications()
        .timeout_iter(Duration::from_secs(5))
        .take(2)
        .map(|n| Ok((n.channel().to_string(), n.payload().to_string())))
        .collect()
        .unwrap();
    assert_eq!(
        received,
        [
            (channel.clone(), "sentinel".to_string()),
            (channel.clone(), String::new())
        ],
        "the sentinel, then the write's NOTIFY, within 5 s"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM events"),
        60,
        "the failed write left nothing"
    );
    let rows = env
        .sql()
        .query(
            "SELECT o.event_id::text, e.payload->>'n' FROM outbox o \
             JOIN events e ON e.id = o.event_id ORDER BY o.id",
            &[],
        )
        .unwrap();
    let order: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(String, String)> = local
        .iter()
        .chain(&notifying)
        .map(|e| (e.id.to_string(), e.payload["n"].to_string()))
        .collect();
    assert_eq!(
        order, want,
        "one outbox row per event, in the request's order"
    );
}
