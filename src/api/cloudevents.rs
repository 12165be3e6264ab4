//! CloudEvents 1.0 at the HTTP edge (the HTTP protocol binding and the JSON
//! event format): which mode a request is in, and its events, validated,
//! as [`NewEvent`]s.
//!
//! The mode comes from the head, as the binding says:
//! `application/cloudevents-batch+json` is batched mode (a JSON array of
//! events), `application/cloudevents+json` structured mode (one event),
//! and any other media type with a `ce-specversion` header binary mode
//! (attributes in `ce-*` headers, the body is the data). A request in none
//! of them is a plain ingest body ([`crate::api::ingest`]).
//!
//! An event becomes a `NewEvent` whose id is derived from its `source` and
//! `id` ([`event_id`]), so the existing client-id path deduplicates it: the
//! same pair with the same content is a replay, with other content a
//! conflict. Its `type` is the event's type and its `partitionkey`
//! extension, if any, its key. JSON data is the payload; other data is
//! kept as base64 text, with `data_base64: true` among the stored
//! attributes. The trace context extension (`traceparent`, `tracestate`)
//! becomes the event's [`TraceContext`] and is not stored among the
//! attributes, so that a replay with another trace is still a replay.

use base64::Engine;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::{Builder, Uuid};

use crate::api::ApiError;
use crate::api::head::media_essence;
use crate::api::ingest::{self, Limits, Parsed};
use crate::store::{BASE64_MARKER, NewEvent};
use crate::trace::{TraceContext, parse_traceparent, parse_tracestate};

/// Longest string value of an attribute other than `type` and
/// `partitionkey`, in characters.
pub const MAX_ATTRIBUTE_CHARS: usize = 2048;

/// How `data_base64` is read: the standard alphabet, padding or not, and
/// unused bits at the end ignored, as lenient decoders (and the SDKs)
/// read it; what ingestd writes is always canonical.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A request's CloudEvents mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One event as a JSON object, `application/cloudevents+json`.
    Structured,
    /// A JSON array of events, `application/cloudevents-batch+json`.
    Batched,
    /// Attributes in `ce-*` headers; the body is the data.
    Binary,
}

/// The mode of a request with this `Content-Type` and, or without, a
/// `ce-specversion` header; `None` for a plain ingest. An event format
/// other than JSON is refused (`415`).
pub fn mode(content_type: Option<&str>, has_specversion: bool) -> Result<Option<Mode>, ApiError> {
    let essence = content_type.map(media_essence).unwrap_or_default();
    if let Some(format) = essence.strip_prefix("application/cloudevents-batch") {
        return match format {
            "+json" => Ok(Some(Mode::Batched)),
            _ => Err(ApiError::UnsupportedEventFormat(essence.clone())),
        };
    }
    if let Some(format) = essence.strip_prefix("application/cloudevents") {
        return match format {
            "+json" => Ok(Some(Mode::Structured)),
            _ => Err(ApiError::UnsupportedEventFormat(essence.clone())),
        };
    }
    Ok(has_specversion.then_some(Mode::Binary))
}

/// The ingestd id of the event with this `source` and `id`: a version 8
/// UUID made of the SHA-256 of both, so the same pair always maps to the
/// same event and different pairs, in practice, never do.
pub fn event_id(source: &str, id: &str) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(b"cloudevents\0");
    hash.update((source.len() as u64).to_be_bytes());
    hash.update(source.as_bytes());
    hash.update(id.as_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Builder::from_custom_bytes(bytes).into_uuid()
}

/// A structured-mode body: one event.
pub fn parse_structured(
    body: &[u8],
    trace: &TraceContext,
    limits: &Limits,
) -> Result<Parsed, ApiError> {
    match ingest::parse_value(body, limits)? {
        Value::Object(object) => Ok(Parsed {
            events: vec![structured_event(object, trace, limits)?],
            batch: false,
        }),
        _ => Err(ApiError::InvalidBody(
            "a structured CloudEvent must be a JSON object".into(),
        )),
    }
}

