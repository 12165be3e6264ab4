use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{self, BufReader, BufWriter, ErrorKind, Read, Write};

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::{HTTPVersion, Header, Method};
use crate::util::RefinedTcpStream;
use crate::util::{write_refusal, BufferedBody, Budget, Deadline, Refusal, Reservation, DRAIN_LIMIT};
use crate::util::{Framing, FramingError};
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::{Limits, Request, Response, ResponseBox};

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    // ingestd patch: what the client may send, and how fast
    limits: Limits,

    // ingestd patch: read deadline, shared with the read side of the socket
    deadline: Arc<Deadline>,

    // ingestd patch: bytes of buffered bodies, shared by all connections
    budget: Arc<Budget>,

    // ingestd patch: bytes the head of the request being read may still take
    head_left: usize,

    // ingestd patch: a refusal this connection wrote itself (not through
    // `Server::recv`) could not be written whole
    refusal_unsent: bool,
}

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    WrongHeader(HTTPVersion),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    ReadIoError(IoError),
    // ingestd patch: the errors below were added with the limits
    /// the request line or a header is not ASCII
    NotAscii,
    /// the head is longer than `Limits::max_head_bytes`
    HeadTooLarge,
    /// the head has more than `Limits::max_headers` header lines
    TooManyHeaders,
    /// building the request failed (upstream: reading a small body at once)
    BodyIoError(IoError),
    /// a line of the head ends in a bare LF, holds a bare CR or a control
    /// character, or is an obsolete folded continuation line
    MalformedLine(&'static str),
    /// the head's `Content-Length` and `Transfer-Encoding` do not frame the
    /// body unambiguously (see `Framing::of`)
    Framing(FramingError),
}

