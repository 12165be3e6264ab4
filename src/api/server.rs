//! The serve loop: each connection's thread routes its request once, runs
//! the handler under `catch_unwind` (a panic answers 500 and the thread
//! serves on), and either answers or hands a valid ingest to a committer,
//! which answers after the commit. At most `INGEST_HTTP_THREADS` requests
//! with bodies are decoded and parsed at once, which bounds the memory that
//! takes; a request over that waits on its own connection's thread.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::error;
use tiny_http::{Request, Server};

use crate::api::error::{ApiError, HttpResponse, error_response};
use crate::api::ratelimit::Limiter;
use crate::api::reply::commit_response;
use crate::api::route::{Route, route};
use crate::api::{Api, Handled, Ingest};
use crate::config::Config;
use crate::lifecycle::join_until;
use crate::ops::metrics::Metrics;

/// The HTTP side of a running process: the server, which handles requests
/// on its connections' threads, and the committers it hands ingests to.
pub struct Http {
    server: Arc<Server>,
    committers: Vec<JoinHandle<()>>,
}

impl Http {
    /// Serves `api` on `server`, parsing at most `at_once` request bodies
    /// at a time.
    pub fn start(
        server: Arc<Server>,
        api: Arc<Api>,
        at_once: usize,
        committers: Vec<JoinHandle<()>>,
    ) -> Http {
        let permits = Permits::new(at_once, api.metrics.clone());
        server.handle_on_connections(Arc::new(move |request| handle(&api, &permits, request)));
        Http { server, committers }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.server.server_addr().to_ip()
    }

    /// Stops serving, by `deadline`: the requests in hand are handled,
    /// requests arriving are answered 503, the committers write what they
    /// were given, and every answer is written to its client. Returns the
    /// names of what was still busy.
    pub fn stop(mut self, deadline: Instant) -> Vec<String> {
        let mut late = Vec::new();
        // The handler, and the API it holds, live while requests in hand
        // are being handled.
        if let Some(handler) = self.server.take_handler()
            && !wait_until(deadline, || handler.strong_count() == 0)
        {
            late.push("http handlers".to_string());
        }
        // No handler takes requests any more: those arriving are answered
        // 503 by the server.
        self.server.refuse_requests();
        // The handler held the last handles on the committers, which now
        // finish what they were given and stop.
        late.extend(join_until(std::mem::take(&mut self.committers), deadline));
        // Connection threads write the answers, and a 202 given must reach
        // its client before the process may exit.
        if !wait_until(deadline, || self.server.unanswered() == 0) {
            late.push("http connections".to_string());
        }
        late
    }
}

impl Drop for Http {
    /// The handler holds the API, which holds the server: a process that
    /// drops its server without stopping it breaks that cycle here.
    fn drop(&mut self) {
        self.server.take_handler();
    }
}

/// Polls `done` until it holds (true) or `deadline` passes (false).
fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
    true
}

/// A counting semaphore: how many request bodies may be parsed at once.
struct Permits {
    free: Mutex<usize>,
    freed: Condvar,
    metrics: Arc<Metrics>,
}

/// One request's turn, given back when dropped.
struct Permit<'a>(&'a Permits);

impl Permits {
    fn new(count: usize, metrics: Arc<Metrics>) -> Permits {
        Permits {
            free: Mutex::new(count),
            freed: Condvar::new(),
            metrics,
        }
    }

    /// Waits for a free permit and takes it; a wait shows in the
    /// `ingestd_http_parse_waiting` gauge.
    fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if *free == 0 {
            self.metrics.http_parse_waiting.inc();
            free = self
                .freed
                .wait_while(free, |free| *free == 0)
                .unwrap_or_else(PoisonError::into_inner);
            self.metrics.http_parse_waiting.dec();
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
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
        // Every body the API accepts is read whole before the handler runs,
        // so a handler never waits on a client.
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

/// Handles one request on its connection's thread: answers it, or hands
/// it to a committer, which answers after the commit. A request with a body
/// to decode and parse waits for a permit first; the others (probes,
/// queries, metrics) never wait for one.
fn handle(api: &Api, permits: &Permits, mut request: Request) {
    let started = Instant::now();
    // Routed once: the name labels the metrics, the route drives the
    // handler.
    let matched = route(request.method(), request.url());
    let name = matched.as_ref().map(Route::name).unwrap_or("unmatched");
    let _permit = matched
        .as_ref()
        .is_ok_and(Route::takes_body)
        .then(|| permits.acquire());
    match guarded(|| api.handle(&mut request, matched)) {
        Handled::Respond(response) => respond(&api.metrics, request, response, name, started),
        Handled::Commit(Ingest { submission, held }) => {
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