/// A batched-mode body: a JSON array of events, all or nothing. An error
/// names the item.
pub fn parse_batched(
    body: &[u8],
    trace: &TraceContext,
    limits: &Limits,
) -> Result<Parsed, ApiError> {
    let Value::Array(items) = ingest::parse_value(body, limits)? else {
        return Err(ApiError::InvalidBody(
            "a batch of CloudEvents must be a JSON array".into(),
        ));
    };
    // The same source and id twice: a copy is a duplicate of the earlier
    // item (stored once), other content a conflict.
    let mut seen = std::collections::HashMap::new();
    let not_object = "each item must be a CloudEvent as a JSON object";
    let events = ingest::parse_items(items, limits, not_object, |index, object, earlier| {
        let event = structured_event(object, trace, limits)
            .map_err(|e| ApiError::InvalidItem(index, Box::new(e)))?;
        match seen.get(&event.id) {
            Some(&first) if !same_content(&earlier[first], &event) => {
                Err(ApiError::IdConflict(Some(index), event.id))
            }
            Some(_) => Ok(event),
            None => {
                seen.insert(event.id, index);
                Ok(event)
            }
        }
    })?;
    Ok(Parsed {
        events,
        batch: true,
    })
}

/// A binary-mode request: `headers` are its `ce-*` headers (names without
/// the prefix, lower case; values as sent), `content_type` its
/// `Content-Type` (the event's `datacontenttype`), `body` the data.
pub fn parse_binary(
    headers: &[(String, &str)],
    content_type: Option<&str>,
    body: &[u8],
    trace: &TraceContext,
    limits: &Limits,
) -> Result<Parsed, ApiError> {
    let mut attributes = Map::new();
    for (name, value) in headers {
        let value = percent_decode(value).ok_or_else(|| {
            ApiError::InvalidBody(format!(
                "the ce-{name} header is not valid percent-encoded UTF-8"
            ))
        })?;
        if attributes
            .insert(name.clone(), Value::String(value))
            .is_some()
        {
            return Err(ApiError::InvalidBody(format!(
                "the ce-{name} header appears twice"
            )));
        }
    }
    if let Some(ct) = content_type {
        attributes.insert("datacontenttype".into(), Value::String(ct.to_string()));
    }
    let data = if body.is_empty() {
        Data::None
    } else if content_type.is_none_or(is_json_content_type) {
        Data::Json(ingest::parse_value(body, limits)?)
    } else {
        // Refused before encoding: base64 takes 4 bytes for every 3.
        if body.len().div_ceil(3) * 4 > limits.max_payload_bytes {
            return Err(ApiError::PayloadTooLarge(limits.max_payload_bytes));
        }
        Data::Base64(STANDARD.encode(body))
    };
    Ok(Parsed {
        events: vec![new_event(attributes, data, trace, limits)?],
        batch: false,
    })
}

/// True when two events with the same id hold the same content (what
/// deduplication compares: data, type, key and attributes, not the trace).
fn same_content(a: &NewEvent, b: &NewEvent) -> bool {
    a.payload == b.payload
        && a.event_type == b.event_type
        && a.key == b.key
        && a.attributes == b.attributes
}

/// True for a `datacontenttype` whose data is JSON: `application/json`,
/// `text/json` or any `+json` type.
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = media_essence(content_type);
    essence.ends_with("/json") || essence.ends_with("+json")
}

/// An event's data as received.
enum Data {
    None,
    Json(Value),
    Base64(String),
}

/// One event of the JSON format: its members are the attributes, but
/// `data` or `data_base64` (never both).
fn structured_event(
    mut object: Map<String, Value>,
    trace: &TraceContext,
    limits: &Limits,
) -> Result<NewEvent, ApiError> {
    let data = object.remove("data");
    let base64 = object.remove("data_base64");
    let data = match (data, base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidBody(
                "an event has \"data\" or \"data_base64\", never both".into(),
            ));
        }
        (Some(data), None) => Data::Json(data),
        (None, Some(Value::String(text))) => {
            // Kept canonical (padded, no unused bits), whatever was sent,
            // so that strict decoders downstream read it.
            let text: String = text.split_ascii_whitespace().collect();
            match LENIENT.decode(&text) {
                Ok(bytes) => Data::Base64(STANDARD.encode(bytes)),
                Err(_) => {
                    return Err(ApiError::InvalidBody(
                        "\"data_base64\" is not valid base64".into(),
                    ));
                }
            }
        }
        (None, Some(_)) => {
            return Err(ApiError::InvalidBody(
                "\"data_base64\" must be a string".into(),
            ));
        }
        (None, None) => Data::None,
    };
    new_event(object, data, trace, limits)
}

