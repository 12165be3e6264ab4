use std::io::Error as IoError;
use std::io::{self, Cursor, ErrorKind, Read, Write};

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use std::sync::mpsc::Sender;

use crate::util::{BufferedBody, ChunkedReader, EqualReader, Framing, FusedReader, Reservation};
use crate::{HTTPVersion, Header, Method, Response, StatusCode};

/// Represents an HTTP request made by a client.
///
/// A `Request` object is what is produced by the server, and is your what
/// your code must analyse and answer.
///
/// This object implements the `Send` trait, therefore you can dispatch your requests to
/// worker threads.
///
/// # Pipelining
///
/// If a client sends multiple requests in a row (without waiting for the response), then you will
/// get multiple `Request` objects simultaneously. This is called *requests pipelining*.
/// Tiny-http automatically reorders the responses so that you don't need to worry about the order
/// in which you call `respond` or `into_writer`.
///
/// This mechanic is disabled if:
///
///  - The body of a request is large enough (handling requires pipelining requires storing the
///    body of the request in a buffer ; if the body is too big, tiny-http will avoid doing that)
///  - A request sends a `Expect: 100-continue` header (which means that the client waits to
///    know whether its body will be processed before sending it)
///  - A request sends a `Connection: close` header or `Connection: upgrade` header (used for
///    websockets), which indicates that this is the last request that will be received on this
///    connection
///
/// # Automatic cleanup
///
/// If a `Request` object is destroyed without `into_writer` or `respond` being called,
/// an empty response with a 500 status code (internal server error) will automatically be
/// sent back to the client.
/// This means that if your code fails during the handling of a request, this "internal server
/// error" response will automatically be sent during the stack unwinding.
///
/// # Testing
///
/// If you want to build fake requests to test your server, use [`TestRequest`](crate::test::TestRequest).
pub struct Request {
    // where to read the body from
    data_reader: Option<Box<dyn Read + Send + 'static>>,

    // if this writer is empty, then the request has been answered
    response_writer: Option<Box<dyn Write + Send + 'static>>,

    remote_addr: Option<SocketAddr>,

    // true if HTTPS, false if HTTP
    secure: bool,

    method: Method,

    path: String,

    http_version: HTTPVersion,

    headers: Vec<Header>,

    body_length: Option<usize>,

    // true if a `100 Continue` response must be sent when `as_reader()` is called
    must_send_continue: bool,

    // If Some, a message must be sent after responding
    notify_when_responded: Option<Sender<Answer>>,

    // ingestd patch: the body is whole in memory, not read from the socket
    body_in_memory: bool,

    // ingestd patch: how the body is delimited
    framing: Framing,

    // ingestd patch: the whole body, when the connection read it into
    // memory; `data_reader` is then empty
    whole_body: Option<BufferedBody>,
}

/// ingestd patch: what a connection's thread learns once its request is
/// answered.
pub(crate) enum Answer {
    /// The response, rendered into memory by the answering thread, with the
    /// writer to send it through and the body to drop after it (unless it
    /// was in memory: it is dropped at once), all moved to the connection's
    /// own thread: whoever answers (a committer, for example) never waits on
    /// a client that reads slowly or not at all; only that client's
    /// connection does, within its write timeout.
    Rendered {
        writer: Box<dyn Write + Send + 'static>,
        bytes: Vec<u8>,
        body: Option<Box<dyn Read + Send + 'static>>,
    },
    /// The response went out some other way (`into_writer`, `upgrade`).
    Done,
    /// No response could be rendered; the connection closes.
    Failed {
        body: Option<Box<dyn Read + Send + 'static>>,
    },
}

struct NotifyOnDrop<R> {
    sender: Sender<Answer>,
    inner: R,
}

impl<R: Read> Read for NotifyOnDrop<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}
impl<R: Write> Write for NotifyOnDrop<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
impl<R> Drop for NotifyOnDrop<R> {
    fn drop(&mut self) {
        let _ = self.sender.send(Answer::Done); // ingestd patch: never panic here
    }
}

/// Error that can happen when building a `Request` object.
#[derive(Debug)]
pub enum RequestCreationError {
    /// The client sent an `Expect` header that was not recognized by tiny-http.
    ExpectationFailed,

    /// Error while reading data from the socket during the creation of the `Request`.
    CreationIoError(IoError),
}

impl From<IoError> for RequestCreationError {
    fn from(err: IoError) -> RequestCreationError {
        RequestCreationError::CreationIoError(err)
    }
}

