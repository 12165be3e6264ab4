//! `openapi.yaml` against the real server: every response a table of
//! requests provokes must be documented for its operation and status, its
//! body must match the documented schema and its required headers must be
//! there; and every documented operation and status must be provoked,
//! except the few that need a failure the server cannot be pushed into
//! from outside (listed, with the reason).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::util::{Resp, TestEnv, raw_request, request, wait_until};

const KEY: &str = "openapi-key-0123456789";

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut e, data).unwrap();
    e.finish().unwrap()
}

fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml at the root");
    serde_yaml::from_str(&text).expect("openapi.yaml parses")
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(spec: &'a Value, mut node: &'a Value) -> &'a Value {
    while let Some(r) = node.get("$ref").and_then(Value::as_str) {
        let pointer = r.strip_prefix('#').expect("local $ref");
        node = spec
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
    }
    node
}

/// The spec's path template for a concrete path, if any.
fn template(spec: &Value, path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap();
    let parts: Vec<&str> = path.split('/').collect();
    spec["paths"]
        .as_object()
        .unwrap()
        .keys()
        .find(|t| {
            let tparts: Vec<&str> = t.split('/').collect();
            tparts.len() == parts.len()
                && tparts
                    .iter()
                    .zip(&parts)
                    .all(|(t, p)| t.starts_with('{') || t == p)
        })
        .cloned()
}