/// Validates the attributes and builds the event.
fn new_event(
    mut attributes: Map<String, Value>,
    data: Data,
    trace: &TraceContext,
    limits: &Limits,
) -> Result<NewEvent, ApiError> {
    // A null attribute is an absent one.
    attributes.retain(|_, v| !v.is_null());
    for (name, value) in &attributes {
        check_attribute(name, value)?;
    }
    match attributes.get("specversion") {
        Some(Value::String(v)) if v == "1.0" => {}
        Some(other) => {
            return Err(ApiError::InvalidBody(format!(
                "specversion {other} is not supported; it must be \"1.0\""
            )));
        }
        None => return Err(ApiError::InvalidBody("specversion is missing".into())),
    }
    let required = |name: &str| match attributes.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(ApiError::InvalidBody(format!(
            "{name} must be a non-empty string"
        ))),
        None => Err(ApiError::InvalidBody(format!("{name} is missing"))),
    };
    let (id, source, event_type) = (required("id")?, required("source")?, required("type")?);
    if event_type.chars().count() > ingest::MAX_NAME_CHARS
        || event_type.chars().any(char::is_control)
    {
        return Err(ApiError::InvalidBody(format!(
            "type must be 1 to {} characters without control characters",
            ingest::MAX_NAME_CHARS
        )));
    }
    for name in ["datacontenttype", "dataschema", "subject", "time"] {
        match attributes.get(name) {
            None => {}
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(_) => {
                return Err(ApiError::InvalidBody(format!(
                    "{name} must be a non-empty string"
                )));
            }
        }
    }
    if let Some(Value::String(time)) = attributes.get("time")
        && !is_rfc3339(time)
    {
        return Err(ApiError::InvalidBody(format!(
            "time {time:?} is not an RFC 3339 timestamp"
        )));
    }
    let key = match attributes.get("partitionkey") {
        None => None,
        Some(Value::String(k))
            if !k.is_empty()
                && k.chars().count() <= ingest::MAX_NAME_CHARS
                && !k.chars().any(char::is_control) =>
        {
            Some(k.clone())
        }
        Some(_) => {
            return Err(ApiError::InvalidBody(format!(
                "partitionkey must be 1 to {} characters without control characters",
                ingest::MAX_NAME_CHARS
            )));
        }
    };
    let caller = |name: &str| match attributes.get(name) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    // The event's own trace context when it has a valid one, else the
    // request's.
    let trace = match caller("traceparent").as_deref().and_then(parse_traceparent) {
        Some(traceparent) => TraceContext {
            traceparent,
            tracestate: caller("tracestate").as_deref().and_then(parse_tracestate),
        },
        None => trace.clone(),
    };
    attributes.remove("traceparent");
    attributes.remove("tracestate");
    let payload = match data {
        Data::None => Value::Null,
        Data::Json(value) => {
            ingest::check_payload(&value, limits)?;
            value
        }
        Data::Base64(text) => {
            if text.len() > limits.max_payload_bytes {
                return Err(ApiError::PayloadTooLarge(limits.max_payload_bytes));
            }
            attributes.insert(BASE64_MARKER.into(), Value::Bool(true));
            Value::String(text)
        }
    };
    Ok(NewEvent {
        id: event_id(&source, &id),
        payload,
        event_type: Some(event_type),
        key,
        client_id: true,
        attributes: Some(attributes),
        trace: Some(trace),
    })
}

