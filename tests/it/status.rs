//! The status page in a real headless Chromium, and `/v1/stats`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ingestd::Role;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::ops::{metric, scrape};
use crate::util::{Load, TestEnv, get, ingest, request, wait_until};

/// Loads `url` in headless Chromium, lets its scripts run for a few
/// seconds of virtual time, and returns the DOM; with `screenshot`, also
/// saves a PNG there.
fn chromium(url: &str, screenshot: Option<&PathBuf>) -> String {
    chromium_sized(url, screenshot, "1200,1500")
}

fn chromium_sized(url: &str, screenshot: Option<&PathBuf>, size: &str) -> String {
    let profile = std::env::temp_dir().join(format!("ingestd-chromium-{}", Uuid::new_v4()));
    let mut command = Command::new("chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--virtual-time-budget=5000",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command.arg(format!("--window-size={size}"));
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let out = command
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("cannot run chromium (apt-get install chromium): {e}"));
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Headless Chromium driven over the DevTools protocol, for a test that
/// acts in the page rather than only reading it. The protocol runs on a
/// pipe (`--remote-debugging-pipe`): Chromium reads commands on its file
/// descriptor 3 and writes answers and events on 4, each a JSON text ended
/// by a NUL byte.
struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: mpsc::Receiver<Value>,
    session: Option<String>,
    next_id: u64,
    profile: PathBuf,
}

impl Browser {
    /// Starts Chromium and opens `url` in a tab, which later calls drive.
    fn open(url: &str) -> Browser {
        let profile = std::env::temp_dir().join(format!("ingestd-chromium-{}", Uuid::new_v4()));
        // The shell puts the two pipes where Chromium looks for them.
        let script = format!(
            "exec chromium --headless --no-sandbox --disable-gpu \
             --disable-background-networking --disable-component-update \
             --disable-sync --no-first-run --window-size=1200,1500 \
             --remote-debugging-pipe --user-data-dir='{}' about:blank \
             3<&0 4>&1 </dev/null >/dev/null 2>/dev/null",
            profile.display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run chromium (apt-get install chromium): {e}"));
        let commands = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, answers) = mpsc::channel();
        thread::spawn(move || {
            let mut message = Vec::new();
            while matches!(out.read_until(0, &mut message), Ok(n) if n > 0) {
                message.pop_if(|b| *b == 0);
                if let Ok(value) = serde_json::from_slice(&message)
                    && tx.send(value).is_err()
                {
                    break;
                }
                message.clear();
            }
        });
        let mut browser = Browser {
            child,
            commands,
            answers,
            session: None,
            next_id: 0,
            profile,
        };
        let target = browser.call("Target.createTarget", json!({ "url": url }));
        let attached = browser.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        browser.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        browser
    }

