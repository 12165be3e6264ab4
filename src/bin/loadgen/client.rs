//! One keep-alive HTTP/1.1 connection that posts a JSON body, or gets a
//! path, and reads the answer.
//!
//! It speaks just enough HTTP for `tiny_http`: requests and responses framed
//! by `Content-Length`. It deliberately does not retry: a POST that failed
//! halfway may have been committed, so a retry would count one event twice
//! and store it twice. After any error the connection is dropped and the next
//! request opens a new one.

use std::error::Error;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::time::{Duration, Instant};

/// Largest response head accepted; anything bigger is not `tiny_http`.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Where requests go: a resolved `http://host:port`.
#[derive(Debug, Clone)]
pub struct Target {
    /// The `Host` header: the authority as it was written.
    host: String,
    addrs: Vec<SocketAddr>,
}

/// A complete response.
#[derive(Debug)]
pub struct Response<'a> {
    /// The status code.
    pub status: u16,
    /// The body, as framed by `Content-Length`.
    pub body: &'a [u8],
}

/// Why a request got no response.
#[derive(Debug)]
pub enum RequestError {
    /// No connection could be opened.
    Connect(io::Error),
    /// The response was not complete within the request timeout.
    Timeout,
    /// The server closed the connection before the response was complete.
    Closed,
    /// Reading or writing the socket failed.
    Io(io::Error),
    /// The response is not HTTP that this client understands.
    Protocol(String),
}

/// One client's connection, reopened after errors.
pub struct Client {
    target: Target,
    path: String,
    timeout: Duration,
    /// Sent as `Authorization: Bearer <key>` on every request.
    api_key: Option<String>,
    /// Bodies go gzip-compressed, with `Content-Encoding: gzip`.
    gzip: bool,
    /// The compressed body, reused.
    compressed: Vec<u8>,
    stream: Option<TcpStream>,
    /// The request being sent, reused so a request costs no allocation.
    out: Vec<u8>,
    /// The response being read, reused likewise.
    buf: Vec<u8>,
}

impl Target {
    /// Parses `http://host[:port][/]` and resolves the host.
    pub fn parse(url: &str) -> Result<Target, String> {
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let (scheme, rest) = url.split_at(scheme_end);
        if !scheme.eq_ignore_ascii_case("http://") {
            return Err("only http://host:port URLs are supported".into());
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err("the URL must not hold a path; give it with --path".into());
        }
        if authority.contains(['@', '?', '#']) {
            return Err("the URL must be only http://host:port".into());
        }
        let (host, port) = split_host_port(authority)?;
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("{host} resolves to no address"));
        }
        Ok(Target {
            host: authority.to_string(),
            addrs,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.host)
    }
}

fn split_host_port(authority: &str) -> Result<(&str, u16), String> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or("the IPv6 address lacks its closing ]")?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(after.strip_prefix(':').ok_or("expected :port after ]")?),
                ),
            }
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("the host is missing".into());
    }
    let port = match port {
        None => 80,
        Some(p) => p.parse().map_err(|_| format!("{p:?} is not a port"))?,
    };
    Ok((host, port))
}

impl RequestError {
    /// A short name for counting errors by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestError::Connect(_) => "connect",
            RequestError::Timeout => "timeout",
            RequestError::Closed => "closed",
            RequestError::Io(_) => "io",
            RequestError::Protocol(_) => "protocol",
        }
    }

    fn from_io(e: io::Error) -> RequestError {
        match e.kind() {
            // A socket timeout shows up as either, depending on the platform.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => RequestError::Timeout,
            _ => RequestError::Io(e),
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Connect(e) => write!(f, "cannot connect: {e}"),
            RequestError::Timeout => f.write_str("the request timed out"),
            RequestError::Closed => f.write_str("the server closed the connection mid-response"),
            RequestError::Io(e) => write!(f, "socket error: {e}"),
            RequestError::Protocol(d) => write!(f, "bad response: {d}"),
        }
    }
}

impl Error for RequestError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            RequestError::Connect(e) | RequestError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// What the response head says.
struct Head {
    status: u16,
    content_length: usize,
    keep_alive: bool,
}

impl Client {
    /// A client that posts to `path` and connects on first use.
    pub fn new(target: Target, path: &str, timeout: Duration) -> Client {
        Client {
            target,
            path: path.to_string(),
            timeout,
            api_key: None,
            gzip: false,
            compressed: Vec::new(),
            stream: None,
            out: Vec::with_capacity(1024),
            buf: Vec::with_capacity(1024),
        }
    }

    /// Presents `key` as a bearer token on every request.
    pub fn with_api_key(mut self, key: Option<String>) -> Client {
        self.api_key = key;
        self
    }

    /// Sends every body gzip-compressed when `gzip` is set.
    pub fn with_gzip(mut self, gzip: bool) -> Client {
        self.gzip = gzip;
        self
    }

    /// Opens the connection now, if it is not open, rather than on the
    /// next request.
    pub fn connect(&mut self) -> Result<(), RequestError> {
        if self.stream.is_none() {
            self.stream = Some(open(&self.target, Instant::now() + self.timeout)?);
        }
        Ok(())
    }