/// An attribute name of 1 to 20 lower-case letters and digits, and a value
/// of the JSON format's types: a string (at most
/// [`MAX_ATTRIBUTE_CHARS`], no U+0000), a boolean or a 32-bit integer.
fn check_attribute(name: &str, value: &Value) -> Result<(), ApiError> {
    let valid_name = (1..=20).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !valid_name {
        return Err(ApiError::InvalidBody(format!(
            "attribute name {name:?} is not 1 to 20 lower-case letters and digits"
        )));
    }
    // `data` is the event's data, never an attribute (a binary-mode
    // `ce-data` header would otherwise publish a second `data`).
    if name == "data" {
        return Err(ApiError::InvalidBody(
            "\"data\" is a reserved name, not an attribute".into(),
        ));
    }
    // CloudEvents strings hold no control characters (U+0000 to U+001F,
    // U+007F to U+009F).
    let valid_value = match value {
        Value::String(s) => {
            s.chars().count() <= MAX_ATTRIBUTE_CHARS && !s.chars().any(char::is_control)
        }
        Value::Bool(_) => true,
        Value::Number(n) => crate::message::integer_attribute(n).is_some(),
        _ => false,
    };
    if valid_value {
        Ok(())
    } else {
        Err(ApiError::InvalidBody(format!(
            "attribute {name} must be a string of at most {MAX_ATTRIBUTE_CHARS} characters \
             without control characters, a boolean or a 32-bit integer"
        )))
    }
}

