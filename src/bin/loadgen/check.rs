//! `--check-ids`: asks the server what became of each accepted event.
//!
//! It owns reading the id file, the polling rounds and their report. A round
//! sends `GET /v1/events/<id>` for every id not yet settled, spread over the
//! client threads, each on its own keep-alive connection; rounds repeat, a
//! short pause apart, until every id is settled or the deadline passes. An
//! event is settled once the server calls it `processed` or `failed`, or
//! does not know it at all (lost): waiting changes none of these. Answers are
//! read as JSON, by key, never by where a key happens to sit in the body.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::client::{Client, Response};

/// The pause between two rounds: short next to the time a backlog takes to
/// drain, long enough that polling a slow backlog costs the server little.
const ROUND_PAUSE: Duration = Duration::from_millis(200);
/// How many example ids of each unhappy kind the report keeps.
const EXAMPLES: usize = 5;

/// What is known of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No usable answer yet.
    Unanswered,
    /// The server has it and has not finished with it.
    Pending,
    /// Processed: settled.
    Processed,
    /// Failed for good: settled.
    Failed,
    /// The server answers `404 event_not_found`: an accepted event it lost.
    Lost,
}

/// An answer that says nothing about the event's state.
#[derive(Debug, PartialEq, Eq)]
pub enum BadAnswer {
    /// `401`: the API key is missing or wrong; every answer will be the same.
    Unauthorized,
    /// Anything else that is not the event, with what was wrong; it is asked
    /// again in the next round.
    Unexpected(String),
}

/// Why the check stopped before its deadline.
#[derive(Debug)]
pub enum CheckError {
    /// The server refused the API key.
    Unauthorized,
    /// A client thread could not be started.
    Spawn(std::io::Error),
    /// A client thread panicked: a bug in this program.
    Panicked,
}

/// The outcome of a check.
#[derive(Debug)]
pub struct CheckReport {
    /// Distinct ids checked.
    pub checked: u64,
    pub processed: u64,
    pub failed: u64,
    /// Still pending when the deadline passed.
    pub pending: u64,
    /// Unknown to the server.
    pub lost: u64,
    /// Never answered usefully before the deadline passed.
    pub unanswered: u64,
    pub rounds: u64,
    pub requests: u64,
    /// Requests that got no response, by kind.
    pub errors_by_kind: BTreeMap<&'static str, u64>,
    /// Responses that were not the event (`BadAnswer::Unexpected`).
    pub unexpected: u64,
    /// The first request error or unexpected answer, for the operator.
    pub first_problem: Option<String>,
    /// When every id was settled, counted from the start; `None` if they
    /// were not all settled by the deadline.
    pub settled_after: Option<Duration>,
    pub elapsed: Duration,
    /// A few ids of each kind that makes the check fail.
    pub pending_examples: Vec<Uuid>,
    pub lost_examples: Vec<Uuid>,
    pub unanswered_examples: Vec<Uuid>,
}

/// What one thread saw in one round.
struct RoundTally {
    answers: Vec<(usize, State)>,
    requests: u64,
    errors: BTreeMap<&'static str, u64>,
    unexpected: u64,
    first_problem: Option<String>,
    unauthorized: bool,
}

impl State {
    /// True when waiting longer cannot change the state.
    pub fn is_settled(self) -> bool {
        matches!(self, State::Processed | State::Failed | State::Lost)
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::Unauthorized => f.write_str(
                "the server refused the API key (401); give it with --api-key or LOADGEN_API_KEY",
            ),
            CheckError::Spawn(e) => write!(f, "cannot start a client thread: {e}"),
            CheckError::Panicked => f.write_str("a client thread panicked"),
        }
    }
}

impl std::error::Error for CheckError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CheckError::Spawn(e) => Some(e),
            _ => None,
        }
    }
}