/// ingestd patch: the first step in which a buffered body is reserved
/// against the budget before it is read; each later step is as large as what
/// has been read, so a body is copied O(log n) times while growing.
const RESERVE_STEP: usize = 64 * 1024;

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    ///
    /// ingestd patch: `deadline` must be the one the read side of the socket
    /// obeys; `budget` is shared by all connections of the server.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        limits: Limits,
        deadline: Arc<Deadline>,
        budget: Arc<Budget>,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            head_left: limits.max_head_bytes,
            refusal_unsent: false,
            limits,
            deadline,
            budget,
        }
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Reads the next line from self.next_header_source.
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line.
    ///
    /// ingestd patch: takes at most `self.head_left` bytes, CRLF included,
    /// and never holds more. Upstream read a line without bound, so one
    /// endless header line grew memory without limit.
    ///
    /// ingestd patch: a line must end in CRLF and hold no other CR or LF
    /// and no control character but HTAB (RFC 9112 §2.2, RFC 9110 §5.5).
    /// Upstream waited for a CRLF that a head with bare LF line ends never
    /// sends, until the head timeout, and kept a bare CR inside a value; a
    /// proxy may read either differently, so both are refused at once.
    fn read_next_line(&mut self) -> Result<AsciiString, ReadError> {
        let mut buf = Vec::new();
        let mut prev_byte_was_cr = false;

        loop {
            if self.head_left == 0 {
                return Err(ReadError::HeadTooLarge);
            }

            let byte = self.next_header_source.by_ref().bytes().next();

            let byte = match byte {
                Some(Ok(b)) => b,
                Some(Err(e)) => return Err(ReadError::ReadIoError(e)),
                None => {
                    let err = IoError::new(ErrorKind::ConnectionAborted, "Unexpected EOF");
                    return Err(ReadError::ReadIoError(err));
                }
            };

            // the first read of a head waits for the previous request's body
            // to be dropped; if that body was given up unread, what follows
            // is more of it, not a request
            if !self.head_started() && self.deadline.is_closed() {
                let err = IoError::new(ErrorKind::ConnectionAborted, "connection is closing");
                return Err(ReadError::ReadIoError(err));
            }
            self.head_left -= 1;

            if byte == b'\n' && prev_byte_was_cr {
                buf.pop(); // removing the '\r'
                return AsciiString::from_ascii(buf).map_err(|_| ReadError::NotAscii);
            }
            if byte == b'\n' {
                return Err(ReadError::MalformedLine(
                    "a line of the request head ends in a bare LF instead of CRLF",
                ));
            }
            if prev_byte_was_cr {
                return Err(ReadError::MalformedLine(
                    "the request head holds a CR that does not end a line",
                ));
            }
            if (byte < 0x20 && byte != b'\t' && byte != b'\r') || byte == 0x7f {
                return Err(ReadError::MalformedLine(
                    "the request head holds a control character",
                ));
            }

            prev_byte_was_cr = byte == b'\r';

            // grow by at most what the rest of the head may take
            if buf.len() == buf.capacity() {
                buf.reserve_exact(buf.capacity().max(64).min(self.head_left + 1));
            }
            buf.push(byte);
        }
    }

    /// ingestd patch: true once any byte of the request being read arrived.
    fn head_started(&self) -> bool {
        self.head_left < self.limits.max_head_bytes
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        // ingestd patch: the whole head must arrive within `head_timeout`
        // from now, that is from when the connection opened or the previous
        // response was sent; this also bounds how long a connection may sit
        // idle between requests.
        self.head_left = self.limits.max_head_bytes;
        self.deadline.set(Some(self.limits.head_timeout));

        let (method, path, version, headers) = {
            // reading the request line
            let (method, path, version) = {
                // ingestd patch: empty lines before a request line are
                // skipped, as RFC 9112 §2.2 advises (some clients send a CRLF
                // after a body); each counts against the head's bytes. The
                // line itself is not trimmed: its parts are separated by
                // exactly one space.
                let mut line = self.read_next_line()?;
                while line.is_empty() {
                    line = self.read_next_line()?;
                }

                parse_request_line(line.as_str())?
            };

            // getting all headers
            let headers = {
                let mut headers = Vec::new();
                loop {
                    let line = self.read_next_line()?;

                    if line.is_empty() {
                        break;
                    };
                    // ingestd patch: bound the number of header lines
                    if headers.len() >= self.limits.max_headers {
                        return Err(ReadError::TooManyHeaders);
                    }
                    // ingestd patch: a line starting with whitespace continues
                    // the previous field (obsolete line folding); RFC 9112
                    // §5.2 lets a server refuse it. Upstream trimmed it into a
                    // field of its own, which a proxy would not have seen.
                    if line.as_str().starts_with([' ', '\t']) {
                        return Err(ReadError::MalformedLine(
                            "the request head uses obsolete line folding",
                        ));
                    }
                    headers.push(match FromStr::from_str(line.as_str().trim()) {
                        // TODO: remove this conversion
                        Ok(h) => h,
                        _ => return Err(ReadError::WrongHeader(version)),
                    });
                }

                headers
            };

            (method, path, version, headers)
        };

        // ingestd patch: the body's framing, decided once from the whole
        // head; a head framed ambiguously is refused before its body.
        let framing = Framing::of(&version, &headers).map_err(ReadError::Framing)?;

        // ingestd patch: a body the server reads itself (`buffer_body`) must
        // arrive within `body_timeout` from now.
        self.deadline.set(Some(self.limits.body_timeout));

        // building the writer for the request
        let writer = self.sink.next().unwrap();

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // building the next reader
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            framing,
            *self.remote_addr.as_ref().unwrap(),
            data_source,
            writer,
        )
        .map_err(|e| {
            use crate::request;
            match e {
                request::RequestCreationError::CreationIoError(e) => ReadError::BodyIoError(e),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version)
                }
            }
        })?;

        // return the request
        Ok(request)
    }

    /// ingestd patch: answers `response` and leaves the connection to close.
    /// Only for errors met before a `Request` (and so its writer) exists.
    fn refuse(&mut self, refusal: Refusal) {
        let writer = self.sink.next().unwrap();
        self.write_refusal(writer, refusal);
    }

    /// ingestd patch: writes one of the library's own refusals through
    /// `writer` and leaves the connection to close without reading anything
    /// more (not even the rest of a body).
    fn write_refusal<W: Write>(&mut self, writer: W, refusal: Refusal) {
        self.deadline.close();
        let sent = write_refusal(self.limits.refusal, &refusal, writer).is_ok();
        self.refusal_unsent |= !sent;
    }

    /// ingestd patch: true if a refusal written by the connection itself
    /// (a 4xx or 503 of the library's own, a `HeadCheck`'s answer, a 505)
    /// could not be written whole: the client is not reading.
    pub(crate) fn refusal_unsent(&self) -> bool {
        self.refusal_unsent
    }

    /// ingestd patch: answers a request with `response` (as HTTP `version`)
    /// through its own writer, marked as the connection's last, and leaves
    /// the connection to close without reading anything more (not even the
    /// request's body).
    fn refuse_request<R: Read>(&mut self, rq: Request, version: HTTPVersion, response: Response<R>) {
        self.deadline.close();
        let head_only = *rq.method() == Method::Head;
        let mut writer = rq.into_writer();
        let sent = response
            .closing()
            .raw_print(&mut writer, version, &[], head_only, None)
            .and_then(|()| writer.flush());
        self.refusal_unsent |= sent.is_err();
    }

    /// ingestd patch: reads a small body into memory, so that the
    /// application never waits on a slow client.
    ///
    /// A body with a `Content-Length` of at most `buffer_body_bytes` is read
    /// whole; a chunked body is read up to `buffer_body_bytes + 1` bytes, and
    /// if it is longer the request reads the rest from the socket after
    /// those. The bytes are reserved against the server's budget before they
    /// are read. Bodies with a larger `Content-Length` are left to the
    /// application.
    ///
    /// On error the request must not be handed out, and the connection
    /// closes, after the response returned if there is one.
    fn buffer_body(&mut self, rq: &mut Request) -> Result<(), Option<Refusal>> {
        let limit = self.limits.buffer_body_bytes;
        match rq.framing() {
            Framing::Empty | Framing::Length(0) => Ok(()),
            Framing::Length(length) if length <= limit => self.buffer_sized(rq, length),
            Framing::Length(length) => {
                let body = rq.replace_reader(Box::new(io::empty()));
                let body = self.unread_guard(body, Some(length));
                rq.replace_reader(Box::new(body));
                Ok(())
            }
            Framing::Chunked if limit > 0 => self.buffer_chunked(rq),
            Framing::Chunked => {
                let body = rq.replace_reader(Box::new(io::empty()));
                let body = self.unread_guard(body, None);
                rq.replace_reader(Box::new(body));
                Ok(())
            }
        }
    }

    fn buffer_sized(
        &mut self,
        rq: &mut Request,
        length: usize,
    ) -> Result<(), Option<Refusal>> {
        // sends the `100 Continue` first if the client asked for one
        let (data, reservation) = self.read_reserved(rq.as_reader(), length)?;
        if data.len() < length {
            return Err(self.body_error(ErrorKind::UnexpectedEof.into()));
        }
        rq.set_whole_body(BufferedBody::new(data, reservation));
        Ok(())
    }

    fn buffer_chunked(&mut self, rq: &mut Request) -> Result<(), Option<Refusal>> {
        let limit = self.limits.buffer_body_bytes.saturating_add(1);
        // sends the `100 Continue` first if the client asked for one
        let (data, reservation) = self.read_reserved(rq.as_reader(), limit)?;
        let complete = data.len() < limit;
        let body = BufferedBody::new(data, reservation);

        if complete {
            rq.set_whole_body(body);
        } else {
            // longer than the limit: what was read, then the rest
            let rest = rq.replace_reader(Box::new(io::empty()));
            let rest = self.unread_guard(rest, None);
            rq.replace_reader(Box::new(body.chain(rest)));
        }
        Ok(())
    }

    /// ingestd patch: reads up to `max` bytes, reserving them against the
    /// budget in doubling steps (from `RESERVE_STEP`) as they arrive, never
    /// all that a `Content-Length` announces at once: a client that
    /// announces a large body and sends it slowly, or not at all, holds at
    /// most twice what it has sent plus `RESERVE_STEP`. Fewer than `max`
    /// bytes means the body ended.
    fn read_reserved(
        &self,
        reader: &mut dyn Read,
        max: usize,
    ) -> Result<(Vec<u8>, Reservation), Option<Refusal>> {
        let mut reservation = Reservation::new(&self.budget);
        let mut data: Vec<u8> = Vec::new();
        let mut filled = 0;
        loop {
            if filled == data.len() {
                if data.len() == max {
                    break;
                }
                let step = (max - data.len()).min(RESERVE_STEP.max(data.len()));
                if !reservation.grow(step) {
                    return Err(Some(busy()));
                }
                data.reserve_exact(step);
                data.resize(data.len() + step, 0);
            }
            match reader.read(&mut data[filled..]) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(ref err) if err.kind() == ErrorKind::Interrupted => (),
                Err(err) => return Err(self.body_error(err)),
            }
        }
        data.truncate(filled);
        data.shrink_to_fit();
        reservation.shrink_to(filled);
        Ok((data, reservation))
    }

    /// ingestd patch: the `HeadCheck`'s answer, for a request with a body.
    fn check_head(&self, rq: &Request) -> Option<ResponseBox> {
        let check = self.limits.head_check.as_ref()?;
        if rq.framing().has_body() {
            check.check(rq)
        } else {
            None
        }
    }

    fn unread_guard(
        &self,
        body: Box<dyn Read + Send + 'static>,
        left: Option<usize>,
    ) -> UnreadBodyGuard {
        UnreadBodyGuard::new(body, left, self.deadline.clone(), self.limits.body_timeout)
    }

    /// The response for an error met while buffering a body, if any: a
    /// client whose connection broke mid-body gets none; one that ended its
    /// side early (a truncated body) gets a 400 it can still read.
    fn body_error(&self, err: IoError) -> Option<Refusal> {
        if matches!(err.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionAborted) {
            Some(Refusal::BadRequest(
                "the request body ended before its announced length".to_owned(),
            ))
        } else if err.kind() == ErrorKind::TimedOut || self.deadline.expired() {
            Some(Refusal::Timeout(format!(
                "the request body did not arrive within {}",
                describe_duration(self.limits.body_timeout)
            )))
        } else if err.kind() == ErrorKind::InvalidData {
            Some(Refusal::BadRequest("the chunked request body is malformed".to_owned()))
        } else {
            None
        }
    }
}

