//! The message format, in one place: what the relay publishes for an event
//! (body and AMQP properties) and what the consumer reads back from a
//! delivery. Consumers other than ingestd's workers read the same message,
//! so a change here is a change of the published contract (README,
//! "Message format").
//!
//! The body is `{"id", "type", "key", "payload", "created_at"}` as JSON,
//! built here from the columns the store returns; the payload goes in as
//! PostgreSQL wrote it (`jsonb` text, numbers exact), never re-parsed.

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::store::{BASE64_MARKER, OutboxRow};

/// AMQP `type` property of event messages.
pub const EVENT_MESSAGE_TYPE: &str = "ingestd.event";
/// Header carrying the number of the attempt a retried message is for.
pub const ATTEMPT_HEADER: &str = "x-ingestd-attempt";
/// Prefix of the headers that carry CloudEvents attributes (the AMQP
/// binding's, which RabbitMQ maps to AMQP 1.0 application properties).
pub const CLOUDEVENTS_PREFIX: &str = "cloudEvents_";
/// Content type of a structured-mode CloudEvents body.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// What a message body is (`INGEST_MESSAGE_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// ingestd's own body, `{"id", "type", "key", "payload", "created_at"}`
    /// (and `"attributes"` for a CloudEvent).
    Ingestd,
    /// A structured-mode CloudEvent in the JSON event format.
    CloudEvents,
}

/// How the relay builds messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The body's format.
    pub format: Format,
    /// The CloudEvents `source` of events ingested without CloudEvents
    /// (`INGEST_CLOUDEVENTS_SOURCE`).
    pub source: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            format: Format::Ingestd,
            source: "/ingestd".into(),
        }
    }
}

/// One message to publish: its body and the AMQP properties it goes with,
/// built once, so that publishing only borrows them.
#[derive(Debug, Clone)]
pub struct Message {
    /// The body.
    pub body: Vec<u8>,
    properties: AmqpProperties,
}

impl Message {
    /// A bare JSON message: `body` under `id`, no timestamp and no headers
    /// (for tools and tests that publish by hand).
    pub fn json(id: impl Into<String>, body: Vec<u8>) -> Message {
        Message::new(id.into(), body, 0, "application/json", FieldTable::new())
    }

    /// The message for a claimed outbox row; `now` stands in for a
    /// timestamp the row cannot give.
    pub fn for_event(row: &OutboxRow, now: u64, settings: &Settings) -> Message {
        let stored: Option<Map<String, Value>> = row
            .attributes
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok());
        let attributes = cloudevent_attributes(row, stored.as_ref(), settings);
        let (body, content_type) = match settings.format {
            Format::Ingestd => (ingestd_body(row, stored.as_ref()), "application/json"),
            Format::CloudEvents => {
                let base64 = stored
                    .as_ref()
                    .is_some_and(|s| s.get(BASE64_MARKER) == Some(&Value::Bool(true)));
                (
                    structured_body(row, attributes.clone(), base64),
                    STRUCTURED_CONTENT_TYPE,
                )
            }
        };
        // The attributes move into the headers: no copy of their values.
        let mut headers = FieldTable::new();
        for (name, value) in attributes {
            if name == "datacontenttype" {
                continue;
            }
            if let Some(value) = amqp_value(value) {
                headers.insert(format!("{CLOUDEVENTS_PREFIX}{name}"), value);
            }
        }
        // The trace context once, under the names of the W3C draft for
        // AMQP, which the CloudEvents tracing extension defers to where a
        // protocol has its own; a second copy costs the broker per message.
        for (name, value) in [
            ("traceparent", &row.traceparent),
            ("tracestate", &row.tracestate),
        ] {
            if let Some(value) = value {
                headers.insert(name.into(), AmqpValue::LongString(value.clone()));
            }
        }
        let timestamp = u64::try_from(row.created_epoch).unwrap_or(now);
        Message::new(
            row.event_id.to_string(),
            body,
            timestamp,
            content_type,
            headers,
        )
    }

    /// A copy of a delivered message (its id, body, timestamp, content
    /// type and headers, so its attributes and trace) for attempt number
    /// `attempt`, which the attempt header carries.
    pub fn retry(properties: &AmqpProperties, body: &[u8], attempt: i32) -> Message {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(ATTEMPT_HEADER.into(), AmqpValue::LongInt(attempt));
        Message::new(
            properties.message_id().clone().unwrap_or_default(),
            body.to_vec(),
            properties.timestamp().unwrap_or(0),
            properties
                .content_type()
                .as_deref()
                .unwrap_or("application/json"),
            headers,
        )
    }

    /// Persistent, with the event id as `message_id`, and `headers`.
    fn new(
        id: String,
        body: Vec<u8>,
        timestamp: u64,
        content_type: &str,
        headers: FieldTable,
    ) -> Message {
        let properties = AmqpProperties::default()
            .with_delivery_mode(2)
            .with_content_type(content_type.into())
            .with_message_id(id)
            .with_type_(EVENT_MESSAGE_TYPE.into())
            .with_timestamp(timestamp)
            .with_headers(headers);
        Message { body, properties }
    }

    /// The AMQP `message_id`: the event id.
    pub fn id(&self) -> &str {
        self.properties.message_id().as_deref().unwrap_or_default()
    }

    /// The AMQP properties it is published with: persistent, with the event
    /// id as `message_id`, its headers, and the attempt header on a retry.
    pub fn properties(&self) -> &AmqpProperties {
        &self.properties
    }
}

