//! Success answers: JSON responses, `202 Accepted` with its `Location`,
//! the answer to a stored submission (`202`, or `200` for a replay) and the
//! answer to an ingest once its commit is settled. Errors are answered in
//! [`crate::api::error`].

use serde_json::{Value, json};
use tiny_http::{Header, Response};
use uuid::Uuid;

use crate::api::commit::CommitError;
use crate::api::error::{ApiError, HttpResponse, error_response};
use crate::store::Written;

/// A JSON response with the given status.
pub fn json_response(status: u16, body: &Value) -> HttpResponse {
    Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
}

/// `202 Accepted` for an event now pending, with its `Location`.
pub fn accepted(id: Uuid) -> HttpResponse {
    let mut response = json_response(202, &json!({ "id": id.to_string(), "status": "pending" }));
    response.add_header(header("Location", &format!("/v1/events/{id}")));
    response
}

/// The answer to a stored submission: `202` when it created anything,
/// `200` when every event was already stored by an earlier request.
pub fn stored(batch: bool, ids: &[Uuid], created: &[bool]) -> HttpResponse {
    let any_created = created.iter().any(|c| *c);
    match (batch, ids) {
        (false, [id]) if any_created => accepted(*id),
        (false, [id]) => {
            let mut response =
                json_response(200, &json!({ "id": id.to_string(), "duplicate": true }));
            response.add_header(header("Location", &format!("/v1/events/{id}")));
            response
        }
        _ => {
            let duplicates: Vec<usize> = created
                .iter()
                .enumerate()
                .filter_map(|(i, c)| (!c).then_some(i))
                .collect();
            let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
            json_response(
                if any_created { 202 } else { 200 },
                &json!({ "ids": ids, "duplicates": duplicates }),
            )
        }
    }
}

/// The answer to an ingest request once its commit is settled.
pub fn commit_response(batch: bool, result: Result<Written, CommitError>) -> HttpResponse {
    match result {
        Ok(Written::Stored { ids, created }) => stored(batch, &ids, &created),
        Ok(Written::KeyConflict) => error_response(&ApiError::IdempotencyConflict),
        Ok(Written::IdConflict(index, id)) => {
            error_response(&ApiError::IdConflict(batch.then_some(index), id))
        }
        Err(CommitError::Busy) => error_response(&ApiError::Busy),
        Err(CommitError::Unavailable) => error_response(&ApiError::Unavailable),
        Err(CommitError::Failed) => error_response(&ApiError::Internal),
    }
}

/// A header from a name and a value ingestd itself chose.
pub(crate) fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}
