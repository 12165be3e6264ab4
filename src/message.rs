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
use serde_json::Value;
use uuid::Uuid;

use crate::store::OutboxRow;

/// AMQP `type` property of event messages.
pub const EVENT_MESSAGE_TYPE: &str = "ingestd.event";
/// Header carrying the number of the attempt a retried message is for.
pub const ATTEMPT_HEADER: &str = "x-ingestd-attempt";

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Message {
    /// Becomes the AMQP `message_id`: the event id.
    pub id: String,
    /// JSON body.
    pub body: Vec<u8>,
    /// Seconds since the epoch, the AMQP `timestamp`.
    pub timestamp: u64,
    /// For a retry: the number of the attempt it is for.
    pub attempt: Option<i32>,
}

impl Message {
    /// The message for a claimed outbox row; `now` stands in for a
    /// timestamp the row cannot give.
    pub fn for_event(row: &OutboxRow, now: u64) -> Message {
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
        body.push(b'}');
        Message {
            id: row.event_id.to_string(),
            body,
            timestamp: u64::try_from(row.created_epoch).unwrap_or(now),
            attempt: None,
        }
    }

    /// A copy of a delivered message (its id, body and timestamp) for
    /// attempt number `attempt`.
    pub fn retry(properties: &AmqpProperties, body: &[u8], attempt: i32) -> Message {
        Message {
            id: properties.message_id().clone().unwrap_or_default(),
            body: body.to_vec(),
            timestamp: properties.timestamp().unwrap_or(0),
            attempt: Some(attempt),
        }
    }

    /// The AMQP properties it is published with: persistent JSON with the
    /// event id as `message_id`, and the attempt header on a retry.
    pub fn properties(&self) -> AmqpProperties {
        let properties = AmqpProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(self.id.clone())
            .with_type_(EVENT_MESSAGE_TYPE.into())
            .with_timestamp(self.timestamp);
        match self.attempt {
            Some(attempt) => {
                let mut headers = FieldTable::new();
                headers.insert(ATTEMPT_HEADER.into(), AmqpValue::LongInt(attempt));
                properties.with_headers(headers)
            }
            None => properties,
        }
    }
}

/// The attempt number of a delivery, from the header set when a retry was
/// scheduled; a first delivery has none.
pub fn attempt(properties: &AmqpProperties) -> Option<i32> {
    match properties.headers().as_ref()?.get(ATTEMPT_HEADER)? {
        AmqpValue::LongInt(n) => Some(*n),
        _ => None,
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
        };
        let message = Message::for_event(&row, 0);
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
        assert_eq!(message.timestamp, 1_769_860_800);
        assert_eq!(
            message.properties().message_id().as_deref(),
            Some(&*message.id)
        );
        assert_eq!(attempt(&message.properties()), None);
    }

    #[test]
    fn a_retry_keeps_the_message_and_carries_its_attempt() {
        let original = AmqpProperties::default()
            .with_message_id("abc".into())
            .with_timestamp(5);
        let copy = Message::retry(&original, b"{}", 3);
        assert_eq!((copy.id.as_str(), copy.timestamp), ("abc", 5));
        assert_eq!(attempt(&copy.properties()), Some(3));
        assert_eq!(copy.properties().delivery_mode(), &Some(2));
    }
}
