//! `loadgen`: sends ingest requests to one `ingestd` and reports what it did,
//! or checks what became of the events it sent.
//!
//! It owns the command line, the two ways of pacing requests and the
//! summary. In a closed loop every client thread sends back-to-back, which
//! measures throughput. In an open loop requests follow a fixed schedule and
//! each latency is measured from the instant the request was due, not the
//! instant it went out: a stalled server delays the client threads too, and
//! measuring from the actual send would hide the stall (coordinated
//! omission). The HTTP exchange lives in `client`, the latency bookkeeping
//! in `histogram` and the `--check-ids` polling in `check`. Traffic goes only to the URL given, and every run is
//! bounded by a request count or a duration.

#[path = "loadgen/check.rs"]
mod check;
#[path = "loadgen/client.rs"]
mod client;
#[path = "loadgen/histogram.rs"]
mod histogram;

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

use check::CheckError;
use client::{Client, RequestError, Target};
use histogram::Histogram;

const USAGE: &str = "\
Usage: loadgen [OPTIONS]
       loadgen --check-ids FILE [--deadline D] [OPTIONS]

Posts JSON events to an ingestd server over keep-alive HTTP/1.1 connections,
one per client thread, and reports status counts and latency percentiles.

With --check-ids it posts nothing: it asks GET /v1/events/<id> about every
id in FILE (one a line, as --ids-out writes them), again and again for those
still pending, until each is processed, failed or unknown to the server
(404: lost), or the deadline passes.