/// Builds a new request.
///
/// After the request line and headers have been read from the socket, a new `Request` object
/// is built.
///
/// You must pass a `Read` that will allow the `Request` object to read from the incoming data.
/// It is the responsibility of the `Request` to read only the data of the request and not further.
///
/// The `Write` object will be used by the `Request` to write the response.
#[allow(clippy::too_many_arguments)]
pub fn new_request<R, W>(
    secure: bool,
    method: Method,
    path: String,
    version: HTTPVersion,
    headers: Vec<Header>,
    framing: Framing,
    remote_addr: Option<SocketAddr>,
    source_data: R,
    writer: W,
) -> Result<Request, RequestCreationError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    // ingestd patch: the body is read as `framing` says, decided once by the
    // caller from the whole head (`Framing::of`), so that every part of the
    // server frames a request alike. Upstream looked at the first
    // `Content-Length` and `Transfer-Encoding` headers only, ignored a
    // malformed length, and read a request with `Connection: upgrade` as the
    // whole rest of the stream.

    // true if the client sent a `Expect: 100-continue` header
    let expects_continue = {
        match headers
            .iter()
            .find(|h: &&Header| h.field.equiv("Expect"))
            .map(|h| h.value.as_str())
        {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("100-continue") => true,
            _ => return Err(RequestCreationError::ExpectationFailed),
        }
    };

    let reader = match framing {
        Framing::Empty | Framing::Length(0) => {
            Box::new(io::empty()) as Box<dyn Read + Send + 'static>
        }
        // ingestd patch: upstream read a body of up to 1 KiB here, at
        // once, before anything could look at the head (`HeadCheck`) and
        // outside the memory budget; the connection buffers bodies
        // itself (`ClientConnection::buffer_body`).
        Framing::Length(content_length) => {
            let (data_reader, _) = EqualReader::new(source_data, content_length);
            Box::new(FusedReader::new(data_reader)) as Box<dyn Read + Send + 'static>
        }
        // ingestd patch: a decoder that bounds the chunk-size lines it reads
        // and passes I/O errors (such as timeouts) on as they are.
        Framing::Chunked => Box::new(FusedReader::new(ChunkedReader::new(source_data)))
            as Box<dyn Read + Send + 'static>,
    };

    Ok(Request {
        data_reader: Some(reader),
        response_writer: Some(Box::new(writer) as Box<dyn Write + Send + 'static>),
        remote_addr,
        secure,
        method,
        path,
        http_version: version,
        headers,
        body_length: framing.length(),
        framing,
        whole_body: None,
        must_send_continue: expects_continue,
        notify_when_responded: None,
        body_in_memory: false,
    })
}

impl Request {
    /// Returns true if the request was made through HTTPS.
    #[inline]
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Returns the method requested by the client (eg. `GET`, `POST`, etc.).
    #[inline]
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Returns the resource requested by the client.
    #[inline]
    pub fn url(&self) -> &str {
        &self.path
    }

    /// Returns a list of all headers sent by the client.
    #[inline]
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// Returns the HTTP version of the request.
    #[inline]
    pub fn http_version(&self) -> &HTTPVersion {
        &self.http_version
    }

    /// Returns the length of the body in bytes.
    ///
    /// Returns `None` if the length is unknown.
    #[inline]
    pub fn body_length(&self) -> Option<usize> {
        self.body_length
    }

    /// Returns the address of the client that sent this request.
    ///
    /// The address is always `Some` for TCP listeners, but always `None` for UNIX listeners
    /// (as the remote address of a UNIX client is almost always unnamed).
    ///
    /// Note that this is gathered from the socket. If you receive the request from a proxy,
    /// this function will return the address of the proxy and not the address of the actual
    /// user.
    #[inline]
    pub fn remote_addr(&self) -> Option<&SocketAddr> {
        self.remote_addr.as_ref()
    }