/// An event's CloudEvents context attributes: a CloudEvent's own (the
/// `data_base64` marker apart), or for a plain event the ones derived from
/// ingestd's fields: `id` the event id, `source` the configured one,
/// `type` the event's or `ingestd.event`, `partitionkey` its key. `time` is
/// when ingestd accepted it unless the event says otherwise.
fn cloudevent_attributes(
    row: &OutboxRow,
    stored: Option<&Map<String, Value>>,
    settings: &Settings,
) -> Map<String, Value> {
    let mut attributes = match stored {
        Some(stored) => stored.clone(),
        None => {
            let mut derived = Map::new();
            derived.insert("specversion".into(), "1.0".into());
            derived.insert("id".into(), row.event_id.to_string().into());
            derived.insert("source".into(), settings.source.clone().into());
            let event_type = row.event_type.as_deref().unwrap_or(EVENT_MESSAGE_TYPE);
            derived.insert("type".into(), event_type.into());
            derived.insert("datacontenttype".into(), "application/json".into());
            if let Some(key) = &row.key {
                derived.insert("partitionkey".into(), key.clone().into());
            }
            derived
        }
    };
    attributes.remove(BASE64_MARKER);
    attributes
        .entry("time")
        .or_insert_with(|| row.created_at.clone().into());
    attributes
}

/// A CloudEvents attribute as an AMQP header value: strings as long
/// strings, booleans as booleans, integers as 32-bit integers.
fn amqp_value(value: Value) -> Option<AmqpValue> {
    match value {
        Value::String(s) => Some(AmqpValue::LongString(s)),
        Value::Bool(b) => Some(AmqpValue::Boolean(b)),
        Value::Number(n) => integer_attribute(&n).map(AmqpValue::LongInt),
        _ => None,
    }
}

/// A CloudEvents Integer: a JSON number of 32 bits with no fraction
/// (`7`, or `7.0` and `7e0`, which JSON Schema counts as integers too).
pub fn integer_attribute(n: &serde_json::Number) -> Option<i32> {
    if let Some(i) = n.as_i64() {
        return i32::try_from(i).ok();
    }
    let f = n.as_f64()?;
    let whole =
        f.is_finite() && f.fract() == 0.0 && f >= f64::from(i32::MIN) && f <= f64::from(i32::MAX);
    whole.then_some(f as i32)
}

/// ingestd's body: `{"id", "type", "key", "payload", "created_at"}`, and
/// a CloudEvent's stored `"attributes"`.
fn ingestd_body(row: &OutboxRow, stored: Option<&Map<String, Value>>) -> Vec<u8> {
    let mut body = Vec::with_capacity(row.payload.len() + 160);
    body.extend_from_slice(b"{\"id\":\"");
    body.extend_from_slice(
        row.event_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    body.extend_from_slice(b"\",\"type\":");
    write_json_string(&mut body, row.event_type.as_deref());
    body.extend_from_slice(b",\"key\":");
    write_json_string(&mut body, row.key.as_deref());
    body.extend_from_slice(b",\"payload\":");
    body.extend_from_slice(row.payload.as_bytes());
    body.extend_from_slice(b",\"created_at\":");
    write_json_string(&mut body, Some(&row.created_at));
    if let Some(stored) = stored {
        body.extend_from_slice(b",\"attributes\":");
        serde_json::to_writer(&mut body, stored).expect("a map serialises");
    }
    body.push(b'}');
    body
}

/// A structured-mode CloudEvent: the attributes, the trace context
/// extension, and the payload as `data` (or as `data_base64` when it holds
/// binary data). The payload goes in as PostgreSQL wrote it.
fn structured_body(row: &OutboxRow, mut attributes: Map<String, Value>, base64: bool) -> Vec<u8> {
    if let Some(traceparent) = &row.traceparent {
        attributes.insert("traceparent".into(), traceparent.clone().into());
    }
    if let Some(tracestate) = &row.tracestate {
        attributes.insert("tracestate".into(), tracestate.clone().into());
    }
    let mut body = serde_json::to_vec(&attributes).expect("a map serialises");
    body.pop();
    if row.payload != "null" {
        if !attributes.is_empty() {
            body.push(b',');
        }
        body.extend_from_slice(if base64 {
            b"\"data_base64\":"
        } else {
            b"\"data\":"
        });
        body.extend_from_slice(row.payload.as_bytes());
    }
    body.push(b'}');
    body
}

/// The attempt number of a delivery, from the header set when a retry was
/// scheduled; a first delivery has none.
pub fn attempt(properties: &AmqpProperties) -> Option<i32> {
    match properties.headers().as_ref()?.get(ATTEMPT_HEADER)? {
        AmqpValue::LongInt(n) => Some(*n),
        _ => None,
    }
}

/// The event id of a delivery: its `message_id`, which every message
/// ingestd publishes carries, whatever its body's format; for a message
/// published by something else without a UUID there, its body's `id`
/// ([`event_id`]), as earlier versions read it.
pub fn delivery_event_id(properties: &AmqpProperties, body: &[u8]) -> Result<Uuid, String> {
    match properties.message_id().as_deref().map(Uuid::try_parse) {
        Some(Ok(id)) => Ok(id),
        _ => event_id(body),
    }
}

/// The event id of a message body `{"id": "<uuid>", ...}`.
pub fn event_id(body: &[u8]) -> Result<Uuid, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .ok_or("body has no string \"id\"")?;
    Uuid::parse_str(id).map_err(|e| format!("id {id:?} is not a UUID: {e}"))
}