    /// Sends `POST <path>` with a JSON body and reads the whole response,
    /// all within the timeout, connecting first if needed.
    pub fn post(&mut self, body: &[u8]) -> Result<Response<'_>, RequestError> {
        self.request("POST", None, Some(body))
    }

    /// Sends `GET <path>`, without a body, and reads the whole response,
    /// all within the timeout, connecting first if needed.
    pub fn get(&mut self, path: &str) -> Result<Response<'_>, RequestError> {
        self.request("GET", Some(path), None)
    }

    /// Sends one request to `path`, or to the client's own path.
    fn request(
        &mut self,
        method: &str,
        path: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<Response<'_>, RequestError> {
        let deadline = Instant::now() + self.timeout;
        match self.exchange(method, path, body, deadline) {
            Ok((head, range)) => {
                if !head.keep_alive {
                    self.stream = None;
                }
                Ok(Response {
                    status: head.status,
                    body: &self.buf[range],
                })
            }
            Err(e) => {
                // Whatever is left on this connection would be read as the
                // answer to the next request.
                self.stream = None;
                Err(e)
            }
        }
    }

    fn exchange(
        &mut self,
        method: &str,
        path: Option<&str>,
        body: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<(Head, Range<usize>), RequestError> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => self.stream.insert(open(&self.target, deadline)?),
        };
        let body = match body {
            Some(body) if self.gzip => {
                self.compressed.clear();
                let mut encoder = flate2::write::GzEncoder::new(
                    std::mem::take(&mut self.compressed),
                    flate2::Compression::fast(),
                );
                encoder.write_all(body).map_err(RequestError::Io)?;
                self.compressed = encoder.finish().map_err(RequestError::Io)?;
                Some(&self.compressed[..])
            }
            other => other,
        };
        self.out.clear();
        write_head(
            &mut self.out,
            method,
            path.unwrap_or(&self.path),
            &self.target.host,
            self.api_key.as_deref(),
            body.map(<[u8]>::len),
            self.gzip,
        )
        .map_err(RequestError::Io)?;
        self.out.extend_from_slice(body.unwrap_or_default());
        stream
            .set_write_timeout(Some(time_left(deadline)?))
            .map_err(RequestError::Io)?;
        stream.write_all(&self.out).map_err(RequestError::from_io)?;
        read_response(stream, &mut self.buf, deadline)
    }
}

/// Writes a request head; a request without a body gets no
/// `Content-Length`, as the server refuses a body on its GET routes.
fn write_head(
    out: &mut Vec<u8>,
    method: &str,
    path: &str,
    host: &str,
    api_key: Option<&str>,
    body_len: Option<usize>,
    gzip: bool,
) -> io::Result<()> {
    write!(out, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n")?;
    if let Some(key) = api_key {
        write!(out, "Authorization: Bearer {key}\r\n")?;
    }
    if let Some(len) = body_len {
        if gzip {
            out.write_all(b"Content-Encoding: gzip\r\n")?;
        }
        write!(
            out,
            "Content-Type: application/json\r\nContent-Length: {len}\r\n"
        )?;
    }
    out.write_all(b"\r\n")
}

fn open(target: &Target, deadline: Instant) -> Result<TcpStream, RequestError> {
    let mut last = None;
    for addr in &target.addrs {
        match TcpStream::connect_timeout(addr, time_left(deadline)?) {
            Ok(stream) => {
                // A request is a single small write; without this the kernel
                // may hold it back until the previous one is acknowledged,
                // and delayed ACKs turn that into tens of milliseconds.
                stream.set_nodelay(true).map_err(RequestError::Connect)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(RequestError::Connect(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "no address to connect to")
    })))
}

fn time_left(deadline: Instant) -> Result<Duration, RequestError> {
    // A zero timeout means "block forever" to the socket API, so an exhausted
    // budget must end here.
    Some(deadline.saturating_duration_since(Instant::now()))
        .filter(|left| !left.is_zero())
        .ok_or(RequestError::Timeout)
}

/// Reads one response into `buf`; returns its head and where the body lies.
fn read_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<(Head, Range<usize>), RequestError> {
    buf.clear();
    let mut searched = 0;
    let head_end = loop {
        if let Some(i) = buf[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            break searched + i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(RequestError::Protocol(format!(
                "the response head exceeds {MAX_HEAD} bytes"
            )));
        }
        // The terminator may straddle two reads.
        searched = buf.len().saturating_sub(3);
        fill(stream, buf, deadline)?;
    };
    let head = parse_head(&buf[..head_end])?;
    let body_end = head_end + head.content_length;
    while buf.len() < body_end {
        fill(stream, buf, deadline)?;
    }
    if buf.len() > body_end {
        // Nothing was asked for beyond this response.
        return Err(RequestError::Protocol(
            "the server sent more than the Content-Length".into(),
        ));
    }
    Ok((head, head_end..body_end))
}

fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<(), RequestError> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        stream
            .set_read_timeout(Some(time_left(deadline)?))
            .map_err(RequestError::Io)?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(RequestError::Closed),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RequestError::from_io(e)),
        }
    }
}