    /// Sends a response with a `Connection: upgrade` header, then turns the `Request` into a `Stream`.
    ///
    /// The main purpose of this function is to support websockets.
    /// If you detect that the request wants to use some kind of protocol upgrade, you can
    ///  call this function to obtain full control of the socket stream.
    ///
    /// If you call this on a non-websocket request, tiny-http will wait until this `Stream` object
    ///  is destroyed before continuing to read or write on the socket. Therefore you should always
    ///  destroy it as soon as possible.
    pub fn upgrade<R: Read>(
        mut self,
        protocol: &str,
        response: Response<R>,
    ) -> Box<dyn ReadWrite + Send> {
        use crate::util::CustomStream;

        response
            .raw_print(
                self.response_writer.as_mut().unwrap().by_ref(),
                self.http_version.clone(),
                &self.headers,
                false,
                Some(protocol),
            )
            .ok(); // TODO: unused result

        self.response_writer.as_mut().unwrap().flush().ok(); // TODO: unused result

        let stream = CustomStream::new(self.extract_reader_impl(), self.extract_writer_impl());
        if let Some(sender) = self.notify_when_responded.take() {
            let stream = NotifyOnDrop {
                sender,
                inner: stream,
            };
            Box::new(stream) as Box<dyn ReadWrite + Send>
        } else {
            Box::new(stream) as Box<dyn ReadWrite + Send>
        }
    }

    /// Allows to read the body of the request.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # extern crate rustc_serialize;
    /// # extern crate tiny_http;
    /// # use rustc_serialize::json::Json;
    /// # use std::io::Read;
    /// # fn get_content_type(_: &tiny_http::Request) -> &'static str { "" }
    /// # fn main() {
    /// # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
    /// let mut request = server.recv().unwrap();
    ///
    /// if get_content_type(&request) == "application/json" {
    ///     let mut content = String::new();
    ///     request.as_reader().read_to_string(&mut content).unwrap();
    ///     let json: Json = content.parse().unwrap();
    /// }
    /// # }
    /// ```
    ///
    /// If the client sent a `Expect: 100-continue` header with the request, calling this
    ///  function will send back a `100 Continue` response.
    #[inline]
    pub fn as_reader(&mut self) -> &mut dyn Read {
        if self.must_send_continue {
            let msg = Response::new_empty(StatusCode(100));
            msg.raw_print(
                self.response_writer.as_mut().unwrap().by_ref(),
                self.http_version.clone(),
                &self.headers,
                true,
                None,
            )
            .ok();
            self.response_writer.as_mut().unwrap().flush().ok();
            self.must_send_continue = false;
        }

        match self.whole_body {
            Some(ref mut body) => body,
            None => self.data_reader.as_mut().unwrap(),
        }
    }

    /// ingestd patch: takes the body out of the request, if the connection
    /// read it whole into memory, with the reservation that counts it
    /// against the server's memory budget (`Limits::buffer_budget`). The
    /// application can then parse it without a copy, and keep counting what
    /// it holds for the request (grow or shrink the reservation) until it
    /// drops the reservation. The request's reader is empty afterwards.
    /// `None` if the body is not whole in memory (none, not buffered, or a
    /// chunked body longer than `Limits::buffer_body_bytes`).
    pub fn take_whole_body(&mut self) -> Option<(Vec<u8>, Reservation)> {
        self.whole_body.take().map(BufferedBody::into_parts)
    }