/// Parses an id file: one UUID a line, blank lines ignored. Returns the
/// distinct ids, sorted, or the first bad line, numbered from 1.
pub fn parse_ids(text: &str) -> Result<Vec<Uuid>, String> {
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let id =
            Uuid::parse_str(line).map_err(|_| format!("line {}: {line:?} is not a UUID", n + 1))?;
        ids.push(id);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// What `GET /v1/events/<id>` answered about `id`.
pub fn read_answer(id: &Uuid, response: &Response<'_>) -> Result<State, BadAnswer> {
    let unexpected = |what: String| Err(BadAnswer::Unexpected(what));
    let body: Option<Value> = serde_json::from_slice(response.body).ok();
    let field = |name: &str| {
        body.as_ref()
            .and_then(|b| b.get(name))
            .and_then(Value::as_str)
    };
    match response.status {
        200 => {}
        401 => return Err(BadAnswer::Unauthorized),
        404 if field("error") == Some("event_not_found") => return Ok(State::Lost),
        status => {
            let error = field("error").map_or(String::new(), |e| format!(" {e}"));
            return unexpected(format!("status {status}{error} for event {id}"));
        }
    }
    if body.is_none() {
        return unexpected(format!("the answer for event {id} is not JSON"));
    }
    // An answer about another event would be a server bug; it must not be
    // counted for this one.
    let answered_id = field("id").and_then(|s| Uuid::parse_str(s).ok());
    if answered_id != Some(*id) {
        return unexpected(format!(
            "the answer for event {id} is about {:?}",
            field("id")
        ));
    }
    match field("status") {
        Some("pending") => Ok(State::Pending),
        Some("processed") => Ok(State::Processed),
        Some("failed") => Ok(State::Failed),
        other => unexpected(format!("event {id} has an unknown status {other:?}")),
    }
}

/// Polls every id until each is settled or `deadline` has passed since the
/// call, with one thread per client. No round starts later than
/// `ROUND_PAUSE` before the deadline, and a round stops asking at it.
pub fn poll(
    ids: &[Uuid],
    clients: &mut [Client],
    deadline: Duration,
) -> Result<CheckReport, CheckError> {
    let start = Instant::now();
    let end = start + deadline;
    let mut states = vec![State::Unanswered; ids.len()];
    let mut todo: Vec<usize> = (0..ids.len()).collect();
    let mut report = CheckReport::empty(ids.len() as u64);
    while !todo.is_empty() {
        report.rounds += 1;
        for tally in round(ids, &todo, clients, end)? {
            if tally.unauthorized {
                return Err(CheckError::Unauthorized);
            }
            for (i, state) in tally.answers {
                states[i] = state;
            }
            report.requests += tally.requests;
            report.unexpected += tally.unexpected;
            for (kind, n) in tally.errors {
                *report.errors_by_kind.entry(kind).or_default() += n;
            }
            if report.first_problem.is_none() {
                report.first_problem = tally.first_problem;
            }
        }
        todo.retain(|&i| !states[i].is_settled());
        if todo.is_empty() {
            report.settled_after = Some(start.elapsed());
            break;
        }
        // A round that would start at the deadline could ask nothing.
        if Instant::now() + ROUND_PAUSE >= end {
            break;
        }
        thread::sleep(ROUND_PAUSE);
    }
    report.elapsed = start.elapsed();
    report.count(ids, &states);
    Ok(report)
}

/// Asks once about each id in `todo`, the threads taking the next one from
/// a shared counter; stops taking new ones at `end`.
fn round(
    ids: &[Uuid],
    todo: &[usize],
    clients: &mut [Client],
    end: Instant,
) -> Result<Vec<RoundTally>, CheckError> {
    let next = AtomicUsize::new(0);
    thread::scope(|scope| {
        let mut handles = Vec::with_capacity(clients.len());
        for (index, client) in clients.iter_mut().enumerate() {
            let next = &next;
            let handle = thread::Builder::new()
                .name(format!("check-{index}"))
                .spawn_scoped(scope, move || {
                    let mut tally = RoundTally::new();
                    let mut path = String::with_capacity(48);
                    while Instant::now() < end {
                        let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            break;
                        };
                        path.clear();
                        path.push_str("/v1/events/");
                        path.push_str(&ids[i].to_string());
                        tally.ask(client, &path, i, &ids[i]);
                        if tally.unauthorized {
                            break;
                        }
                    }
                    tally
                })
                .map_err(CheckError::Spawn)?;
            handles.push(handle);
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| CheckError::Panicked))
            .collect()
    })
}

