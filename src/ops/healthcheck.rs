//! `ingestd healthcheck`: the probe a container runs against its own API.
//!
//! The image holds nothing but the binary (`FROM scratch`: no shell, no
//! curl), so the binary is its own probe: one `GET /readyz` to the address
//! the API listens on (`INGEST_HTTP_ADDR`, with an unspecified address,
//! `0.0.0.0` or `[::]`, replaced by loopback), over a plain `TcpStream`,
//! within one deadline for the whole exchange: connecting, writing and
//! reading the answer. Ready is a `200`; anything else (no connection, no
//! answer in time, another status) is a failure with a one-line reason.
//! It speaks just enough HTTP/1.1 for that answer and shares no code with
//! the server, so that it sees the API as any client would.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::config::{self, Config};

/// How long the whole check may take.
pub const TIMEOUT: Duration = Duration::from_secs(1);

/// The most of an answer that is read: `/readyz` answers a few dozen bytes.
const MAX_ANSWER: usize = 16 * 1024;

/// Why the API is not ready, or could not be asked.
#[derive(Debug)]
pub enum Error {
    /// The configuration is invalid.
    Config(config::Error),
    /// `INGEST_HTTP_ADDR` has port 0: the server picks its port at start,
    /// so no other process can know it.
    NoPort,
    /// Connecting, writing or reading failed (what was being done, where).
    Io(&'static str, SocketAddr, io::Error),
    /// The deadline passed while waiting for the server (for what, where).
    TimedOut(&'static str, SocketAddr),
    /// The server's answer is not an HTTP response.
    Malformed(SocketAddr),
    /// `/readyz` answered this status; the value lists the checks that
    /// are not up, when the body names them.
    NotReady(u16, Vec<String>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::NoPort => f.write_str(
                "INGEST_HTTP_ADDR has port 0, so the port the server picked cannot be known",
            ),
            Error::Io(what, addr, e) => write!(f, "cannot {what} {addr}: {e}"),
            Error::TimedOut(what, addr) => {
                write!(
                    f,
                    "{what} {addr} timed out (the whole check has {TIMEOUT:?})"
                )
            }
            Error::Malformed(addr) => write!(f, "{addr} did not answer HTTP"),
            Error::NotReady(status, down) if down.is_empty() => {
                write!(f, "not ready: /readyz answered {status}")
            }
            Error::NotReady(status, down) => write!(
                f,
                "not ready: /readyz answered {status}; down: {}",
                down.join(", ")
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(e) => Some(e),
            Error::Io(_, _, e) => Some(e),
            _ => None,
        }
    }
}

/// `ingestd healthcheck`: checks the API that the environment's
/// configuration describes, within [`TIMEOUT`].
pub fn run() -> Result<(), Error> {
    let config = Config::from_env().map_err(Error::Config)?;
    check(config.http_addr, TIMEOUT)
}

/// Asks the API listening on `listen` whether it is ready, within
/// `timeout` in all.
pub fn check(listen: SocketAddr, timeout: Duration) -> Result<(), Error> {
    let addr = target(listen);
    if addr.port() == 0 {
        return Err(Error::NoPort);
    }
    let deadline = Instant::now() + timeout;
    // The time left, or the error for `what` once none is.
    let left = |what| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(Error::TimedOut(what, addr))
    };
    let failed = |what, e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::TimedOut(what, addr),
        _ => Error::Io(what, addr, e),
    };
    let mut stream = TcpStream::connect_timeout(&addr, left("connecting to")?)
        .map_err(|e| failed("connect to", e))?;
    stream
        .set_write_timeout(Some(left("writing to")?))
        .map_err(|e| failed("write to", e))?;
    let request = format!(
        "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ingestd-healthcheck\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| failed("write to", e))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let (status, body) = loop {
        if let Some(complete) = parse(&answer, false) {
            break complete;
        }
        stream
            .set_read_timeout(Some(left("waiting for an answer from")?))
            .map_err(|e| failed("read from", e))?;
        match stream.read(&mut buf) {
            Ok(0) => break parse(&answer, true).ok_or(Error::Malformed(addr))?,
            Ok(n) if answer.len() + n > MAX_ANSWER => return Err(Error::Malformed(addr)),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed("waiting for an answer from", e)),
        }
    };
    if status == 200 {
        return Ok(());
    }
    Err(Error::NotReady(status, down_checks(body)))
}

/// Where to reach a server listening on `listen`: the same address, but
/// loopback for an unspecified one, which is not an address to connect to.
pub fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The status and body of a complete answer in `raw`, or `None` while it
/// is not complete. A body without `Content-Length` runs to the close
/// (`closed`); a chunked body is not read, as its status is enough.
fn parse(raw: &[u8], closed: bool) -> Option<(u16, &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut status_line = lines.next()?.splitn(3, ' ');
    if !status_line.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = status_line.next()?.parse().ok()?;
    let mut length = None;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("Content-Length") {
            length = Some(value.trim().parse::<usize>().ok()?);
        } else if name.eq_ignore_ascii_case("Transfer-Encoding") {
            return Some((status, &[]));
        }
    }
    let body = &raw[end + 4..];
    match length {
        Some(n) if body.len() >= n => Some((status, &body[..n])),
        None if closed => Some((status, body)),
        _ => None,
    }
}

/// The names of the checks a `/readyz` body reports as not up; none when
/// the body is not the usual `{"checks": {...}}`.
fn down_checks(body: &[u8]) -> Vec<String> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let Some(checks) = value.get("checks").and_then(|c| c.as_object()) else {
        return Vec::new();
    };
    checks
        .iter()
        .filter(|(_, state)| state.as_str() != Some("up"))
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_address_is_reached_over_loopback() {
        let at = |s: &str| target(s.parse().unwrap()).to_string();
        assert_eq!(at("0.0.0.0:5001"), "127.0.0.1:5001");
        assert_eq!(at("[::]:5001"), "[::1]:5001");
        assert_eq!(at("127.0.0.1:5001"), "127.0.0.1:5001");
        assert_eq!(at("10.1.2.3:80"), "10.1.2.3:80");
        assert!(matches!(
            check("0.0.0.0:0".parse().unwrap(), TIMEOUT),
            Err(Error::NoPort)
        ));
    }

    #[test]
    fn answers_are_complete_at_their_length_or_their_close() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse(ok, false), Some((200, &b"{}"[..])));
        assert_eq!(parse(&ok[..ok.len() - 1], false), None);
        assert_eq!(parse(b"HTTP/1.1 503 Service Unavailable\r\n", false), None);
        let unframed = b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy";
        assert_eq!(parse(unframed, false), None);
        assert_eq!(parse(unframed, true), Some((503, &b"busy"[..])));
        assert_eq!(parse(b"SSH-2.0-OpenSSH\r\n\r\n", true), None);
    }

    #[test]
    fn the_reason_names_the_checks_that_are_down() {
        let body = br#"{"status":"unavailable","checks":{"postgres":"up","broker_relay":"down"}}"#;
        assert_eq!(down_checks(body), ["broker_relay"]);
        assert!(down_checks(b"not json").is_empty());
        let e = Error::NotReady(503, down_checks(body));
        assert_eq!(
            e.to_string(),
            "not ready: /readyz answered 503; down: broker_relay"
        );
    }
}
