//! Request parsing and validation on arbitrary input: the route, the
//! media type, the API key headers, the idempotency key and the ingest
//! body. Nothing may panic, and what is accepted must keep the promises
//! the API makes: no null payload, no batch over the limit, no NUL, every
//! error answered with a JSON body.
#![no_main]

use ingestd::auth;
use ingestd::http::{self, ApiError};
use ingestd::ingest::{self, Limits};
use libfuzzer_sys::fuzz_target;
use tiny_http::Method;

const LIMITS: Limits = Limits {
    max_batch: 50,
    max_payload_bytes: 4096,
    max_depth: 16,
};

fuzz_target!(|data: &[u8]| {
    // The first line is a header-ish string, the rest the body.
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (line, body) = (&data[..split], &data[(split + 1).min(data.len())..]);
    let line = String::from_utf8_lossy(line);

    for method in [Method::Get, Method::Post, Method::Delete] {
        if let Err(e) = http::route(&method, &line) {
            check_error(&e);
        }
    }
    let _ = http::is_json_media_type(&line);
    let _ = auth::presented_key(Some(&line), Some(&line));
    if let Ok(key) = ingest::idempotency_key(&line) {
        assert!(!key.is_empty() && key.len() <= ingest::MAX_NAME_BYTES);
    }

    match ingest::parse(body, &LIMITS) {
        Ok(parsed) => {
            assert!(!parsed.events.is_empty());
            assert!(parsed.events.len() <= LIMITS.max_batch);
            assert!(parsed.batch || parsed.events.len() == 1);
            assert!(!ingest::nesting_exceeds(body, LIMITS.max_depth));
            for event in &parsed.events {
                assert!(!event.payload.is_null());
                assert!(serde_json::to_vec(&event.payload).unwrap().len() <= LIMITS.max_payload_bytes);
                assert!(!event.payload.to_string().contains("\\u0000"));
                for name in [&event.event_type, &event.key].into_iter().flatten() {
                    assert!(!name.is_empty() && name.len() <= ingest::MAX_NAME_BYTES);
                }
            }
        }
        Err(e) => check_error(&e),
    }
});

/// Every error becomes a 4xx with a JSON body naming a code.
fn check_error(e: &ApiError) {
    let response = http::error_response(e);
    let status = response.status_code().0;
    assert!((400..500).contains(&status), "{e:?} answered {status}");
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut body).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(json["error"].is_string() && json["detail"].is_string());
}
