//! The HTTP API: routes, request parsing, and the mapping of errors to responses.
//!
//! Handler threads share one `tiny_http::Server`. A request is routed, its
//! head checked ([`check_head`]: route, API key, media type, announced size)
//! and then its body (JSON shape) before anything touches the database, and
//! every failure becomes an [`ApiError`], which [`error_response`] alone
//! turns into a status and a JSON body. The head check also runs on the
//! connection's thread before a body is read ([`head_check`]), so a request
//! refused on its head costs no body bytes. A panic in a handler answers 500
//! and the thread goes on serving.

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::Sender;
use log::{error, warn};
use serde_json::{Value, json};
use tiny_http::{HeadCheck, Header, Method, Request, Reservation, Response, Server};
use uuid::Uuid;

use crate::auth::{self, ApiKeys};
use crate::commit::{CommitError, Committer};
use crate::config::MetricsAuth;
use crate::footprint;
use crate::health::{Health, Link};
use crate::ingest::{self, Limits};
use crate::metrics::{Gauges, Metrics};
use crate::stats::Stats;
use crate::store::{self, IdempotencyKey, RetryResult, Store, Submission, Written};

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

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
    /// Wakes the relay in this process after a commit.
    pub wake: Option<Sender<()>>,
    /// Wake relays in other processes with `NOTIFY` (API-only role).
    pub notify: bool,
    /// Broker connection state for `/readyz`.
    pub health: Arc<Health>,
    /// What `/metrics` shows.
    pub metrics: Arc<Metrics>,
    /// What the status page and `/v1/stats` show.
    pub stats: Arc<Stats>,
    /// The server, for its connection and memory gauges.
    pub server: Arc<Server>,
}

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
        ApiError::Unavailable | ApiError::Busy | ApiError::MemoryBusy => {
            response.add_header(header("Retry-After", &RETRY_AFTER_SECS.to_string()))
        }
        ApiError::Unauthorized => {
            response.add_header(header("WWW-Authenticate", "Bearer realm=\"ingestd\""))
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
    }
}

/// A JSON response with the given status.
pub fn json_response(status: u16, body: &Value) -> HttpResponse {
    Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
}

/// `202 Accepted` for an event now pending, with its `Location`.
fn accepted(id: Uuid) -> HttpResponse {
    let mut response = json_response(202, &json!({ "id": id.to_string(), "status": "pending" }));
    response.add_header(header("Location", &format!("/v1/events/{id}")));
    response
}

/// The answer to a stored submission: `202` when it created anything,
/// `200` when every event was already stored by an earlier request.
fn stored(batch: bool, ids: &[Uuid], created: &[bool]) -> HttpResponse {
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

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

/// The routes of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /Ingestion/ingest` and `POST /v1/events`.
    Ingest,
    /// `GET /v1/events/<id>`.
    GetEvent(Uuid),
    /// `POST /v1/events/<id>/retry`.
    RetryEvent(Uuid),
    /// `GET /healthz`.
    Healthz,
    /// `GET /readyz`.
    Readyz,
    /// `GET /metrics`.
    Metrics,
    /// `GET /` and `GET /status`: the status page.
    StatusPage,
    /// `GET /v1/stats`: the status page's figures.
    Stats,
}

impl Route {
    /// True for routes that need an API key when keys are configured:
    /// everything but the probes, the status page's shell (whose figures
    /// come from the protected `/v1/stats`) and, unless `metrics` asks for
    /// a key, the metrics.
    pub fn is_protected(&self, metrics: MetricsAuth) -> bool {
        match self {
            Route::Healthz | Route::Readyz | Route::StatusPage => false,
            Route::Metrics => metrics == MetricsAuth::Key,
            _ => true,
        }
    }

    /// True for the routes that read a body: ingest, and retry (which
    /// ignores it). The others are `GET`s; they refuse one, so that no body
    /// is read or held for them, open routes included.
    pub fn takes_body(&self) -> bool {
        matches!(self, Route::Ingest | Route::RetryEvent(_))
    }

    /// The route's name in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Ingest => "ingest",
            Route::GetEvent(_) => "get_event",
            Route::RetryEvent(_) => "retry_event",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::StatusPage => "status_page",
            Route::Stats => "stats",
        }
    }
}

/// The value of the first header called `name`, if any.
fn header_value<'r>(request: &'r Request, name: &'static str) -> Option<&'r str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// The API key a request presents, if any.
fn presented_key(request: &Request) -> Option<&str> {
    auth::presented_key(
        header_value(request, "Authorization"),
        header_value(request, "X-Api-Key"),
    )
}