Options:
  --url URL           server base URL, http only [default: http://127.0.0.1:5001]
  --path PATH         request path [default: /Ingestion/ingest]
  --concurrency C     client threads, one connection each [default: 32]
  --duration D        stop after D, written like 500ms, 10s or 2m
  --requests N        stop after N requests [default: 10000 when neither
                      --duration nor --requests is given]
  --rate R            open loop: R requests per second in all, on a fixed
                      schedule shared by the threads, latency measured from
                      each request's scheduled time; without it every thread
                      sends back-to-back
  --payload-bytes B   size of each event in bytes [default: 100]
  --batch N           events per request, sent as a JSON array when above 1
                      (use --path /v1/events) [default: 1]
  --ids-out FILE      write the id of every 202 response to FILE, one a line
  --check-ids FILE    check the events in FILE instead of sending any
  --deadline D        with --check-ids: give up on events still pending after
                      D [default: 120s]
  --api-key KEY       send Authorization: Bearer KEY; LOADGEN_API_KEY in the
                      environment does the same out of sight of ps
  --json              print one JSON object instead of the summary line
  --gzip              send every body gzip-compressed (Content-Encoding: gzip)
  --timeout D         limit on each request, connecting included [default: 10s]
  -h, --help          print this help

With both --duration and --requests the first limit reached ends the run.
Exit status: 0; 1 when no request got a 2xx answer, when a 202 held no id
for --ids-out, or with --check-ids when an event is still pending, lost or
unanswered; 2 on a bad argument.
";

const FLAGS: [&str; 15] = [
    "--url",
    "--path",
    "--concurrency",
    "--duration",
    "--requests",
    "--rate",
    "--payload-bytes",
    "--batch",
    "--ids-out",
    "--check-ids",
    "--deadline",
    "--api-key",
    "--timeout",
    "--json",
    "--gzip",
];
/// The flags that shape what is sent, which --check-ids does not send.
const SEND_FLAGS: [&str; 7] = [
    "--path",
    "--duration",
    "--requests",
    "--rate",
    "--payload-bytes",
    "--batch",
    "--ids-out",
];
/// Where the API key may come from, besides --api-key.
const API_KEY_VAR: &str = "LOADGEN_API_KEY";
const DEFAULT_URL: &str = "http://127.0.0.1:5001";
const DEFAULT_PATH: &str = "/Ingestion/ingest";
const DEFAULT_CONCURRENCY: usize = 32;
const DEFAULT_REQUESTS: u64 = 10_000;
const DEFAULT_PAYLOAD_BYTES: usize = 100;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
const MAX_CONCURRENCY: usize = 10_000;
const MAX_PAYLOAD_BYTES: usize = 64 * 1024 * 1024;
const MAX_BATCH: u64 = 100_000;
/// Pause after a failed connect, so that a server that is down costs a
/// trickle of errors rather than a busy loop.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);
/// How long before a scheduled send a thread stops sleeping and spins:
/// `sleep` overshoots by tens of microseconds, which the open loop would
/// otherwise charge to the server.
const SPIN_BEFORE: Duration = Duration::from_micros(200);

/// What the command line asks for.
#[derive(Debug)]
struct Args {
    target: Target,
    path: String,
    concurrency: usize,
    duration: Option<Duration>,
    requests: Option<u64>,
    /// Requests per second in all; `None` for a closed loop.
    rate: Option<f64>,
    payload_bytes: usize,
    /// Events per request; above 1 the body is an array.
    batch: usize,
    ids_out: Option<PathBuf>,
    /// `--check-ids`: check these events instead of sending.
    check: Option<Check>,
    /// Presented as a bearer token on every request.
    api_key: Option<String>,
    json: bool,
    /// `--gzip`: bodies go gzip-compressed.
    gzip: bool,
    timeout: Duration,
}

/// What `--check-ids` asks for.
#[derive(Debug, PartialEq, Eq)]
struct Check {
    ids: PathBuf,
    deadline: Duration,
}

/// A command line that cannot be run.
#[derive(Debug, PartialEq, Eq)]
enum ArgError {
    /// An argument that is not a known flag.
    Unknown(String),
    /// A flag given without its value.
    MissingValue(&'static str),
    /// A flag given more than once.
    Repeated(&'static str),
    /// A flag whose value cannot be used, with the reason.
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
    /// A flag that only means something with `--check-ids`, or nothing
    /// with it.
    Conflict {
        flag: &'static str,
        with_check: bool,
    },
    /// An argument that is not valid UTF-8.
    NotUnicode(String),
}

/// A run that could not be carried out.
#[derive(Debug)]
enum RunError {
    /// The `--ids-out` file could not be created.
    CreateIds(PathBuf, io::Error),
    /// The `--ids-out` file could not be written.
    WriteIds(PathBuf, io::Error),
    /// The `--check-ids` file could not be read.
    ReadIds(PathBuf, io::Error),
    /// The `--check-ids` file holds something that is not an id.
    BadIds(PathBuf, String),
    /// The check stopped early.
    Check(CheckError),
    /// Not even the first connection could be opened.
    Unreachable(String, RequestError),
    /// A client thread could not be started.
    Spawn(io::Error),
    /// A client thread panicked: a bug in this program.
    Panicked,
}

/// What one client thread saw; merged into the totals at the end.
struct Tally {
    latency: Histogram,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
    sent: u64,
    /// Open loop: scheduled requests left unsent when the duration ran out.
    missed: u64,
    ids: Vec<String>,
    /// 202 responses whose body held no UUID `id`.
    missing_ids: u64,
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Unknown(arg) => write!(f, "unknown argument {arg:?}"),
            ArgError::MissingValue(flag) => write!(f, "{flag} needs a value"),
            ArgError::Repeated(flag) => write!(f, "{flag} is given more than once"),
            ArgError::Invalid {
                flag,
                value,
                reason,
            } => write!(f, "invalid value {value:?} for {flag}: {reason}"),
            ArgError::Conflict {
                flag,
                with_check: true,
            } => write!(f, "{flag} sends events; --check-ids sends none"),
            ArgError::Conflict {
                flag,
                with_check: false,
            } => write!(f, "{flag} is used only with --check-ids"),
            ArgError::NotUnicode(arg) => write!(f, "argument {arg:?} is not valid UTF-8"),
        }
    }
}

impl Error for ArgError {}

impl RunError {
    fn exit_code(&self) -> u8 {
        match self {
            // The file is named on the command line: a usage error.
            RunError::CreateIds(..) | RunError::ReadIds(..) | RunError::BadIds(..) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::CreateIds(path, e) => {
                write!(f, "cannot create --ids-out file {}: {e}", path.display())
            }
            RunError::WriteIds(path, e) => {
                write!(f, "cannot write --ids-out file {}: {e}", path.display())
            }
            RunError::ReadIds(path, e) => {
                write!(f, "cannot read --check-ids file {}: {e}", path.display())
            }
            RunError::BadIds(path, e) => {
                write!(f, "bad --check-ids file {}: {e}", path.display())
            }
            RunError::Check(e) => e.fmt(f),
            RunError::Unreachable(url, e) => write!(f, "no server answers at {url}: {e}"),
            RunError::Spawn(e) => write!(f, "cannot start a client thread: {e}"),
            RunError::Panicked => f.write_str("a client thread panicked"),
        }
    }
}

impl Error for RunError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            RunError::CreateIds(_, e)
            | RunError::WriteIds(_, e)
            | RunError::ReadIds(_, e)
            | RunError::Spawn(e) => Some(e),
            RunError::Unreachable(_, e) => Some(e),
            RunError::Check(e) => Some(e),
            RunError::BadIds(..) | RunError::Panicked => None,
        }
    }
}

