//! Ingest request bodies: parsing and validation, before anything touches
//! the database.
//!
//! A body is one event object or an array of them (a batch, all or
//! nothing). An event is `{"payload": <any JSON but null>}` with optional
//! `type` and `key` strings and an optional client-chosen `id` (a UUID,
//! which makes the event idempotent). Every limit has its own error, and an
//! error inside a batch names the item's index. Nothing here allocates in
//! proportion to anything but the body, which the caller has already bounded.

use std::collections::HashSet;
use std::io;

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::http::ApiError;
use crate::store::NewEvent;

/// Longest `Idempotency-Key`, in bytes (it is ASCII).
pub const MAX_NAME_BYTES: usize = 255;

/// Longest `type` or `key`, in characters: the unit of JSON Schema's
/// `maxLength`, so that what the OpenAPI contract allows is accepted.
pub const MAX_NAME_CHARS: usize = 255;

/// Limits on what one body may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most events in one batch.
    pub max_batch: usize,
    /// Largest payload of one event, as compact JSON.
    pub max_payload_bytes: usize,
    /// Deepest nesting of arrays and objects in the whole body.
    pub max_depth: usize,
}

/// A valid ingest body.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The events, in order; their ids are the clients' or new random ones.
    pub events: Vec<NewEvent>,
    /// The body was an array.
    pub batch: bool,
}

/// The checks on a body's text that cost a scan, not a parse: not empty,
/// UTF-8, not nested deeper than the limit.
pub fn check_text(body: &[u8], limits: &Limits) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidJson("the body is empty".into()));
    }
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::InvalidJson("the body is not valid UTF-8".into()));
    }
    if nesting_exceeds(body, limits.max_depth) {
        return Err(ApiError::TooDeep(limits.max_depth));
    }
    Ok(())
}

/// Checks that `body` is JSON without building anything from it.
pub fn check_syntax(body: &[u8]) -> Result<(), ApiError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(|_| ())
        .map_err(|e| ApiError::InvalidJson(e.to_string()))
}

/// Parses and validates an ingest body.
pub fn parse(body: &[u8], limits: &Limits) -> Result<Parsed, ApiError> {
    // Checked before parsing, so a deep body costs a scan, not a deep parse.
    check_text(body, limits)?;
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    match value {
        Value::Object(object) => Ok(Parsed {
            events: vec![parse_event(object, limits)?],
            batch: false,
        }),
        Value::Array(items) => parse_batch(items, limits),
        _ => Err(ApiError::InvalidBody(
            "the body must be a JSON object with a \"payload\" field, or an array of them".into(),
        )),
    }
}

fn parse_batch(items: Vec<Value>, limits: &Limits) -> Result<Parsed, ApiError> {
    if items.is_empty() {
        return Err(ApiError::InvalidBody("the batch is empty".into()));
    }
    if items.len() > limits.max_batch {
        return Err(ApiError::BatchTooLarge(limits.max_batch));
    }
    let mut events = Vec::with_capacity(items.len());
    let mut client_ids = HashSet::new();
    for (index, item) in items.into_iter().enumerate() {
        let in_item = |e| ApiError::InvalidItem(index, Box::new(e));
        let Value::Object(object) = item else {
            return Err(in_item(ApiError::InvalidBody(
                "each item must be a JSON object with a \"payload\" field".into(),
            )));
        };
        let event = parse_event(object, limits).map_err(in_item)?;
        if event.client_id && !client_ids.insert(event.id) {
            return Err(in_item(ApiError::InvalidBody(format!(
                "the id {} appears twice in the batch",
                event.id
            ))));
        }
        events.push(event);
    }
    Ok(Parsed {
        events,
        batch: true,
    })
}

