//! Batches, `type` and `key`, idempotency keys and client ids, API keys.

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use ingestd::Role;
use ingestd::broker::{self, AmqpUrl};
use ingestd::commit::{self, Committer};
use ingestd::metrics::Metrics;
use ingestd::store::{NewEvent, Store, Submission, Written};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::util::{Resp, TestEnv, amqp_url, get, post_json, request, wait_until};

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
    let channel = conn.open_channel(None).unwrap();
    env.topology().declare(&channel).unwrap();
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
    let app = env.start_with(&[("INGEST_IDEMPOTENCY_TTL", "2s")]);
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

    // Once the key expires it may be used again.
    thread::sleep(Duration::from_millis(2500));
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

/// Batches that share client ids, written at once in different orders,
/// lock their rows in the same order: each is stored or replayed, never
/// refused by a deadlock, and every id is stored once.
#[test]
fn concurrent_batches_sharing_ids_do_not_deadlock() {
    let env = TestEnv::new("idorder");
    let store = Store::open_sized(&env.config(), 8).unwrap();
    let events: Vec<NewEvent> = (0..1000)
        .map(|n| NewEvent {
            id: Uuid::new_v4(),
            payload: json!(n),
            event_type: None,
            key: None,
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
                client_ids: true,
                idempotency_key: None,
            };
            thread::spawn(move || {
                start.wait();
                store
                    .insert_idempotent(&submission, Duration::from_secs(60), false)
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
    assert_eq!(env.count("SELECT count(*) FROM events"), 1000);
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 1000);
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

/// A panic in a commit batch (here, in a request's reply, after the commit)
/// spares its committer: the thread goes on, and the next request is
/// written and answered.
#[test]
fn a_panic_in_a_commit_batch_spares_the_committer() {
    let env = TestEnv::new("commitpanic");
    let settings = commit::Settings {
        threads: 1,
        max_batch: 100,
        key_ttl: Duration::from_secs(60),
        queue: 16,
        notify: false,
        metrics: Arc::new(Metrics::default()),
    };
    let store = Store::open_sized(&env.config(), 2).unwrap();
    let (committer, threads) = Committer::start(store, settings, None);
    let one = |n: i32| Submission {
        events: vec![NewEvent {
            id: Uuid::new_v4(),
            payload: json!(n),
            event_type: None,
            key: None,
        }],
        client_ids: false,
        idempotency_key: None,
    };
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
    drop(committer);
    for t in threads {
        t.join().expect("the committer thread ends cleanly");
    }
}
