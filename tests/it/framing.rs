//! Message framing as RFC 9112 §6 asks of a server behind a proxy: every
//! head that two implementations could frame differently is refused at
//! once and closes its connection, so that no request hidden in another's
//! body ever runs; and `Upgrade` never switches protocols, so upgrade
//! requests are framed, bounded and answered like any other.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use ingestd::Role;
use serde_json::json;
use uuid::Uuid;

use crate::ops::{metric, scrape};
use crate::util::{
    Resp, TestEnv, assert_healthz_instant, parse_response, read_to_close, wait_until,
};

/// A whole, valid ingest that must never run: it is hidden in the body of
/// the request before it, where a proxy framing that request differently
/// would see a request of its own.
const HIDDEN: &str = "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                      Content-Length: 21\r\n\r\n{\"payload\":\"hidden\"}\n";

/// The head of an ingest up to its framing headers.
const POST: &str = "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";

/// Sends `bytes` on one connection and reads until the server closes it,
/// for at most `wait`; returns everything read and how long it took.
fn exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(wait)).unwrap();
    // The server may answer and close before it reads everything.
    let _ = stream.write_all(bytes);
    let raw = read_to_close(&mut stream);
    (raw, started.elapsed())
}

/// How many responses `raw` holds (status lines at the start of a line).
fn responses(raw: &[u8]) -> usize {
    let text = String::from_utf8_lossy(raw);
    text.match_indices("HTTP/1.1 ")
        .filter(|(at, _)| *at == 0 || text[..*at].ends_with('\n'))
        .count()
}

/// A chunked body holding `data` in one chunk.
fn one_chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n0\r\n\r\n", data.len())
}

