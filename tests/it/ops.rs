//! Operating it: several processes per role, quorum queues, retention.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::util::{Load, TestEnv, ingest, wait_until};

#[test]
fn two_apis_two_relays_three_workers_lose_nothing_and_process_once() {
    let env = TestEnv::new("scaleout");
    let mut apis: Vec<_> = (0..2).map(|_| env.spawn_binary(Some("api"))).collect();
    let mut others: Vec<_> = (0..2)
        .map(|_| env.spawn_binary(Some("relay")))
        .chain((0..3).map(|_| env.spawn_binary(Some("worker"))))
        .collect();

    let loads: Vec<_> = apis
        .iter()
        .map(|a| Load::start(a.addr.unwrap(), 4))
        .collect();
    for load in &loads {
        load.wait_for(300, "load through both APIs");
    }
    let ids: Vec<Uuid> = loads.into_iter().flat_map(Load::stop).collect();

    env.wait_processed(&ids, Duration::from_secs(60));
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE processed_count <> 1"),
        0,
        "every event processed exactly once"
    );
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 0);
    for p in apis.iter_mut().chain(others.iter_mut()) {
        p.terminate();
    }
}

#[test]
fn quorum_queues_carry_the_pipeline() {
    let env = TestEnv::new("quorum");
    let app = env.start_with(&[("INGEST_QUEUE_TYPE", "quorum")]);
    let addr = app.http_addr().unwrap();
    let ids: Vec<Uuid> = (0..20).map(|i| ingest(addr, &json!(i))).collect();
    let retried = ingest(addr, &json!({ "fail": "transient", "times": 1 }));
    env.wait_processed(&ids, Duration::from_secs(20));
    env.wait_processed(&[retried], Duration::from_secs(20));
    app.shutdown().unwrap();

    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "type"])
        .output()
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&out.stdout);
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&*env.topology().queue))
        .unwrap_or_else(|| panic!("queue not listed:\n{listing}"));
    assert!(line.contains("quorum"), "{line}");
}

#[test]
fn retention_deletes_old_processed_events_only() {
    let env = TestEnv::new("retention");
    let app = env.start_with(&[("INGEST_RETENTION", "1h")]);
    let addr = app.http_addr().unwrap();
    let old: Vec<Uuid> = (0..3).map(|i| ingest(addr, &json!(i))).collect();
    let recent = ingest(addr, &json!("recent"));
    env.wait_processed(&old, Duration::from_secs(10));
    env.wait_processed(&[recent], Duration::from_secs(10));
    let failed = ingest(addr, &json!({ "fail": "permanent" }));
    wait_until(Duration::from_secs(10), "failed", || {
        env.status(failed).as_deref() == Some("failed")
    });
    // Age some events past the retention window.
    let aged = [old.clone(), vec![failed]].concat();
    env.sql()
        .execute(
            "UPDATE events SET processed_at = now() - interval '2 hours', \
             created_at = now() - interval '2 hours' WHERE id = ANY($1)",
            &[&aged],
        )
        .unwrap();
    app.shutdown().unwrap();

    // The retention pass runs at start-up, then every 15 minutes for 1h.
    let app = env.start_with(&[("INGEST_RETENTION", "1h")]);
    wait_until(
        Duration::from_secs(10),
        "old processed events deleted",
        || env.count("SELECT count(*) FROM events") == 2,
    );
    assert_eq!(env.status(recent).as_deref(), Some("processed"));
    assert_eq!(
        env.status(failed).as_deref(),
        Some("failed"),
        "failed events are kept"
    );
    app.shutdown().unwrap();
}
