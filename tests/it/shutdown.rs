//! Graceful shutdown: every request that got a 202 survives it.

use std::process::Command;
use std::time::Duration;

use uuid::Uuid;

use crate::util::{Load, TestEnv};

pub fn assert_all_stored_then_processed(env: &TestEnv, accepted: &[Uuid]) {
    assert!(!accepted.is_empty(), "the load produced accepted events");
    let ids = accepted.to_vec();
    let stored: i64 = env
        .sql()
        .query_one("SELECT count(*) FROM events WHERE id = ANY($1)", &[&ids])
        .unwrap()
        .get(0);
    assert_eq!(stored, ids.len() as i64, "every 202 was committed");
    // And the reverse: every committed event's 202 reached its client
    // before the process stopped.
    assert_eq!(
        env.count("SELECT count(*) FROM events"),
        ids.len() as i64,
        "every committed event was answered 202"
    );

    // Whatever was left in the outbox or the queue is processed by the next
    // instance, exactly once.
    let app = env.start();
    env.wait_processed(&ids, Duration::from_secs(60));
    let twice = env.processed_twice();
    assert_eq!(twice, 0, "no event processed twice");
    app.shutdown().unwrap();
}

#[test]
fn graceful_shutdown_under_load_loses_nothing() {
    let env = TestEnv::new("shutdown");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let load = Load::start(addr, 8);
    load.wait_for(300, "load under way");
    app.shutdown().expect("shutdown within the timeout");
    let accepted = load.stop();
    assert_all_stored_then_processed(&env, &accepted);
}

#[test]
fn sigterm_stops_the_binary_cleanly_under_load() {
    let env = TestEnv::new("sigterm");
    let mut proc = env.spawn_binary(None);
    let addr = proc.addr.unwrap();
    let child = &mut proc.child;

    let load = Load::start(addr, 8);
    load.wait_for(200, "load under way");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let accepted = load.stop();
    let log = proc.log.take().unwrap().join().unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("shutdown complete")),
        "{}",
        log.join("\n")
    );

    assert_all_stored_then_processed(&env, &accepted);
}