#[test]
fn ambiguous_framing_is_refused_and_no_hidden_request_runs() {
    let env = TestEnv::new("framing");
    // Long head and body deadlines: an answer that comes quickly was not
    // left to a timeout.
    let config = env.config_with(&[
        ("INGEST_HTTP_HEADER_TIMEOUT", "20s"),
        ("INGEST_HTTP_BODY_TIMEOUT", "20s"),
    ]);
    let app = env.start_role(&config, Role::All);
    let addr = app.http_addr().unwrap();
    let outer = "{\"payload\":1}";
    let chunked_then_hidden = format!("0\r\n\r\n{HIDDEN}");
    let hidden_len = HIDDEN.len();

    // (case, the request's framing headers and everything after the head,
    // status, error code)
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "CL.CL: two Content-Length headers that differ",
            format!(
                "Content-Length: 13\r\nContent-Length: {}\r\n\r\n{outer}{HIDDEN}",
                13 + hidden_len
            ),
            400,
            "bad_request",
        ),
        (
            "CL.CL: a Content-Length list whose values differ",
            format!(
                "Content-Length: 13, {}\r\n\r\n{outer}{HIDDEN}",
                13 + hidden_len
            ),
            400,
            "bad_request",
        ),
        (
            "Content-Length with a sign",
            format!("Content-Length: +13\r\n\r\n{outer}{HIDDEN}"),
            400,
            "bad_request",
        ),
        (
            "Content-Length in hexadecimal",
            format!("Content-Length: 0x0d\r\n\r\n{outer}{HIDDEN}"),
            400,
            "bad_request",
        ),
        (
            "Content-Length beyond any integer",
            format!("Content-Length: 99999999999999999999999\r\n\r\n{outer}{HIDDEN}"),
            400,
            "bad_request",
        ),
        (
            "chunked is not the final transfer coding",
            format!("Transfer-Encoding: chunked, gzip\r\n\r\n{chunked_then_hidden}"),
            400,
            "bad_request",
        ),
        (
            "the only transfer coding is not chunked",
            format!("Transfer-Encoding: identity\r\n\r\n{outer}{HIDDEN}"),
            400,
            "bad_request",
        ),
        (
            "an obfuscated chunked coding",
            format!("Transfer-Encoding: xchunked\r\n\r\n{chunked_then_hidden}"),
            400,
            "bad_request",
        ),
        (
            "two Transfer-Encoding headers, chunked not last",
            format!(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n{chunked_then_hidden}"
            ),
            400,
            "bad_request",
        ),
        (
            "chunked applied twice",
            format!("Transfer-Encoding: chunked, chunked\r\n\r\n{chunked_then_hidden}"),
            400,
            "bad_request",
        ),
        (
            "an unknown transfer coding before chunked",
            format!("Transfer-Encoding: gzip, chunked\r\n\r\n{chunked_then_hidden}"),
            501,
            "not_implemented",
        ),
        (
            "CL.TE: Content-Length first, the chunked body ends early",
            format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_then_hidden}",
                chunked_then_hidden.len()
            ),
            400,
            "bad_request",
        ),
        (
            "TE.CL: chunked first, the Content-Length ends early",
            format!(
                "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{}",
                one_chunk(HIDDEN)
            ),
            400,
            "bad_request",
        ),
        (
            "TE.TE: a Transfer-Encoding name with a space before its colon",
            format!(
                "Transfer-Encoding : chunked\r\nContent-Length: {}\r\n\r\n{chunked_then_hidden}",
                chunked_then_hidden.len()
            ),
            400,
            "bad_request",
        ),
        (
            "TE.TE: chunked on a folded continuation line",
            format!("Transfer-Encoding: identity\r\n chunked\r\n\r\n{chunked_then_hidden}"),
            400,
            "bad_request",
        ),
        (
            "a chunk extension ending in a bare LF",
            format!("Transfer-Encoding: chunked\r\n\r\nd;x\nZZ\r\n{outer}\r\n0\r\n\r\n{HIDDEN}"),
            400,
            "bad_request",
        ),
        (
            "a chunk trailer line ending in a bare LF",
            format!(
                "Transfer-Encoding: chunked\r\n\r\nd\r\n{outer}\r\n0\r\nX: a\nY: b\r\n\r\n{HIDDEN}"
            ),
            400,
            "bad_request",
        ),
        (
            "whitespace before a chunk size",
            format!("Transfer-Encoding: chunked\r\n\r\n d\r\n{outer}\r\n0\r\n\r\n{HIDDEN}"),
            400,
            "bad_request",
        ),
        (
            "a bare CR inside a header line",
            format!(
                "X-Note: a\rTransfer-Encoding: chunked\r\nContent-Length: 13\r\n\r\n{outer}{HIDDEN}"
            ),
            400,
            "bad_request",
        ),
        (
            "a NUL inside a header line",
            format!("X-Note: a\0b\r\nContent-Length: 13\r\n\r\n{outer}{HIDDEN}"),
            400,
            "bad_request",
        ),
    ];

    let mut raw_cases: Vec<(&str, Vec<u8>, u16, &str)> = cases
        .into_iter()
        .map(|(name, rest, status, code)| {
            (name, format!("{POST}{rest}").into_bytes(), status, code)
        })
        .collect();
    raw_cases.push((
        "a head with bare LF line ends",
        format!(
            "POST /v1/events HTTP/1.1\nHost: x\nContent-Type: application/json\n\
             Content-Length: 13\n\n{outer}{HIDDEN}"
        )
        .into_bytes(),
        400,
        "bad_request",
    ));
    raw_cases.push((
        "Transfer-Encoding in an HTTP/1.0 request",
        format!(
            "POST /v1/events HTTP/1.0\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n{chunked_then_hidden}"
        )
        .into_bytes(),
        400,
        "bad_request",
    ));
    raw_cases.push((
        "a request line with a fourth part",
        format!(
            "POST /v1/events HTTP/1.1 x\r\nContent-Type: application/json\r\n\
             Content-Length: 13\r\n\r\n{outer}{HIDDEN}"
        )
        .into_bytes(),
        400,
        "bad_request",
    ));

    let mut table = Vec::new();
    for (name, bytes, status, code) in &raw_cases {
        let (raw, took) = exchange(addr, bytes, Duration::from_secs(15));
        let resp: Resp = parse_response(&raw)
            .unwrap_or_else(|e| panic!("{name}: no response ({e}) after {took:?}"));
        assert_eq!(
            resp.status,
            *status,
            "{name}: {}",
            String::from_utf8_lossy(&raw)
        );
        assert_eq!(resp.json()["error"], *code, "{name}");
        assert!(resp.json()["detail"].is_string(), "{name}");
        assert_eq!(resp.header("connection"), Some("close"), "{name}");
        // One answer, then the connection closed: nothing after the refused
        // head was read as a request.
        assert_eq!(
            responses(&raw),
            1,
            "{name}: {}",
            String::from_utf8_lossy(&raw)
        );
        // At once, not at the end of a 20 s deadline.
        assert!(
            took < Duration::from_secs(3),
            "{name}: answered after {took:?}"
        );
        table.push(format!(
            "{name}: {} {} in {:.0?}",
            resp.status,
            resp.json()["error"].as_str().unwrap_or(""),
            took
        ));
    }
    eprintln!("framing table:\n  {}", table.join("\n  "));

    // Nothing ran, neither the refused requests nor the hidden ones; the
    // server still serves, and exactly what it is sent now.
    assert_eq!(env.count("SELECT count(*) FROM events"), 0);
    let id = crate::util::ingest(addr, &json!("after"));
    env.wait_processed(&[id], Duration::from_secs(10));
    assert_eq!(env.count("SELECT count(*) FROM events"), 1);
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE payload::text LIKE '%hidden%'"),
        0
    );
    app.shutdown().unwrap();
}

