//! Graceful shutdown: every request that got a 202 survives it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use uuid::Uuid;

use crate::util::{TestEnv, amqp_url, db_url, load, wait_until};

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_ingestd"))
        .env_clear()
        .env("INGEST_HTTP_ADDR", "127.0.0.1:0")
        .env("INGEST_DATABASE_URL", db_url())
        .env("INGEST_AMQP_URL", amqp_url())
        .env("INGEST_DB_SCHEMA", &env.name)
        .env("INGEST_AMQP_PREFIX", &env.name)
        .env("INGEST_DB_POOL_SIZE", "6")
        .env("INGEST_SHUTDOWN_TIMEOUT", "20s")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ingestd");

    // The binary logs the port it bound; port 0 keeps tests apart.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("ingestd exited before listening")
            .unwrap();
        if let Some(a) = line.split("http: listening on ").nth(1) {
            break a.trim().parse().unwrap();
        }
    };
    let log = thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

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
    let log = log.join().unwrap();
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