impl RoundTally {
    fn new() -> RoundTally {
        RoundTally {
            answers: Vec::new(),
            requests: 0,
            errors: BTreeMap::new(),
            unexpected: 0,
            first_problem: None,
            unauthorized: false,
        }
    }

    fn ask(&mut self, client: &mut Client, path: &str, index: usize, id: &Uuid) {
        self.requests += 1;
        match client.get(path).map(|r| read_answer(id, &r)) {
            Ok(Ok(state)) => self.answers.push((index, state)),
            Ok(Err(BadAnswer::Unauthorized)) => self.unauthorized = true,
            Ok(Err(BadAnswer::Unexpected(what))) => {
                self.unexpected += 1;
                self.first_problem.get_or_insert(what);
            }
            Err(e) => {
                *self.errors.entry(e.kind()).or_default() += 1;
                self.first_problem.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

impl CheckReport {
    fn empty(checked: u64) -> CheckReport {
        CheckReport {
            checked,
            processed: 0,
            failed: 0,
            pending: 0,
            lost: 0,
            unanswered: 0,
            rounds: 0,
            requests: 0,
            errors_by_kind: BTreeMap::new(),
            unexpected: 0,
            first_problem: None,
            settled_after: None,
            elapsed: Duration::ZERO,
            pending_examples: Vec::new(),
            lost_examples: Vec::new(),
            unanswered_examples: Vec::new(),
        }
    }

    /// Counts the final states and keeps a few examples of the bad ones.
    fn count(&mut self, ids: &[Uuid], states: &[State]) {
        for (id, state) in ids.iter().zip(states) {
            let (count, examples) = match state {
                State::Processed => (&mut self.processed, None),
                State::Failed => (&mut self.failed, None),
                State::Pending => (&mut self.pending, Some(&mut self.pending_examples)),
                State::Lost => (&mut self.lost, Some(&mut self.lost_examples)),
                State::Unanswered => (&mut self.unanswered, Some(&mut self.unanswered_examples)),
            };
            *count += 1;
            if let Some(examples) = examples.filter(|e| e.len() < EXAMPLES) {
                examples.push(*id);
            }
        }
    }

    /// True when every id was processed or failed.
    pub fn all_settled_and_found(&self) -> bool {
        self.pending == 0 && self.lost == 0 && self.unanswered == 0
    }

    pub fn to_json(&self) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "checked": self.checked,
            "processed": self.processed,
            "failed": self.failed,
            "pending": self.pending,
            "lost": self.lost,
            "unanswered": self.unanswered,
            "settled_after_s": self.settled_after.map(|d| round(d.as_secs_f64())),
            "elapsed_s": round(self.elapsed.as_secs_f64()),
            "rounds": self.rounds,
            "requests": self.requests,
            "errors_by_kind": self.errors_by_kind,
            "unexpected": self.unexpected,
        })
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checked {}  processed {}  failed {}  pending {}  lost {}  unanswered {}  ",
            self.checked, self.processed, self.failed, self.pending, self.lost, self.unanswered
        )?;
        match self.settled_after {
            Some(d) => write!(f, "all settled after {:.2}s", d.as_secs_f64())?,
            None => write!(
                f,
                "not all settled after {:.2}s",
                self.elapsed.as_secs_f64()
            )?,
        }
        write!(f, "  ({} rounds, {} requests)", self.rounds, self.requests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Target;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    const ID: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";

    fn answer(status: u16, body: &str) -> Result<State, BadAnswer> {
        let id = Uuid::parse_str(ID).expect("uuid");
        read_answer(
            &id,
            &Response {
                status,
                body: body.as_bytes(),
            },
        )
    }

    fn is_unexpected(result: Result<State, BadAnswer>) -> bool {
        matches!(result, Err(BadAnswer::Unexpected(_)))
    }

    #[test]
    fn reads_the_status_whatever_the_key_order() {
        // The order the server writes today: "status" before "type".
        let body = format!(
            "{{\"attempts\":1,\"id\":\"{ID}\",\"key\":null,\"payload\":{{\"status\":\"failed\"}},\
             \"status\":\"processed\",\"type\":null}}"
        );
        assert_eq!(answer(200, &body), Ok(State::Processed));
        let body = format!("{{\"status\":\"pending\",\"id\":\"{ID}\"}}");
        assert_eq!(answer(200, &body), Ok(State::Pending));
        let body = format!("{{ \"id\" : \"{ID}\" ,\n \"status\" : \"failed\" }}");
        assert_eq!(answer(200, &body), Ok(State::Failed));
    }

    #[test]
    fn only_the_servers_not_found_means_lost() {
        let not_found =
            format!("{{\"detail\":\"no event with id {ID}\",\"error\":\"event_not_found\"}}");
        assert_eq!(answer(404, &not_found), Ok(State::Lost));
        // A 404 from something that is not the event route proves nothing.
        assert!(is_unexpected(answer(404, "{\"error\":\"not_found\"}")));
        assert!(is_unexpected(answer(404, "<html>no</html>")));
    }

    #[test]
    fn other_answers_are_asked_again_or_stop_the_check() {
        assert_eq!(
            answer(401, "{\"error\":\"unauthorized\"}"),
            Err(BadAnswer::Unauthorized)
        );
        assert_eq!(
            answer(503, "{\"error\":\"unavailable\",\"detail\":\"db\"}"),
            Err(BadAnswer::Unexpected(format!(
                "status 503 unavailable for event {ID}"
            )))
        );
        assert!(is_unexpected(answer(200, "not json")));
        assert!(is_unexpected(answer(200, "{\"status\":\"processed\"}")));
        let other = "{\"id\":\"00000000-0000-4000-8000-000000000000\",\"status\":\"processed\"}";
        assert!(is_unexpected(answer(200, other)));
        let body = format!("{{\"id\":\"{ID}\",\"status\":\"done\"}}");
        assert!(is_unexpected(answer(200, &body)));
        let body = format!("{{\"id\":\"{ID}\",\"status\":1}}");
        assert!(is_unexpected(answer(200, &body)));
    }

    #[test]
    fn id_files_hold_distinct_uuids() {
        let other = "00000000-0000-4000-8000-000000000000";
        let ids = parse_ids(&format!("{ID}\n\n  {other}\n{ID}\n")).expect("valid");
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0].to_string(), other);
        assert_eq!(parse_ids(""), Ok(Vec::new()));
        assert_eq!(
            parse_ids(&format!("{ID}\nnope\n")),
            Err("line 2: \"nope\" is not a UUID".to_string())
        );
    }