/// One event object.
fn parse_event(mut object: Map<String, Value>, limits: &Limits) -> Result<NewEvent, ApiError> {
    let payload = match object.remove("payload") {
        None => {
            return Err(ApiError::InvalidBody(
                "the \"payload\" field is missing".into(),
            ));
        }
        Some(Value::Null) => {
            return Err(ApiError::InvalidBody(
                "the \"payload\" field is null".into(),
            ));
        }
        Some(payload) => payload,
    };
    // PostgreSQL's jsonb cannot store U+0000; refusing it here keeps one
    // request from failing the group commit it would share.
    if has_nul(&payload) {
        return Err(ApiError::InvalidBody(
            "the payload contains U+0000, which cannot be stored".into(),
        ));
    }
    if compact_len(&payload) > limits.max_payload_bytes {
        return Err(ApiError::PayloadTooLarge(limits.max_payload_bytes));
    }
    let event_type = name_field(&mut object, "type")?;
    let key = name_field(&mut object, "key")?;
    let (id, client_id) = match object.remove("id") {
        None | Some(Value::Null) => (Uuid::new_v4(), false),
        // Only the hyphenated form (36 characters), which is what the
        // contract's `format: uuid` means; `Uuid` would also take others.
        Some(Value::String(s)) => match Uuid::parse_str(&s) {
            Ok(id) if s.len() == 36 && !id.is_nil() => (id, true),
            _ => {
                return Err(ApiError::InvalidBody(format!(
                    "the \"id\" field {s:?} is not a hyphenated UUID other than the nil one"
                )));
            }
        },
        Some(_) => {
            return Err(ApiError::InvalidBody(
                "the \"id\" field must be a UUID string".into(),
            ));
        }
    };
    Ok(NewEvent {
        id,
        payload,
        event_type,
        key,
        client_id,
    })
}

/// An optional string field of 1 to [`MAX_NAME_CHARS`] characters without
/// control characters.
fn name_field(object: &mut Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match object.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if valid_name(&s) => Ok(Some(s)),
        Some(Value::String(_)) => Err(ApiError::InvalidBody(format!(
            "the {field:?} field must be 1 to {MAX_NAME_CHARS} characters without control characters"
        ))),
        Some(_) => Err(ApiError::InvalidBody(format!(
            "the {field:?} field must be a string"
        ))),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= MAX_NAME_CHARS && !s.chars().any(char::is_control)
}