#[test]
fn unambiguous_framing_variants_are_accepted() {
    let env = TestEnv::new("framingok");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let body = "{\"payload\":\"ok\"}";
    let n = body.len();
    let cases = [
        (
            "a list of equal lengths",
            format!("Content-Length: {n}, {n}\r\n\r\n{body}"),
        ),
        (
            "two equal Content-Length headers",
            format!("Content-Length: {n}\r\nContent-Length: {n}\r\n\r\n{body}"),
        ),
        (
            "chunked after a tab, in any case",
            format!("Transfer-Encoding:\tChunked\r\n\r\n{}", one_chunk(body)),
        ),
    ];
    for (name, rest) in &cases {
        let bytes = format!("{POST}Connection: close\r\n{rest}");
        let (raw, _) = exchange(addr, bytes.as_bytes(), Duration::from_secs(10));
        let resp = parse_response(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            resp.status,
            202,
            "{name}: {}",
            String::from_utf8_lossy(&raw)
        );
    }
    // An empty line before the request line is skipped (RFC 9112 §2.2).
    let bytes = format!("\r\n{POST}Connection: close\r\nContent-Length: {n}\r\n\r\n{body}");
    let (raw, _) = exchange(addr, bytes.as_bytes(), Duration::from_secs(10));
    assert_eq!(parse_response(&raw).unwrap().status, 202);
    assert_eq!(env.count("SELECT count(*) FROM events"), 4);
    app.shutdown().unwrap();
}

/// The head of an h2c upgrade attempt on an ingest, announcing `length`.
fn upgrade_head(length: usize) -> String {
    format!(
        "{POST}Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: {length}\r\n\r\n"
    )
}

#[test]
fn an_upgrade_request_is_answered_at_once_and_keeps_the_connection() {
    let env = TestEnv::new("upgrade");
    let config = env.config_with(&[
        ("INGEST_HTTP_HEADER_TIMEOUT", "20s"),
        ("INGEST_HTTP_BODY_TIMEOUT", "20s"),
    ]);
    let app = env.start_role(&config, Role::All);
    let addr = app.http_addr().unwrap();
    let body = "{\"payload\":1}";
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut ids = Vec::new();
    // Twice on one connection: the server never switched protocols, and
    // the connection stays open for the next request.
    for _ in 0..2 {
        let started = Instant::now();
        stream
            .write_all(format!("{}{body}", upgrade_head(body.len())).as_bytes())
            .unwrap();
        let resp = read_one_response(&mut stream);
        let took = started.elapsed();
        assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
        assert_ne!(resp.header("connection"), Some("close"));
        assert_eq!(resp.header("upgrade"), None);
        ids.push(Uuid::parse_str(resp.json()["id"].as_str().unwrap()).unwrap());
    }
    env.wait_processed(&ids, Duration::from_secs(10));
    app.shutdown().unwrap();
}

/// Reads exactly one response with a `Content-Length` from a kept-alive
/// connection.
fn read_one_response(stream: &mut TcpStream) -> Resp {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response head");
        raw.push(byte[0]);
    }
    let head = parse_response(&raw).expect("response head");
    let length: usize = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    let mut body = vec![0; length];
    stream.read_exact(&mut body).expect("response body");
    raw.extend_from_slice(&body);
    parse_response(&raw).unwrap()
}

#[test]
fn upgrade_tricklers_do_not_stall_the_api() {
    let env = TestEnv::new("upgradetrickle");
    // Fewer parse turns than tricklers.
    let config = env.config_with(&[
        ("INGEST_HTTP_THREADS", "2"),
        ("INGEST_HTTP_BODY_TIMEOUT", "4s"),
    ]);
    let app = env.start_role(&config, Role::All);
    let addr = app.http_addr().unwrap();
    // Eight clients each send an upgrade head announcing 100 bytes and
    // one byte of body, then nothing.
    let tricklers: Vec<_> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(upgrade_head(100).as_bytes()).unwrap();
            s.write_all(b"{").unwrap();
            s
        })
        .collect();
    // Wait until the server holds all eight bodies' first bytes: they are
    // being buffered on their connections' threads, not by handlers.
    wait_until(Duration::from_secs(5), "eight connections open", || {
        // Eight tricklers and the scrape's own connection.
        metric(&scrape(addr), "ingestd_http_connections") >= Some(9.0)
    });
    let started = Instant::now();
    assert_healthz_instant(addr);
    // Meanwhile everyone else is served.
    let ids: Vec<Uuid> = (0..40)
        .map(|i| crate::util::ingest(addr, &json!(i)))
        .collect();
    let served = started.elapsed();
    assert!(
        served < Duration::from_secs(4),
        "40 ingests took {served:?}, as long as the tricklers' deadline"
    );
    env.wait_processed(&ids, Duration::from_secs(10));
    // The tricklers are cut off at their body deadline with 408.
    let answers: Vec<String> = tricklers
        .into_iter()
        .map(|mut s| {
            thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                answer
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for answer in answers {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    assert_eq!(env.count("SELECT count(*) FROM events"), 40);
    app.shutdown().unwrap();
}
