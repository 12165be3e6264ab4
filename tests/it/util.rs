//! Helpers shared by every integration test: an isolated environment per
//! test (its own schema and AMQP prefix), a tiny HTTP client, a fault-injecting
//! TCP proxy, and waiting for a condition with a deadline.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ingestd::broker::{self, AmqpUrl, Topology};
use ingestd::{App, Config, Event, ProcessError, Processor, Role};
use postgres::{Client, NoTls, Transaction};
use serde_json::{Value, json};
use uuid::Uuid;

/// PostgreSQL the tests use; override with `INGEST_TEST_DATABASE_URL`.
pub fn db_url() -> String {
    std::env::var("INGEST_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// RabbitMQ the tests use; override with `INGEST_TEST_AMQP_URL`.
pub fn amqp_url() -> String {
    std::env::var("INGEST_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// One test's private corner of the shared services. Dropping it removes
/// the schema, the exchanges and the queues it created.
pub struct TestEnv {
    /// Schema name and AMQP prefix.
    pub name: String,
    /// The processor every app of this environment runs.
    pub processor: Arc<Scripted>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TestEnv {
    /// A fresh environment; fails the test, naming the URL, when PostgreSQL
    /// or RabbitMQ cannot be reached.
    pub fn new(tag: &str) -> TestEnv {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("it_{tag}_{}_{n}", std::process::id());
        let url = db_url();
        if let Err(e) = Client::connect(&url, NoTls) {
            panic!("cannot reach PostgreSQL at {url}: {e}");
        }
        let amqp = AmqpUrl::parse(&amqp_url()).expect("valid INGEST_TEST_AMQP_URL");
        if let Err(e) = broker::connect(&amqp, Duration::from_secs(5)) {
            panic!("cannot reach RabbitMQ at {}: {e}", amqp_url());
        }
        let env = TestEnv {
            name,
            processor: Arc::new(Scripted::default()),
        };
        // Tables exist before any app starts, so tests can add their own.
        ingestd::app::migrate(&env.config()).expect("migrate");
        env.sql()
            .batch_execute("CREATE TABLE runs (event_id uuid NOT NULL)")
            .expect("create runs table");
        env
    }

    /// A configuration for this environment: port 0, small pools.
    pub fn config(&self) -> Config {
        self.config_with(&[])
    }

    /// Like [`TestEnv::config`] with some variables overridden.
    pub fn config_with(&self, extra: &[(&str, &str)]) -> Config {
        let mut vars: HashMap<String, String> = [
            ("INGEST_HTTP_ADDR", "127.0.0.1:0".to_string()),
            ("INGEST_DATABASE_URL", db_url()),
            ("INGEST_AMQP_URL", amqp_url()),
            ("INGEST_DB_SCHEMA", self.name.clone()),
            ("INGEST_AMQP_PREFIX", self.name.clone()),
            ("INGEST_DB_POOL_SIZE", "6".into()),
            ("INGEST_WORKERS", "2".into()),
            ("INGEST_HTTP_THREADS", "4".into()),
            ("INGEST_RELAY_POLL", "200ms".into()),
            ("INGEST_SHUTDOWN_TIMEOUT", "20s".into()),
            ("INGEST_RETRY_DELAYS", "300ms,600ms".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        Config::from_vars(vars).expect("test config")
    }

    /// Starts every role with the [`Scripted`] processor.
    pub fn start(&self) -> App {
        self.start_role(&self.config(), Role::All)
    }

    /// Starts every role with the [`Scripted`] processor and some variables
    /// overridden.
    pub fn start_with(&self, extra: &[(&str, &str)]) -> App {
        self.start_role(&self.config_with(extra), Role::All)
    }

    /// Starts `role` with `config` and the [`Scripted`] processor.
    pub fn start_role(&self, config: &Config, role: Role) -> App {
        ingestd::start(config, role, self.processor.clone()).expect("start ingestd")
    }

    /// Runs the `ingestd` binary in this environment (`role` as its first
    /// argument, none for all roles) and, when it serves HTTP, waits for
    /// the port it bound, which it logs.
    pub fn spawn_binary(&self, role: Option<&str>) -> Binary {
        self.spawn_binary_with(role, &[])
    }

    /// Like [`TestEnv::spawn_binary`] with more environment variables.
    pub fn spawn_binary_with(&self, role: Option<&str>, vars: &[(&str, &str)]) -> Binary {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ingestd"));
        command
            .args(role)
            .env_clear()
            .env("INGEST_HTTP_ADDR", "127.0.0.1:0")
            .env("INGEST_DATABASE_URL", db_url())
            .env("INGEST_AMQP_URL", amqp_url())
            .env("INGEST_DB_SCHEMA", &self.name)
            .env("INGEST_AMQP_PREFIX", &self.name)
            .env("INGEST_RETRY_DELAYS", "300ms,600ms")
            .env("INGEST_DB_POOL_SIZE", "5")
            .env("INGEST_HTTP_THREADS", "8")
            .env("INGEST_SHUTDOWN_TIMEOUT", "20s")
            .envs(vars.iter().copied())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn ingestd");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let serves_http = matches!(role, None | Some("api"));
        let mut addr = None;
        while serves_http && addr.is_none() {
            let line = lines
                .next()
                .expect("ingestd exited before listening")
                .unwrap();
            if let Some(a) = line.split("http: listening on ").nth(1) {
                addr = Some(a.trim().parse().unwrap());
            }
        }
        let log = thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
        Binary {
            child,
            addr,
            log: Some(log),
        }
    }

    /// A connection whose search_path is this environment's schema.
    pub fn sql(&self) -> Client {
        let mut c = Client::connect(&db_url(), NoTls).expect("connect");
        c.batch_execute(&format!("SET search_path TO {}", self.name))
            .expect("search_path");
        c
    }

    /// How many transactions last wrote the rows of these events (their
    /// `xmin`s).
    pub fn transactions_of(&self, ids: &[Uuid]) -> i64 {
        let list: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
        self.count(&format!(
            "SELECT count(DISTINCT xmin::text) FROM events WHERE id IN ({})",
            list.join(",")
        ))
    }

    /// Runs a `SELECT count(*)`-like query returning one bigint.
    pub fn count(&self, sql: &str) -> i64 {
        self.sql().query_one(sql, &[]).expect(sql).get(0)
    }

    /// Committed processor runs of one event.
    pub fn runs(&self, id: Uuid) -> i64 {
        self.sql()
            .query_one("SELECT count(*) FROM runs WHERE event_id = $1", &[&id])
            .expect("count runs")
            .get(0)
    }

    /// Events whose processor run committed more than once.
    pub fn processed_twice(&self) -> i64 {
        self.count(
            "SELECT count(*) FROM (SELECT event_id FROM runs GROUP BY 1 HAVING count(*) > 1) d",
        )
    }

    /// The status of one event.
    pub fn status(&self, id: Uuid) -> Option<String> {
        self.sql()
            .query_opt("SELECT status FROM events WHERE id = $1", &[&id])
            .expect("status")
            .map(|r| r.get(0))
    }

    /// Waits until every id is processed.
    pub fn wait_processed(&self, ids: &[Uuid], timeout: Duration) {
        let ids = ids.to_vec();
        wait_until(timeout, "all events processed", || {
            let done: i64 = self
                .sql()
                .query_one(
                    "SELECT count(*) FROM events WHERE id = ANY($1) AND status = 'processed'",
                    &[&ids],
                )
                .expect("count processed")
                .get(0);
            done == ids.len() as i64
        });
    }

    /// The topology names of this environment.
    pub fn topology(&self) -> Topology {
        Topology::new(&self.name, &self.config().retry_delays)
    }

    /// Messages ready in a queue (not counting unacknowledged ones).
    pub fn queue_depth(&self, queue: &str) -> u32 {
        queued_messages(queue).expect("queue exists")
    }

    /// Publishes a raw body to this environment's events exchange.
    pub fn publish_raw(&self, body: &[u8]) {
        let url = AmqpUrl::parse(&amqp_url()).unwrap();
        let mut publisher =
            broker::Publisher::open(&url, &self.topology(), Duration::from_secs(5)).expect("open");
        let message = broker::Message::json("raw", body.to_vec());
        publisher
            .publish_batch(&[message], Duration::from_secs(5))
            .expect("publish");
        publisher.close();
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Ok(mut c) = Client::connect(&db_url(), NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
        let url = AmqpUrl::parse(&amqp_url()).unwrap();
        if let Ok(mut conn) = broker::connect(&url, Duration::from_secs(5)) {
            let t = self.topology();
            if let Ok(ch) = conn.open_channel(None) {
                for q in t.queues() {
                    let _ = ch.queue_delete(q, Default::default());
                }
                let _ = ch.exchange_delete(&*t.exchange, false);
                let _ = ch.exchange_delete(&*t.dead_exchange, false);
            }
            let _ = conn.close();
        }
    }
}

/// A database of its own, for a test that reads figures PostgreSQL keeps
/// per database (`pg_stat_database`), which every other test running
/// beside it in the shared database would move. Dropped with the guard.
pub struct PrivateDatabase {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

impl PrivateDatabase {
    /// Creates database `name` on the tests' server.
    pub fn create(name: &str) -> PrivateDatabase {
        let mut admin = Client::connect(&db_url(), NoTls).expect("connect");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        let pg: postgres::Config = db_url().parse().unwrap();
        let host = match pg.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let url = format!(
            "postgres://{}@{host}:{port}/{name}",
            pg.get_user().unwrap_or("postgres")
        );
        PrivateDatabase {
            name: name.to_string(),
            url,
        }
    }

    /// Deadlocks PostgreSQL detected in this database. A backend reports
    /// its statistics lazily, at the latest as it exits, and before it
    /// leaves `pg_stat_activity`: so this first waits until no session is
    /// connected to the database, and the caller must have closed its own.
    pub fn deadlocks(&self) -> i64 {
        let mut admin = Client::connect(&db_url(), NoTls).expect("connect");
        wait_until(Duration::from_secs(20), "the sessions gone", || {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                    &[&self.name],
                )
                .unwrap()
                .get(0);
            n == 0
        });
        admin
            .query_one(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = $1",
                &[&self.name],
            )
            .unwrap()
            .get(0)
    }
}

impl Drop for PrivateDatabase {
    fn drop(&mut self) {
        if let Ok(mut c) = Client::connect(&db_url(), NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// A running `ingestd` binary; killed when dropped.
pub struct Binary {
    /// The process.
    pub child: Child,
    /// Where it serves HTTP, for the roles that do.
    pub addr: Option<SocketAddr>,
    /// Its log lines, once it has exited.
    pub log: Option<thread::JoinHandle<Vec<String>>>,
}

impl Binary {
    /// Sends SIGTERM and waits for the exit; fails the test, with the
    /// process's log, unless it exits with status 0.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("wait for ingestd");
        if !status.success() {
            let log = self
                .log
                .take()
                .map(|l| l.join().unwrap())
                .unwrap_or_default();
            panic!("ingestd exited with {status}:\n{}", log.join("\n"));
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `traceparent` and `tracestate` one attempt was handed.
pub type Trace = (Option<String>, Option<String>);

/// The tests' processor. It records each committed run in the `runs` table,
/// inside the worker's transaction, so a second committed run is visible,
/// and it fails on request, as the payload says:
/// `{"fail": "transient", "times": n}` fails the first n attempts;
/// `{"fail": "permanent"}` fails every attempt until [`Scripted::heal`].
/// `{"hold": true}` makes an attempt wait, inside the worker's transaction
/// and so holding the event's row lock, until [`Scripted::release`] (a
/// minute at most), then go on as the rest of the payload says.
#[derive(Default)]
pub struct Scripted {
    calls: Mutex<HashMap<Uuid, Vec<Instant>>>,
    payloads: Mutex<HashMap<Uuid, Value>>,
    traces: Mutex<HashMap<Uuid, Vec<Trace>>>,
    attributes: Mutex<HashMap<Uuid, Option<Value>>>,
    healed: AtomicBool,
    released: AtomicBool,
}

impl Scripted {
    /// When each attempt on `id` started.
    pub fn calls(&self, id: Uuid) -> Vec<Instant> {
        self.calls
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    /// The payload the last attempt on `id` was handed, as the processor
    /// saw it.
    pub fn payload(&self, id: Uuid) -> Option<Value> {
        self.payloads.lock().unwrap().get(&id).cloned()
    }

    /// The `traceparent` and `tracestate` each attempt on `id` was handed.
    pub fn traces(&self, id: Uuid) -> Vec<Trace> {
        self.traces
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    /// The CloudEvents attributes the last attempt on `id` was handed
    /// (`Some(None)` for a plain event), `None` before any attempt.
    pub fn attributes(&self, id: Uuid) -> Option<Option<Value>> {
        self.attributes.lock().unwrap().get(&id).cloned()
    }

    /// From now on permanent failures stop failing.
    pub fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
    }

    /// Lets held attempts go on, and later ones pass without holding.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }
}

impl Processor for Scripted {
    fn process(&self, tx: &mut Transaction<'_>, event: &Event) -> Result<(), ProcessError> {
        self.calls
            .lock()
            .unwrap()
            .entry(event.id)
            .or_default()
            .push(Instant::now());
        self.payloads
            .lock()
            .unwrap()
            .insert(event.id, event.payload.clone());
        self.traces
            .lock()
            .unwrap()
            .entry(event.id)
            .or_default()
            .push((event.traceparent.clone(), event.tracestate.clone()));
        self.attributes
            .lock()
            .unwrap()
            .insert(event.id, event.attributes.clone());
        if event.payload.get("hold") == Some(&Value::Bool(true)) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !self.released.load(Ordering::SeqCst) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
        }
        match event.payload.get("fail").and_then(Value::as_str) {
            Some("transient") => {
                let times = event.payload["times"].as_i64().unwrap_or(1);
                if i64::from(event.attempt) <= times {
                    return Err(ProcessError::Transient(format!(
                        "attempt {}",
                        event.attempt
                    )));
                }
            }
            Some("permanent") if !self.healed.load(Ordering::SeqCst) => {
                return Err(ProcessError::Permanent("told to fail".into()));
            }
            Some("panic") => panic!("told to panic"),
            // An error text PostgreSQL's `text` cannot hold as it is.
            Some("nul") => return Err(ProcessError::Permanent("bad\0byte".into())),
            // Leaves the transaction aborted yet reports success.
            Some("abort") => {
                let _ = tx.batch_execute("SELECT 1/0");
                return Ok(());
            }
            _ => {}
        }
        tx.execute("INSERT INTO runs (event_id) VALUES ($1)", &[&event.id])
            .map_err(|e| ProcessError::Transient(e.to_string()))?;
        Ok(())
    }
}

/// Client threads posting events until stopped, collecting the ids that
/// were answered 202. Refusals and connection errors are expected while a
/// server stops or a dependency is away; they are not counted as accepted.
/// A thread ends when its connection is refused: the server has gone.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<thread::JoinHandle<()>>,
    accepted: Arc<Mutex<Vec<Uuid>>>,
}

impl Load {
    /// Starts `clients` threads posting to `addr`.
    pub fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let clients = (0..clients)
            .map(|c| {
                let (stop, accepted) = (stop.clone(), accepted.clone());
                thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let body = json!({ "payload": { "client": c, "n": n } }).to_string();
                        let headers = [("Content-Type", "application/json")];
                        match request(addr, "POST", "/v1/events", &headers, body.as_bytes()) {
                            Ok(r) if r.status == 202 => {
                                let id = r.json()["id"].as_str().unwrap().parse().unwrap();
                                accepted.lock().unwrap().push(id);
                            }
                            Ok(_) => {}
                            // The server is gone for good (no test starts
                            // another on its address). Going on would post
                            // to whichever test's server gets the port next.
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                            Err(_) => thread::sleep(Duration::from_millis(5)),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            clients,
            accepted,
        }
    }

    /// Events accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }

    /// Waits until `more` events beyond those accepted now are accepted.
    pub fn wait_for(&self, more: usize, what: &str) {
        let target = self.accepted() + more;
        wait_until(Duration::from_secs(30), what, || self.accepted() >= target);
    }

    /// Stops the clients and returns every accepted id.
    pub fn stop(self) -> Vec<Uuid> {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.clients {
            c.join().unwrap();
        }
        self.accepted.lock().unwrap().clone()
    }
}

/// Polls `f` until it is true; fails the test naming `what` at the deadline.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP response as the tests see it.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Header names in lowercase.
    pub headers: Vec<(String, String)>,
    /// Raw body.
    pub body: Vec<u8>,
}

impl Resp {
    /// The body as JSON; fails the test if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request on a fresh connection and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// Sends raw bytes on a fresh connection (then, with `half_close`, ends
/// the sending side) and reads the response until the server closes or
/// `wait` passes.
pub fn raw_request(
    addr: SocketAddr,
    bytes: &[u8],
    half_close: bool,
    wait: Duration,
) -> std::io::Result<Resp> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(wait))?;
    // The server may answer and close before reading everything.
    let _ = stream.write_all(bytes);
    if half_close {
        stream.shutdown(Shutdown::Write)?;
    }
    let raw = read_to_close(&mut stream);
    if raw.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no answer before the connection closed or the wait ran out",
        ));
    }
    parse_response(&raw)
}

/// Everything `stream` sends until it closes, resets (what arrived before a
/// reset still counts) or its read timeout passes.
pub fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return raw,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
}

/// Fails the test unless `/healthz` answers 200 within a second.
pub fn assert_healthz_instant(addr: SocketAddr) {
    let started = Instant::now();
    assert_eq!(get(addr, "/healthz").status, 200);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
}

pub fn parse_response(raw: &[u8]) -> std::io::Result<Resp> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("malformed chunked body"))?
    } else {
        body.to_vec()
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// Decodes a chunked body (large responses are sent chunked).
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// `POST` a JSON body to `path`.
pub fn post_json(addr: SocketAddr, path: &str, body: &str) -> Resp {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .expect("POST")
}

/// `GET` a path.
pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"").expect("GET")
}

/// Ingests one event through `/v1/events` and returns its id.
pub fn ingest(addr: SocketAddr, payload: &Value) -> Uuid {
    let resp = post_json(
        addr,
        "/v1/events",
        &serde_json::json!({ "payload": payload }).to_string(),
    );
    assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    Uuid::parse_str(resp.json()["id"].as_str().unwrap()).unwrap()
}

/// The broker's `host:port`, for a proxy in front of it.
pub fn amqp_host_port() -> String {
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    url.nodes[0].to_string()
}

/// A proxy in front of the broker, up, and the URL that goes through it,
/// with `query` (such as `heartbeat=1`) added.
pub fn amqp_proxy(query: &str) -> (Proxy, String) {
    let proxy = Proxy::start(&amqp_host_port(), true);
    let url = format!("amqp://guest:guest@{}/%2f?{query}", proxy.addr());
    (proxy, url)
}

/// A URL of the tests' broker whose authority lists `nodes` (`host:port`
/// each), in order, with `query` added.
pub fn amqp_nodes_url(nodes: &[String], query: &str) -> String {
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    format!(
        "amqp://{}:{}@{}/{}?{query}",
        url.user,
        url.password,
        nodes.join(","),
        url.vhost.replace('/', "%2f")
    )
}

/// The tests' PostgreSQL as `host:port`, for a proxy in front of it.
pub fn db_host_port() -> String {
    let pg: postgres::Config = db_url().parse().unwrap();
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("127.0.0.1:{port}")
}

/// A URL of the tests' database that lists `hosts` (`host:port` each), in
/// order, with `query` added.
pub fn db_hosts_url(hosts: &[String], query: &str) -> String {
    let pg: postgres::Config = db_url().parse().unwrap();
    format!(
        "postgres://{}@{}/{}?{query}",
        pg.get_user().unwrap_or("postgres"),
        hosts.join(","),
        pg.get_dbname().unwrap_or("test")
    )
}

/// A proxy in front of PostgreSQL, up, and the URL that goes through it.
pub fn db_proxy() -> (Proxy, String) {
    let pg: postgres::Config = db_url().parse().unwrap();
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let proxy = Proxy::start(&format!("127.0.0.1:{port}"), true);
    let url = format!(
        "postgres://{}@{}/{}",
        pg.get_user().unwrap_or("postgres"),
        proxy.addr(),
        pg.get_dbname().unwrap_or("test")
    );
    (proxy, url)
}

/// A TCP proxy in front of one service. Taking it down closes every
/// connection through it and refuses new ones, which cuts exactly the test
/// instance that uses it off the service while others carry on. A
/// blackhole is nastier, as a host that vanished: every connection stays
/// open and its bytes are taken and never delivered, and new connections
/// are accepted and held the same way.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
}

struct ProxyState {
    up: AtomicBool,
    closed: AtomicBool,
    /// Connections forwarded to the target so far.
    forwarded: AtomicUsize,
    /// Connections forward only while their generation is the current one
    /// and no blackhole is on: a connection caught in a blackhole stays
    /// dead after it ends, as its peer's would.
    generation: AtomicUsize,
    blackholed: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

impl ProxyState {
    fn forwards(&self, generation: usize) -> bool {
        !self.blackholed.load(Ordering::SeqCst)
            && self.generation.load(Ordering::SeqCst) == generation
    }

    /// Keeps `stream` open and takes whatever it sends, for ever.
    fn hold(self: &Arc<Self>, stream: TcpStream) {
        self.conns.lock().unwrap().push(stream.try_clone().unwrap());
        let mut stream = stream;
        thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        });
    }
}

impl Proxy {
    /// Starts a proxy to `target` (`host:port`), up or down.
    pub fn start(target: &str, up: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let target: SocketAddr = target.parse().expect("proxy target");
        let state = Arc::new(ProxyState {
            up: AtomicBool::new(up),
            closed: AtomicBool::new(false),
            forwarded: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            blackholed: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if st.closed.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if st.blackholed.load(Ordering::SeqCst) {
                    st.hold(client);
                    continue;
                }
                if !st.up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                st.forwarded.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut conns = st.conns.lock().unwrap();
                    conns.push(client.try_clone().unwrap());
                    conns.push(server.try_clone().unwrap());
                }
                let generation = st.generation.load(Ordering::SeqCst);
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    &st,
                    generation,
                );
                pipe(server, client, &st, generation);
            }
        });
        Proxy { addr, state }
    }

    /// The proxy's own address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections it has forwarded to its target so far.
    pub fn forwarded(&self) -> usize {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// Cuts every connection and refuses new ones.
    pub fn down(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        self.state.blackholed.store(false, Ordering::SeqCst);
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Stops delivering anything, closing nothing: bytes sent on open
    /// connections are taken and held, and new connections are accepted
    /// and held the same way.
    pub fn blackhole(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        self.state.blackholed.store(true, Ordering::SeqCst);
    }

    /// Lets new connections through again. Those caught in a blackhole
    /// stay dead, still open.
    pub fn up(&self) {
        self.state.blackholed.store(false, Ordering::SeqCst);
        self.state.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
        self.state.closed.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Forwards what `from` sends to `to` while the proxy forwards for
/// `generation`; after that, takes and drops it.
fn pipe(mut from: TcpStream, mut to: TcpStream, state: &Arc<ProxyState>, generation: usize) {
    let state = state.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) if !state.forwards(generation) => continue,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        // A connection ended by a blackhole is closed only by its peer.
        if state.forwards(generation) {
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        }
    });
}