/// Validates an `Idempotency-Key` header: 1 to [`MAX_NAME_BYTES`] visible
/// ASCII characters.
pub fn idempotency_key(value: &str) -> Result<String, ApiError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_BYTES
        && value.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(value.to_string())
    } else {
        Err(ApiError::InvalidIdempotencyKey)
    }
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// The size of `value` as compact JSON, without building the text.
fn compact_len(value: &Value) -> usize {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// True when arrays and objects in `body` nest deeper than `max`. Brackets
/// inside strings do not count; the text need not be valid JSON.
pub fn nesting_exceeds(body: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits {
        max_batch: 3,
        max_payload_bytes: 64,
        max_depth: 6,
    };

    fn one(body: &str) -> Result<NewEvent, ApiError> {
        let parsed = parse(body.as_bytes(), &LIMITS)?;
        assert!(!parsed.batch);
        Ok(parsed.events.into_iter().next().unwrap())
    }

    #[test]
    fn single_events() {
        let e = one(r#"{"payload":"Test masivo"}"#).unwrap();
        assert_eq!(e.payload, json!("Test masivo"));
        assert_eq!((e.event_type, e.key), (None, None));
        let e = one(r#"{"payload":{"a":[1]},"type":"order.created","key":"c-1"}"#).unwrap();
        assert_eq!(e.event_type.as_deref(), Some("order.created"));
        assert_eq!(e.key.as_deref(), Some("c-1"));
        let id = Uuid::new_v4();
        let parsed = parse(
            format!(r#"{{"payload":1,"id":"{id}"}}"#).as_bytes(),
            &LIMITS,
        )
        .unwrap();
        assert!(parsed.events[0].client_id);
        assert_eq!(parsed.events[0].id, id);
        // Null is the same as leaving a field out.
        let e = one(r#"{"payload":1,"type":null,"key":null,"id":null}"#).unwrap();
        assert_eq!((e.event_type, e.key, e.client_id), (None, None, false));
    }

    #[test]
    fn invalid_single_events() {
        let invalid_json = ["", "  ", "{\"payload\":", "nope"];
        for body in invalid_json {
            assert!(matches!(one(body), Err(ApiError::InvalidJson(_))), "{body}");
        }
        let invalid_body = [
            "1",
            "\"x\"",
            "null",
            "{}",
            r#"{"payload":null}"#,
            r#"{"payload":{"a":["x\u0000y"]}}"#,
            r#"{"payload":{"\u0000":1}}"#,
            r#"{"payload":1,"type":""}"#,
            r#"{"payload":1,"type":7}"#,
            r#"{"payload":1,"key":"a\nb"}"#,
            r#"{"payload":1,"id":"nope"}"#,
            r#"{"payload":1,"id":"00000000-0000-0000-0000-000000000000"}"#,
            r#"{"payload":1,"id":"4e866db4be48401ca6c21101f2dfd759"}"#,
            r#"{"payload":1,"id":"{4e866db4-be48-401c-a6c2-1101f2dfd759}"}"#,
            r#"{"payload":1,"id":"urn:uuid:4e866db4-be48-401c-a6c2-1101f2dfd759"}"#,
            r#"{"payload":1,"id":5}"#,
        ];
        for body in invalid_body {
            assert!(matches!(one(body), Err(ApiError::InvalidBody(_))), "{body}");
        }
        let long = format!(r#"{{"payload":1,"key":"{}"}}"#, "k".repeat(256));
        assert!(matches!(one(&long), Err(ApiError::InvalidBody(_))));
        // The limit counts characters, as the contract's maxLength does.
        let wide = format!(r#"{{"payload":1,"type":"{}"}}"#, "é".repeat(255));
        assert_eq!(one(&wide).unwrap().event_type, Some("é".repeat(255)));
        let wider = format!(r#"{{"payload":1,"type":"{}"}}"#, "é".repeat(256));
        assert!(matches!(one(&wider), Err(ApiError::InvalidBody(_))));
        // Control characters include C1 (U+0080 to U+009F).
        assert!(matches!(
            one(r#"{"payload":1,"type":"a\u0085b"}"#),
            Err(ApiError::InvalidBody(_))
        ));
        let big = format!(r#"{{"payload":"{}"}}"#, "x".repeat(63));
        assert_eq!(one(&big), Err(ApiError::PayloadTooLarge(64)));
        assert_eq!(
            one(r#"{"payload":[[[[[[1]]]]]]}"#),
            Err(ApiError::TooDeep(6))
        );
        assert!(matches!(
            parse(b"{\"payload\":\"\xff\"}", &LIMITS),
            Err(ApiError::InvalidJson(_))
        ));
    }

    #[test]
    fn batches() {
        let parsed = parse(br#"[{"payload":1},{"payload":2,"type":"t"}]"#, &LIMITS).unwrap();
        assert!(parsed.batch && !parsed.events.iter().any(|e| e.client_id));
        assert_eq!(parsed.events.len(), 2);
        assert_eq!(parsed.events[1].payload, json!(2));
        assert!(matches!(
            parse(b"[]", &LIMITS),
            Err(ApiError::InvalidBody(_))
        ));
        assert_eq!(
            parse(
                br#"[{"payload":1},{"payload":1},{"payload":1},{"payload":1}]"#,
                &LIMITS
            ),
            Err(ApiError::BatchTooLarge(3))
        );
        match parse(br#"[{"payload":1},{"nope":1}]"#, &LIMITS) {
            Err(ApiError::InvalidItem(1, inner)) => {
                assert!(matches!(*inner, ApiError::InvalidBody(_)))
            }
            other => panic!("{other:?}"),
        }
        let id = Uuid::new_v4();
        let twice = format!(r#"[{{"payload":1,"id":"{id}"}},{{"payload":2,"id":"{id}"}}]"#);
        assert!(matches!(
            parse(twice.as_bytes(), &LIMITS),
            Err(ApiError::InvalidItem(1, _))
        ));
        assert!(matches!(
            parse(br#"[{"payload":1},7]"#, &LIMITS),
            Err(ApiError::InvalidItem(1, _))
        ));
    }

    #[test]
    fn nesting() {
        assert!(!nesting_exceeds(b"[[1]]", 2));
        assert!(nesting_exceeds(b"[[[1]]]", 2));
        assert!(!nesting_exceeds(br#"["[[[[", {"a":"{{{{\"[["}]"#, 2));
        assert!(nesting_exceeds(&b"[".repeat(100_000), 64));
    }

    #[test]
    fn idempotency_keys() {
        assert_eq!(idempotency_key("order-42"), Ok("order-42".to_string()));
        for bad in ["", "a b", "é", &"k".repeat(256)] {
            assert_eq!(idempotency_key(bad), Err(ApiError::InvalidIdempotencyKey));
        }
    }
}
