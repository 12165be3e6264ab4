//! Processing failures: retries through delay queues, dead letters, and
//! sending failed events back.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use amiquip::{AmqpValue, FieldTable, QueueDeclareOptions};
use ingestd::broker::{self, AmqpUrl};
use serde_json::json;
use uuid::Uuid;

use crate::ops::{metric, scrape};
use crate::util::{TestEnv, amqp_proxy, amqp_url, db_url, get, ingest, request, wait_until};

fn wait_status(env: &TestEnv, id: Uuid, status: &str) {
    wait_until(Duration::from_secs(20), &format!("event {status}"), || {
        env.status(id).as_deref() == Some(status)
    });
}

#[test]
fn a_transient_failure_is_retried_after_the_scheduled_delays() {
    let env = TestEnv::new("transient");
    let app = env.start();
    let addr = app.http_addr().unwrap();

    let id = ingest(addr, &json!({ "fail": "transient", "times": 2 }));
    env.wait_processed(&[id], Duration::from_secs(20));

    let event = get(addr, &format!("/v1/events/{id}")).json();
    assert_eq!(event["attempts"], 3);
    assert!(event["last_error"].is_null());
    assert_eq!(env.runs(id), 1);
    // The schedule is 300ms then 600ms; each retry waits at least its delay
    // and not absurdly longer.
    let calls = env.processor.calls(id);
    assert_eq!(calls.len(), 3);
    for (gap, delay) in calls.windows(2).zip([300u64, 600]) {
        let waited = gap[1] - gap[0];
        assert!(
            waited >= Duration::from_millis(delay),
            "waited {waited:?} < {delay}ms"
        );
        assert!(
            waited < Duration::from_millis(delay + 3000),
            "waited {waited:?} for {delay}ms"
        );
    }
    app.shutdown().unwrap();
}

#[test]
fn retries_do_not_block_other_events() {
    let env = TestEnv::new("noblock");
    let app = env.start_with(&[
        ("INGEST_WORKERS", "1"),
        ("INGEST_RETRY_DELAYS", "300ms,600ms"),
    ]);
    let addr = app.http_addr().unwrap();
    let slow = ingest(addr, &json!({ "fail": "transient", "times": 2 }));
    let fine: Vec<Uuid> = (0..20).map(|i| ingest(addr, &json!(i))).collect();
    // The healthy events finish while the failing one waits in delay queues.
    env.wait_processed(&fine, Duration::from_secs(10));
    assert_eq!(env.status(slow).as_deref(), Some("pending"));
    env.wait_processed(&[slow], Duration::from_secs(20));
    app.shutdown().unwrap();
}

#[test]
fn exhausted_retries_fail_the_event_and_dead_letter_it() {
    let env = TestEnv::new("exhaust");
    let app = env.start();
    let addr = app.http_addr().unwrap();

    let id = ingest(addr, &json!({ "fail": "transient", "times": 99 }));
    wait_status(&env, id, "failed");
    let event = get(addr, &format!("/v1/events/{id}")).json();
    assert_eq!(event["attempts"], 3, "first attempt and two retries");
    assert_eq!(event["last_error"], "transient: attempt 3");
    wait_until(Duration::from_secs(10), "dead letter", || {
        env.queue_depth(&env.topology().dead_queue) == 1
    });
    assert_eq!(env.runs(id), 0);
    app.shutdown().unwrap();
}

#[test]
fn a_permanent_failure_fails_at_once_and_dead_letters() {
    let env = TestEnv::new("permanent");
    let app = env.start();
    let addr = app.http_addr().unwrap();

    let id = ingest(addr, &json!({ "fail": "permanent" }));
    wait_status(&env, id, "failed");
    let event = get(addr, &format!("/v1/events/{id}")).json();
    assert_eq!(event["attempts"], 1);
    assert_eq!(event["last_error"], "permanent: told to fail");
    wait_until(Duration::from_secs(10), "dead letter", || {
        env.queue_depth(&env.topology().dead_queue) == 1
    });
    assert_eq!(env.processor.calls(id).len(), 1, "never retried");
    app.shutdown().unwrap();
}

/// An error text PostgreSQL cannot store as it is (U+0000) is made
/// storable, so the event still reaches `failed` instead of staying
/// `pending` while its delivery is dead-lettered.
#[test]
fn a_failure_whose_text_holds_a_nul_is_still_recorded() {
    let env = TestEnv::new("nulerror");
    let app = env.start();
    let addr = app.http_addr().unwrap();

    let id = ingest(addr, &json!({ "fail": "nul" }));
    wait_status(&env, id, "failed");
    let event = get(addr, &format!("/v1/events/{id}")).json();
    assert_eq!(event["last_error"], "permanent: bad\u{fffd}byte");
    assert_eq!(env.processor.calls(id).len(), 1, "never retried");
    app.shutdown().unwrap();
}

