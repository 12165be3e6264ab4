//! Ingest request bodies: parsing and validation, before anything touches
//! the database.
//!
//! A body is one event object or an array of them (a batch, all or
//! nothing). An event is `{"payload": <any JSON but null>}` with optional
//! `type` and `key` strings and an optional client-chosen `id` (a UUID,
//! which makes the event idempotent). Every limit has its own error, and an
//! error inside a batch names the item's index. Nothing here allocates in
//! proportion to anything but the body, which the caller has already bounded.
//!
//! Numbers are kept as sent: serde_json holds each one as its text (its
//! `arbitrary_precision` feature), and PostgreSQL stores it as an exact
//! `numeric`, which it writes back in plain decimal (`1e3` as `1000`). A
//! number it cannot hold is refused here, and a payload's size counts each
//! number at the longer of its forms, as sent and as stored, so that a
//! short exponent cannot make a large row.

use std::collections::HashSet;
use std::io;

use serde_json::{Map, Number, Value};
use uuid::Uuid;

use crate::api::ApiError;
use crate::store::NewEvent;

/// Longest `Idempotency-Key`, in bytes (it is ASCII).
pub const MAX_NAME_BYTES: usize = 255;

/// Longest `type` or `key`, in characters: the unit of JSON Schema's
/// `maxLength`, so that what the OpenAPI contract allows is accepted.
pub const MAX_NAME_CHARS: usize = 255;

/// Most digits PostgreSQL's `numeric` holds before the decimal point.
pub const MAX_INTEGER_DIGITS: usize = 131_072;

/// Most digits PostgreSQL's `numeric` holds after the decimal point.
pub const MAX_FRACTION_DIGITS: usize = 16_383;

/// Limits on what one body may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most events in one batch.
    pub max_batch: usize,
    /// Largest payload of one event, as compact JSON, each number counted
    /// as stored (see [`stored_number_len`]) when that is longer.
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
    match parse_value(body, limits)? {
        Value::Object(object) => Ok(Parsed {
            events: vec![parse_event(object, limits)?],
            batch: false,
        }),
        Value::Array(items) => {
            let mut client_ids = HashSet::new();
            let not_object = "each item must be a JSON object with a \"payload\" field";
            let events = parse_items(items, limits, not_object, |index, object, _| {
                let in_item = |e| ApiError::InvalidItem(index, Box::new(e));
                let event = parse_event(object, limits).map_err(in_item)?;
                if event.client_id && !client_ids.insert(event.id) {
                    return Err(in_item(ApiError::InvalidBody(format!(
                        "the id {} appears twice in the batch",
                        event.id
                    ))));
                }
                Ok(event)
            })?;
            Ok(Parsed {
                events,
                batch: true,
            })
        }
        _ => Err(ApiError::InvalidBody(
            "the body must be a JSON object with a \"payload\" field, or an array of them".into(),
        )),
    }
}

/// A body's JSON, after the scan checks of [`check_text`], so that a deep
/// body costs a scan, not a deep parse.
pub fn parse_value(body: &[u8], limits: &Limits) -> Result<Value, ApiError> {
    check_text(body, limits)?;
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))
}

/// The events of a batch, all or nothing: not empty, at most the limit,
/// every item an object (else `not_object`, naming it), which `event`
/// turns into an event given its index and the events before it; `event`
/// names the item in its own errors.
pub fn parse_items(
    items: Vec<Value>,
    limits: &Limits,
    not_object: &str,
    mut event: impl FnMut(usize, Map<String, Value>, &[NewEvent]) -> Result<NewEvent, ApiError>,
) -> Result<Vec<NewEvent>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::InvalidBody("the batch is empty".into()));
    }
    if items.len() > limits.max_batch {
        return Err(ApiError::BatchTooLarge(limits.max_batch));
    }
    let mut events = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let Value::Object(object) = item else {
            return Err(ApiError::InvalidItem(
                index,
                Box::new(ApiError::InvalidBody(not_object.into())),
            ));
        };
        let next = event(index, object, &events)?;
        events.push(next);
    }
    Ok(events)
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
    check_payload(&payload, limits)?;
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
        attributes: None,
        trace: None,
    })
}