fn main() -> ExitCode {
    let args = std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string()
                .map_err(|a| ArgError::NotUnicode(a.to_string_lossy().into_owned()))
        })
        .collect::<Result<Vec<String>, ArgError>>()
        .and_then(parse_args)
        .and_then(|args| args.map(api_key_from_env).transpose());
    let args = match args {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loadgen: {e}\nTry 'loadgen --help'.");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Parses the arguments after the program name; `None` asks for the help.
fn parse_args(args: Vec<String>) -> Result<Option<Args>, ArgError> {
    let mut values: BTreeMap<&'static str, String> = BTreeMap::new();
    let (mut json, mut gzip) = (false, false);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (arg.as_str(), None),
        };
        let flag = *FLAGS
            .iter()
            .find(|f| **f == name)
            .ok_or_else(|| ArgError::Unknown(arg.clone()))?;
        if flag == "--json" || flag == "--gzip" {
            if inline.is_some() {
                return Err(ArgError::Unknown(arg));
            }
            if flag == "--json" {
                json = true;
            } else {
                gzip = true;
            }
            continue;
        }
        let value = match inline {
            Some(value) => value,
            // No value starts with "--", so one that does is the next flag.
            None => args
                .next()
                .filter(|v| !v.starts_with("--"))
                .ok_or(ArgError::MissingValue(flag))?,
        };
        if values.insert(flag, value).is_some() {
            return Err(ArgError::Repeated(flag));
        }
    }

    let given: Vec<&'static str> = values.keys().copied().collect();
    let mut take = |flag: &'static str| values.remove(flag).map(|value| (flag, value));
    let url = take("--url").unwrap_or(("--url", DEFAULT_URL.to_string()));
    let target = check(url, Target::parse)?;
    let path = match take("--path") {
        Some(path) => check(path, parse_path)?,
        None => DEFAULT_PATH.to_string(),
    };
    let concurrency = match take("--concurrency") {
        Some(c) => check(c, |v| parse_count(v, MAX_CONCURRENCY as u64))? as usize,
        None => DEFAULT_CONCURRENCY,
    };
    let duration = take("--duration")
        .map(|d| check(d, parse_duration))
        .transpose()?;
    let requests = take("--requests")
        .map(|n| check(n, |v| parse_count(v, u64::MAX)))
        .transpose()?;
    let rate = take("--rate").map(|r| check(r, parse_rate)).transpose()?;
    let payload_bytes = match take("--payload-bytes") {
        Some(b) => check(b, |v| parse_size(v, MAX_PAYLOAD_BYTES))?,
        None => DEFAULT_PAYLOAD_BYTES,
    };
    let batch = match take("--batch") {
        Some(n) => check(n, |v| parse_count(v, MAX_BATCH))? as usize,
        None => 1,
    };
    let ids_out = take("--ids-out").map(|(_, file)| PathBuf::from(file));
    let api_key = take("--api-key").map(check_api_key).transpose()?;
    let timeout = match take("--timeout") {
        Some(t) => check(t, parse_duration)?,
        None => DEFAULT_TIMEOUT,
    };
    let deadline = take("--deadline")
        .map(|d| check(d, parse_duration))
        .transpose()?;
    let check_ids = match (take("--check-ids"), deadline) {
        (Some((_, ids)), deadline) => Some(Check {
            ids: PathBuf::from(ids),
            deadline: deadline.unwrap_or(DEFAULT_DEADLINE),
        }),
        (None, Some(_)) => {
            return Err(ArgError::Conflict {
                flag: "--deadline",
                with_check: false,
            });
        }
        (None, None) => None,
    };
    if check_ids.is_some()
        && let Some(flag) = SEND_FLAGS.into_iter().find(|f| given.contains(f))
    {
        return Err(ArgError::Conflict {
            flag,
            with_check: true,
        });
    }
    let requests = match (duration, requests) {
        (None, None) => Some(DEFAULT_REQUESTS),
        (_, requests) => requests,
    };
    Ok(Some(Args {
        target,
        path,
        concurrency,
        duration,
        requests,
        rate,
        payload_bytes,
        batch,
        ids_out,
        check: check_ids,
        api_key,
        json,
        gzip,
        timeout,
    }))
}

/// Takes the API key from `LOADGEN_API_KEY` when `--api-key` gave none.
fn api_key_from_env(mut args: Args) -> Result<Args, ArgError> {
    if args.api_key.is_none()
        && let Some(key) = std::env::var_os(API_KEY_VAR)
    {
        let key = key
            .into_string()
            .map_err(|k| ArgError::NotUnicode(k.to_string_lossy().into_owned()))?;
        args.api_key = Some(check_api_key((API_KEY_VAR, key))?);
    }
    Ok(args)
}

