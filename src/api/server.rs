//! The serve loop: each connection's thread routes its request once, runs
//! the handler under `catch_unwind` (a panic answers 500 and the thread
//! serves on), and either answers or hands a valid ingest to a committer,
//! which answers after the commit. At most `INGEST_HTTP_THREADS` requests
//! that parse a body or query the database are handled at once, which
//! bounds the memory parsing takes and the pooled connections requests
//! hold; a request over that waits its turn on its own connection's thread,
//! in arrival order.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use log::error;
use tiny_http::{Request, Server};

use crate::api::error::{ApiError, HttpResponse, error_response};
use crate::api::ratelimit::Limiter;
use crate::api::reply::commit_response;
use crate::api::route::{Route, route};
use crate::api::{Api, Handled, Ingest};
use crate::config::Config;
use crate::lifecycle::{join_until, wait_until};
use crate::ops::metrics::Metrics;

/// The HTTP side of a running process: the server, which handles requests
/// on its connections' threads, and the committers it hands ingests to.
pub struct Http {
    server: Arc<Server>,
    committers: Vec<JoinHandle<()>>,
}

impl Http {
    /// Serves `api` on `server`, giving at most `at_once` requests a turn
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
        // No handler takes requests any more: those arriving are answered
        // 503 by the server at once. The handler, and the API it holds,
        // live while the requests in hand are being handled.
        let handler = self.server.take_handler();
        self.server.refuse_requests();
        if let Some(handler) = handler
            && !wait_until(deadline, || handler.strong_count() == 0)
        {
            late.push("http handlers".to_string());
        }
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

/// A counting semaphore handing out turns in arrival order: how many
/// requests may be handled at once. A request arriving while others wait
/// queues behind them rather than take a turn just given back.
struct Permits {
    state: Mutex<Turns>,
    freed: Condvar,
    metrics: Arc<Metrics>,
}

struct Turns {
    /// Turns not taken.
    free: usize,
    /// Tickets given to the requests that had to wait, in order.
    issued: u64,
    /// Tickets whose holders have taken their turn.
    served: u64,
}

/// One request's turn, given back when dropped.
struct Permit<'a>(&'a Permits);

impl Permits {
    fn new(count: usize, metrics: Arc<Metrics>) -> Permits {
        Permits {
            state: Mutex::new(Turns {
                free: count,
                issued: 0,
                served: 0,
            }),
            freed: Condvar::new(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Turns> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the `ingestd_http_requests_waiting` gauge: the tickets given
    /// and not yet served.
    fn show_waiting(&self, turns: &Turns) {
        let waiting = turns.issued - turns.served;
        self.metrics.http_requests_waiting.set(waiting);
    }

    /// Waits for a turn and takes it; a wait shows in the
    /// `ingestd_http_requests_waiting` gauge.
    fn acquire(&self) -> Permit<'_> {
        let mut turns = self.lock();
        if turns.free == 0 || turns.served < turns.issued {
            let ticket = turns.issued;
            turns.issued += 1;
            self.show_waiting(&turns);
            turns = self
                .freed
                .wait_while(turns, |t| t.free == 0 || t.served != ticket)
                .unwrap_or_else(PoisonError::into_inner);
            turns.served += 1;
            self.show_waiting(&turns);
            if turns.free > 1 && turns.served < turns.issued {
                // More turns are free: the next ticket may go too.
                self.freed.notify_all();
            }
        }
        turns.free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut turns = self.0.lock();
        turns.free += 1;
        if turns.served < turns.issued {
            // Only the next ticket may go; each waiter checks its own.
            self.0.freed.notify_all();
        }
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
/// it to a committer, which answers after the commit. A request that
/// parses a body or queries the database waits for a turn first
/// ([`Route::takes_turn`]); the others never wait for one.
fn handle(api: &Api, permits: &Permits, mut request: Request) {
    let started = Instant::now();
    // Routed once: the name labels the metrics, the route drives the
    // handler.
    let matched = route(request.method(), request.url());
    let name = matched.as_ref().map(Route::name).unwrap_or("unmatched");
    let _permit = matched
        .as_ref()
        .is_ok_and(Route::takes_turn)
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

    use std::thread;
    use std::time::Duration;

    use super::*;
    use crate::api::reply::json_response;

    /// Turns go in arrival order, and a turn given back goes to the first
    /// request waiting.
    #[test]
    fn turns_are_taken_in_arrival_order() {
        let metrics = Arc::new(Metrics::default());
        let permits = Arc::new(Permits::new(1, metrics.clone()));
        let first = permits.acquire();
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiter = |name: &'static str| {
            let (permits, order) = (permits.clone(), order.clone());
            thread::spawn(move || {
                let _turn = permits.acquire();
                order.lock().unwrap().push(name);
            })
        };
        let wait_for = |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(10);
            let waiting = || metrics.http_requests_waiting.get() == n;
            assert!(wait_until(deadline, waiting), "{n} waiting");
        };
        let mut waiters = Vec::new();
        for name in ["a", "b", "c"] {
            waiters.push(waiter(name));
            wait_for(waiters.len() as u64);
        }
        drop(first);
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a", "b", "c"]);
        assert_eq!(metrics.http_requests_waiting.get(), 0);
        // All turns are back.
        let _all = permits.acquire();
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
}