    /// Turns the `Request` into a writer.
    ///
    /// The writer has a raw access to the stream to the user.
    /// This function is useful for things like CGI.
    ///
    /// Note that the destruction of the `Writer` object may trigger
    /// some events. For exemple if a client has sent multiple requests and the requests
    /// have been processed in parallel, the destruction of a writer will trigger
    /// the writing of the next response.
    /// Therefore you should always destroy the `Writer` as soon as possible.
    #[inline]
    pub fn into_writer(mut self) -> Box<dyn Write + Send + 'static> {
        let writer = self.extract_writer_impl();
        if let Some(sender) = self.notify_when_responded.take() {
            let writer = NotifyOnDrop {
                sender,
                inner: writer,
            };
            Box::new(writer) as Box<dyn Write + Send + 'static>
        } else {
            writer
        }
    }

    /// Extract the response `Writer` object from the Request, dropping this `Writer` has the same side effects
    /// as the object returned by `into_writer` above.
    ///
    /// This may only be called once on a single request.
    fn extract_writer_impl(&mut self) -> Box<dyn Write + Send + 'static> {
        use std::mem;

        assert!(self.response_writer.is_some());

        let mut writer = None;
        mem::swap(&mut self.response_writer, &mut writer);
        writer.unwrap()
    }

    /// Extract the body `Reader` object from the Request.
    ///
    /// This may only be called once on a single request.
    fn extract_reader_impl(&mut self) -> Box<dyn Read + Send + 'static> {
        use std::mem;

        assert!(self.data_reader.is_some());
        // ingestd patch: a body read whole into memory
        if let Some(body) = self.whole_body.take() {
            self.data_reader = None;
            return Box::new(body);
        }

        let mut reader = None;
        mem::swap(&mut self.data_reader, &mut reader);
        reader.unwrap()
    }

    /// Sends a response to this request.
    #[inline]
    pub fn respond<R>(mut self, response: Response<R>) -> Result<(), IoError>
    where
        R: Read,
    {
        self.respond_impl(response)
    }

    fn respond_impl<R>(&mut self, response: Response<R>) -> Result<(), IoError>
    where
        R: Read,
    {
        // ingestd patch: with a connection thread waiting, render here and
        // let that thread write.
        if let Some(sender) = self.notify_when_responded.take() {
            let mut bytes = Vec::new();
            let rendered = response.raw_print(
                &mut bytes,
                self.http_version.clone(),
                &self.headers,
                self.method == Method::Head,
                None,
            );
            let writer = self.extract_writer_impl();
            // A body in memory only holds memory and budget: free them now.
            // One still on the socket must be dropped (drained or cut off)
            // after the response is written.
            let body = self.data_reader.take().filter(|_| !self.body_in_memory);
            if rendered.is_err() {
                // An unreadable response body: send nothing rather than
                // half a response, and close the connection.
                let _ = sender.send(Answer::Failed { body });
                return rendered;
            }
            let _ = sender.send(Answer::Rendered {
                writer,
                bytes,
                body,
            });
            return Ok(());
        }

        let mut writer = self.extract_writer_impl();

        let do_not_send_body = self.method == Method::Head;

        Self::ignore_client_closing_errors(response.raw_print(
            writer.by_ref(),
            self.http_version.clone(),
            &self.headers,
            do_not_send_body,
            None,
        ))?;

        Self::ignore_client_closing_errors(writer.flush())
    }

    fn ignore_client_closing_errors(result: io::Result<()>) -> io::Result<()> {
        result.or_else(|err| match err.kind() {
            ErrorKind::BrokenPipe => Ok(()),
            ErrorKind::ConnectionAborted => Ok(()),
            ErrorKind::ConnectionRefused => Ok(()),
            ErrorKind::ConnectionReset => Ok(()),
            _ => Err(err),
        })
    }

    /// ingestd patch: how the body is delimited.
    pub(crate) fn framing(&self) -> Framing {
        self.framing
    }

    /// ingestd patch: marks the body as whole in memory (see `Answer`).
    pub(crate) fn set_body_in_memory(&mut self) {
        self.body_in_memory = true;
    }

    /// ingestd patch: hands out `body`, read whole into memory, as the
    /// request's body (see `take_whole_body`).
    pub(crate) fn set_whole_body(&mut self, body: BufferedBody) {
        self.data_reader = Some(Box::new(io::empty()));
        self.whole_body = Some(body);
        self.body_in_memory = true;
    }

    pub(crate) fn with_notify_sender(mut self, sender: Sender<Answer>) -> Self {
        self.notify_when_responded = Some(sender);
        self
    }

    /// ingestd patch: replaces the body reader, returning the one it had,
    /// so that the connection can hand out a body it has read into memory.
    /// A `100 Continue` still owed is not sent by this; use `as_reader()`
    /// first when the old reader is to be read from.
    pub(crate) fn replace_reader(
        &mut self,
        reader: Box<dyn Read + Send + 'static>,
    ) -> Box<dyn Read + Send + 'static> {
        let old = self.data_reader.replace(reader);
        old.unwrap_or_else(|| Box::new(io::empty()))
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> Result<(), fmt::Error> {
        write!(
            formatter,
            "Request({} {} from {:?})",
            self.method, self.path, self.remote_addr
        )
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.response_writer.is_some() {
            let response = Response::empty(500);
            let _ = self.respond_impl(response); // ignoring any potential error
        }
    }
}

/// Dummy trait that regroups the `Read` and `Write` traits.
///
/// Automatically implemented on all types that implement both `Read` and `Write`.
pub trait ReadWrite: Read + Write {}
impl<T> ReadWrite for T where T: Read + Write {}

#[cfg(test)]
mod tests {
    use super::Request;

    #[test]
    fn must_be_send() {
        #![allow(dead_code)]
        fn f<T: Send>(_: &T) {}
        fn bar(rq: &Request) {
            f(rq);
        }
    }
}