/// What a request's head alone decides, in the order the handler checks it:
/// the route, the API key on protected routes when keys are configured
/// (`metrics` says whether `/metrics` is one), no body on a route that
/// takes none, and for an ingest its media type, its `Idempotency-Key` and
/// its announced length (`max_body_bytes` at most).
pub fn check_head(
    keys: &ApiKeys,
    metrics: MetricsAuth,
    max_body_bytes: usize,
    request: &Request,
    route: Result<Route, ApiError>,
) -> Result<Route, ApiError> {
    let route = route?;
    if route.is_protected(metrics) && !keys.is_open() && !keys.allows(presented_key(request)) {
        return Err(ApiError::Unauthorized);
    }
    let length = request.body_length();
    let has_body =
        length.is_some_and(|n| n > 0) || header_value(request, "Transfer-Encoding").is_some();
    if has_body && !route.takes_body() {
        return Err(ApiError::BodyNotAllowed);
    }
    if route == Route::Ingest {
        let content_type = header_value(request, "Content-Type");
        if !content_type.is_some_and(is_json_media_type) {
            return Err(ApiError::UnsupportedMediaType(
                content_type.map(str::to_string),
            ));
        }
        if let Some(key) = header_value(request, "Idempotency-Key") {
            ingest::idempotency_key(key)?;
        }
        if length.is_some_and(|n| n > max_body_bytes) {
            return Err(ApiError::BodyTooLarge(max_body_bytes));
        }
    }
    Ok(route)
}

/// [`check_head`] for the server's connection threads: a request with a
/// body that its head alone refuses is answered there, before the body is
/// read or buffered, and counted in the metrics as the handler would.
pub fn head_check(
    keys: ApiKeys,
    metrics_auth: MetricsAuth,
    max_body_bytes: usize,
    metrics: Arc<Metrics>,
) -> HeadCheck {
    HeadCheck::new(move |request| {
        let matched = route(request.method(), request.url());
        let name = matched.as_ref().map(Route::name).unwrap_or("unmatched");
        let err = check_head(&keys, metrics_auth, max_body_bytes, request, matched).err()?;
        let response = error_response(&err);
        metrics.request(name, response.status_code().0);
        Some(response.boxed())
    })
}

/// Maps a method and a URL to a route. The legacy path matches without
/// regard to case, as the original ASP.NET routing did.
pub fn route(method: &Method, url: &str) -> Result<Route, ApiError> {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let (allow, route) = if path.eq_ignore_ascii_case("/Ingestion/ingest") || path == "/v1/events" {
        ("POST", Ok(Route::Ingest))
    } else if let Some(rest) = path.strip_prefix("/v1/events/") {
        let (id, allow, to_route): (_, _, fn(Uuid) -> Route) = match rest.strip_suffix("/retry") {
            Some(id) => (id, "POST", Route::RetryEvent),
            None => (rest, "GET", Route::GetEvent),
        };
        let route = Uuid::parse_str(id)
            .map(to_route)
            .map_err(|_| ApiError::InvalidId(id.to_string()));
        (allow, route)
    } else if path == "/healthz" {
        ("GET", Ok(Route::Healthz))
    } else if path == "/readyz" {
        ("GET", Ok(Route::Readyz))
    } else if path == "/metrics" {
        ("GET", Ok(Route::Metrics))
    } else if path == "/" || path == "/status" {
        ("GET", Ok(Route::StatusPage))
    } else if path == "/v1/stats" {
        ("GET", Ok(Route::Stats))
    } else {
        return Err(ApiError::NotFound);
    };
    let allowed = match allow {
        "POST" => *method == Method::Post,
        _ => *method == Method::Get || *method == Method::Head,
    };
    if !allowed {
        return Err(ApiError::MethodNotAllowed(allow));
    }
    route
}

