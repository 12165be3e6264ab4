//! The error contract: every error code, status and JSON body ingestd
//! answers with, its own and tiny_http's refusals alike.
//!
//! An [`ApiError`] is what any check of a request can fail with; [`error_response`]
//! is the one place it becomes a status, a `{"error", "detail"}` body and the
//! headers that go with it (`Allow`, `Retry-After`, `WWW-Authenticate`).
//! The HTTP server's own refusals (a malformed head, a timeout, too many
//! connections) reach the same function through [`refusal`], the hook the
//! server is built with, so no code or body is written anywhere else.

use std::io::Cursor;

use log::{error, warn};
use serde_json::json;
use tiny_http::{Refusal, Response};
use uuid::Uuid;

use crate::api::reply::{header, json_response};
use crate::api::{encoding, ingest};
use crate::store;

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

/// A response body: status, JSON and extra headers.
pub type HttpResponse = Response<Cursor<Vec<u8>>>;

/// Everything that can go wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The body is not valid JSON.
    InvalidJson(String),
    /// The JSON is valid but not the shape the route expects.
    InvalidBody(String),
    /// Item `.0` of a batch is refused for the reason `.1`.
    InvalidItem(usize, Box<ApiError>),
    /// Arrays and objects nest deeper than the limit (the value).
    TooDeep(usize),
    /// The `Idempotency-Key` header is empty, too long or not visible ASCII.
    InvalidIdempotencyKey,
    /// No valid API key was presented.
    Unauthorized,
    /// The path holds something that is not a UUID.
    InvalidId(String),
    /// No route has this path.
    NotFound,
    /// No event has this id.
    EventNotFound(Uuid),
    /// The request conflicts with the event's state.
    Conflict(String),
    /// The `Idempotency-Key` was used for a different body.
    IdempotencyConflict,
    /// A client id already used for different content; in a batch, the
    /// item's index.
    IdConflict(Option<usize>, Uuid),
    /// The path exists but not for this method; the value lists the allowed ones.
    MethodNotAllowed(&'static str),
    /// The body is larger than the limit (the value).
    BodyTooLarge(usize),
    /// A body sent to a route that takes none.
    BodyNotAllowed,
    /// An event's payload is larger than the limit (the value).
    PayloadTooLarge(usize),
    /// A batch holds more events than the limit (the value).
    BatchTooLarge(usize),
    /// The request's Content-Type is not JSON.
    UnsupportedMediaType(Option<String>),
    /// A CloudEvents event format other than JSON (the media type).
    UnsupportedEventFormat(String),
    /// The request's `Content-Encoding` (the value, every field joined)
    /// names a coding the API does not decode, or more than one.
    UnsupportedEncoding(String),
    /// The body is not valid in the coding its `Content-Encoding` names;
    /// the value says why.
    InvalidEncoding(String),
    /// The body decodes to more than the limit (the value).
    DecodedTooLarge(usize),
    /// The client is over its rate limit; it may try again after this many
    /// seconds.
    RateLimited(u64),
    /// The database is unreachable or overloaded.
    Unavailable,
    /// Too many events are waiting to be written.
    Busy,
    /// The memory budget for requests held (`INGEST_HTTP_BUFFER_BYTES`) is
    /// spent for now.
    MemoryBusy,
    /// Parsing the body would take more memory (the value, in bytes) than
    /// the whole budget for requests held (`.1`).
    TooManyValues(usize, usize),
    /// A bug: logged in full, answered without detail.
    Internal,
    /// The HTTP server refused the request or the connection itself, before
    /// any handler saw it.
    Server(Refusal),
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> ApiError {
        if e.is_unavailable() {
            warn!("database unavailable: {e}");
            ApiError::Unavailable
        } else {
            error!("database error: {e}");
            ApiError::Internal
        }
    }
}