// ingestd patch: the budget of buffered bodies is spent
fn busy() -> Refusal {
    Refusal::Busy("the server is holding too many request bodies; retry shortly".to_owned())
}

/// ingestd patch: "2 seconds", "1 second", "1500 milliseconds", for the
/// details of error responses.
fn describe_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        match duration.as_secs() {
            1 => "1 second".to_owned(),
            secs => format!("{} seconds", secs),
        }
    } else {
        format!("{} milliseconds", duration.as_millis())
    }
}

/// ingestd patch: a body handed out unread. If it is dropped before its end
/// and the rest is not to be drained (a chunked body, or more than
/// `DRAIN_LIMIT` bytes left), the connection closes rather than reading the
/// rest of the body as the next request. Otherwise the rest is drained here,
/// and must arrive within `body_timeout` (or the deadline of the next head,
/// if that is already running), so that the thread dropping the body does
/// not wait long on a slow client; if it does not, the connection closes.
struct UnreadBodyGuard {
    inner: Box<dyn Read + Send + 'static>,
    // bytes left, if the length is known
    left: Option<usize>,
    done: bool,
    deadline: Arc<Deadline>,
    drain_timeout: Duration,
}

impl UnreadBodyGuard {
    fn new(
        inner: Box<dyn Read + Send + 'static>,
        left: Option<usize>,
        deadline: Arc<Deadline>,
        drain_timeout: Duration,
    ) -> UnreadBodyGuard {
        UnreadBodyGuard {
            inner,
            left,
            done: left == Some(0),
            deadline,
            drain_timeout,
        }
    }
}

