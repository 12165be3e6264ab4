//! The handlers: what each route does once its head has passed. Ingest
//! decodes a compressed body, parses and reserves memory for it and hands
//! the events on; the others read the store, the health links and the
//! figures the stats refresher keeps, so that no probe or scrape waits for
//! PostgreSQL except `/readyz`, whose job it is.

use log::warn;
use serde_json::json;
use tiny_http::{Request, Response};

use crate::api::cloudevents::{self, Mode};
use crate::api::encoding::{self, Coding};
use crate::api::error::{ApiError, HttpResponse, error_response};
use crate::api::head::{check_head, header_value, header_values, presented_key, rate_client};
use crate::api::reply::{accepted, header, json_response};
use crate::api::route::Route;
use crate::api::{Api, Handled, Ingest, footprint, ingest};
use crate::ops::health::Link;
use crate::ops::metrics::Gauges;
use crate::store::{EventRecord, IdempotencyKey, RetryResult, Submission};
use crate::trace::TraceContext;

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
            self.limiter.as_deref(),
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
                json_response(200, &event_json(&event))
            }
            Route::RetryEvent(id) => match self.store.retry_event(id, &self.wakeup)? {
                RetryResult::Requeued => accepted(id),
                RetryResult::NotFound => return Err(ApiError::EventNotFound(id)),
                RetryResult::NotFailed(status) => {
                    return Err(ApiError::Conflict(format!(
                        "the event is {status}; only failed events can be retried"
                    )));
                }
            },
            Route::IngestOptions => self.webhook_handshake(request),
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
        // A compressed body is decoded here, into at most the same limit,
        // each step of the decoded body reserved before it is written.
        let coding = encoding::coding(header_values(request, "Content-Encoding"))?;
        let body = if coding == Coding::Identity {
            body
        } else {
            let decoded = encoding::decode(coding, body, self.max_body_bytes, &mut |n| {
                held.as_mut().is_none_or(|held| held.grow(n))
            })?;
            // The compressed bytes are gone; what replaced them stays counted.
            if let Some(held) = &mut held {
                held.shrink_to(decoded.capacity());
            }
            decoded
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
        let trace = TraceContext::from_caller(
            header_value(request, "traceparent"),
            header_value(request, "tracestate"),
        );
        let content_type = header_value(request, "Content-Type");
        let specversion = header_value(request, "ce-specversion").is_some();
        let mut parsed = match cloudevents::mode(content_type, specversion)? {
            None => ingest::parse(&body, &self.limits)?,
            Some(Mode::Structured) => cloudevents::parse_structured(&body, &trace, &self.limits)?,
            Some(Mode::Batched) => cloudevents::parse_batched(&body, &trace, &self.limits)?,
            Some(Mode::Binary) => {
                let headers: Vec<(String, &str)> = request
                    .headers()
                    .iter()
                    .filter_map(|h| {
                        let name = h.field.as_str().as_str().to_ascii_lowercase();
                        let name = name.strip_prefix("ce-")?.to_string();
                        Some((name, h.value.as_str()))
                    })
                    .collect();
                cloudevents::parse_binary(&headers, content_type, &body, &trace, &self.limits)?
            }
        };
        drop(body);
        for event in &mut parsed.events {
            event.trace.get_or_insert_with(|| trace.clone());
        }
        if let Some(limiter) = &self.limiter {
            limiter
                .take_client(&rate_client(&self.keys, request), parsed.events.len())
                .map_err(|wait| ApiError::RateLimited(wait.as_secs()))?;
        }
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

    /// The abuse-protection handshake of the CloudEvents webhook
    /// specification: a sender asks with `WebHook-Request-Origin` whether it
    /// may deliver, and is allowed, with the rate the limit allows (in
    /// events per minute; `*` without a limit). The asynchronous form
    /// (`WebHook-Request-Callback`) is not offered: the answer is immediate.
    fn webhook_handshake(&self, request: &Request) -> HttpResponse {
        let mut response = Response::from_data(Vec::new())
            .with_status_code(200)
            .with_header(header("Allow", "POST, OPTIONS"));
        let origin = header_value(request, "WebHook-Request-Origin")
            .map(str::trim)
            .filter(|o| !o.is_empty());
        if let Some(origin) = origin {
            response.add_header(header("WebHook-Allowed-Origin", origin));
            let rate = match &self.limiter {
                Some(limiter) => limiter.limit().per_minute().to_string(),
                None => "*".into(),
            };
            response.add_header(header("WebHook-Allowed-Rate", &rate));
        }
        response
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
        // The broker node each connection is on (null while it is down).
        let nodes: serde_json::Map<String, serde_json::Value> = self
            .health
            .broker_nodes()
            .into_iter()
            .map(|(name, node)| (name.to_string(), node.into()))
            .collect();
        let status = if ready { "ready" } else { "unavailable" };
        json_response(
            if ready { 200 } else { 503 },
            &json!({ "status": status, "checks": checks, "nodes": nodes }),
        )
    }
}

/// The JSON body of `GET /v1/events/<id>`.
fn event_json(event: &EventRecord) -> serde_json::Value {
    json!({
        "id": event.id.to_string(),
        "status": event.status,
        "attempts": event.attempts,
        "type": event.event_type,
        "key": event.key,
        "payload": event.payload,
        "created_at": event.created_at,
        "processed_at": event.processed_at,
        "last_error": event.last_error,
        "attributes": event.attributes,
        "traceparent": event.traceparent,
        "tracestate": event.tracestate,
    })
}