    #[test]
    fn the_report_separates_pending_from_lost() {
        let ids: Vec<Uuid> = (0..5u128).map(Uuid::from_u128).collect();
        let states = [
            State::Processed,
            State::Failed,
            State::Pending,
            State::Lost,
            State::Unanswered,
        ];
        let mut report = CheckReport::empty(5);
        report.rounds = 2;
        report.requests = 9;
        report.elapsed = Duration::from_secs(3);
        report.count(&ids, &states);
        assert_eq!(
            (report.processed, report.failed, report.pending, report.lost),
            (1, 1, 1, 1)
        );
        assert_eq!(report.unanswered, 1);
        assert_eq!(report.lost_examples, vec![ids[3]]);
        assert!(!report.all_settled_and_found());
        assert_eq!(
            report.to_string(),
            "checked 5  processed 1  failed 1  pending 1  lost 1  unanswered 1  \
             not all settled after 3.00s  (2 rounds, 9 requests)"
        );
        let json = report.to_json();
        assert_eq!(json["pending"], json!(1));
        assert_eq!(json["lost"], json!(1));
        assert_eq!(json["settled_after_s"], Value::Null);

        let mut report = CheckReport::empty(2);
        report.settled_after = Some(Duration::from_millis(1500));
        report.count(&ids[..2], &states[..2]);
        assert!(report.all_settled_and_found());
        assert!(report.to_string().contains("all settled after 1.50s"));
        assert_eq!(report.to_json()["settled_after_s"], json!(1.5));
    }

