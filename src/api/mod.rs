//! The HTTP API, and the only code that names tiny_http.
//!
//! Each connection's thread handles its own requests ([`server`]). A request is
//! routed ([`route`]), its head checked ([`head`]: route, API key, media
//! type, content coding, announced size), its body decoded when it is
//! compressed ([`encoding`]) and then checked ([`ingest`]: JSON shape,
//! limits; [`cloudevents`] for CloudEvents) before anything touches the
//! database. Every failure is an
//! [`ApiError`], which [`error::error_response`] alone turns into a status
//! and a JSON body, and the server's own refusals reach the same function
//! ([`error::refusal`]). Valid events go to a [`commit::Committer`], which
//! writes them in group commits and answers each request after its commit.
//! The API knows the store and the ops figures; it knows nothing of the
//! relay or the workers but the one wake-up it may send a relay in this
//! process.

pub mod auth;
pub mod cloudevents;
pub mod commit;
pub mod encoding;
pub mod error;
pub mod footprint;
mod handlers;
pub mod head;
pub mod ingest;
pub mod ratelimit;
pub mod reply;
pub mod route;
pub mod server;

use std::sync::Arc;

use tiny_http::{Reservation, Server};

use crate::api::auth::ApiKeys;
use crate::api::commit::Committer;
use crate::api::ingest::Limits;
use crate::api::ratelimit::Limiter;
use crate::config::MetricsAuth;
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::ops::stats::Stats;
use crate::store::{Store, Submission, Wakeup};

pub use error::{ApiError, HttpResponse, error_response};
pub use route::Route;

/// Everything a handler needs.
pub struct Api {
    /// Where events are read, and retried events written.
    pub store: Store,
    /// Where accepted events are written (group commit).
    pub committer: Committer,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// What one ingest body may hold.
    pub limits: Limits,
    /// Keys required on ingest and query routes; empty: open.
    pub keys: ApiKeys,
    /// Whether `/metrics` needs a key too.
    pub metrics_auth: MetricsAuth,
    /// The rate limit per client on ingest, if any.
    pub limiter: Option<Arc<Limiter>>,
    /// How a retried event's commit wakes the relays.
    pub wakeup: Wakeup,
    /// Broker connection state for `/readyz`.
    pub health: Arc<Health>,
    /// What `/metrics` shows.
    pub metrics: Arc<Metrics>,
    /// What the status page and `/v1/stats` show.
    pub stats: Arc<Stats>,
    /// The server, for its connection and memory gauges.
    pub server: Arc<Server>,
}

/// What became of a request.
pub enum Handled {
    /// Answer now with this response.
    Respond(HttpResponse),
    /// Valid events to commit; the answer comes after the commit.
    Commit(Ingest),
}

/// A valid ingest on its way to a committer.
pub struct Ingest {
    /// The events to write.
    pub submission: Submission,
    /// The memory the parsed events take, counted against the HTTP
    /// buffer budget until the request is answered.
    pub held: Option<Reservation>,
}

impl From<HttpResponse> for Handled {
    fn from(response: HttpResponse) -> Handled {
        Handled::Respond(response)
    }
}