    /// Sends one command (to the tab, once one is attached) and returns
    /// its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            command["sessionId"] = json!(session);
        }
        let mut bytes = command.to_string().into_bytes();
        bytes.push(0);
        self.commands.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self
                .answers
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer from chromium to {method}: {e}"));
            if answer["id"] == id {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits until a JavaScript expression is true in the page.
    fn wait_for(&mut self, what: &str, expression: &str) {
        wait_until(Duration::from_secs(20), what, || {
            self.eval(expression) == json!(true)
        });
    }

    /// Clicks the middle of the element `selector` names with the mouse,
    /// as a user would: the browser's own hit testing decides what the
    /// click lands on.
    fn click(&mut self, selector: &str) {
        let at = self.eval(&format!(
            "(() => {{ const el = document.querySelector({selector:?}); \
             el.scrollIntoView({{block: 'center'}}); const r = el.getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        for (kind, button) in [
            ("mouseMoved", "none"),
            ("mousePressed", "left"),
            ("mouseReleased", "left"),
        ] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": button, "clickCount": 1 }),
            );
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.session = None;
        let _ = self
            .commands
            .write_all(b"{\"id\":0,\"method\":\"Browser.close\"}\0");
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The opening tag of the element with `id`, from a DOM dump.
fn tag_with_id(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page"));
    let start = dom[..at].rfind('<').unwrap();
    let end = dom[at..].find('>').unwrap() + at;
    dom[start..=end].to_string()
}

/// The text inside the element with `id`, from a DOM dump.
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page"));
    let open = dom[start..].find('>').unwrap() + start + 1;
    let close = dom[open..].find('<').unwrap() + open;
    dom[open..close].trim().to_string()
}

#[test]
fn the_status_page_follows_the_pipeline_in_a_browser() {
    let env = TestEnv::new("statuspage");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let url = format!("http://{addr}/");

    let before = chromium(&url, None);
    assert_eq!(text_of(&before, "count-processed"), "0");
    assert_eq!(text_of(&before, "count-failed"), "0");
    assert!(!before.contains("class=\"failed-event\""));

    let ok: Vec<Uuid> = (0..12).map(|i| ingest(addr, &json!(i))).collect();
    let bad = ingest(addr, &json!({ "fail": "permanent" }));
    env.wait_processed(&ok, Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "failed", || {
        env.status(bad).as_deref() == Some("failed")
    });
    // The server caches its database figures for a second; wait until it
    // reports the new counts, so the page is compared with what it knows.
    wait_until(Duration::from_secs(10), "stats caught up", || {
        let s = get(addr, "/v1/stats").json();
        s["events"]["processed"] == 12 && s["events"]["failed"] == 1
    });

    let after = chromium(&url, None);
    assert_eq!(text_of(&after, "count-processed"), "12");
    assert_eq!(text_of(&after, "count-failed"), "1");
    assert!(
        after.contains(&format!("data-id=\"{bad}\"")),
        "the failed event is listed"
    );
    // Each broker connection names the node it is on.
    let node = format!("on {}", crate::util::amqp_host_port());
    assert_eq!(text_of(&after, "node-broker-relay"), node);
    assert_eq!(text_of(&after, "node-broker-consumer"), node);
    // The chart lines and the Retry buttons come from the page's script
    // and /v1/stats, never from the server: they prove the script ran.
    let line = tag_with_id(&after, "line-processed");
    assert!(line.contains(" d=\"M"), "chart drawn by JavaScript: {line}");
    assert!(
        after.contains("class=\"retry\""),
        "retry button added by JavaScript"
    );
    assert!(!tag_with_id(&before, "line-processed").is_empty());

    // Without JavaScript the server-rendered page carries the same figures.
    let plain = String::from_utf8(get(addr, "/status").body).unwrap();
    assert_eq!(text_of(&plain, "count-processed"), "12");

    // An operator clicks the failed event's Retry button: the event goes
    // back through the pipeline and, the processor healed, is processed,
    // and the page follows.
    env.processor.heal();
    let mut browser = Browser::open(&url);
    let button = format!("tr[data-id=\"{bad}\"] button.retry");
    browser.wait_for(
        "the Retry button",
        &format!("document.querySelector({button:?}) !== null"),
    );
    browser.click(&button);
    browser.wait_for(
        "the page reports the retry",
        &format!(
            "document.getElementById('retry-note').textContent === {:?}",
            format!("{bad}: requeued")
        ),
    );
    env.wait_processed(&[bad], Duration::from_secs(10));
    assert_eq!(env.runs(bad), 1);
    let event = get(addr, &format!("/v1/events/{bad}")).json();
    assert_eq!(event["attempts"], 1, "one attempt since the retry: {event}");
    browser.wait_for(
        "the page shows it processed",
        &format!(
            "document.getElementById('count-processed').textContent === '13' \
             && document.getElementById('count-failed').textContent === '0' \
             && document.querySelector({button:?}) === null"
        ),
    );
    drop(browser);

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("status-page.png");
    // The screenshot is taken under load, as an operator would see it.
    let load = Load::start(addr, 4);
    load.wait_for(200, "load under way");
    chromium(&url, Some(&shot));
    let phone = dir.join("status-page-phone.png");
    chromium_sized(&url, Some(&phone), "390,1600");
    let accepted = load.stop();
    env.wait_processed(&accepted, Duration::from_secs(30));
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a real screenshot"
    );
    assert!(std::fs::metadata(&phone).unwrap().len() > 10_000);
    eprintln!("screenshots: {} {}", shot.display(), phone.display());
    app.shutdown().unwrap();
}