/// The one place an error becomes a status code and a JSON body.
pub fn error_response(err: &ApiError) -> HttpResponse {
    let (status, code, detail) = describe(err);
    let mut body = json!({ "error": code, "detail": detail });
    let index = match err {
        ApiError::InvalidItem(index, _) | ApiError::IdConflict(Some(index), _) => Some(*index),
        _ => None,
    };
    if let Some(index) = index {
        body["index"] = index.into();
    }
    let mut response = json_response(status, &body);
    match err {
        ApiError::MethodNotAllowed(allow) => response.add_header(header("Allow", allow)),
        ApiError::Unavailable
        | ApiError::Busy
        | ApiError::MemoryBusy
        | ApiError::Server(
            Refusal::Busy(_) | Refusal::TooManyConnections(_) | Refusal::ShuttingDown,
        ) => response.add_header(header("Retry-After", &RETRY_AFTER_SECS.to_string())),
        ApiError::Unauthorized => {
            response.add_header(header("WWW-Authenticate", "Bearer realm=\"ingestd\""))
        }
        ApiError::RateLimited(secs) => {
            response.add_header(header("Retry-After", &secs.to_string()))
        }
        ApiError::UnsupportedEncoding(_) => {
            response.add_header(header("Accept-Encoding", encoding::ACCEPTED))
        }
        _ => {}
    }
    response
}

/// An error's status, code and detail sentence.
fn describe(err: &ApiError) -> (u16, &'static str, String) {
    match err {
        ApiError::InvalidJson(d) => (400, "invalid_json", d.clone()),
        ApiError::InvalidBody(d) => (400, "invalid_body", d.clone()),
        ApiError::InvalidItem(index, inner) => {
            let (status, code, detail) = describe(inner);
            (status, code, format!("item {index}: {detail}"))
        }
        ApiError::TooDeep(max) => (
            400,
            "too_deep",
            format!("arrays and objects nest deeper than {max} levels"),
        ),
        ApiError::InvalidIdempotencyKey => (
            400,
            "invalid_idempotency_key",
            format!(
                "the Idempotency-Key header must be 1 to {} visible ASCII characters",
                ingest::MAX_NAME_BYTES
            ),
        ),
        ApiError::Unauthorized => (
            401,
            "unauthorized",
            "a valid API key is required (Authorization: Bearer <key>, or X-Api-Key)".to_string(),
        ),
        ApiError::IdempotencyConflict => (
            409,
            "idempotency_conflict",
            "this Idempotency-Key was already used for a different request body".to_string(),
        ),
        ApiError::IdConflict(index, id) => (
            409,
            "id_conflict",
            match index {
                Some(i) => format!("item {i}: the id {id} was already used for a different event"),
                None => format!("the id {id} was already used for a different event"),
            },
        ),
        ApiError::InvalidId(id) => (400, "invalid_id", format!("{id:?} is not a UUID")),
        ApiError::NotFound => (404, "not_found", "no such route".to_string()),
        ApiError::EventNotFound(id) => (404, "event_not_found", format!("no event with id {id}")),
        ApiError::Conflict(d) => (409, "conflict", d.clone()),
        ApiError::MethodNotAllowed(allow) => (
            405,
            "method_not_allowed",
            format!("this route accepts {allow}"),
        ),
        ApiError::BodyTooLarge(max) => (
            413,
            "body_too_large",
            format!("the body exceeds the limit of {max} bytes"),
        ),
        ApiError::BodyNotAllowed => (
            413,
            "body_too_large",
            "this route takes no request body".to_string(),
        ),
        ApiError::PayloadTooLarge(max) => (
            413,
            "payload_too_large",
            format!("the payload exceeds the limit of {max} bytes"),
        ),
        ApiError::BatchTooLarge(max) => (
            413,
            "batch_too_large",
            format!("the batch holds more than {max} events"),
        ),
        ApiError::UnsupportedMediaType(got) => (
            415,
            "unsupported_media_type",
            match got {
                Some(ct) => format!("Content-Type {ct:?} is not application/json"),
                None => "Content-Type application/json is required".to_string(),
            },
        ),
        ApiError::UnsupportedEventFormat(got) => (
            415,
            "unsupported_media_type",
            format!(
                "the CloudEvents event format {got:?} is not supported: send \
                 application/cloudevents+json, application/cloudevents-batch+json or binary mode"
            ),
        ),
        ApiError::UnsupportedEncoding(got) => (
            415,
            "unsupported_encoding",
            format!(
                "Content-Encoding {got:?} is not supported: send the body as is, or in one \
                 of these codings: {}",
                encoding::ACCEPTED
            ),
        ),
        ApiError::InvalidEncoding(d) => (400, "invalid_encoding", d.clone()),
        ApiError::DecodedTooLarge(max) => (
            413,
            "body_too_large",
            format!("the body exceeds the limit of {max} bytes once decompressed"),
        ),
        ApiError::RateLimited(secs) => (
            429,
            "rate_limited",
            format!(
                "this client is over its rate limit (INGEST_RATE_LIMIT); nothing was written, \
                 retry in {secs} s"
            ),
        ),
        ApiError::Unavailable => (
            503,
            "unavailable",
            "the database is unavailable; retry later".to_string(),
        ),
        ApiError::Busy => (
            503,
            "busy",
            "too many events are waiting to be written; retry later".to_string(),
        ),
        ApiError::MemoryBusy => (
            503,
            "busy",
            "the server is holding too many requests in memory; retry shortly".to_string(),
        ),
        ApiError::TooManyValues(needs, budget) => (
            413,
            "body_too_large",
            format!(
                "the body holds so many JSON values that parsing it would take about \
                 {needs} bytes, more than the {budget} bytes the server holds for all requests"
            ),
        ),
        ApiError::Internal => (500, "internal", "internal error".to_string()),
        ApiError::Server(refusal) => {
            let code = match refusal {
                Refusal::BadRequest(_) => "bad_request",
                Refusal::Timeout(_) => "request_timeout",
                Refusal::HeadTooLarge(_) => "header_too_large",
                Refusal::NotImplemented(_) => "not_implemented",
                Refusal::Busy(_) => "busy",
                Refusal::TooManyConnections(_) => "too_many_connections",
                Refusal::ShuttingDown => "unavailable",
            };
            let detail = match refusal {
                Refusal::ShuttingDown => {
                    "the server is shutting down; nothing was written, retry".to_string()
                }
                other => other.detail(),
            };
            (refusal.status(), code, detail)
        }
    }
}