/// Runs a value parser, naming the flag and the value if it fails.
fn check<T>(
    (flag, value): (&'static str, String),
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, ArgError> {
    parse(&value).map_err(|reason| ArgError::Invalid {
        flag,
        value,
        reason,
    })
}

fn parse_path(value: &str) -> Result<String, String> {
    if !value.starts_with('/') {
        return Err("the path must start with /".into());
    }
    // The path goes into the request line verbatim.
    if value
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("the path must not contain spaces or control characters".into());
    }
    Ok(value.to_string())
}

/// Like `check` with `parse_api_key`, but an error does not repeat the key.
fn check_api_key((flag, value): (&'static str, String)) -> Result<String, ArgError> {
    parse_api_key(&value).map_err(|reason| ArgError::Invalid {
        flag,
        value: "(not shown)".into(),
        reason,
    })
}

fn parse_api_key(value: &str) -> Result<String, String> {
    // The key goes into a header verbatim.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the key must be visible ASCII characters, without spaces".into());
    }
    Ok(value.to_string())
}

fn parse_count(value: &str, max: u64) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        Ok(_) => Err(format!("expected a whole number from 1 to {max}")),
        Err(_) => Err("expected a whole number".into()),
    }
}

fn parse_size(value: &str, max: usize) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("expected a whole number from 0 to {max}")),
    }
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err("expected a positive number of requests per second".into()),
    }
}

/// Parses a duration such as `500ms`, `10s`, `1.5s` or `2m`.
fn parse_duration(value: &str) -> Result<Duration, String> {
    let unit_at = value
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or("expected a number and a unit: ms, s, m or h (like 500ms, 10s, 2m)")?;
    let (number, unit) = value.split_at(unit_at);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{number:?} is not a number"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("unknown unit {unit:?}; use ms, s, m or h")),
    };
    match Duration::try_from_secs_f64(seconds) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err("expected a duration above zero".into()),
    }
}

fn run(args: &Args) -> Result<ExitCode, RunError> {
    match &args.check {
        Some(spec) => run_check(args, spec),
        None => run_send(args),
    }
}

/// Connects `args.concurrency` clients; only the first failure is fatal,
/// later ones are retried on first use.
fn connect_clients(args: &Args, path: &str) -> Result<Vec<Client>, RunError> {
    let mut clients = Vec::with_capacity(args.concurrency);
    for i in 0..args.concurrency {
        let mut client = Client::new(args.target.clone(), path, args.timeout)
            .with_api_key(args.api_key.clone())
            .with_gzip(args.gzip);
        if let Err(e) = client.connect()
            && i == 0
        {
            return Err(RunError::Unreachable(args.target.to_string(), e));
        }
        clients.push(client);
    }
    Ok(clients)
}