#[test]
fn stats_report_rates_counts_and_failures() {
    let env = TestEnv::new("stats");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let ids: Vec<Uuid> = (0..20).map(|i| ingest(addr, &json!(i))).collect();
    let bad = ingest(addr, &json!({ "fail": "permanent" }));
    env.wait_processed(&ids, Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "stats see the failure", || {
        let s = get(addr, "/v1/stats").json();
        s["events"]["failed"] == 1 && s["events"]["processed"] == 20
    });
    let s = get(addr, "/v1/stats").json();
    assert_eq!(s["health"]["postgres"], "up");
    assert_eq!(s["health"]["broker_relay"], "up");
    assert_eq!(s["recent_failed"][0]["id"], bad.to_string());
    assert_eq!(
        s["recent_failed"][0]["last_error"],
        "permanent: told to fail"
    );
    assert!(s["rates"]["ingested"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["latency_ms"]["p50"].as_f64().is_some(), "{s}");
    assert!(s["history"]["ingested"].is_array());
    assert_eq!(s["retry_enabled"], true);
    wait_until(Duration::from_secs(10), "queue depth probed", || {
        get(addr, "/v1/stats").json()["queue"]["depth"].is_number()
    });
    app.shutdown().unwrap();
}

#[test]
fn with_api_keys_the_status_page_asks_for_one_and_shows_nothing() {
    let env = TestEnv::new("statuslocked");
    let key = "status-key-0123456789";
    let app = env.start_with(&[("INGEST_API_KEYS", key)]);
    let addr = app.http_addr().unwrap();
    let authorized = [("Content-Type", "application/json"), ("X-Api-Key", key)];
    let resp = request(addr, "POST", "/v1/events", &authorized, br#"{"payload":1}"#).unwrap();
    assert_eq!(resp.status, 202);

    // Without JavaScript: the shell, no figures, the form visible.
    let plain = String::from_utf8(get(addr, "/status").body).unwrap();
    assert_eq!(text_of(&plain, "count-pending"), "-");
    assert!(!tag_with_id(&plain, "key-form").contains("hidden"));
    // In a browser the script asks /v1/stats, gets 401 and keeps the form.
    let dom = chromium(&format!("http://{addr}/"), None);
    assert!(
        !tag_with_id(&dom, "key-form").contains("hidden"),
        "form shown"
    );
    assert_eq!(text_of(&dom, "count-pending"), "-");
    assert!(
        text_of(&dom, "conn").contains("401"),
        "{}",
        text_of(&dom, "conn")
    );
    app.shutdown().unwrap();
}

/// Scrapers and viewers from many threads at once add no database reads:
/// the figures are read by one thread, at most once per interval, however
/// many requests ask for them.
#[test]
fn many_scrapers_and_viewers_cause_one_database_read_per_interval() {
    let env = TestEnv::new("statsflight");
    let interval = Duration::from_millis(300);
    let app = env.start_with(&[("INGEST_STATS_INTERVAL", "300ms")]);
    let addr = app.http_addr().unwrap();
    let reads = || metric(&scrape(addr), "ingestd_stats_refreshes_total").unwrap();

    let started = Instant::now();
    let before = reads();
    let (threads, per_thread) = (16, 40);
    let clients: Vec<_> = (0..threads)
        .map(|t| {
            thread::spawn(move || {
                for i in 0..per_thread {
                    let path = ["/metrics", "/v1/stats", "/", "/status"][(t + i) % 4];
                    assert_eq!(get(addr, path).status, 200, "{path}");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let after = reads();
    let elapsed = started.elapsed();
    // The refresher pauses a whole interval between two reads, so this
    // long a time holds at most this many.
    let most = (elapsed.as_secs_f64() / interval.as_secs_f64()).floor() + 1.0;
    assert!(
        after - before <= most,
        "{} reads in {elapsed:?} for {} requests; at most {most}",
        after - before,
        threads * per_thread
    );
    // The reads go on by themselves, and follow the database.
    let id = ingest(addr, &json!("counted"));
    env.wait_processed(&[id], Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "the refresher reads on", || {
        get(addr, "/v1/stats").json()["events"]["processed"] == 1
    });
    assert!(reads() > after);
    app.shutdown().unwrap();
}

/// Counts stay cheap however large the tables: exact up to the cap, an
/// estimate above it, marked as one in `/v1/stats`, `/metrics` and the page.
#[test]
fn large_tables_are_counted_up_to_a_cap_and_estimated_above() {
    let env = TestEnv::new("estimates");
    let config = env.config_with(&[("INGEST_STATS_INTERVAL", "200ms")]);
    // The API alone, as during a broker outage: the outbox only grows.
    let app = env.start_role(&config, Role::Api);
    let addr = app.http_addr().unwrap();
    ingest(addr, &json!(1));
    ingest(addr, &json!(2));
    wait_until(Duration::from_secs(10), "exact small counts", || {
        let s = get(addr, "/v1/stats").json();
        s["outbox"]["rows"] == 2
            && s["events"]["pending"] == 2
            && s["outbox"]["estimated"] == json!([])
            && s["events"]["estimated"] == json!([])
    });
    let s = get(addr, "/v1/stats").json();
    assert_eq!(s["db_figures"]["exact_up_to"], 10_000);

    env.sql()
        .batch_execute(
            "INSERT INTO events (id, payload) \
             SELECT gen_random_uuid(), '1' FROM generate_series(1, 12000); \
             INSERT INTO outbox (event_id) SELECT id FROM events \
             WHERE id NOT IN (SELECT event_id FROM outbox)",
        )
        .unwrap();
    // PostgreSQL's live-row counts catch up within a second or so.
    let total = 12_002;
    wait_until(Duration::from_secs(20), "estimates near the truth", || {
        let s = get(addr, "/v1/stats").json();
        let near = |v: &serde_json::Value| v.as_i64().is_some_and(|n| n >= 12_000);
        s["outbox"]["estimated"] == json!(["rows"])
            && s["events"]["estimated"] == json!(["pending"])
            && near(&s["outbox"]["rows"])
            && near(&s["events"]["pending"])
    });
    let s = get(addr, "/v1/stats").json();
    assert!(s["outbox"]["rows"].as_i64().unwrap() <= total, "{s}");
    assert!(s["events"]["pending"].as_i64().unwrap() <= total, "{s}");
    assert_eq!(s["events"]["processed"], 0, "small counts stay exact");

    let text = scrape(addr);
    assert_eq!(metric(&text, "ingestd_outbox_rows_estimated"), Some(1.0));
    assert!(metric(&text, "ingestd_outbox_rows").unwrap() >= 12_000.0);
    let help = text
        .lines()
        .find(|l| l.starts_with("# HELP ingestd_outbox_rows "))
        .unwrap();
    assert!(
        help.contains("exact up to 10000") && help.contains("estimate"),
        "{help}"
    );
    // The page marks the estimates.
    let plain = String::from_utf8(get(addr, "/status").body).unwrap();
    assert!(text_of(&plain, "count-pending").starts_with('~'));
    assert!(text_of(&plain, "outbox-rows").starts_with('~'));
    assert_eq!(text_of(&plain, "count-processed"), "0");
    app.shutdown().unwrap();
}