impl Read for UnreadBodyGuard {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        let read = self.inner.read(buf)?;
        if read == 0 && !buf.is_empty() {
            self.done = true;
        }
        if let Some(ref mut left) = self.left {
            *left = left.saturating_sub(read);
            if *left == 0 {
                self.done = true;
            }
        }
        Ok(read)
    }
}

impl Drop for UnreadBodyGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.left.map_or(true, |left| left > DRAIN_LIMIT) {
            self.deadline.close();
            return;
        }
        self.deadline.set_if_unbounded(self.drain_timeout);
        let mut buf = [0; 8192];
        loop {
            match self.inner.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => (),
                Err(ref err) if err.kind() == ErrorKind::Interrupted => (),
                Err(_) => {
                    self.deadline.close();
                    return;
                }
            }
        }
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        use crate::{Response, StatusCode};

        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        // ingestd patch: the previous request's body was left unread and
        // could not be drained; the connection closes.
        if self.deadline.is_closed() {
            return None;
        }

        // ingestd patch: the client went away before its address could be
        // read; upstream panicked on building the request.
        if self.remote_addr.is_err() {
            return None;
        }

        // ingestd patch: the library's own error responses carry a JSON
        // body and `Connection: close`.
        loop {
            let mut rq = match self.read() {
                Err(ReadError::WrongRequestLine) => {
                    self.refuse(Refusal::BadRequest("the request line is malformed".to_owned()));
                    return None; // we don't know where the next request would start,
                                 // se we have to close
                }

                Err(ReadError::WrongHeader(_)) => {
                    self.refuse(Refusal::BadRequest("a request header is malformed".to_owned()));
                    return None; // we don't know where the next request would start,
                                 // se we have to close
                }

                Err(ReadError::NotAscii) => {
                    self.refuse(Refusal::BadRequest("the request head is not ASCII".to_owned()));
                    return None;
                }

                Err(ReadError::MalformedLine(detail)) => {
                    self.refuse(Refusal::BadRequest(detail.to_owned()));
                    return None;
                }

                Err(ReadError::Framing(FramingError::BadRequest(detail))) => {
                    self.refuse(Refusal::BadRequest(detail.to_owned()));
                    return None;
                }

                Err(ReadError::Framing(FramingError::NotImplemented(detail))) => {
                    self.refuse(Refusal::NotImplemented(detail));
                    return None;
                }

                Err(ReadError::HeadTooLarge) => {
                    let detail = format!(
                        "the request headers exceed {} bytes",
                        self.limits.max_head_bytes
                    );
                    self.refuse(Refusal::HeadTooLarge(detail));
                    return None;
                }

                Err(ReadError::TooManyHeaders) => {
                    let detail = format!(
                        "the request has more than {} header lines",
                        self.limits.max_headers
                    );
                    self.refuse(Refusal::HeadTooLarge(detail));
                    return None;
                }

                Err(ReadError::ReadIoError(ref err)) if err.kind() == ErrorKind::TimedOut => {
                    // request timeout; a connection on which no byte of a new
                    // request arrived is idle and just closes
                    if self.head_started() {
                        let detail = format!(
                            "the request headers did not arrive within {}",
                            describe_duration(self.limits.head_timeout)
                        );
                        self.refuse(Refusal::Timeout(detail));
                    }
                    return None; // closing the connection
                }

                Err(ReadError::BodyIoError(err)) => {
                    if let Some(response) = self.body_error(err) {
                        self.refuse(response);
                    }
                    return None;
                }

                Err(ReadError::ExpectationFailed(ver)) => {
                    let writer = self.sink.next().unwrap();
                    let response = Response::new_empty(StatusCode(417));
                    response.raw_print(writer, ver, &[], true, None).ok();
                    return None; // TODO: should be recoverable, but needs handling in case of body
                }

                Err(ReadError::ReadIoError(_)) => return None,

                Ok(rq) => rq,
            };

            // checking HTTP version
            if *rq.http_version() > (1, 1) {
                // ingestd patch: answer through the request's own writer.
                // Upstream took the next writer, which waits for this
                // request's writer to be dropped before writing; the request
                // was still alive, so the connection's thread hung for ever.
                // And close: upstream went on to read the next request where
                // this one's body began.
                let response = Response::from_string(
                    "This server only supports HTTP versions 1.0 and 1.1".to_owned(),
                )
                .with_status_code(StatusCode(505));
                self.refuse_request(rq, HTTPVersion(1, 1), response);
                return None;
            }

            // updating the status of the connection; ingestd patch: an
            // `Upgrade` is ignored (RFC 9110 §7.8 lets a server do so), so
            // `Connection: upgrade` keeps the connection as it would be
            // without it. Upstream ended the connection's requests there and
            // handed the raw socket to the application as the body.
            let connection_header = rq
                .headers()
                .iter()
                .find(|h| h.field.equiv("Connection"))
                .map(|h| h.value.as_str());

            let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

            match lowercase {
                Some(ref val) if val.contains("close") => self.no_more_requests = true,
                Some(ref val)
                    if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
                {
                    self.no_more_requests = true
                }
                None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
                _ => (),
            };

            // ingestd patch: a request refused on its head alone is answered
            // before any of its body is read (see `HeadCheck`).
            if let Some(response) = self.check_head(&rq) {
                let version = rq.http_version().clone();
                self.refuse_request(rq, version, response);
                return None;
            }

            // ingestd patch: read a small body now, on this connection's
            // thread, so that the application never waits on a slow client.
            if let Err(response) = self.buffer_body(&mut rq) {
                // nothing more is read, not even to drain the body
                let writer = rq.into_writer();
                match response {
                    Some(response) => self.write_refusal(writer, response),
                    None => self.deadline.close(),
                }
                return None;
            }
            // the application reads any body left with the socket's idle
            // read timeout
            self.deadline.set(None);

            // returning the request
            return Some(rq);
        }
    }
}

/// Parses a "HTTP/1.1" string.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let (major, minor) = match version {
        "HTTP/0.9" => (0, 9),
        "HTTP/1.0" => (1, 0),
        "HTTP/1.1" => (1, 1),
        "HTTP/2.0" => (2, 0),
        "HTTP/3.0" => (3, 0),
        _ => return Err(ReadError::WrongRequestLine),
    };

    Ok(HTTPVersion(major, minor))
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .map(ToOwned::to_owned);
    let version = parts.next().and_then(|w| parse_http_version(w).ok());
    // ingestd patch: nothing may follow the version
    if parts.next().is_some() {
        return Err(ReadError::WrongRequestLine);
    }

    method
        .and_then(|method| Some((method, path?, version?)))
        .ok_or(ReadError::WrongRequestLine)
}

#[cfg(test)]
mod test {
    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
        assert!(super::parse_request_line("GET /hello HTTP/1.1 x").is_err());
        assert!(super::parse_request_line("GET  /hello HTTP/1.1").is_err());
        assert!(super::parse_request_line(" GET /hello HTTP/1.1").is_err());
    }
}