/// Percent-decodes a header value once; `None` when an escape is broken or
/// the result is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// An RFC 3339 `date-time`: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`,
/// `T` and `Z` in either case, fields in range.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
            .then(|| s[r].parse::<u32>().unwrap_or(u32::MAX))
    };
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        digits(0..4),
        digits(5..7),
        digits(8..10),
        digits(11..13),
        digits(14..16),
        digits(17..19),
    ) else {
        return false;
    };
    let separators = b.get(4) == Some(&b'-')
        && b.get(7) == Some(&b'-')
        && matches!(b.get(10), Some(b'T' | b't'))
        && b.get(13) == Some(&b':')
        && b.get(16) == Some(&b':');
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let in_range = (1..=12).contains(&month)
        && (1..=days).contains(&day)
        && hour <= 23
        && minute <= 59
        && second <= 60;
    let mut rest = &s[19.min(s.len())..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &fraction[n..];
    }
    let offset = match rest {
        "Z" | "z" => true,
        _ => {
            let o = rest.as_bytes();
            o.len() == 6
                && matches!(o[0], b'+' | b'-')
                && o[3] == b':'
                && [1, 2, 4, 5].iter().all(|&i| o[i].is_ascii_digit())
                && rest[1..3].parse::<u32>().is_ok_and(|h| h <= 23)
                && rest[4..6].parse::<u32>().is_ok_and(|m| m <= 59)
        }
    };
    separators && in_range && offset
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::api::ingest::tests::LIMITS;

    fn trace() -> TraceContext {
        TraceContext::start()
    }

    fn structured(body: &str) -> Result<NewEvent, ApiError> {
        parse_structured(body.as_bytes(), &trace(), &LIMITS).map(|p| p.events[0].clone())
    }

    #[test]
    fn modes_follow_the_content_type() {
        let cases = [
            (
                Some("application/cloudevents+json"),
                false,
                Ok(Some(Mode::Structured)),
            ),
            (
                Some("Application/CloudEvents+JSON; charset=utf-8"),
                true,
                Ok(Some(Mode::Structured)),
            ),
            (
                Some("application/cloudevents-batch+json"),
                false,
                Ok(Some(Mode::Batched)),
            ),
            (Some("application/json"), true, Ok(Some(Mode::Binary))),
            (Some("text/plain"), true, Ok(Some(Mode::Binary))),
            (None, true, Ok(Some(Mode::Binary))),
            (Some("application/json"), false, Ok(None)),
        ];
        for (ct, spec, want) in cases {
            assert_eq!(mode(ct, spec), want, "{ct:?} {spec}");
        }
        for ct in [
            "application/cloudevents+avro",
            "application/cloudevents-batch+xml",
        ] {
            assert!(matches!(
                mode(Some(ct), false),
                Err(ApiError::UnsupportedEventFormat(_))
            ));
        }
    }

    #[test]
    fn a_structured_event_keeps_its_attributes() {
        let e = structured(
            r#"{"specversion":"1.0","id":"A-1","source":"/s","type":"t.x","subject":"sub",
                "time":"2026-01-31T12:00:00.5+01:00","partitionkey":"k","myext":7,"flag":true,
                "data":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(e.id, event_id("/s", "A-1"));
        assert!(e.client_id);
        assert_eq!(e.payload, serde_json::json!({"a": 1}));
        assert_eq!(e.event_type.as_deref(), Some("t.x"));
        assert_eq!(e.key.as_deref(), Some("k"));
        let attributes = e.attributes.unwrap();
        assert_eq!(attributes["subject"], "sub");
        assert_eq!(attributes["myext"], 7);
        assert_eq!(attributes["flag"], true);
        assert!(!attributes.contains_key("data"));
        // An integer may be written with a zero fraction.
        let e = structured(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","n":7.0}"#);
        assert!(e.is_ok(), "{e:?}");
        // No data is a null payload.
        let e = structured(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t"}"#).unwrap();
        assert_eq!(e.payload, Value::Null);
    }

    #[test]
    fn base64_data_is_kept_as_text_and_marked() {
        let e = structured(
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t",
                "datacontenttype":"application/octet-stream","data_base64":"AAE="}"#,
        )
        .unwrap();
        assert_eq!(e.payload, Value::String("AAE=".into()));
        assert_eq!(e.attributes.unwrap()[BASE64_MARKER], true);
        // Unused trailing bits and missing padding are read leniently.
        // ...and stored canonical.
        for (text, stored) in [("0wKB3w==", "0wKB3w=="), ("AB==", "AA=="), ("AAE", "AAE=")] {
            let body = format!(
                r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"{text}"}}"#
            );
            assert_eq!(
                structured(&body).unwrap().payload,
                Value::String(stored.into()),
                "{text}"
            );
        }
    }

    #[test]
    fn invalid_events_are_refused_with_a_reason() {
        let cases = [
            (
                r#"{"id":"1","source":"/s","type":"t"}"#,
                "specversion is missing",
            ),
            (
                r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
                "not supported",
            ),
            (
                r#"{"specversion":"1.0","source":"/s","type":"t"}"#,
                "id is missing",
            ),
            (
                r#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#,
                "id must be",
            ),
            (
                r#"{"specversion":"1.0","id":"1","type":"t"}"#,
                "source is missing",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s"}"#,
                "type is missing",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Bad":1}"#,
                "attribute name",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","abcdefghijklmnopqrstu":1}"#,
                "attribute name",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","x":{"a":1}}"#,
                "attribute x",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","x":1.5}"#,
                "attribute x",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","x":2147483648}"#,
                "attribute x",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}"#,
                "never both",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"!!"}"#,
                "not valid base64",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"}"#,
                "RFC 3339",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":""}"#,
                "subject must be",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","x":"a\nb"}"#,
                "control characters",
            ),
        ];
        for (body, reason) in cases {
            match structured(body) {
                Err(ApiError::InvalidBody(d)) => assert!(d.contains(reason), "{body}: {d}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(structured("[]"), Err(ApiError::InvalidBody(_))));
        assert!(matches!(structured("{"), Err(ApiError::InvalidJson(_))));
        let big = format!(
            r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","data":"{}"}}"#,
            "x".repeat(70)
        );
        assert_eq!(structured(&big), Err(ApiError::PayloadTooLarge(64)));
    }

    #[test]
    fn batches_are_checked_item_by_item() {
        let item =
            |id: &str| format!(r#"{{"specversion":"1.0","id":"{id}","source":"/s","type":"t"}}"#);
        let body = format!("[{},{}]", item("1"), item("2"));
        let parsed = parse_batched(body.as_bytes(), &trace(), &LIMITS).unwrap();
        assert!(parsed.batch);
        assert_eq!(parsed.events.len(), 2);
        // A copy is kept (stored once, answered as a duplicate); other
        // content under the same source and id is a conflict.
        let twice = format!("[{},{}]", item("1"), item("1"));
        let parsed = parse_batched(twice.as_bytes(), &trace(), &LIMITS).unwrap();
        assert_eq!(parsed.events[0].id, parsed.events[1].id);
        let other = r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":2}"#;
        let clash = format!("[{},{other}]", item("1"));
        assert_eq!(
            parse_batched(clash.as_bytes(), &trace(), &LIMITS),
            Err(ApiError::IdConflict(Some(1), event_id("/s", "1")))
        );
        let bad = format!("[{},{{}}]", item("1"));
        assert!(matches!(
            parse_batched(bad.as_bytes(), &trace(), &LIMITS),
            Err(ApiError::InvalidItem(1, _))
        ));
        let many = format!("[{},{},{},{}]", item("1"), item("2"), item("3"), item("4"));
        assert_eq!(
            parse_batched(many.as_bytes(), &trace(), &LIMITS),
            Err(ApiError::BatchTooLarge(3))
        );
    }

    #[test]
    fn binary_mode_reads_headers_and_body() {
        let headers = [
            ("specversion".to_string(), "1.0"),
            ("id".to_string(), "b-1"),
            ("source".to_string(), "%2Fsrc%20x"),
            ("type".to_string(), "t"),
        ];
        let parsed = parse_binary(&headers, None, br#"{"a":1}"#, &trace(), &LIMITS).unwrap();
        let e = &parsed.events[0];
        assert_eq!(e.id, event_id("/src x", "b-1"));
        assert_eq!(e.payload, serde_json::json!({"a": 1}));
        let parsed =
            parse_binary(&headers, Some("text/plain"), b"hi\0", &trace(), &LIMITS).unwrap();
        let e = &parsed.events[0];
        assert_eq!(e.payload, Value::String("aGkA".into()));
        let attributes = e.attributes.as_ref().unwrap();
        assert_eq!(attributes["datacontenttype"], "text/plain");
        assert_eq!(attributes[BASE64_MARKER], true);
        for bad in [("data", "spoof"), ("id", "%+f"), ("id", "a%0Ab")] {
            let mut with = headers.to_vec();
            with.retain(|(n, _)| n != bad.0);
            with.push((bad.0.to_string(), bad.1));
            assert!(
                matches!(
                    parse_binary(&with, None, b"", &trace(), &LIMITS),
                    Err(ApiError::InvalidBody(_))
                ),
                "{bad:?}"
            );
        }
        let mut broken = headers.to_vec();
        broken[1].1 = "%ff";
        assert!(matches!(
            parse_binary(&broken, None, b"", &trace(), &LIMITS),
            Err(ApiError::InvalidBody(_))
        ));
        assert!(matches!(
            parse_binary(
                &headers,
                Some("application/json"),
                b"nope",
                &trace(),
                &LIMITS
            ),
            Err(ApiError::InvalidJson(_))
        ));
    }

    #[test]
    fn the_event_trace_wins_over_the_request_trace() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let body = format!(
            r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","traceparent":"{parent}","tracestate":"a=1"}}"#
        );
        let e = structured(&body).unwrap();
        let kept = e.trace.unwrap();
        assert_eq!(
            (kept.traceparent.as_str(), kept.tracestate.as_deref()),
            (parent, Some("a=1"))
        );
        assert!(!e.attributes.unwrap().contains_key("traceparent"));
        // An invalid one gives way to the request's.
        let request = trace();
        let body =
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","traceparent":"nope"}"#;
        let e = parse_structured(body.as_bytes(), &request, &LIMITS)
            .unwrap()
            .events[0]
            .clone();
        assert_eq!(e.trace, Some(request));
    }

    #[test]
    fn ids_depend_on_source_and_id() {
        assert_eq!(event_id("/a", "1"), event_id("/a", "1"));
        assert_ne!(event_id("/a", "1"), event_id("/a", "2"));
        assert_ne!(event_id("/a1", ""), event_id("/a", "1"));
        assert_eq!(event_id("/a", "1").get_version_num(), 8);
    }

    #[test]
    fn timestamps() {
        for ok in [
            "2026-01-31T12:00:00Z",
            "2026-01-31t12:00:00.123456z",
            "2026-01-31T12:00:00+05:30",
            "2016-12-31T23:59:60Z",
            "2024-02-29T00:00:00Z",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "",
            "2026-01-31",
            "2026-13-01T00:00:00Z",
            "2026-01-31T12:00:00",
            "2026-01-31T12:00:00.Z",
            "2026-01-31T25:00:00Z",
            "2026-01-31T12:00:00+0530",
            "2026-01-31 12:00:00Z",
            "2026-02-29T12:00:00Z",
            "2026-04-31T12:00:00Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }
}