/// Appends `s` as a JSON string, or `null`.
fn write_json_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => serde_json::to_writer(&mut *out, s).expect("a string serialises"),
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_message_ids() {
        let id = Uuid::new_v4();
        let body = format!(r#"{{"id":"{id}","payload":1}}"#);
        assert_eq!(event_id(body.as_bytes()), Ok(id));
        assert!(event_id(b"not json").is_err());
        assert!(event_id(b"{}").is_err());
        assert!(event_id(br#"{"id":"nope"}"#).is_err());
        assert!(event_id(br#"{"id":7}"#).is_err());
        // A payload with numbers beyond f64 (as PostgreSQL writes 1e400)
        // does not make the message unreadable.
        let body = format!(r#"{{"id":"{id}","payload":[1{},1e-400]}}"#, "0".repeat(400));
        assert_eq!(event_id(body.as_bytes()), Ok(id));
    }

    #[test]
    fn the_body_is_built_as_json_and_read_back() {
        let row = OutboxRow {
            outbox_id: 7,
            event_id: Uuid::new_v4(),
            event_type: Some("order \"placed\"".into()),
            key: None,
            payload: r#"{"n": 1.00, "big": 123456789012345678901234567890}"#.into(),
            created_at: "2026-01-31T12:00:00.000001Z".into(),
            created_epoch: 1_769_860_800,
            refusals: 0,
            queued_epoch: 1_769_860_800.0,
            attributes: None,
            traceparent: Some(TRACEPARENT.into()),
            tracestate: None,
        };
        let message = Message::for_event(&row, 0, &Settings::default());
        let body: Value = serde_json::from_slice(&message.body).expect("JSON");
        assert_eq!(body["id"], row.event_id.to_string());
        assert_eq!(body["type"], "order \"placed\"");
        assert_eq!(body["key"], Value::Null);
        assert_eq!(body["created_at"], "2026-01-31T12:00:00.000001Z");
        // The payload's numbers stay as PostgreSQL wrote them.
        let text = String::from_utf8(message.body.clone()).unwrap();
        assert!(
            text.contains("\"payload\":{\"n\": 1.00, \"big\": 123456789012345678901234567890}")
        );
        assert_eq!(event_id(&message.body), Ok(row.event_id));
        assert_eq!(message.properties().timestamp(), &Some(1_769_860_800));
        assert_eq!(message.id(), row.event_id.to_string());
        assert_eq!(attempt(message.properties()), None);
    }

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn header<'a>(properties: &'a AmqpProperties, name: &str) -> Option<&'a AmqpValue> {
        properties.headers().as_ref()?.get(name)
    }

    fn text(value: Option<&AmqpValue>) -> Option<&str> {
        match value {
            Some(AmqpValue::LongString(s)) => Some(s),
            _ => None,
        }
    }

    fn cloudevent_row() -> OutboxRow {
        OutboxRow {
            outbox_id: 1,
            event_id: Uuid::new_v4(),
            event_type: Some("com.example.t".into()),
            key: None,
            payload: "\"AAE=\"".into(),
            created_at: "2026-01-31T12:00:00Z".into(),
            created_epoch: 1_769_860_800,
            refusals: 0,
            queued_epoch: 0.0,
            attributes: Some(
                r#"{"id": "A-1", "type": "com.example.t", "source": "/s", "specversion": "1.0",
                    "datacontenttype": "application/octet-stream", "data_base64": true,
                    "n": 7, "ok": true}"#
                    .into(),
            ),
            traceparent: Some(TRACEPARENT.into()),
            tracestate: Some("a=1".into()),
        }
    }

    #[test]
    fn plain_events_get_derived_cloudevents_headers() {
        let mut row = cloudevent_row();
        row.attributes = None;
        row.key = Some("k-1".into());
        let settings = Settings {
            format: Format::Ingestd,
            source: "/here".into(),
        };
        let properties = Message::for_event(&row, 0, &settings).properties().clone();
        let id = row.event_id.to_string();
        for (name, want) in [
            ("cloudEvents_specversion", "1.0"),
            ("cloudEvents_id", &*id),
            ("cloudEvents_source", "/here"),
            ("cloudEvents_type", "com.example.t"),
            ("cloudEvents_time", "2026-01-31T12:00:00Z"),
            ("cloudEvents_partitionkey", "k-1"),
            ("traceparent", TRACEPARENT),
        ] {
            assert_eq!(text(header(&properties, name)), Some(want), "{name}");
        }
        assert_eq!(
            properties.content_type().as_deref(),
            Some("application/json")
        );
        row.event_type = None;
        let properties = Message::for_event(&row, 0, &settings).properties().clone();
        assert_eq!(
            text(header(&properties, "cloudEvents_type")),
            Some(EVENT_MESSAGE_TYPE)
        );
    }

    #[test]
    fn a_cloudevent_keeps_its_attributes_on_the_broker() {
        let row = cloudevent_row();
        let message = Message::for_event(&row, 0, &Settings::default());
        let properties = message.properties();
        assert_eq!(text(header(properties, "cloudEvents_id")), Some("A-1"));
        assert_eq!(text(header(properties, "cloudEvents_source")), Some("/s"));
        assert_eq!(
            header(properties, "cloudEvents_n"),
            Some(&AmqpValue::LongInt(7))
        );
        assert_eq!(
            header(properties, "cloudEvents_ok"),
            Some(&AmqpValue::Boolean(true))
        );
        assert_eq!(header(properties, "cloudEvents_data_base64"), None);
        assert_eq!(text(header(properties, "tracestate")), Some("a=1"));
        let body: Value = serde_json::from_slice(&message.body).unwrap();
        assert_eq!(
            body["attributes"]["datacontenttype"],
            "application/octet-stream"
        );
        assert_eq!(body["payload"], "AAE=");
        // Its retry keeps them, and the trace.
        let copy = Message::retry(properties, &message.body, 2);
        let again = copy.properties();
        assert_eq!(text(header(again, "cloudEvents_id")), Some("A-1"));
        assert_eq!(text(header(again, "traceparent")), Some(TRACEPARENT));
        assert_eq!(attempt(again), Some(2));
    }

    #[test]
    fn the_cloudevents_format_is_a_structured_event() {
        let row = cloudevent_row();
        let settings = Settings {
            format: Format::CloudEvents,
            ..Settings::default()
        };
        let message = Message::for_event(&row, 0, &settings);
        let properties = message.properties();
        assert_eq!(
            properties.content_type().as_deref(),
            Some(STRUCTURED_CONTENT_TYPE)
        );
        assert_eq!(
            delivery_event_id(properties, &message.body),
            Ok(row.event_id)
        );
        let body: Value = serde_json::from_slice(&message.body).unwrap();
        assert_eq!(body["id"], "A-1");
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(body["data_base64"], "AAE=");
        assert_eq!(body["traceparent"], TRACEPARENT);
        assert_eq!(body["time"], "2026-01-31T12:00:00Z");
        assert!(body.get("data").is_none());
        let mut plain = cloudevent_row();
        plain.attributes = None;
        plain.payload = r#"{"n": 1.50}"#.into();
        let message = Message::for_event(&plain, 0, &settings);
        let text = String::from_utf8(message.body).unwrap();
        assert!(text.contains(r#""data":{"n": 1.50}"#), "{text}");
        assert!(text.contains(r#""source":"/ingestd""#), "{text}");
    }

    #[test]
    fn a_retry_keeps_the_message_and_carries_its_attempt() {
        let original = AmqpProperties::default()
            .with_message_id("abc".into())
            .with_timestamp(5);
        let copy = Message::retry(&original, b"{}", 3);
        assert_eq!(
            (copy.id(), copy.properties().timestamp()),
            ("abc", &Some(5))
        );
        assert_eq!(attempt(copy.properties()), Some(3));
        assert_eq!(copy.properties().delivery_mode(), &Some(2));
    }
}