/// Fails the test unless `resp` is the JSON error `code` with `status`.
pub fn assert_error(resp: &Resp, status: u16, code: &str) {
    assert_eq!(
        resp.status,
        status,
        "{}",
        String::from_utf8_lossy(&resp.body)
    );
    let body = resp.json();
    assert_eq!(body["error"], code, "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

/// Runs `python3` with `args`, `stdin` on its standard input, and returns
/// its standard output; fails the test when it cannot run or fails.
pub fn python3(args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new("python3")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 {:?} failed: {}",
        args.first(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Messages ready in `queue`, or `None` while it does not exist yet.
pub fn queued_messages(queue: &str) -> Option<u32> {
    let url = AmqpUrl::parse(&amqp_url()).unwrap();
    let mut conn = broker::connect(&url, Duration::from_secs(5)).expect("amqp connect");
    let channel = conn.open_channel(None).expect("channel");
    let depth = channel
        .queue_declare_passive(queue)
        .ok()
        .map(|q| q.declared_message_count().unwrap_or(0));
    let _ = conn.close();
    depth
}

/// A new event with a generated id and nothing but `payload`.
pub fn plain_event(payload: Value) -> ingestd::store::NewEvent {
    ingestd::store::NewEvent {
        id: Uuid::new_v4(),
        payload,
        event_type: None,
        key: None,
        client_id: false,
        attributes: None,
        trace: None,
    }
}

/// Writes one event and its outbox row as the API would. With `notify`
/// the commit wakes relays in other processes; without, it wakes nobody.
pub fn insert_event(store: &ingestd::store::Store, payload: &Value, notify: bool) -> Uuid {
    let event = plain_event(payload.clone());
    let wakeup = if notify {
        ingestd::store::Wakeup::Notify
    } else {
        ingestd::store::Wakeup::Local(crossbeam_channel::bounded(1).0)
    };
    store
        .insert_events(&[&event], &wakeup)
        .expect("insert event");
    event.id
}
