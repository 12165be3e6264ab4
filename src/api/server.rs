//! The serve loop: each handler thread takes requests from the shared
//! `tiny_http::Server`, routes them once, runs the handler under
//! `catch_unwind` (a panic answers 500 and the thread serves on), and
//! either answers or hands a valid ingest to a committer, which answers
//! after the commit while this thread goes back to serving.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use log::{error, warn};
use tiny_http::{Request, Server};

use crate::api::error::{ApiError, HttpResponse, error_response};
use crate::api::reply::commit_response;
use crate::api::route::{Route, route};
use crate::api::{Api, Handled, Ingest};
use crate::ops::metrics::Metrics;

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
    use serde_json::json;

    use super::*;
    use crate::api::reply::json_response;

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
}