/// Checks the events of an id file and reports their states.
fn run_check(args: &Args, spec: &Check) -> Result<ExitCode, RunError> {
    let text =
        std::fs::read_to_string(&spec.ids).map_err(|e| RunError::ReadIds(spec.ids.clone(), e))?;
    let ids = check::parse_ids(&text).map_err(|e| RunError::BadIds(spec.ids.clone(), e))?;
    let mut clients = connect_clients(args, "/")?;
    let report = check::poll(&ids, &mut clients, spec.deadline).map_err(RunError::Check)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    let examples = |ids: &[Uuid]| {
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        ids.join(" ")
    };
    if report.pending > 0 {
        eprintln!(
            "loadgen: still pending at the {:.0}s deadline: {} (e.g. {})",
            spec.deadline.as_secs_f64(),
            report.pending,
            examples(&report.pending_examples)
        );
    }
    if report.lost > 0 {
        eprintln!(
            "loadgen: unknown to the server (404, lost): {} (e.g. {})",
            report.lost,
            examples(&report.lost_examples)
        );
    }
    if report.unanswered > 0 {
        eprintln!(
            "loadgen: no usable answer before the deadline: {} (e.g. {})",
            report.unanswered,
            examples(&report.unanswered_examples)
        );
    }
    if let Some(problem) = &report.first_problem {
        eprintln!("loadgen: first problem: {problem}");
    }
    Ok(if report.all_settled_and_found() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sends events and reports how the server answered.
fn run_send(args: &Args) -> Result<ExitCode, RunError> {
    // Create the file first: a typo in its path should not cost a whole run.
    let ids_file = args
        .ids_out
        .as_ref()
        .map(|path| File::create(path).map_err(|e| RunError::CreateIds(path.clone(), e)))
        .transpose()?;

    // Connect every client before the clock starts, so that the first
    // requests measure the server rather than the handshakes.
    let clients = connect_clients(args, &args.path)?;

    let next_seq = AtomicU64::new(0);
    let start = Instant::now();
    let tallies = thread::scope(|scope| {
        let mut handles = Vec::with_capacity(clients.len());
        for (index, client) in clients.into_iter().enumerate() {
            let next_seq = &next_seq;
            let handle = thread::Builder::new()
                .name(format!("client-{index}"))
                .spawn_scoped(scope, move || match args.rate {
                    None => closed_loop(args, client, start, next_seq),
                    Some(rate) => open_loop(args, index, rate, client, start),
                })
                .map_err(RunError::Spawn)?;
            handles.push(handle);
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| RunError::Panicked))
            .collect::<Result<Vec<Tally>, RunError>>()
    })?;
    let elapsed = start.elapsed();

    let mut total = Tally::new();
    for tally in tallies {
        total.merge(tally);
    }
    if let (Some(file), Some(path)) = (ids_file, &args.ids_out) {
        write_ids(file, &total.ids).map_err(|e| RunError::WriteIds(path.clone(), e))?;
    }

    let report = Report::new(&total, elapsed);
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    if let Some(e) = &total.first_error {
        eprintln!("loadgen: first error: {e}");
    }
    if total.missed > 0 {
        eprintln!(
            "loadgen: {} scheduled requests were not sent before --duration ran out; \
             the server did not keep up with --rate",
            total.missed
        );
    }
    if total.missing_ids > 0 {
        eprintln!(
            "loadgen: {} 202 responses held no id; --ids-out lacks them",
            total.missing_ids
        );
    }
    // An id file that lacks accepted events would make a later check
    // vouch for less than was sent.
    Ok(if report.accepted == 0 || total.missing_ids > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Sends back-to-back until the request count or the duration runs out.
fn closed_loop(args: &Args, mut client: Client, start: Instant, next_seq: &AtomicU64) -> Tally {
    let mut tally = Tally::new();
    let mut body = Vec::with_capacity(args.payload_bytes * args.batch);
    let end = args.duration.map(|d| start + d);
    loop {
        if end.is_some_and(|end| Instant::now() >= end) {
            break;
        }
        // The counter hands out sequence numbers and enforces --requests in
        // one step, so the threads never overshoot the total between them.
        let seq = next_seq.fetch_add(1, Ordering::Relaxed);
        if args.requests.is_some_and(|n| seq >= n) {
            break;
        }
        write_body(&mut body, seq, args.payload_bytes, args.batch);
        send(
            &mut client,
            &body,
            Instant::now(),
            args.ids_out.is_some(),
            &mut tally,
        );
    }
    tally
}

/// Sends request number `index`, `index + C`, `index + 2C`… of a schedule
/// that puts request `k` at `start + k / rate`.
fn open_loop(args: &Args, index: usize, rate: f64, mut client: Client, start: Instant) -> Tally {
    let mut tally = Tally::new();
    let mut body = Vec::with_capacity(args.payload_bytes * args.batch);
    let end = args.duration.map(|d| start + d);
    let due = |seq: u64| start + Duration::from_secs_f64(seq as f64 / rate);
    let mut seq = index as u64;
    loop {
        if args.requests.is_some_and(|n| seq >= n) {
            break;
        }
        let intended = due(seq);
        if let Some(end) = end {
            if intended >= end {
                break;
            }
            // A thread that fell behind may reach the end with requests it
            // was due to send still unsent. Sending them now would stretch
            // the run past --duration, so they are counted instead.
            if Instant::now() >= end {
                while args.requests.is_none_or(|n| seq < n) && due(seq) < end {
                    tally.missed += 1;
                    seq += args.concurrency as u64;
                }
                break;
            }
        }
        wait_until(intended);
        write_body(&mut body, seq, args.payload_bytes, args.batch);
        // Behind schedule the request goes out at once, but its latency
        // still counts from when it was due.
        send(
            &mut client,
            &body,
            intended,
            args.ids_out.is_some(),
            &mut tally,
        );
        seq += args.concurrency as u64;
    }
    tally
}

fn wait_until(when: Instant) {
    let now = Instant::now();
    if when > now + SPIN_BEFORE {
        thread::sleep(when - now - SPIN_BEFORE);
    }
    while Instant::now() < when {
        std::hint::spin_loop();
    }
}

/// Sends one request and records its outcome, the latency counted from
/// `since`.
fn send(client: &mut Client, body: &[u8], since: Instant, keep_ids: bool, tally: &mut Tally) {
    tally.sent += 1;
    match client.post(body) {
        Ok(response) => {
            tally.latency.record(since.elapsed());
            *tally.statuses.entry(response.status).or_default() += 1;
            if keep_ids && response.status == 202 {
                match accepted_ids(response.body) {
                    Some(ids) => tally.ids.extend(ids),
                    None => tally.missing_ids += 1,
                }
            }
        }
        Err(e) => {
            *tally.errors.entry(e.kind()).or_default() += 1;
            let refused = matches!(e, RequestError::Connect(_));
            tally.first_error.get_or_insert_with(|| e.to_string());
            if refused {
                thread::sleep(CONNECT_BACKOFF);
            }
        }
    }
}

/// The ids of a `202` body: `{"id":"<uuid>",...}` for one event,
/// `{"ids":[...],...}` for a batch.
fn accepted_ids(body: &[u8]) -> Option<Vec<String>> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let parse = |v: &Value| Some(Uuid::parse_str(v.as_str()?).ok()?.to_string());
    match (value.get("id"), value.get("ids")) {
        (Some(id), _) => Some(vec![parse(id)?]),
        (None, Some(Value::Array(ids))) => ids.iter().map(parse).collect(),
        _ => None,
    }
}

/// Writes request `seq`: with `batch` 1 the event
/// `{"payload":{"seq":N,"pad":"xx…"}}`, padded to `size` bytes when that is
/// more than the event without padding; above 1 an array of `batch` such
/// events, numbered `"seq":"N.i"`.
fn write_body(buf: &mut Vec<u8>, seq: u64, size: usize, batch: usize) {
    const TAIL: &[u8] = b"\"}}";
    buf.clear();
    if batch > 1 {
        buf.push(b'[');
    }
    for i in 0..batch {
        if i > 0 {
            buf.push(b',');
        }
        let start = buf.len();
        buf.extend_from_slice(b"{\"payload\":{\"seq\":");
        if batch > 1 {
            buf.extend_from_slice(format!("\"{seq}.{i}\"").as_bytes());
        } else {
            buf.extend_from_slice(seq.to_string().as_bytes());
        }
        buf.extend_from_slice(b",\"pad\":\"");
        let pad = size.saturating_sub(buf.len() - start + TAIL.len());
        buf.resize(buf.len() + pad, b'x');
        buf.extend_from_slice(TAIL);
    }
    if batch > 1 {
        buf.push(b']');
    }
}

fn write_ids(file: File, ids: &[String]) -> io::Result<()> {
    let mut out = BufWriter::new(file);
    for id in ids {
        writeln!(out, "{id}")?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency: Histogram::new(),
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            first_error: None,
            sent: 0,
            missed: 0,
            ids: Vec::new(),
            missing_ids: 0,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latency.merge(&other.latency);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.sent += other.sent;
        self.missed += other.missed;
        self.ids.extend(other.ids);
        self.missing_ids += other.missing_ids;
    }
}

/// The numbers printed at the end.
struct Report {
    sent: u64,
    accepted: u64,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    errors_by_kind: BTreeMap<&'static str, u64>,
    missed: u64,
    elapsed: Duration,
    throughput: f64,
    /// p50, p90, p95, p99, p99.9 and max, in milliseconds.
    latency_ms: Option<[f64; 6]>,
}

impl Report {
    fn new(total: &Tally, elapsed: Duration) -> Report {
        let responses: u64 = total.statuses.values().sum();
        let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let h = &total.latency;
        Report {
            sent: total.sent,
            accepted: total
                .statuses
                .iter()
                .filter(|(s, _)| (200..300).contains(*s))
                .map(|(_, n)| n)
                .sum(),
            statuses: total.statuses.clone(),
            errors: total.errors.values().sum(),
            errors_by_kind: total.errors.clone(),
            missed: total.missed,
            elapsed,
            throughput: responses as f64 / elapsed.as_secs_f64().max(1e-9),
            latency_ms: (h.len() > 0).then(|| {
                let p = |percent| ms(h.percentile(percent));
                [p(50.0), p(90.0), p(95.0), p(99.0), p(99.9), ms(h.max())]
            }),
        }
    }

    fn to_json(&self) -> Value {
        // Microseconds are the useful precision; more digits are noise.
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let statuses: serde_json::Map<String, Value> = self
            .statuses
            .iter()
            .map(|(s, n)| (s.to_string(), json!(n)))
            .collect();
        let latency = match self.latency_ms {
            Some([p50, p90, p95, p99, p99_9, max]) => json!({
                "p50": round(p50), "p90": round(p90), "p95": round(p95),
                "p99": round(p99), "p99_9": round(p99_9), "max": round(max),
            }),
            None => json!({
                "p50": null, "p90": null, "p95": null, "p99": null, "p99_9": null, "max": null,
            }),
        };
        json!({
            "sent": self.sent,
            "accepted": self.accepted,
            "statuses": statuses,
            "errors": self.errors,
            "errors_by_kind": self.errors_by_kind,
            "missed": self.missed,
            "elapsed_s": round(self.elapsed.as_secs_f64()),
            "throughput_per_s": round(self.throughput),
            "latency_ms": latency,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rejected: Vec<String> = self
            .statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        write!(
            f,
            "sent {}  accepted {}  rejected {{{}}}  errors {}",
            self.sent,
            self.accepted,
            rejected.join(", "),
            self.errors
        )?;
        if !self.errors_by_kind.is_empty() {
            let kinds: Vec<String> = self
                .errors_by_kind
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            write!(f, " {{{}}}", kinds.join(", "))?;
        }
        if self.missed > 0 {
            write!(f, "  missed {}", self.missed)?;
        }
        write!(
            f,
            "  elapsed {:.2}s  throughput {:.0}/s  latency ms ",
            self.elapsed.as_secs_f64(),
            self.throughput
        )?;
        match self.latency_ms {
            Some([p50, p90, p95, p99, p99_9, max]) => write!(
                f,
                "p50 {p50:.2} p90 {p90:.2} p95 {p95:.2} p99 {p99:.2} p99.9 {p99_9:.2} max {max:.2}"
            ),
            None => f.write_str("n/a"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Option<Args>, ArgError> {
        parse_args(line.split_whitespace().map(String::from).collect())
    }

    fn invalid_flag(line: &str) -> &'static str {
        match parse(line) {
            Err(ArgError::Invalid { flag, .. }) => flag,
            other => panic!("{line}: expected an invalid value, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let args = parse("").expect("valid").expect("not help");
        assert_eq!(args.path, DEFAULT_PATH);
        assert_eq!(args.concurrency, 32);
        assert_eq!(args.requests, Some(10_000));
        assert_eq!((args.duration, args.rate, args.json), (None, None, false));
        assert_eq!(args.payload_bytes, 100);
        assert_eq!(args.timeout, Duration::from_secs(10));
    }

    #[test]
    fn flags_with_values() {
        let args = parse(
            "--url http://127.0.0.1:5077 --concurrency 16 --duration 3s --rate 500 \
             --payload-bytes 1000 --ids-out ids.txt --json --timeout=500ms --path /v1/events",
        )
        .expect("valid")
        .expect("not help");
        assert_eq!(args.concurrency, 16);
        assert_eq!(args.duration, Some(Duration::from_secs(3)));
        // A duration alone does not bring the default request count.
        assert_eq!(args.requests, None);
        assert_eq!(args.rate, Some(500.0));
        assert_eq!(args.payload_bytes, 1000);
        assert_eq!(args.ids_out, Some(PathBuf::from("ids.txt")));
        assert!(args.json);
        assert_eq!(args.timeout, Duration::from_millis(500));
        assert_eq!(args.path, "/v1/events");
    }

    #[test]
    fn help() {
        assert!(matches!(parse("--json --help"), Ok(None)));
        assert!(matches!(parse("-h"), Ok(None)));
    }

    #[test]
    fn errors_name_the_flag() {
        assert_eq!(
            parse("--bogus 1").err(),
            Some(ArgError::Unknown("--bogus".into()))
        );
        assert_eq!(
            parse("--rate").err(),
            Some(ArgError::MissingValue("--rate"))
        );
        assert_eq!(
            parse("--rate --json").err(),
            Some(ArgError::MissingValue("--rate"))
        );
        assert_eq!(
            parse("--rate 1 --rate 2").err(),
            Some(ArgError::Repeated("--rate"))
        );
        assert_eq!(invalid_flag("--rate 0"), "--rate");
        assert_eq!(invalid_flag("--rate fast"), "--rate");
        assert_eq!(invalid_flag("--concurrency 0"), "--concurrency");
        assert_eq!(invalid_flag("--requests -5"), "--requests");
        assert_eq!(invalid_flag("--duration 10"), "--duration");
        assert_eq!(invalid_flag("--timeout 0s"), "--timeout");
        assert_eq!(invalid_flag("--url https://example.com"), "--url");
        assert_eq!(invalid_flag("--path nope"), "--path");
        let message = parse("--duration 10").expect_err("refused").to_string();
        assert!(
            message.starts_with("invalid value \"10\" for --duration"),
            "{message}"
        );
    }

    #[test]
    fn check_ids_takes_only_its_own_flags() {
        let args = parse("--check-ids ids.txt --concurrency 8 --json")
            .expect("valid")
            .expect("not help");
        let expected = Check {
            ids: PathBuf::from("ids.txt"),
            deadline: Duration::from_secs(120),
        };
        assert_eq!(args.check, Some(expected));
        assert_eq!(args.concurrency, 8);
        let args = parse("--check-ids ids.txt --deadline 30s")
            .expect("valid")
            .expect("not help");
        assert_eq!(
            args.check.map(|c| c.deadline),
            Some(Duration::from_secs(30))
        );
        assert!(
            parse("--requests 5")
                .expect("valid")
                .expect("args")
                .check
                .is_none()
        );
        for flag in [
            "--rate 5",
            "--requests 5",
            "--ids-out x",
            "--path /v1/events",
        ] {
            let line = format!("--check-ids ids.txt {flag}");
            assert!(
                matches!(
                    parse(&line),
                    Err(ArgError::Conflict {
                        with_check: true,
                        ..
                    })
                ),
                "{line}"
            );
        }
        assert_eq!(
            parse("--deadline 5s").err(),
            Some(ArgError::Conflict {
                flag: "--deadline",
                with_check: false
            })
        );
        assert_eq!(invalid_flag("--check-ids x --deadline 5"), "--deadline");
    }

    #[test]
    fn gzip_is_a_switch() {
        assert!(parse("--gzip").expect("valid").expect("args").gzip);
        assert!(!parse("").expect("valid").expect("args").gzip);
        assert_eq!(
            parse("--gzip=yes").err(),
            Some(ArgError::Unknown("--gzip=yes".into()))
        );
    }

    #[test]
    fn api_keys_go_into_a_header_verbatim() {
        let args = parse("--api-key s3cret-key-0123456789")
            .expect("valid")
            .expect("not help");
        assert_eq!(args.api_key.as_deref(), Some("s3cret-key-0123456789"));
        assert_eq!(parse("").expect("valid").expect("args").api_key, None);
        assert_eq!(invalid_flag("--api-key=a\u{7f}b"), "--api-key");
        assert_eq!(invalid_flag("--api-key="), "--api-key");
        let message = parse("--api-key=a\u{7f}b")
            .expect_err("refused")
            .to_string();
        assert!(!message.contains('\u{7f}'), "{message}");
        assert!(parse_api_key("two words").is_err());
        assert!(parse_api_key("line\r\nX-Evil: 1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "10", "s", "-1s", "0ms", "1d", "1e400s", "NaNs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn bodies_have_the_requested_size_and_parse() {
        let mut buf = Vec::new();
        for (seq, size) in [(0, 100), (123_456_789, 100), (7, 1000), (7, 5)] {
            write_body(&mut buf, seq, size, 1);
            if size > 40 {
                assert_eq!(buf.len(), size);
            }
            let value: Value = serde_json::from_slice(&buf).expect("valid JSON");
            assert_eq!(value["payload"]["seq"], json!(seq));
        }
        write_body(&mut buf, 9, 100, 3);
        assert_eq!(buf.len(), 3 * 100 + 2 + 2);
        let value: Value = serde_json::from_slice(&buf).expect("valid JSON");
        assert_eq!(value[2]["payload"]["seq"], "9.2");
    }

    #[test]
    fn ids_come_only_from_uuid_bodies() {
        let id = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        let body = format!("{{\"id\":\"{id}\",\"status\":\"pending\"}}");
        assert_eq!(accepted_ids(body.as_bytes()), Some(vec![id.to_string()]));
        let batch = format!("{{\"ids\":[\"{id}\",\"{id}\"],\"duplicates\":[]}}");
        assert_eq!(accepted_ids(batch.as_bytes()).map(|v| v.len()), Some(2));
        assert_eq!(accepted_ids(b"{\"ids\":[\"nope\"]}"), None);
        assert_eq!(accepted_ids(b"{\"id\":\"nope\"}"), None);
        assert_eq!(accepted_ids(b"{\"status\":\"pending\"}"), None);
        assert_eq!(accepted_ids(b"not json"), None);
    }

    #[test]
    fn summary_line() {
        let mut tally = Tally::new();
        tally.sent = 4;
        tally.statuses.insert(202, 2);
        tally.statuses.insert(503, 1);
        tally.errors.insert("timeout", 1);
        tally.latency.record(Duration::from_millis(2));
        tally.latency.record(Duration::from_millis(4));
        tally.latency.record(Duration::from_millis(4));
        let report = Report::new(&tally, Duration::from_secs(2));
        let line = report.to_string();
        assert!(
            line.starts_with(
                "sent 4  accepted 2  rejected {503: 1}  errors 1 {timeout: 1}  elapsed 2.00s  throughput 2/s  latency ms p50 4.0"
            ),
            "{line}"
        );
        assert!(line.ends_with("max 4.00"), "{line}");
        let json = report.to_json();
        assert_eq!(json["statuses"], json!({"202": 2, "503": 1}));
        assert_eq!(json["errors"], json!(1));
        assert_eq!(json["latency_ms"]["max"], json!(4.0));
        assert!(json.to_string().contains("\"sent\":4"));
    }

    #[test]
    fn an_empty_run_reports_no_latency() {
        let report = Report::new(&Tally::new(), Duration::from_secs(1));
        assert!(report.to_string().ends_with("latency ms n/a"));
        assert_eq!(report.to_json()["latency_ms"]["p50"], Value::Null);
    }
}
