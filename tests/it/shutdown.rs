//! Graceful shutdown: every request that got a 202 survives it.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use uuid::Uuid;

use crate::util::{TestEnv, load, wait_until};

pub fn assert_all_stored_then_processed(env: &TestEnv, accepted: &[Uuid]) {
    assert!(!accepted.is_empty(), "the load produced accepted events");
    let ids = accepted.to_vec();
    let stored: i64 = env
        .sql()
        .query_one("SELECT count(*) FROM events WHERE id = ANY($1)", &[&ids])
        .unwrap()
        .get(0);
    assert_eq!(stored, ids.len() as i64, "every 202 was committed");

    // Whatever was left in the outbox or the queue is processed by the next
    // instance, exactly once.
    let app = env.start();
    env.wait_processed(&ids, Duration::from_secs(60));
    let twice = env
        .count("SELECT count(*) FROM (SELECT event_id FROM runs GROUP BY 1 HAVING count(*) > 1) d");
    assert_eq!(twice, 0, "no event processed twice");
    app.shutdown().unwrap();
}

#[test]
fn graceful_shutdown_under_load_loses_nothing() {
    let env = TestEnv::new("shutdown");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (clients, accepted) = load(addr, 8, stop.clone());

    wait_until(Duration::from_secs(20), "load under way", || {
        accepted.lock().unwrap().len() >= 300
    });
    app.shutdown().expect("shutdown within the timeout");
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert_all_stored_then_processed(&env, &accepted);
}

#[test]
fn sigterm_stops_the_binary_cleanly_under_load() {
    let env = TestEnv::new("sigterm");
    let mut proc = env.spawn_binary(None);
    let addr = proc.addr.unwrap();
    let child = &mut proc.child;

    let stop = Arc::new(AtomicBool::new(false));
    let (clients, accepted) = load(addr, 8, stop.clone());
    wait_until(Duration::from_secs(20), "load under way", || {
        accepted.lock().unwrap().len() >= 200
    });
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
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

    let accepted = accepted.lock().unwrap().clone();
    assert_all_stored_then_processed(&env, &accepted);
}
