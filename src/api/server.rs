//! The serve loop: each handler thread takes requests from the shared
//! `tiny_http::Server`, routes them once, runs the handler under
//! `catch_unwind` (a panic answers 500 and the thread serves on), and
//! either answers or hands a valid ingest to a committer, which answers
//! after the commit while this thread goes back to serving.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, warn};
use tiny_http::{Request, Server};

use crate::api::error::{ApiError, HttpResponse, error_response};
use crate::api::ratelimit::Limiter;
use crate::api::reply::commit_response;
use crate::api::route::{Route, route};
use crate::api::{Api, Handled, Ingest};
use crate::config::Config;
use crate::lifecycle::{join_until, spawn};
use crate::ops::metrics::Metrics;

/// The HTTP side of a running process: the server, its handler threads and
/// the committers they hand ingests to.
pub struct Http {
    server: Arc<Server>,
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    committers: Vec<JoinHandle<()>>,
}

impl Http {
    /// Starts `threads` handler threads serving `api` on `server`.
    pub fn start(
        server: Arc<Server>,
        api: Arc<Api>,
        threads: usize,
        committers: Vec<JoinHandle<()>>,
    ) -> Http {
        let stopping = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|i| {
                let (server, api, stopping) = (server.clone(), api.clone(), stopping.clone());
                spawn(&format!("http-{i}"), move || serve(server, api, stopping))
            })
            .collect();
        Http {
            server,
            stopping,
            threads,
            committers,
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.server.server_addr().to_ip()
    }

    /// Stops serving, by `deadline`: the handler threads finish the requests
    /// in hand, requests still queued or arriving are answered 503, the
    /// committers write what they were given, and every answer is written
    /// to its client. Returns the names of what was still busy.
    pub fn stop(self, deadline: Instant) -> Vec<String> {
        self.stopping.store(true, Ordering::SeqCst);
        for _ in 0..self.threads.len() {
            self.server.unblock();
        }
        let mut late = join_until(self.threads, deadline);
        // No handler takes requests any more: those still queued, and any
        // arriving, are answered 503 by the server.
        self.server.refuse_requests();
        // The handler threads held the last handles on the committers,
        // which now finish what they were given and stop.
        late.extend(join_until(self.committers, deadline));
        // Connection threads write the answers, and a 202 given must reach
        // its client before the process may exit.
        while self.server.unanswered() > 0 {
            if Instant::now() >= deadline {
                late.push("http connections".to_string());
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        late
    }
}

/// Binds the server with the limits of `config`.
pub fn bind(
    config: &Config,
    metrics: &Arc<Metrics>,
    limiter: Option<Arc<Limiter>>,
) -> std::io::Result<Arc<Server>> {
    Server::http_with_limits(config.http_addr, http_limits(config, metrics, limiter))
        .map(Arc::new)
        .map_err(std::io::Error::other)
}

/// The HTTP server's limits, from the configuration.
fn http_limits(
    config: &Config,
    metrics: &Arc<Metrics>,
    limiter: Option<Arc<Limiter>>,
) -> tiny_http::Limits {
    tiny_http::Limits {
        max_connections: config.http_max_connections,
        max_head_bytes: config.http_max_header_bytes,
        max_headers: 100,
        head_timeout: config.http_header_timeout,
        body_timeout: config.http_body_timeout,
        // Every body the API accepts is read by its connection's thread, so
        // handler threads never wait on a client.
        buffer_body_bytes: config.max_body_bytes,
        buffer_budget: config.http_buffer_bytes,
        write_timeout: config.http_body_timeout,
        // A body that its head alone refuses (no API key, not JSON, too
        // large, no such route) is never read.
        head_check: Some(crate::api::head::head_check(
            config.api_keys.clone(),
            config.metrics_auth,
            config.max_body_bytes,
            limiter,
            metrics.clone(),
        )),
        // The server's own refusals answer in the API's error format.
        refusal: crate::api::error::refusal,
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