/// Parses a status line and headers, ending with the empty line.
fn parse_head(head: &[u8]) -> Result<Head, RequestError> {
    let bad = |d: &str| RequestError::Protocol(d.to_string());
    let text = std::str::from_utf8(head).map_err(|_| bad("the response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(&format!("unexpected status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .filter(|code| (100..1000).contains(code))
        .ok_or_else(|| bad(&format!("no status code in {status_line:?}")))?;
    let mut keep_alive = version == "HTTP/1.1";
    let mut content_length = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(&format!("malformed header {line:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| bad(&format!("Content-Length {value:?} is not a number")))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(bad("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("chunked responses are not supported"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    let content_length = match content_length {
        Some(n) if n > MAX_BODY => {
            return Err(bad(&format!("the body of {n} bytes exceeds {MAX_BODY}")));
        }
        Some(n) => n,
        None if status < 200 || status == 204 || status == 304 => 0,
        None => return Err(bad("the response has no Content-Length")),
    };
    Ok(Head {
        status,
        content_length,
        keep_alive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::thread;

    #[test]
    fn parses_urls() {
        let t = Target::parse("http://127.0.0.1:5077/").expect("valid");
        assert_eq!(t.host, "127.0.0.1:5077");
        assert_eq!(t.addrs, vec!["127.0.0.1:5077".parse().expect("addr")]);
        let t = Target::parse("HTTP://[::1]:8080").expect("valid");
        assert_eq!(t.addrs, vec!["[::1]:8080".parse().expect("addr")]);
        assert_eq!(
            Target::parse("http://127.0.0.1").expect("valid").addrs[0].port(),
            80
        );
        for bad in [
            "https://127.0.0.1:1",
            "127.0.0.1:1",
            "http://127.0.0.1:1/x",
            "http://127.0.0.1:port",
            "http://:80",
            "http://u@127.0.0.1:1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn parses_heads() {
        let h = parse_head(b"HTTP/1.1 202 Accepted\r\nContent-Length: 12\r\n\r\n").expect("ok");
        assert_eq!((h.status, h.content_length, h.keep_alive), (202, 12, true));
        let h = parse_head(b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\nConnection: close\r\n\r\n")
            .expect("ok");
        assert_eq!((h.status, h.keep_alive), (503, false));
        let h = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n").expect("ok");
        assert_eq!(h.content_length, 0);
        for bad in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"SSH-2.0 hello\r\n\r\n",
            b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn writes_request_heads() {
        let mut out = Vec::new();
        write_head(&mut out, "GET", "/v1/events/x", "h:1", None, None, false).expect("write");
        assert_eq!(out, b"GET /v1/events/x HTTP/1.1\r\nHost: h:1\r\n\r\n");
        out.clear();
        write_head(
            &mut out,
            "POST",
            "/ingest",
            "h:1",
            Some("k"),
            Some(2),
            false,
        )
        .expect("write");
        assert_eq!(
            String::from_utf8(out.clone()).expect("text"),
            "POST /ingest HTTP/1.1\r\nHost: h:1\r\nAuthorization: Bearer k\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\n\r\n"
        );
        out.clear();
        write_head(&mut out, "POST", "/v1/events", "h:1", None, Some(9), true).expect("write");
        assert!(
            String::from_utf8(out)
                .expect("text")
                .contains("\r\nContent-Encoding: gzip\r\nContent-Type: application/json\r\n")
        );
    }

    /// A server on a loopback port that answers each request on one
    /// connection with the next canned response, in chunks to exercise
    /// reassembly, and then closes.
    fn serve(responses: Vec<&'static [u8]>) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = io::BufReader::new(stream.try_clone().expect("clone"));
            let mut writer = stream;
            for response in responses {
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).expect("read") == 0 {
                        return;
                    }
                    if let Some(n) = line.strip_prefix("Content-Length: ") {
                        length = n.trim().parse().expect("length");
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).expect("body");
                for piece in response.chunks(7) {
                    writer.write_all(piece).expect("write");
                    thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Target::parse(&url).expect("url")
    }

    #[test]
    fn keeps_one_connection_for_several_requests() {
        let target = serve(vec![
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 13\r\n\r\n{\"id\":\"abc\"}\n",
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}",
        ]);
        let mut client = Client::new(target, "/ingest", Duration::from_secs(5));
        let r = client.post(b"{}").expect("first");
        assert_eq!((r.status, r.body), (202, &b"{\"id\":\"abc\"}\n"[..]));
        let r = client.post(b"{}").expect("second");
        assert_eq!((r.status, r.body), (503, &b"{}"[..]));
        // The fake server has hung up; the client notices and says so.
        assert!(matches!(
            client.post(b"{}"),
            Err(RequestError::Closed | RequestError::Io(_))
        ));
    }

    #[test]
    fn times_out_when_the_server_is_silent() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let mut client = Client::new(
            Target::parse(&url).expect("url"),
            "/",
            Duration::from_millis(200),
        );
        let started = Instant::now();
        let result = client.post(b"{}");
        assert!(matches!(result, Err(RequestError::Timeout)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }
}