/// The server's [`tiny_http::Limits::refusal`] hook: its own refusals are
/// answered like every other error. The server adds `Connection: close`.
pub fn refusal(refusal: &Refusal) -> HttpResponse {
    error_response(&ApiError::Server(refusal.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_their_headers() {
        let r = error_response(&ApiError::MethodNotAllowed("POST"));
        assert_eq!(r.status_code().0, 405);
        assert!(r.headers().iter().any(|h| h.field.equiv("Allow")));
        let r = error_response(&ApiError::Unavailable);
        assert_eq!(r.status_code().0, 503);
        assert!(r.headers().iter().any(|h| h.field.equiv("Retry-After")));
        let r = error_response(&ApiError::Unauthorized);
        assert_eq!(r.status_code().0, 401);
        assert!(
            r.headers()
                .iter()
                .any(|h| h.field.equiv("WWW-Authenticate"))
        );
        let r = error_response(&ApiError::UnsupportedEncoding("br".into()));
        assert_eq!(r.status_code().0, 415);
        assert!(
            r.headers()
                .iter()
                .any(|h| h.field.equiv("Accept-Encoding") && h.value.as_str() == "gzip, deflate")
        );
        let inner = ApiError::PayloadTooLarge(10);
        let r = error_response(&ApiError::InvalidItem(3, Box::new(inner)));
        assert_eq!(r.status_code().0, 413);
    }
}