/// Checks `value` against the subset of JSON Schema the spec uses; returns
/// the first mismatch.
fn validate(spec: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(spec, schema);
    let fail = |why: String| Err(format!("{at}: {why} (value {value})"));
    if let Some(c) = schema.get("const")
        && c != value
    {
        return fail(format!("expected {c}"));
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        return fail(format!("not one of {options:?}"));
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => panic!("bad type in schema"),
        };
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let ok = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
        if !ok {
            return fail(format!("type {actual}, expected {types:?}"));
        }
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let matching = options
            .iter()
            .filter(|o| validate(spec, o, value, at).is_ok())
            .count();
        if matching != 1 {
            return fail(format!("matches {matching} of the oneOf schemas"));
        }
    }
    match value {
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if schema["minLength"].as_u64().is_some_and(|m| len < m)
                || schema["maxLength"].as_u64().is_some_and(|m| len > m)
            {
                return fail("length out of range".into());
            }
            match schema["format"].as_str() {
                Some("uuid") if Uuid::parse_str(s).is_err() => return fail("not a uuid".into()),
                Some("date-time") if !(s.len() >= 20 && s.as_bytes()[10] == b'T') => {
                    return fail("not a date-time".into());
                }
                _ => {}
            }
        }
        Value::Number(n)
            if schema["minimum"]
                .as_f64()
                .is_some_and(|m| n.as_f64().unwrap() < m) =>
        {
            return fail("below minimum".into());
        }
        Value::Array(items) => {
            let len = items.len() as u64;
            if schema["minItems"].as_u64().is_some_and(|m| len < m)
                || schema["maxItems"].as_u64().is_some_and(|m| len > m)
            {
                return fail("item count out of range".into());
            }
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    validate(spec, item, v, &format!("{at}[{i}]"))?;
                }
            }
        }
        Value::Object(map) => {
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap();
                if !map.contains_key(name) {
                    return fail(format!("missing required {name:?}"));
                }
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            for (name, v) in map {
                let at = format!("{at}.{name}");
                match (
                    properties.and_then(|p| p.get(name)),
                    schema.get("additionalProperties"),
                ) {
                    (Some(s), _) => validate(spec, s, v, &at)?,
                    (None, Some(s)) if s.is_object() => validate(spec, s, v, &at)?,
                    (None, Some(Value::Bool(false))) => {
                        return fail(format!("unexpected {name:?}"));
                    }
                    _ if properties.is_some() && schema.get("oneOf").is_none() => {
                        return fail(format!("undocumented property {name:?}"));
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Checks one real response against the spec and returns its
/// `(template, method, status)`.
fn conform(spec: &Value, method: &str, path: &str, resp: &Resp) -> (String, String, String) {
    let method = method.to_ascii_lowercase();
    let status = resp.status.to_string();
    let error = json!({ "$ref": "#/components/schemas/Error" });
    let Some(template) = template(spec, path) else {
        // Paths not listed answer 404, as the description says.
        assert_eq!(resp.status, 404, "{method} {path}");
        validate(spec, &error, &resp.json(), "body").unwrap();
        return ("(unlisted)".into(), method, status);
    };
    let operation = &spec["paths"][&template][&method];
    if resp.status == 413 && method == "get" {
        // A body on a route that takes none answers 413, as the
        // description says.
        assert_eq!(resp.json()["error"], "body_too_large", "{method} {path}");
        validate(spec, &error, &resp.json(), "body").unwrap();
        return (template, method, status);
    }
    if !operation.is_object() {
        // Methods not listed answer 405 with Allow, as the description says.
        assert_eq!(resp.status, 405, "{method} {path}");
        let allow = resp.header("allow").expect("Allow");
        for listed in spec["paths"][&template].as_object().unwrap().keys() {
            assert!(allow.contains(&listed.to_ascii_uppercase()), "{allow}");
        }
        validate(spec, &error, &resp.json(), "body").unwrap();
        return (template, method, status);
    }
    let documented = operation["responses"]
        .get(&status)
        .unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
    let documented = resolve(spec, documented);
    for (name, header) in documented["headers"].as_object().into_iter().flatten() {
        let header = resolve(spec, header);
        if header["required"] == true {
            assert!(
                resp.header(name).is_some(),
                "{method} {path} {status}: header {name} missing"
            );
        }
    }
    if documented["content"].is_null() {
        // A response documented without content has none.
        assert!(resp.body.is_empty(), "{method} {path} {status}: a body");
        return (template, method, status);
    }
    let content_type = resp.header("content-type").unwrap_or("");
    let essence = content_type.split(';').next().unwrap().trim();
    let media = &documented["content"][essence];
    assert!(
        media.is_object(),
        "{method} {path} {status}: content type {content_type:?} is not documented"
    );
    if essence == "application/json" {
        let body = resp.json();
        if let Err(e) = validate(spec, &media["schema"], &body, "body") {
            panic!("{method} {path} {status}: {e}");
        }
    }
    (template, method, status)
}

/// Sends requests and records what each provoked.
struct Probe {
    spec: Value,
    addr: SocketAddr,
    seen: BTreeSet<(String, String, String)>,
}

impl Probe {
    /// A request with the API key.
    fn call(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let mut all = vec![("X-Api-Key", KEY)];
        all.extend_from_slice(headers);
        self.send(method, path, &all, body)
    }

    /// A request exactly as given.
    fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let resp = request(self.addr, method, path, headers, body).expect("request");
        self.seen.insert(conform(&self.spec, method, path, &resp));
        resp
    }

    /// Raw bytes, recorded as `method path`.
    fn raw(&mut self, method: &str, path: &str, bytes: &[u8]) -> Resp {
        let resp = raw_request(self.addr, bytes, false, Duration::from_secs(10)).expect("raw");
        self.seen.insert(conform(&self.spec, method, path, &resp));
        resp
    }
}

#[test]
fn responses_match_openapi_yaml() {
    let spec = spec();
    assert_eq!(spec["openapi"], "3.1.0");
    let env = TestEnv::new("openapi");
    let config = env.config_with(&[
        ("INGEST_API_KEYS", KEY),
        ("INGEST_METRICS_AUTH", "key"),
        ("INGEST_MAX_BODY_BYTES", "4096"),
        ("INGEST_HTTP_MAX_HEADER_BYTES", "2048"),
        ("INGEST_HTTP_BODY_TIMEOUT", "1s"),
    ]);
    let app = env.start_role(&config, ingestd::Role::All);
    let mut p = Probe {
        spec,
        addr: app.http_addr().unwrap(),
        seen: BTreeSet::new(),
    };
    let json_ct = ("Content-Type", "application/json");
    let flood = |method: &str, path: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nX-Filler: {}\r\n\r\n",
            "a".repeat(4000)
        )
    };

    for path in ["/v1/events", "/Ingestion/ingest"] {
        let key = format!("k-{path}");
        let idem = ("Idempotency-Key", key.as_str());
        assert_eq!(
            p.call("POST", path, &[json_ct, idem], br#"{"payload":1}"#)
                .status,
            202
        );
        assert_eq!(
            p.call("POST", path, &[json_ct, idem], br#"{"payload":1}"#)
                .status,
            200
        );
        assert_eq!(
            p.call("POST", path, &[json_ct, idem], br#"{"payload":2}"#)
                .status,
            409
        );
        let batch = br#"[{"payload":1,"type":"t","key":"k"},{"payload":2}]"#;
        assert_eq!(p.call("POST", path, &[json_ct], batch).status, 202);
        // A key on a batch: created, replayed, then reused for other events.
        let batch_key = format!("b-{path}");
        let bidem = ("Idempotency-Key", batch_key.as_str());
        let created = p.call("POST", path, &[json_ct, bidem], batch);
        assert_eq!(created.status, 202);
        let replayed = p.call("POST", path, &[json_ct, bidem], batch);
        assert_eq!(replayed.status, 200);
        assert_eq!(replayed.json()["ids"], created.json()["ids"]);
        assert_eq!(
            p.call("POST", path, &[json_ct, bidem], br#"[{"payload":2}]"#)
                .status,
            409
        );
        let id = Uuid::new_v4();
        let fixed = json!([{ "id": id.to_string(), "payload": 1 }]).to_string();
        assert_eq!(
            p.call("POST", path, &[json_ct], fixed.as_bytes()).status,
            202
        );
        assert_eq!(
            p.call("POST", path, &[json_ct], fixed.as_bytes()).status,
            200
        );
        assert_eq!(p.call("POST", path, &[json_ct], b"{").status, 400);
        assert_eq!(
            p.call("POST", path, &[json_ct], b"[{\"payload\":1},7]")
                .status,
            400
        );
        assert_eq!(p.call("POST", path, &[], br#"{"payload":1}"#).status, 415);
        // Compressed bodies: taken, refused when corrupt, and an unknown
        // coding is refused with the codings that would do.
        let gz = ("Content-Encoding", "gzip");
        assert_eq!(
            p.call("POST", path, &[json_ct, gz], &gzip(br#"{"payload":1}"#))
                .status,
            202
        );
        let corrupt = p.call("POST", path, &[json_ct, gz], br#"{"payload":1}"#);
        assert_eq!(corrupt.status, 400);
        assert_eq!(corrupt.json()["error"], "invalid_encoding");
        let br = ("Content-Encoding", "br");
        let refused = p.call("POST", path, &[json_ct, br], br#"{"payload":1}"#);
        assert_eq!(refused.status, 415);
        assert_eq!(refused.header("accept-encoding"), Some("gzip, deflate"));
        let documented = resolve(&p.spec, &p.spec["paths"][path]["post"]["responses"]["415"]);
        assert!(
            documented["headers"]["Accept-Encoding"].is_object(),
            "the 415 of {path} documents Accept-Encoding"
        );
        assert_eq!(
            p.call("POST", path, &[json_ct, gz], &gzip(&[b' '; 5000]))
                .status,
            413
        );
        assert_eq!(p.call("POST", path, &[json_ct], &[b' '; 5000]).status, 413);
        assert_eq!(p.call("GET", path, &[], b"").status, 405);
        assert_eq!(
            p.send("POST", path, &[json_ct], br#"{"payload":1}"#).status,
            401
        );
        // CloudEvents: structured (created, replayed, conflicting), batched,
        // binary, and an event format that is not JSON.
        let ce_ct = ("Content-Type", "application/cloudevents+json");
        let ce = |id: &str, data: Value| {
            json!({"specversion": "1.0", "id": format!("{id}{path}"), "source": "/openapi",
                   "type": "t", "data": data})
        };
        let one = ce("one", json!({"a": 1})).to_string();
        assert_eq!(p.call("POST", path, &[ce_ct], one.as_bytes()).status, 202);
        assert_eq!(p.call("POST", path, &[ce_ct], one.as_bytes()).status, 200);
        let changed = ce("one", json!({"a": 2})).to_string();
        assert_eq!(
            p.call("POST", path, &[ce_ct], changed.as_bytes()).status,
            409
        );
        let batch_ct = ("Content-Type", "application/cloudevents-batch+json");
        let two = json!([ce("b1", json!(1)), ce("b2", json!(2))]).to_string();
        assert_eq!(
            p.call("POST", path, &[batch_ct], two.as_bytes()).status,
            202
        );
        let ce_id = format!("bin{path}");
        let binary = [
            ("Content-Type", "text/plain"),
            ("ce-specversion", "1.0"),
            ("ce-id", ce_id.as_str()),
            ("ce-source", "/openapi"),
            ("ce-type", "t"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ];
        assert_eq!(p.call("POST", path, &binary, b"hello").status, 202);
        let avro = ("Content-Type", "application/cloudevents+avro");
        assert_eq!(p.call("POST", path, &[avro], b"x").status, 415);
        let origin = ("WebHook-Request-Origin", "sender.example");
        let handshake = p.send("OPTIONS", path, &[origin], b"");
        assert_eq!(handshake.status, 200);
        assert_eq!(
            handshake.header("webhook-allowed-origin"),
            Some("sender.example")
        );
        // A body that stops half-way: 408 once the body timeout passes.
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{{\"payload\""
        );
        assert_eq!(p.raw("POST", path, head.as_bytes()).status, 408);
        assert_eq!(
            p.raw("POST", path, flood("POST", path).as_bytes()).status,
            431
        );
    }

    // An event that fails, for the retry route.
    let failed = p.call(
        "POST",
        "/v1/events",
        &[json_ct],
        br#"{"payload":{"fail":"permanent"}}"#,
    );
    let failed = Uuid::parse_str(failed.json()["id"].as_str().unwrap()).unwrap();
    let done = p.call("POST", "/v1/events", &[json_ct], br#"{"payload":"fine"}"#);
    let done = Uuid::parse_str(done.json()["id"].as_str().unwrap()).unwrap();
    env.wait_processed(&[done], Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "the event failed", || {
        env.status(failed).as_deref() == Some("failed")
    });
    let missing = Uuid::new_v4();
    for (route, id) in [("/v1/events/{}", done), ("/v1/events/{}/retry", failed)] {
        let at = |id: &dyn std::fmt::Display| route.replace("{}", &id.to_string());
        let (method, other, ok) = if route.ends_with("retry") {
            ("POST", "GET", 202)
        } else {
            ("GET", "DELETE", 200)
        };
        assert_eq!(p.call(method, &at(&id), &[], b"").status, ok);
        assert_eq!(p.call(method, &at(&"nope"), &[], b"").status, 400);
        assert_eq!(p.call(method, &at(&missing), &[], b"").status, 404);
        assert_eq!(p.call(other, &at(&id), &[], b"").status, 405);
        assert_eq!(p.send(method, &at(&id), &[], b"").status, 401);
        assert_eq!(
            p.raw(method, &at(&id), flood(method, &at(&id)).as_bytes())
                .status,
            431
        );
    }
    // Retrying a processed event conflicts.
    assert_eq!(
        p.call("POST", &format!("/v1/events/{done}/retry"), &[], b"")
            .status,
        409
    );

    for path in [
        "/v1/stats",
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
        "/status",
    ] {
        assert_eq!(p.call("GET", path, &[], b"").status, 200, "{path}");
        assert_eq!(
            p.call("POST", path, &[json_ct], b"{}").status,
            405,
            "{path}"
        );
        assert_eq!(p.call("GET", path, &[json_ct], b"{}").status, 413, "{path}");
    }
    assert_eq!(p.send("GET", "/v1/stats", &[], b"").status, 401);
    assert_eq!(p.send("GET", "/metrics", &[], b"").status, 401);
    assert_eq!(p.call("GET", "/v2/events", &[], b"").status, 404);

    // Rate limits: a second API in the same schema, whose clients may send
    // one event every ten seconds.
    let limited_config = env.config_with(&[
        ("INGEST_API_KEYS", KEY),
        ("INGEST_RATE_LIMIT", "0.1/s,burst=1"),
    ]);
    let limited = env.start_role(&limited_config, ingestd::Role::Api);
    let mut q = Probe {
        spec: p.spec.clone(),
        addr: limited.http_addr().unwrap(),
        seen: BTreeSet::new(),
    };
    let first = q.call("POST", "/v1/events", &[json_ct], br#"{"payload":1}"#);
    assert_eq!(first.status, 202);
    // The key's allowance is spent, on either route.
    for path in ["/v1/events", "/Ingestion/ingest"] {
        let refused = q.call("POST", path, &[json_ct], br#"{"payload":1}"#);
        assert_eq!(refused.status, 429, "{path}");
        assert!(refused.header("retry-after").is_some());
    }
    limited.shutdown().unwrap();
    p.seen.extend(q.seen);

    // Every documented operation and status was provoked, except these.
    let exempt = |path: &str, method: &str, status: &str| {
        // A bug, by definition not provoked by a request.
        status == "500"
            // The database down or the server full: see the fault and
            // hardening tests.
            || status == "503"
            // A request without a body cannot stall in it.
            || (status == "408" && (method == "get" || path.ends_with("/retry")))
    };
    let mut not_seen = Vec::new();
    for (path, item) in p.spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for status in operation["responses"].as_object().unwrap().keys() {
                let triple = (path.clone(), method.clone(), status.clone());
                if !p.seen.contains(&triple) && !exempt(path, method, status) {
                    not_seen.push(triple);
                }
            }
        }
    }
    assert!(
        not_seen.is_empty(),
        "documented but never seen: {not_seen:?}"
    );
    app.shutdown().unwrap();
}
