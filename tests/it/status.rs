//! The status page in a real headless Chromium, and `/v1/stats`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

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
