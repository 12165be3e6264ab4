//! Routing: a method and a URL become a [`Route`], or the error that says
//! why not (`404`, `405` with the methods allowed, `400` for an id that is
//! not a UUID). Which routes need a key and which take a body is decided
//! here too, beside the routes themselves.

use tiny_http::Method;
use uuid::Uuid;

use crate::api::error::ApiError;
use crate::config::MetricsAuth;

/// The routes of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /Ingestion/ingest` and `POST /v1/events`.
    Ingest,
    /// `OPTIONS` on the ingest routes: the CloudEvents webhook
    /// abuse-protection handshake.
    IngestOptions,
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
            Route::Healthz | Route::Readyz | Route::StatusPage | Route::IngestOptions => false,
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

    /// True for the routes whose handling takes one of the
    /// `INGEST_HTTP_THREADS` turns: those that decode and parse a body
    /// (ingest), and those that query the database on the request's thread
    /// (an event, a retry, readiness), so that requests never hold more
    /// pooled connections at once than there are turns. The others (the
    /// liveness probe, the figures, the metrics, the page) only copy what
    /// is in memory and never wait for a turn.
    pub fn takes_turn(&self) -> bool {
        matches!(
            self,
            Route::Ingest | Route::GetEvent(_) | Route::RetryEvent(_) | Route::Readyz
        )
    }

    /// The route's name in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Ingest => "ingest",
            Route::IngestOptions => "ingest_options",
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
/// regard to case, as the original ASP.NET routing did.
pub fn route(method: &Method, url: &str) -> Result<Route, ApiError> {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let (allow, route) = if path.eq_ignore_ascii_case("/Ingestion/ingest") || path == "/v1/events" {
        ("POST, OPTIONS", Ok(Route::Ingest))
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
    if *method == Method::Options && route == Ok(Route::Ingest) {
        return Ok(Route::IngestOptions);
    }
    let allowed = match allow {
        "POST" | "POST, OPTIONS" => *method == Method::Post,
        _ => *method == Method::Get || *method == Method::Head,
    };
    if !allowed {
        return Err(ApiError::MethodNotAllowed(allow));
    }
    route
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
        assert_eq!(
            route(&Method::Options, "/v1/events"),
            Ok(Route::IngestOptions)
        );
        assert_eq!(
            route(&Method::Options, "/Ingestion/ingest"),
            Ok(Route::IngestOptions)
        );
        assert_eq!(
            route(&Method::Options, "/healthz"),
            Err(ApiError::MethodNotAllowed("GET"))
        );
        assert_eq!(route(&Method::Get, "/nope"), Err(ApiError::NotFound));
        assert_eq!(
            route(&Method::Get, "/v1/events"),
            Err(ApiError::MethodNotAllowed("POST, OPTIONS"))
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
}