/// The checks on a payload that PostgreSQL and the limits impose: no
/// U+0000 anywhere (jsonb cannot store it; refused here, it cannot fail the
/// group commit it would share), numbers it can store, and the size limit.
pub fn check_payload(payload: &Value, limits: &Limits) -> Result<(), ApiError> {
    if has_nul(payload) {
        return Err(ApiError::InvalidBody(
            "the payload contains U+0000, which cannot be stored".into(),
        ));
    }
    if payload_len(payload)? > limits.max_payload_bytes {
        return Err(ApiError::PayloadTooLarge(limits.max_payload_bytes));
    }
    Ok(())
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

/// The size of a payload as compact JSON, each number at the longer of its
/// length as serde_json writes it and as PostgreSQL writes it back, so that
/// the limit bounds both; or an error naming a number PostgreSQL cannot
/// store.
fn payload_len(payload: &Value) -> Result<usize, ApiError> {
    let (mut written, mut longest) = (0, 0);
    number_lens(payload, &mut written, &mut longest).map_err(|n| {
        let text = n.as_str();
        // The number itself may be long; its start is enough to find it.
        let shown = match text.char_indices().nth(40) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text.to_string(),
        };
        ApiError::InvalidBody(format!(
            "the payload holds the number {shown}, which cannot be stored: at most \
             {MAX_INTEGER_DIGITS} digits before the decimal point and {MAX_FRACTION_DIGITS} \
             after it"
        ))
    })?;
    Ok(compact_len(payload) - written + longest)
}