#[test]
fn failed_events_can_be_retried_by_api_and_replayed_by_cli() {
    let env = TestEnv::new("retryapi");
    let app = env.start();
    let addr = app.http_addr().unwrap();

    let by_api = ingest(addr, &json!({ "fail": "permanent" }));
    let by_cli = ingest(addr, &json!({ "fail": "permanent" }));
    wait_status(&env, by_api, "failed");
    wait_status(&env, by_cli, "failed");
    env.processor.heal();

    let retry =
        |id: Uuid| request(addr, "POST", &format!("/v1/events/{id}/retry"), &[], b"").unwrap();
    let resp = retry(by_api);
    assert_eq!(resp.status, 202);
    assert_eq!(resp.json()["status"], "pending");
    env.wait_processed(&[by_api], Duration::from_secs(10));
    assert_eq!(env.runs(by_api), 1);

    let again = retry(by_api);
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["error"], "conflict");
    assert_eq!(retry(Uuid::new_v4()).status, 404);

    let out = Command::new(env!("CARGO_BIN_EXE_ingestd"))
        .args(["replay", "--failed", "--since", "1h"])
        .env_clear()
        .env("INGEST_DATABASE_URL", db_url())
        .env("INGEST_AMQP_URL", amqp_url())
        .env("INGEST_DB_SCHEMA", &env.name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "requeued 1 failed events"
    );
    env.wait_processed(&[by_cli], Duration::from_secs(10));
    assert_eq!(env.runs(by_cli), 1);
    app.shutdown().unwrap();
}

#[test]
fn a_panicking_processor_fails_its_event_and_spares_the_worker() {
    let env = TestEnv::new("panic");
    let app = env.start_with(&[("INGEST_WORKERS", "1")]);
    let addr = app.http_addr().unwrap();
    let bad = ingest(addr, &json!({ "fail": "panic" }));
    wait_status(&env, bad, "failed");
    let event = get(addr, &format!("/v1/events/{bad}")).json();
    assert_eq!(event["attempts"], 3);
    assert_eq!(event["last_error"], "transient: the processor panicked");
    // The one worker thread survived and still processes.
    let ok: Vec<Uuid> = (0..5).map(|i| ingest(addr, &json!(i))).collect();
    env.wait_processed(&ok, Duration::from_secs(10));
    app.shutdown().expect("no worker is missing at shutdown");
}

#[test]
fn a_database_error_after_processing_is_a_failed_attempt_not_a_loop() {
    let env = TestEnv::new("aborted");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let bad = ingest(addr, &json!({ "fail": "abort" }));
    wait_status(&env, bad, "failed");
    let event = get(addr, &format!("/v1/events/{bad}")).json();
    assert_eq!(event["attempts"], 3, "{event}");
    let error = event["last_error"].as_str().unwrap();
    assert!(error.starts_with("transient: database error"), "{error}");
    assert_eq!(env.runs(bad), 0);
    app.shutdown().unwrap();
}

#[test]
fn many_retries_at_once_are_all_scheduled_and_processed() {
    let env = TestEnv::new("manyretries");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let ids: Vec<Uuid> = (0..30)
        .map(|_| ingest(addr, &json!({ "fail": "transient", "times": 1 })))
        .collect();
    env.wait_processed(&ids, Duration::from_secs(20));
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE attempts = 2 AND processed_count = 1"),
        30
    );
    assert_eq!(env.processed_twice(), 0);
    app.shutdown().unwrap();
}

/// What every retry copy that was not confirmed must leave behind once the
/// original came back: the failed attempt recorded once; the original not
/// run again early but its delayed copy scheduled again, and confirmed
/// once (one retry counted); the next attempt run once, from that copy, and
/// processed.
fn assert_retried_once_through_the_original(env: &TestEnv, addr: SocketAddr, id: Uuid) {
    env.wait_processed(&[id], Duration::from_secs(30));
    let event = get(addr, &format!("/v1/events/{id}")).json();
    assert_eq!(event["attempts"], 2, "{event}");
    assert!(event["last_error"].is_null(), "{event}");
    assert_eq!(env.processor.calls(id).len(), 2, "two attempts ran");
    assert_eq!(env.runs(id), 1);
    let text = scrape(addr);
    assert_eq!(metric(&text, "ingestd_retries_total"), Some(1.0));
    assert_eq!(metric(&text, "ingestd_events_processed_total"), Some(1.0));
    assert_eq!(env.queue_depth(&env.topology().dead_queue), 0);
}

fn attempts(env: &TestEnv, id: Uuid) -> i32 {
    env.sql()
        .query_one("SELECT attempts FROM events WHERE id = $1", &[&id])
        .unwrap()
        .get(0)
}

