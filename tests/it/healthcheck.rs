//! `ingestd healthcheck`, the binary as a container runs it: silent and 0
//! against a ready API, 1 with a one-line reason otherwise, within its
//! one-second bound whatever the peer does.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::util::{Proxy, TestEnv, amqp_host_port, get, wait_until};

/// Runs `ingestd healthcheck` with `INGEST_HTTP_ADDR` and nothing else in
/// its environment; returns what it did and how long it took.
fn healthcheck(http_addr: &str) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ingestd"))
        .arg("healthcheck")
        .env_clear()
        .env("INGEST_HTTP_ADDR", http_addr)
        .output()
        .expect("run ingestd healthcheck");
    (out, started.elapsed())
}

/// Fails the test unless the check failed with exit code 1 and one line
/// on stderr containing `reason`; returns that line.
fn assert_fails(out: &Output, reason: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.starts_with("ingestd healthcheck: ") && stderr.contains(reason),
        "{stderr:?} should say {reason:?}"
    );
    stderr
}

#[test]
fn healthcheck_exits_0_silently_against_a_ready_server() {
    let env = TestEnv::new("hcready");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    wait_until(Duration::from_secs(10), "/readyz 200", || {
        get(addr, "/readyz").status == 200
    });
    let (out, took) = healthcheck(&addr.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    assert!(out.stderr.is_empty(), "stderr: {:?}", out.stderr);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    app.shutdown().unwrap();
}

#[test]
fn healthcheck_reaches_a_server_listening_on_every_address_over_loopback() {
    let env = TestEnv::new("hcany");
    let app = env.start_with(&[("INGEST_HTTP_ADDR", "0.0.0.0:0")]);
    let port = app.http_addr().unwrap().port();
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until(Duration::from_secs(10), "/readyz 200", || {
        get(loopback, "/readyz").status == 200
    });
    // The variable as the container sets it: every address, which is not
    // one to connect to.
    let (out, _) = healthcheck(&format!("0.0.0.0:{port}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    app.shutdown().unwrap();
}

#[test]
fn healthcheck_fails_fast_when_nothing_listens() {
    // A port that was free a moment ago, and is closed now.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (out, took) = healthcheck(&format!("127.0.0.1:{port}"));
    assert_fails(&out, &format!("cannot connect to 127.0.0.1:{port}"));
    assert!(took < Duration::from_millis(500), "took {took:?}");
    // Neither can a port the server would pick itself.
    let (out, _) = healthcheck("127.0.0.1:0");
    assert_fails(&out, "port 0");
}

#[test]
fn healthcheck_fails_while_readyz_answers_503_and_passes_once_ready() {
    let env = TestEnv::new("hc503");
    // The broker behind a proxy that is down: the relay and the consumer
    // cannot connect, so /readyz answers 503 while PostgreSQL is up.
    let proxy = Proxy::start(&amqp_host_port(), false);
    let amqp = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let app = env.start_with(&[("INGEST_AMQP_URL", &amqp)]);
    let addr = app.http_addr().unwrap();
    assert_eq!(get(addr, "/readyz").status, 503);

    let (out, took) = healthcheck(&addr.to_string());
    let line = assert_fails(&out, "not ready: /readyz answered 503");
    assert!(line.contains("broker_relay"), "{line}");
    assert!(!line.contains("postgres"), "{line}");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    proxy.up();
    wait_until(Duration::from_secs(20), "/readyz 200", || {
        get(addr, "/readyz").status == 200
    });
    let (out, _) = healthcheck(&addr.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.shutdown().unwrap();
}

#[test]
fn healthcheck_gives_up_on_a_silent_peer_within_its_second() {
    let env = TestEnv::new("hcblackhole");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    wait_until(Duration::from_secs(10), "/readyz 200", || {
        get(addr, "/readyz").status == 200
    });
    // Through the proxy first, to show the path works.
    let proxy = Proxy::start(&addr.to_string(), true);
    let (out, _) = healthcheck(&proxy.addr().to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Then the API vanishes: the connection is accepted, the request taken,
    // and nothing ever comes back.
    proxy.blackhole();
    let (out, took) = healthcheck(&proxy.addr().to_string());
    assert_fails(&out, "timed out");
    // It waited out its second, and not much more: the rest is starting
    // a process, with room for a loaded machine.
    assert!(took >= Duration::from_millis(900), "took {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    app.shutdown().unwrap();
}