/// Adds up the lengths of the numbers in `value` as serde_json writes them,
/// and the longer of that and their length as PostgreSQL stores them;
/// stops at one it cannot store.
fn number_lens<'v>(
    value: &'v Value,
    written: &mut usize,
    longest: &mut usize,
) -> Result<(), &'v Number> {
    match value {
        Value::Number(n) => {
            let text = n.as_str();
            *written += text.len();
            *longest += stored_number_len(text).ok_or(n)?.max(text.len());
        }
        Value::Array(items) => {
            for item in items {
                number_lens(item, written, longest)?;
            }
        }
        Value::Object(map) => {
            for item in map.values() {
                number_lens(item, written, longest)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The length of the JSON number `text` as PostgreSQL stores it in `jsonb`
/// and writes it back: as an exact `numeric`, in plain decimal with the
/// digits after the point that the text implies (`1e3` is `1000`, `1.50e1`
/// is `15.0`, `-0.00` is `0.00`). `None` when `numeric` cannot hold it
/// (more than [`MAX_INTEGER_DIGITS`] digits before the point or
/// [`MAX_FRACTION_DIGITS`] after) or `text` is not a JSON number.
pub fn stored_number_len(text: &str) -> Option<usize> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], exponent(&rest[at + 1..])?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let well_formed = !int.is_empty()
        && digits(int)
        && (int == "0" || !int.starts_with('0'))
        && digits(frac)
        && !(mantissa.contains('.') && frac.is_empty());
    if !well_formed {
        return None;
    }
    let (int_len, frac_len) = (int.len() as i64, frac.len() as i64);
    // The exponent moves the point; digits after it are kept, zeros too.
    let scale = (frac_len - exponent).max(0);
    if scale > MAX_FRACTION_DIGITS as i64 {
        return None;
    }
    let fraction = if scale > 0 { 1 + scale } else { 0 };
    let leading_zeros = int
        .bytes()
        .chain(frac.bytes())
        .take_while(|&b| b == b'0')
        .count() as i64;
    if leading_zeros == int_len + frac_len {
        // Zero, written without a sign.
        return Some((1 + fraction) as usize);
    }
    let integer_digits = int_len + exponent - leading_zeros;
    if integer_digits > MAX_INTEGER_DIGITS as i64 {
        return None;
    }
    Some((i64::from(negative) + integer_digits.max(1) + fraction) as usize)
}

/// An exponent's value, `None` past what PostgreSQL accepts (half of
/// `i32::MAX`, beyond which every number but zero is out of range anyway).
fn exponent(text: &str) -> Option<i64> {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = digits.trim_start_matches('0');
    if digits.len() > 10 {
        return None;
    }
    let value: i64 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    if value >= i64::from(i32::MAX / 2) {
        return None;
    }
    Some(if negative { -value } else { value })
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

/// Follows JSON text byte by byte and tells which bytes lie outside its
/// strings, for scans that count structure without parsing.
#[derive(Debug, Default)]
pub struct Strings {
    inside: bool,
    escaped: bool,
}

impl Strings {
    /// True if `b` is outside every string; the quote that opens a string
    /// counts as outside, so the caller sees each string start once.
    pub fn outside(&mut self, b: u8) -> bool {
        if self.inside {
            match b {
                _ if self.escaped => self.escaped = false,
                b'\\' => self.escaped = true,
                b'"' => self.inside = false,
                _ => {}
            }
            return false;
        }
        self.inside = b == b'"';
        true
    }
}

/// True when arrays and objects in `body` nest deeper than `max`. Brackets
/// inside strings do not count; the text need not be valid JSON.
pub fn nesting_exceeds(body: &[u8], max: usize) -> bool {
    let (mut depth, mut strings) = (0usize, Strings::default());
    for &b in body {
        if !strings.outside(b) {
            continue;
        }
        match b {
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
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// Small limits, for the tests of every body parser.
    pub(crate) const LIMITS: Limits = Limits {
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
    fn numbers_are_kept_as_sent() {
        let e = one(r#"{"payload":[123456789012345678901234567890,1.00,-0.5e-3,7]}"#).unwrap();
        assert_eq!(
            e.payload.to_string(),
            "[123456789012345678901234567890,1.00,-0.5e-3,7]"
        );
        assert_eq!(
            one(r#"{"payload":1e40}"#).unwrap().payload.to_string(),
            "1e+40"
        );
        // Exponents count as written out: 1e63 is 64 digits, the limit.
        assert!(one(r#"{"payload":1e63}"#).is_ok());
        assert!(one(r#"{"payload":[1e61]}"#).is_ok());
        // And as sent when that is longer: 1e0 is kept as 1e+0, stored as 1.
        let sent_long = format!(r#"{{"payload":[{}1e0]}}"#, "1e0,".repeat(12));
        for over in [r#"{"payload":1e64}"#, r#"{"payload":[1e62]}"#, &sent_long] {
            assert_eq!(one(over), Err(ApiError::PayloadTooLarge(64)), "{over}");
        }
        let sent_short = format!(r#"{{"payload":[{}1e0]}}"#, "1e0,".repeat(11));
        assert!(one(&sent_short).is_ok());
        match one(r#"{"payload":{"a":[1e131072]}}"#) {
            Err(ApiError::InvalidBody(d)) => assert!(d.contains("1e+131072"), "{d}"),
            other => panic!("{other:?}"),
        }
        let long = format!(r#"{{"payload":0.{}1}}"#, "0".repeat(16_383));
        match one(&long) {
            Err(ApiError::InvalidBody(d)) => assert!(d.contains("0.000") && d.contains('…'), "{d}"),
            other => panic!("{other:?}"),
        }
        match parse(br#"[{"payload":1},{"payload":-1e-99999}]"#, &LIMITS) {
            Err(ApiError::InvalidItem(1, inner)) => {
                assert!(matches!(*inner, ApiError::InvalidBody(_)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn numbers_are_measured_as_stored() {
        let cases: &[(&str, Option<usize>)] = &[
            ("0", Some(1)),
            ("-0", Some(1)),
            ("-0.00", Some(4)),
            ("7", Some(1)),
            ("-12", Some(3)),
            ("1.00", Some(4)),
            ("1e3", Some(4)),
            ("1E+3", Some(4)),
            ("1e+0005", Some(6)),
            ("1.50e1", Some(4)),
            ("10e-1", Some(3)),
            ("123.456e-1", Some(7)),
            ("0.001", Some(5)),
            ("-0.001", Some(6)),
            ("0.0e5", Some(1)),
            ("5e-324", Some(326)),
            ("1e400", Some(401)),
            ("1e131071", Some(131_072)),
            ("0.1e131072", Some(131_072)),
            ("1e131072", None),
            ("1e-16383", Some(16_385)),
            ("-1e-16383", Some(16_386)),
            ("0e-16383", Some(16_385)),
            ("1e-16384", None),
            ("0e-16384", None),
            ("1.5e-16383", None),
            ("0e1073741822", Some(1)),
            ("0e1073741823", None),
            ("1e99999999999999999999", None),
            ("00", None),
            ("1.", None),
            (".5", None),
            ("1e", None),
            ("1e+", None),
            ("", None),
            ("-", None),
            ("x", None),
        ];
        for (text, len) in cases {
            assert_eq!(stored_number_len(text), *len, "{text}");
        }
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