/// The broker nacks a retry copy (its delay queue refuses every message):
/// the consumer acks nothing, gives its connection up, and the original
/// comes back for the next attempt.
#[test]
fn a_nacked_retry_copy_leaves_the_original_to_come_back() {
    let env = TestEnv::new("retrynack");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    wait_until(Duration::from_secs(10), "ready", || {
        get(addr, "/readyz").status == 200
    });
    // The consumer declared its topology when it connected; the first
    // delay queue is now swapped for one that nacks every publish. Its
    // arguments differ from the topology's, so the consumer cannot
    // reconnect while it is there.
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    let mut conn = broker::connect(&url, Duration::from_secs(5)).unwrap();
    let channel = conn.open_channel(None).unwrap();
    let delay = env.topology().delay_queue(0);
    channel.queue_delete(&delay, Default::default()).unwrap();
    let mut arguments = FieldTable::new();
    arguments.insert("x-max-length".into(), AmqpValue::LongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AmqpValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            &delay,
            QueueDeclareOptions {
                durable: true,
                arguments,
                ..QueueDeclareOptions::default()
            },
        )
        .unwrap();

    let id = ingest(addr, &json!({ "fail": "transient", "times": 1 }));
    wait_until(Duration::from_secs(10), "the consumer gave up", || {
        get(addr, "/readyz").json()["checks"]["broker_consumer"] == "down"
    });
    assert_eq!(env.processor.calls(id).len(), 1);
    assert_eq!(attempts(&env, id), 1, "the failure is recorded once");
    assert_eq!(env.status(id).as_deref(), Some("pending"));

    channel.queue_delete(&delay, Default::default()).unwrap();
    let _ = conn.close();
    assert_retried_once_through_the_original(&env, addr, id);
    app.shutdown().unwrap();
}

/// A retry copy whose confirm never comes (the broker vanished right after
/// the failure) is not confirmed either: the original is left unacked and
/// comes back once the broker does.
#[test]
fn a_retry_copy_whose_confirm_times_out_leaves_the_original_to_come_back() {
    let env = TestEnv::new("retrytimeout");
    // Heartbeats slower than the confirm timeout, so the copy's confirm
    // times out before the connection is found dead.
    let (proxy, url) = amqp_proxy("heartbeat=2");
    let app = env.start_with(&[("INGEST_AMQP_URL", &url), ("INGEST_CONFIRM_TIMEOUT", "1s")]);
    let addr = app.http_addr().unwrap();

    let id = ingest(
        addr,
        &json!({ "fail": "transient", "times": 1, "hold": true }),
    );
    wait_until(
        Duration::from_secs(10),
        "the first attempt under way",
        || env.processor.calls(id).len() == 1,
    );
    proxy.blackhole();
    env.processor.release();
    wait_until(Duration::from_secs(10), "the failure recorded", || {
        attempts(&env, id) == 1
    });
    wait_until(Duration::from_secs(20), "the consumer gave up", || {
        get(addr, "/readyz").json()["checks"]["broker_consumer"] == "down"
    });
    assert_eq!(env.status(id).as_deref(), Some("pending"));
    assert_eq!(env.processor.calls(id).len(), 1);

    proxy.up();
    assert_retried_once_through_the_original(&env, addr, id);
    app.shutdown().unwrap();
}

/// A worker that cannot even record the failed attempt (the event's row is
/// locked by a session that holds it past the statement timeout, as one
/// whose client vanished mid-transaction does) sends the message through a
/// delay queue and tries the same attempt again: the event stays `pending`
/// in the database, and dead-lettered it would wait for the sweeper. Once
/// the lock goes, the event is processed once.
#[test]
fn an_event_locked_past_the_statement_timeout_is_tried_again_later_not_dead_lettered() {
    let env = TestEnv::new("lockheld");
    let config = env.config_with(&[
        ("INGEST_DB_STATEMENT_TIMEOUT", "300ms"),
        ("INGEST_WORKERS", "1"),
    ]);
    let store = ingestd::store::Store::open(&ingestd::store::Settings::of(&config).sized(1))
        .expect("store");
    // Written before any relay runs, and locked before one can publish it.
    let id = crate::util::insert_event(&store, &json!({ "locked": true }), false);
    let mut holder = env.sql();
    let mut lock = holder.transaction().unwrap();
    lock.execute("SELECT 1 FROM events WHERE id = $1 FOR UPDATE", &[&id])
        .unwrap();

    let app = env.start_role(&config, ingestd::Role::All);
    let addr = app.http_addr().unwrap();
    // A second delivery, through a delay queue, means the first was sent
    // to be tried again, not dead-lettered.
    wait_until(Duration::from_secs(20), "a delivery after a delay", || {
        let text = scrape(addr);
        metric(&text, "ingestd_deliveries_total").unwrap_or(0.0) >= 2.0
            && metric(&text, "ingestd_retries_total").unwrap_or(0.0) >= 1.0
    });
    assert_eq!(env.status(id).as_deref(), Some("pending"));
    assert_eq!(env.queue_depth(&env.topology().dead_queue), 0);

    lock.rollback().unwrap();
    env.wait_processed(&[id], Duration::from_secs(20));
    assert_eq!(env.runs(id), 1);
    let text = scrape(addr);
    assert_eq!(metric(&text, "ingestd_dead_lettered_total"), Some(0.0));
    assert_eq!(env.queue_depth(&env.topology().dead_queue), 0);
    app.shutdown().unwrap();
}