    /// A loopback server that answers `GET <path>` with `answer(path, n)`,
    /// `n` counting the times that path was asked, on keep-alive
    /// connections.
    fn serve(answer: fn(&str, u32) -> (u16, String)) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let asked = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let mut writer = stream.expect("accept");
                let mut reader = BufReader::new(writer.try_clone().expect("clone"));
                let asked = Arc::clone(&asked);
                thread::spawn(move || {
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split(' ').nth(1).expect("path").to_string();
                        while line != "\r\n" {
                            line.clear();
                            reader.read_line(&mut line).expect("header");
                        }
                        let n = {
                            let mut asked = asked.lock().expect("lock");
                            let n = asked.entry(path.clone()).or_default();
                            *n += 1;
                            *n
                        };
                        let (status, body) = answer(&path, n);
                        let response = format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        writer.write_all(response.as_bytes()).expect("write");
                    }
                });
            }
        });
        Target::parse(&url).expect("url")
    }

    fn clients(target: &Target, n: usize) -> Vec<Client> {
        (0..n)
            .map(|_| Client::new(target.clone(), "/", Duration::from_secs(5)))
            .collect()
    }

    /// Ids 1 to 4: processed from the second ask, lost, pending for ever,
    /// and failed after one 503.
    fn four_fates(path: &str, n: u32) -> (u16, String) {
        let id = path.trim_start_matches("/v1/events/");
        let event = |status: &str| (200, format!("{{\"status\":\"{status}\",\"id\":\"{id}\"}}"));
        match (Uuid::parse_str(id).expect("uuid").as_u128(), n) {
            (1, 1) => event("pending"),
            (1, _) => event("processed"),
            (2, _) => (404, "{\"error\":\"event_not_found\"}".into()),
            (3, _) => event("pending"),
            (4, 1) => (503, "{\"error\":\"unavailable\"}".into()),
            (4, _) => event("failed"),
            _ => (500, String::new()),
        }
    }

    #[test]
    fn polls_until_the_deadline_and_tells_pending_from_lost() {
        let target = serve(four_fates);
        let ids: Vec<Uuid> = (1..=4u128).map(Uuid::from_u128).collect();
        let deadline = Duration::from_millis(700);
        let report = poll(&ids, &mut clients(&target, 3), deadline).expect("checked");
        assert_eq!(
            (report.processed, report.failed, report.pending, report.lost),
            (1, 1, 1, 1),
            "{report}"
        );
        assert_eq!(report.unanswered, 0);
        assert_eq!(report.unexpected, 1);
        assert_eq!(report.pending_examples, vec![ids[2]]);
        assert_eq!(report.lost_examples, vec![ids[1]]);
        assert_eq!(report.settled_after, None);
        assert!(report.elapsed >= deadline - ROUND_PAUSE, "{report}");
        // Settled ids are asked no more: after the first round only the
        // pending one is.
        assert!(report.rounds >= 3, "{report}");
        assert_eq!(report.requests, 4 + 3 + (report.rounds - 2), "{report}");
    }

    #[test]
    fn stops_as_soon_as_everything_is_settled() {
        let target = serve(four_fates);
        let ids = [Uuid::from_u128(1), Uuid::from_u128(4)];
        let report =
            poll(&ids, &mut clients(&target, 2), Duration::from_secs(60)).expect("checked");
        assert!(report.all_settled_and_found(), "{report}");
        assert_eq!((report.processed, report.failed, report.rounds), (1, 1, 2));
        assert!(
            report
                .settled_after
                .is_some_and(|d| d < Duration::from_secs(10))
        );
    }

    #[test]
    fn a_refused_key_ends_the_check() {
        let target = serve(|_, _| (401, "{\"error\":\"unauthorized\"}".into()));
        let result = poll(
            &[Uuid::from_u128(1)],
            &mut clients(&target, 1),
            Duration::from_secs(60),
        );
        assert!(
            matches!(result, Err(CheckError::Unauthorized)),
            "{result:?}"
        );
    }
}