/// Checks that a Content-Type names JSON (`application/json`, optionally
/// with parameters, or any `+json` type).
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl Api {
    /// Handles one request already matched to `route`; errors become
    /// responses here.
    pub fn handle(&self, request: &mut Request, route: Result<Route, ApiError>) -> Handled {
        match self.dispatch(request, route) {
            Ok(handled) => handled,
            Err(err) => Handled::Respond(error_response(&err)),
        }
    }

    fn dispatch(
        &self,
        request: &mut Request,
        route: Result<Route, ApiError>,
    ) -> Result<Handled, ApiError> {
        let route = check_head(
            &self.keys,
            self.metrics_auth,
            self.max_body_bytes,
            request,
            route,
        )?;
        let response = match route {
            Route::Ingest => return self.ingest(request).map(Handled::Commit),
            Route::GetEvent(id) => {
                let event = self
                    .store
                    .get_event(id)?
                    .ok_or(ApiError::EventNotFound(id))?;
                json_response(200, &event.to_json())
            }
            Route::RetryEvent(id) => match self.store.retry_event(id, self.notify)? {
                RetryResult::Requeued => {
                    self.wake_relay();
                    accepted(id)
                }
                RetryResult::NotFound => return Err(ApiError::EventNotFound(id)),
                RetryResult::NotFailed(status) => {
                    return Err(ApiError::Conflict(format!(
                        "the event is {status}; only failed events can be retried"
                    )));
                }
            },
            Route::Healthz => json_response(200, &json!({ "status": "ok" })),
            Route::Readyz => self.readyz(),
            Route::Metrics => self.metrics(),
            Route::Stats => json_response(200, &self.stats.snapshot()),
            Route::StatusPage => {
                Response::from_data(self.stats.page(!self.keys.is_open()).into_bytes())
                    .with_header(header("Content-Type", "text/html; charset=utf-8"))
                    .with_header(header("Cache-Control", "no-store"))
            }
        };
        Ok(Handled::Respond(response))
    }

    /// An ingest whose head [`check_head`] passed. An `Idempotency-Key`
    /// covers the whole body, one event or a batch, and belongs to the API
    /// key that sent it.
    fn ingest(&self, request: &mut Request) -> Result<Ingest, ApiError> {
        let key = header_value(request, "Idempotency-Key")
            .map(ingest::idempotency_key)
            .transpose()?;
        let scope = self
            .keys
            .scope(presented_key(request))
            .ok_or(ApiError::Unauthorized)?;
        let idempotency_key = key.map(|key| IdempotencyKey { scope, key });
        // The body read whole into memory (always, but for a chunked body
        // over the limit), taken without a copy with the reservation that
        // counts it against INGEST_HTTP_BUFFER_BYTES.
        let (body, mut held) = match request.take_whole_body() {
            Some((body, reservation)) => (body, Some(reservation)),
            // Not whole in memory: no body at all, or a chunked one longer
            // than the limit (a longer Content-Length was refused on its
            // head), which is not read into memory at all.
            None if request.body_length().unwrap_or(0) == 0
                && header_value(request, "Transfer-Encoding").is_none() =>
            {
                (Vec::new(), None)
            }
            None => return Err(ApiError::BodyTooLarge(self.max_body_bytes)),
        };
        // What the parse will take is reserved before it runs, and stays
        // reserved, in place of the body, until the request is answered.
        let parsed_bound = footprint::parsed_bound(&body);
        if let Some(held) = &mut held {
            let needs = held.bytes().saturating_add(parsed_bound);
            if needs > held.limit() {
                // Invalid or too deep JSON is answered as such, not as too
                // large (`parse` checks the same on the usual path).
                ingest::check_text(&body, &self.limits)?;
                ingest::check_syntax(&body)?;
                return Err(ApiError::TooManyValues(needs, held.limit()));
            }
            if !held.grow(parsed_bound) {
                return Err(ApiError::MemoryBusy);
            }
        }
        let parsed = ingest::parse(&body, &self.limits)?;
        drop(body);
        if let Some(held) = &mut held {
            held.shrink_to(parsed_bound);
        }
        let submission = Submission {
            events: parsed.events,
            batch: parsed.batch,
            idempotency_key,
        };
        Ok(Ingest { submission, held })
    }

    fn wake_relay(&self) {
        if let Some(wake) = &self.wake {
            // A full channel means a wake-up is already pending.
            let _ = wake.try_send(());
        }
    }

    /// The metrics; the database figures are the stats refresher's last
    /// read, so a scrape never queries or waits for PostgreSQL.
    fn metrics(&self) -> HttpResponse {
        let db = self.stats.db();
        let (pool_in_use, pool_idle) = self.store.pool_state();
        let text = self.metrics.render(&Gauges {
            outbox: db.figures.map(|f| f.outbox),
            stats_age_seconds: db.age.map(|a| a.as_secs_f64()),
            pool_in_use,
            pool_idle,
            http_connections: self.server.num_connections(),
            http_buffered_bytes: self.server.buffered_bytes(),
        });
        Response::from_data(text.into_bytes()).with_header(header(
            "Content-Type",
            "text/plain; version=0.0.4; charset=utf-8",
        ))
    }

    fn readyz(&self) -> HttpResponse {
        let mut checks = serde_json::Map::new();
        let mut ready = true;
        let db = match self.store.ping() {
            Ok(()) => "up",
            Err(e) => {
                warn!("readyz: postgres is down: {e}");
                ready = false;
                "down"
            }
        };
        checks.insert("postgres".into(), db.into());
        for (name, link) in self.health.broker_links() {
            ready &= link == Link::Up;
            checks.insert(name.into(), link.as_str().into());
        }
        let status = if ready { "ready" } else { "unavailable" };
        json_response(
            if ready { 200 } else { 503 },
            &json!({ "status": status, "checks": checks }),
        )
    }
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

/// Runs `f`, turning a panic into a 500 response so the thread survives.
pub fn guarded<T: From<HttpResponse>>(f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(response) => response,
        Err(_) => {
            error!("a request handler panicked; answered 500");
            error_response(&ApiError::Internal).into()
        }
    }
}

