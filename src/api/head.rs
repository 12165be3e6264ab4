//! The head check: what a request's line and headers alone decide (route,
//! API key, a body where none is taken, media type, content coding,
//! `Idempotency-Key`, announced length). It runs twice with the same code:
//! on the server's connection thread before any body byte is read
//! ([`head_check`]), and in the handler ([`check_head`]), so a refusal
//! costs no body and a handler never sees a request the head would have
//! refused.

use std::sync::Arc;

use tiny_http::{HeadCheck, Request};

use crate::api::auth::{self, ApiKeys};
use crate::api::error::{ApiError, error_response};
use crate::api::ratelimit::{Client, Limiter};
use crate::api::route::{Route, route};
use crate::api::{cloudevents, encoding, ingest};
use crate::config::MetricsAuth;
use crate::ops::metrics::Metrics;

/// The value of the first header called `name`, if any.
pub fn header_value<'r>(request: &'r Request, name: &'static str) -> Option<&'r str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// The values of every header called `name`, in order: for a field that
/// is a list, such as `Content-Encoding`, several lines make one list.
pub fn header_values<'r>(
    request: &'r Request,
    name: &'static str,
) -> impl Iterator<Item = &'r str> + Clone {
    request
        .headers()
        .iter()
        .filter(move |h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// The API key a request presents, if any.
pub fn presented_key(request: &Request) -> Option<&str> {
    auth::presented_key(
        header_value(request, "Authorization"),
        header_value(request, "X-Api-Key"),
    )
}

/// Whom a request counts against for the rate limit: its API key's scope,
/// or its address when no keys are configured.
pub fn rate_client(keys: &ApiKeys, request: &Request) -> Client {
    let scope = keys.scope(presented_key(request));
    Client::new(scope, request.remote_addr().map(|a| a.ip()))
}

/// What a request's head alone decides, in the order the handler checks it:
/// the route, the API key on protected routes when keys are configured
/// (`metrics` says whether `/metrics` is one), no body on a route that
/// takes none, and for an ingest its media type, its content coding, its
/// `Idempotency-Key` and its announced length (`max_body_bytes` at most;
/// a compressed body is held to it before and after decoding).
pub fn check_head(
    keys: &ApiKeys,
    metrics: MetricsAuth,
    max_body_bytes: usize,
    limiter: Option<&Limiter>,
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
        // An empty bucket refuses on the head; the events are counted once
        // the body is parsed.
        if let Some(limiter) = limiter {
            limiter
                .check_client(&rate_client(keys, request))
                .map_err(|wait| ApiError::RateLimited(wait.as_secs()))?;
        }
        let content_type = header_value(request, "Content-Type");
        // A CloudEvent in binary mode may have any media type (its data's);
        // everything else is JSON.
        let ce_mode = cloudevents::mode(
            content_type,
            header_value(request, "ce-specversion").is_some(),
        )?;
        if ce_mode.is_none() && !content_type.is_some_and(is_json_media_type) {
            return Err(ApiError::UnsupportedMediaType(
                content_type.map(str::to_string),
            ));
        }
        encoding::coding(header_values(request, "Content-Encoding"))?;
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
    limiter: Option<Arc<Limiter>>,
    metrics: Arc<Metrics>,
) -> HeadCheck {
    HeadCheck::new(move |request| {
        let matched = route(request.method(), request.url());
        let name = matched.as_ref().map(Route::name).unwrap_or("unmatched");
        let limiter = limiter.as_deref();
        let err = check_head(
            &keys,
            metrics_auth,
            max_body_bytes,
            limiter,
            request,
            matched,
        )
        .err()?;
        let response = error_response(&err);
        metrics.request(name, response.status_code().0);
        Some(response.boxed())
    })
}

/// Maps a method and a URL to a route. The legacy path matches without
/// A media type without its parameters, in lower case: `type/subtype`.
pub fn media_essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Checks that a Content-Type names JSON (`application/json`, optionally
/// with parameters, or any `+json` type).
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = media_essence(content_type);
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("Application/JSON; charset=utf-8"));
        assert!(is_json_media_type("application/cloudevents+json"));
        assert!(!is_json_media_type("text/plain"));
        assert!(!is_json_media_type(""));
    }
}
