//! Request parsing and validation on arbitrary input: the route, the
//! media type, the content coding, the API key headers, the idempotency
//! key, the head check that runs before a body is read, the ingest body,
//! and its decoding as gzip or deflate. Nothing may panic, and what is
//! accepted must keep the promises the API makes: no null payload, no
//! batch over the limit, no NUL, no decoded body over the limit, every
//! error answered with a JSON body.
#![no_main]

use ingestd::api::auth::{self, ApiKeys};
use ingestd::api::encoding;
use ingestd::api::ingest::{self, Limits};
use ingestd::api::{self, ApiError};
use ingestd::config::MetricsAuth;
use libfuzzer_sys::fuzz_target;
use tiny_http::{Header, Method, Request, TestRequest};

const KEY: &str = "fuzz-key-0123456789";
const MAX_BODY: usize = 4096;

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
        if let Err(e) = api::route::route(&method, &line) {
            check_error(&e);
        }
    }
    let _ = api::head::is_json_media_type(&line);
    let _ = auth::presented_key(Some(&line), Some(&line));
    if let Ok(key) = ingest::idempotency_key(&line) {
        assert!(!key.is_empty() && key.len() <= ingest::MAX_NAME_BYTES);
    }

    check_head(&line, body.len());

    // The body as gzip or deflate: never more than the limit out, and
    // whatever is refused is a clear 4xx (or the 503 of a spent budget).
    for coding in [encoding::Coding::Gzip, encoding::Coding::Deflate] {
        let mut reserved = 0;
        let decoded = encoding::decode(coding, body.to_vec(), MAX_BODY, &mut |n| {
            reserved += n;
            reserved <= 4 * MAX_BODY
        });
        match decoded {
            Ok(decoded) => assert!(decoded.len() <= MAX_BODY && decoded.len() <= reserved),
            Err(ApiError::MemoryBusy) => unreachable!("the limit bounds what is reserved"),
            Err(e) => check_error(&e),
        }
    }

    match ingest::parse(body, &LIMITS) {
        Ok(parsed) => {
            assert!(!parsed.events.is_empty());
            assert!(parsed.events.len() <= LIMITS.max_batch);
            assert!(parsed.batch || parsed.events.len() == 1);
            assert!(!ingest::nesting_exceeds(body, LIMITS.max_depth));
            for event in &parsed.events {
                assert!(!event.payload.is_null());
                assert!(
                    serde_json::to_vec(&event.payload).unwrap().len() <= LIMITS.max_payload_bytes
                );
                assert!(!event.payload.to_string().contains("\\u0000"));
                for name in [&event.event_type, &event.key].into_iter().flatten() {
                    assert!(!name.is_empty() && name.chars().count() <= ingest::MAX_NAME_CHARS);
                }
            }
        }
        Err(e) => check_error(&e),
    }
});

/// The head check on requests whose every header it reads carries `line`:
/// what it lets through has the key, and an ingest is JSON within the
/// size limit; what it refuses is a clear 4xx.
fn check_head(line: &str, seed: usize) {
    let keys = ApiKeys::parse(KEY).unwrap();
    // no body, or one whose length may pass the limit
    let length = if seed.is_multiple_of(2) {
        0
    } else {
        1025 + seed * 7
    };
    for (method, path) in [
        (Method::Post, "/v1/events"),
        (Method::Post, line),
        (Method::Get, line),
    ] {
        let mut test = TestRequest::new()
            .with_method(method.clone())
            .with_path(path);
        for name in [
            "Content-Type",
            "Content-Encoding",
            "Idempotency-Key",
            "Authorization",
            "X-Api-Key",
        ] {
            if let Ok(header) = Header::from_bytes(name, line.as_bytes()) {
                test = test.with_header(header);
            }
        }
        let content_length = Header::from_bytes("Content-Length", length.to_string()).unwrap();
        let request: Request = test.with_header(content_length).into();
        let route = api::route::route(&method, path);
        match api::head::check_head(&keys, MetricsAuth::Key, MAX_BODY, None, &request, route) {
            Ok(route) => {
                if route.is_protected(MetricsAuth::Key) {
                    assert!(line.contains(KEY), "{route:?} let through without the key");
                }
                if route == api::Route::Ingest {
                    assert!(api::head::is_json_media_type(line));
                    assert!(encoding::coding([line]).is_ok());
                    assert!(length <= MAX_BODY);
                }
            }
            Err(e) => check_error(&e),
        }
    }
}

/// Every error becomes a 4xx with a JSON body naming a code.
fn check_error(e: &ApiError) {
    let response = api::error_response(e);
    let status = response.status_code().0;
    assert!((400..500).contains(&status), "{e:?} answered {status}");
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut body).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(json["error"].is_string() && json["detail"].is_string());
}