/// One handler thread: serves requests until `stopping` is set and the
/// thread is unblocked.
pub fn serve(server: Arc<Server>, api: Arc<Api>, stopping: Arc<AtomicBool>) {
    loop {
        let mut request = match server.recv() {
            Ok(r) => r,
            Err(_) if stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                warn!("http: accept failed: {e}");
                continue;
            }
        };
        let started = Instant::now();
        // Routed once: the name labels the metrics, the route drives the
        // handler.
        let matched = route(request.method(), request.url());
        let name = matched.as_ref().map(Route::name).unwrap_or("unmatched");
        match guarded(|| api.handle(&mut request, matched)) {
            Handled::Respond(response) => respond(&api.metrics, request, response, name, started),
            Handled::Commit(Ingest { submission, held }) => {
                // The committer answers after the commit; this thread
                // goes back to serving.
                let (metrics, batch) = (api.metrics.clone(), submission.batch);
                api.committer.submit(
                    submission,
                    Box::new(move |result| {
                        // A bug building this answer answers 500 in JSON, not a bare 500.
                        let response = guarded(|| commit_response(batch, result));
                        respond(&metrics, request, response, name, started);
                        drop(held);
                    }),
                );
            }
        }
    }
}

fn respond(
    metrics: &Metrics,
    request: Request,
    response: HttpResponse,
    route: &'static str,
    started: Instant,
) {
    let status = response.status_code().0;
    metrics.request(route, status);
    if route == "ingest" && status == 202 {
        metrics.ingest_seconds.observe_duration(started.elapsed());
    }
    if let Err(e) = request.respond(response) {
        // The response could not be rendered; its connection closes.
        log::warn!("http: response not sent: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let id = Uuid::new_v4();
        assert_eq!(route(&Method::Post, "/Ingestion/ingest"), Ok(Route::Ingest));
        assert_eq!(
            route(&Method::Post, "/ingestion/INGEST/"),
            Ok(Route::Ingest)
        );
        assert_eq!(route(&Method::Post, "/v1/events?x=1"), Ok(Route::Ingest));
        assert_eq!(
            route(&Method::Get, &format!("/v1/events/{id}")),
            Ok(Route::GetEvent(id))
        );
        assert_eq!(
            route(&Method::Get, "/v1/events/nope"),
            Err(ApiError::InvalidId("nope".into()))
        );
        assert_eq!(
            route(&Method::Post, &format!("/v1/events/{id}/retry")),
            Ok(Route::RetryEvent(id))
        );
        assert_eq!(
            route(&Method::Get, &format!("/v1/events/{id}/retry")),
            Err(ApiError::MethodNotAllowed("POST"))
        );
        assert_eq!(route(&Method::Get, "/healthz"), Ok(Route::Healthz));
        assert_eq!(route(&Method::Get, "/nope"), Err(ApiError::NotFound));
        assert_eq!(
            route(&Method::Get, "/v1/events"),
            Err(ApiError::MethodNotAllowed("POST"))
        );
        assert_eq!(
            route(&Method::Delete, &format!("/v1/events/{id}")),
            Err(ApiError::MethodNotAllowed("GET"))
        );
    }

    #[test]
    fn metrics_need_a_key_only_when_asked() {
        let id = Uuid::new_v4();
        for (route, open, key) in [
            (Route::Metrics, false, true),
            (Route::Healthz, false, false),
            (Route::Readyz, false, false),
            (Route::StatusPage, false, false),
            (Route::Stats, true, true),
            (Route::Ingest, true, true),
            (Route::GetEvent(id), true, true),
        ] {
            assert_eq!(route.is_protected(MetricsAuth::Open), open, "{route:?}");
            assert_eq!(route.is_protected(MetricsAuth::Key), key, "{route:?}");
        }
    }

    #[test]
    fn media_types() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("Application/JSON; charset=utf-8"));
        assert!(is_json_media_type("application/cloudevents+json"));
        assert!(!is_json_media_type("text/plain"));
        assert!(!is_json_media_type(""));
    }

    #[test]
    fn a_panic_becomes_a_500() {
        let response: HttpResponse = guarded(|| panic!("boom"));
        assert_eq!(response.status_code().0, 500);
        // The thread that caught it keeps working.
        assert_eq!(
            guarded(|| json_response(200, &json!({}))).status_code().0,
            200
        );
    }

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
        let inner = ApiError::PayloadTooLarge(10);
        let r = error_response(&ApiError::InvalidItem(3, Box::new(inner)));
        assert_eq!(r.status_code().0, 413);
    }
}
