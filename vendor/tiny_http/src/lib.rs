// ingestd: upstream code as published; its warnings are not ours to fix here.
#![allow(warnings)]
//! # Simple usage
//!
//! ## Creating the server
//!
//! The easiest way to create a server is to call `Server::http()`.
//!
//! The `http()` function returns an `IoResult<Server>` which will return an error
//! in the case where the server creation fails (for example if the listening port is already
//! occupied).
//!
//! ```no_run
//! let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! ```
//!
//! A newly-created `Server` will immediately start listening for incoming connections and HTTP
//! requests.
//!
//! ## Receiving requests
//!
//! Calling `server.recv()` will block until the next request is available.
//! This function returns an `IoResult<Request>`, so you need to handle the possible errors.
//!
//! ```no_run
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//!
//! loop {
//!     // blocks until the next request is received
//!     let request = match server.recv() {
//!         Ok(rq) => rq,
//!         Err(e) => { println!("error: {}", e); break }
//!     };
//!
//!     // do something with the request
//!     // ...
//! }
//! ```
//!
//! In a real-case scenario, you will probably want to spawn multiple worker tasks and call
//! `server.recv()` on all of them. Like this:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::thread;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! let server = Arc::new(server);
//! let mut guards = Vec::with_capacity(4);
//!
//! for _ in (0 .. 4) {
//!     let server = server.clone();
//!
//!     let guard = thread::spawn(move || {
//!         loop {
//!             let rq = server.recv().unwrap();
//!
//!             // ...
//!         }
//!     });
//!
//!     guards.push(guard);
//! }
//! ```
//!
//! If you don't want to block, you can call `server.try_recv()` instead.
//!
//! ## Handling requests
//!
//! The `Request` object returned by `server.recv()` contains informations about the client's request.
//! The most useful methods are probably `request.method()` and `request.url()` which return
//! the requested method (`GET`, `POST`, etc.) and url.
//!
//! To handle a request, you need to create a `Response` object. See the docs of this object for
//! more infos. Here is an example of creating a `Response` from a file:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! ```
//!
//! All that remains to do is call `request.respond()`:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! # let request = server.recv().unwrap();
//! # let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! let _ = request.respond(response);
//! ```
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![allow(clippy::match_like_matches_macro)]

#[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
use zeroize::Zeroizing;

use std::error::Error;
use std::io::Error as IoError;
use std::io::ErrorKind as IoErrorKind;
use std::io::Result as IoResult;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::thread;
use std::time::Duration;

use client::ClientConnection;
use connection::Connection;
use util::MessagesQueue;

pub use common::{HTTPVersion, Header, HeaderField, Method, StatusCode};
pub use connection::{ConfigListenAddr, ListenAddr, Listener};
pub use request::{ReadWrite, Request};
pub use response::{Response, ResponseBox};
pub use util::{plain_refusal, Refusal, RefusalHook};
pub use test::TestRequest;
// ingestd patch: the framing decision, public so that it can be fuzzed.
pub use util::{Framing, FramingError};
// ingestd patch: a body taken out of a request keeps its reservation.
pub use util::Reservation;

mod client;
mod common;
mod connection;
mod request;
mod response;
mod ssl;
mod test;
mod util;

/// The main class of this library.
///
/// Destroying this object will immediately close the listening socket and the reading
///  part of all the client's connections. Requests that have already been returned by
///  the `recv()` function will not close and the responses will be transferred to the client.
pub struct Server {
    // should be false as long as the server exists
    // when set to true, all the subtasks will close within a few hundreds ms
    close: Arc<AtomicBool>,

    // queue for messages received by child threads
    messages: Arc<MessagesQueue<Message>>,

    // result of TcpListener::local_addr()
    listening_addr: ListenAddr,

    // ingestd patch: connections open now
    connections: Arc<AtomicUsize>,

    // ingestd patch: bytes of buffered request bodies held now
    budget: Arc<util::Budget>,

    // ingestd patch: requests handed out whose answers are not yet written
    answers: Arc<AtomicUsize>,

    // ingestd patch: renders the server's own refusals
    refusal: RefusalHook,

    // ingestd patch: when set, each connection's thread hands its requests
    // to this handler itself instead of queueing them for `recv`
    handler: Arc<RwLock<Option<Arc<Handler>>>>,
}

/// ingestd patch: handles a request on its connection's own thread (see
/// `Server::handle_on_connections`). It answers the request, or hands it to
/// another thread that will, and returns.
pub type Handler = dyn Fn(Request) + Send + Sync;

/// ingestd patch: where a connection's request went.
enum Routed {
    /// To the handler, to be called on the connection's thread.
    Direct(Arc<Handler>, Request),
    /// Into the queue for `recv`.
    Queued(Result<(), Message>),
}

enum Message {
    Error(IoError),
    NewRequest(Request),
}

impl From<IoError> for Message {
    fn from(e: IoError) -> Message {
        Message::Error(e)
    }
}

impl From<Request> for Message {
    fn from(rq: Request) -> Message {
        Message::NewRequest(rq)
    }
}

// this trait is to make sure that Server implements Share and Send
#[doc(hidden)]
trait MustBeShareDummy: Sync + Send {}
#[doc(hidden)]
impl MustBeShareDummy for Server {}

pub struct IncomingRequests<'a> {
    server: &'a Server,
}

/// Represents the parameters required to create a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The addresses to try to listen to.
    pub addr: ConfigListenAddr,

    /// If `Some`, then the server will use SSL to encode the communications.
    pub ssl: Option<SslConfig>,
}

/// Limits on what clients can hold (ingestd patch).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most connections open at once; 0 means no limit. A connection beyond it is answered 503 and closed.
    pub max_connections: usize,
    /// Most bytes in a request line plus its headers (431 beyond).
    pub max_head_bytes: usize,
    /// Most header lines in one request (431 beyond).
    pub max_headers: usize,
    /// The request line and all headers must arrive within this long after the server starts waiting for them
    /// (this also bounds how long a keep-alive connection may sit idle). 408 after.
    pub head_timeout: Duration,
    /// A body buffered by the server (see buffer_body_bytes) must arrive in full within this long. 408 after.
    pub body_timeout: Duration,
    /// Bodies of at most this many bytes are read into memory by the connection's own thread before
    /// `Server::recv` (or the handler, see `Server::handle_on_connections`) gets the request, so
    /// application code never waits on a slow client.
    pub buffer_body_bytes: usize,
    /// Total bytes of buffered bodies held at once across all connections; a request whose body would exceed it
    /// is answered 503 at once.
    pub buffer_budget: usize,
    /// Socket write timeout for responses.
    pub write_timeout: Duration,
    /// Judges a request that has a body from its head alone, on the
    /// connection's thread, before any of the body is read or buffered (see
    /// `HeadCheck`).
    pub head_check: Option<HeadCheck>,
    /// Renders the server's own refusals (a malformed head, a timeout, a
    /// spent budget, too many connections, shutting down) as responses;
    /// the server marks each as the connection's last and writes it. The
    /// default is `plain_refusal`: the status and a sentence as text.
    pub refusal: RefusalHook,
}

/// ingestd patch: a check of a request's head (method, URL, headers) run
/// before its body is read. When it returns a response, that response is
/// sent with `Connection: close`, the body is never read nor buffered, the
/// request never reaches `Server::recv` or the handler, and the connection closes
/// (lingering). It runs only for requests with a body, so that a refusal
/// the application could give as well costs no body bytes, memory or time;
/// requests without a body take the usual path. It runs on the connection's
/// thread and must not block.
#[derive(Clone)]
pub struct HeadCheck(Arc<dyn Fn(&Request) -> Option<ResponseBox> + Send + Sync>);

impl HeadCheck {
    pub fn new<F>(check: F) -> HeadCheck
    where
        F: Fn(&Request) -> Option<ResponseBox> + Send + Sync + 'static,
    {
        HeadCheck(Arc::new(check))
    }

    pub(crate) fn check(&self, request: &Request) -> Option<ResponseBox> {
        (self.0)(request)
    }
}

impl std::fmt::Debug for HeadCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeadCheck")
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_head_bytes: 16 * 1024,
            max_headers: 100,
            head_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            buffer_body_bytes: 1024 * 1024,
            buffer_budget: 256 * 1024 * 1024,
            write_timeout: Duration::from_secs(30),
            head_check: None,
            refusal: util::plain_refusal,
        }
    }
}

/// ingestd patch: counts one (an open connection, an unwritten answer) for
/// as long as this lives.
struct CountGuard {
    count: Arc<AtomicUsize>,
}

impl CountGuard {
    fn new(count: &Arc<AtomicUsize>) -> CountGuard {
        count.fetch_add(1, AcqRel);
        CountGuard {
            count: count.clone(),
        }
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.count.fetch_sub(1, AcqRel);
    }
}

/// ingestd patch: how long the accept thread may spend writing the refusal
/// to a connection over `Limits::max_connections`.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// ingestd patch: answers a connection over the limit with a 503 and closes
/// it, without blocking the accept thread for long on a client that does
/// not read.
fn refuse_connection(mut sock: Connection, limits: &Limits) {
    let _ = sock.set_write_timeout(Some(REFUSE_WRITE_TIMEOUT));
    let refusal = Refusal::TooManyConnections(limits.max_connections);
    let _ = util::write_refusal(limits.refusal, &refusal, &mut sock);
    let _ = sock.shutdown(Shutdown::Write);
}

/// ingestd patch: longest a lingering close waits for the client to stop
/// sending.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// ingestd patch: most bytes a lingering close reads and discards.
const LINGER_BYTES: usize = 64 << 20;

/// ingestd patch: a lingering close. Closing a socket with unread bytes in
/// its receive queue, or while more are arriving, makes the kernel answer
/// with a reset, and a client still writing its request (the rest of a body
/// that was refused) then fails on its write, or loses the answer that was
/// already on its way, instead of reading it. So the sending side is shut
/// first, which tells the client the answer is complete, and what the
/// client still sends is read and discarded until it closes its side, for
/// at most `LINGER_TIME` and `LINGER_BYTES`.
fn linger(sock: &mut Connection) {
    if sock.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let until = std::time::Instant::now() + LINGER_TIME;
    let mut buf = [0u8; 16 * 1024];
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match std::io::Read::read(sock, &mut buf) {
            Ok(0) => return,
            Ok(read) => discarded += read,
            Err(ref err) if err.kind() == IoErrorKind::Interrupted => (),
            Err(_) => return,
        }
    }
}

/// ingestd patch: answers a request that no handler will see, the server
/// being gone, with a 503.
fn refuse_request(message: Message, hook: RefusalHook) {
    if let Message::NewRequest(rq) = message {
        let _ = rq.respond(hook(&Refusal::ShuttingDown).closing());
    }
}

/// ingestd patch: writes a rendered response within `timeout` in all,
/// however slowly the client reads: the socket's own timeout bounds each
/// write call only, and a client taking a few bytes at a time would
/// otherwise hold the connection for ever.
fn write_answer(
    writer: &mut dyn std::io::Write,
    bytes: &[u8],
    socket: Option<&Connection>,
    timeout: Duration,
) -> IoResult<()> {
    let end = std::time::Instant::now() + timeout;
    // Before each call: the time left, as the socket's timeout. Between
    // answers the socket's write timeout is `timeout`, so while less than
    // SOCKET_SLACK has gone by it stands (a call may end that much late):
    // a response taken in at once costs no system call for its timeout.
    let mut changed = false;
    let mut time_left = || -> IoResult<()> {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(IoError::new(IoErrorKind::TimedOut, "response not taken in time"));
        }
        if let Some(socket) = socket {
            if changed || timeout.saturating_sub(left) > util::SOCKET_SLACK {
                socket.set_write_timeout(socket_timeout(left))?;
                changed = true;
            }
        }
        Ok(())
    };
    let result = (|| {
        let mut rest = bytes;
        while !rest.is_empty() {
            time_left()?;
            match writer.write(&rest[..rest.len().min(64 * 1024)]) {
                Ok(0) => return Err(IoErrorKind::WriteZero.into()),
                Ok(written) => rest = &rest[written..],
                Err(ref e) if e.kind() == IoErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // what the writer buffered, within what is left
        time_left()?;
        writer.flush()
    })();
    if changed {
        if let Some(socket) = socket {
            let _ = socket.set_write_timeout(socket_timeout(timeout));
        }
    }
    result
}

// ingestd patch: a zero timeout is refused by sockets
fn socket_timeout(timeout: Duration) -> Option<Duration> {
    Some(timeout.max(Duration::from_millis(1)))
}

/// Configuration of the server for SSL.
#[derive(Debug, Clone)]
pub struct SslConfig {
    /// Contains the public certificate to send to clients.
    pub certificate: Vec<u8>,
    /// Contains the ultra-secret private key used to decode communications.
    pub private_key: Vec<u8>,
}

impl Server {
    /// Shortcut for a simple server on a specific address.
    #[inline]
    pub fn http<A>(addr: A) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: None,
        })
    }

    /// Shortcut for a simple server on a specific address, with the given
    /// limits on clients (ingestd patch).
    pub fn http_with_limits<A>(
        addr: A,
        limits: Limits,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        let listener = ConfigListenAddr::from_socket_addrs(addr)?.bind()?;
        Server::from_listener_with_limits(listener, None, limits)
    }

    /// Shortcut for an HTTPS server on a specific address.
    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
    #[inline]
    pub fn https<A>(
        addr: A,
        config: SslConfig,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: Some(config),
        })
    }

    #[cfg(unix)]
    #[inline]
    /// Shortcut for a UNIX socket server at a specific path
    pub fn http_unix(
        path: &std::path::Path,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::unix_from_path(path),
            ssl: None,
        })
    }

    /// Builds a new server that listens on the specified address.
    pub fn new(config: ServerConfig) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = config.addr.bind()?;
        Self::from_listener(listener, config.ssl)
    }

    /// Builds a new server using the specified TCP listener.
    ///
    /// This is useful if you've constructed TcpListener using some less usual method
    /// such as from systemd. For other cases, you probably want the `new()` function.
    pub fn from_listener<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Self::from_listener_with_limits(listener, ssl_config, Limits::default())
    }

    /// Builds a new server using the specified listener, with the given
    /// limits on clients (ingestd patch).
    pub fn from_listener_with_limits<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
        limits: Limits,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = listener.into();
        // building the "close" variable
        let close_trigger = Arc::new(AtomicBool::new(false));

        // building the TcpListener
        let (server, local_addr) = {
            let local_addr = listener.local_addr()?;
            log::debug!("Server listening on {}", local_addr);
            (listener, local_addr)
        };

        // building the SSL capabilities
        #[cfg(all(feature = "ssl-openssl", feature = "ssl-rustls"))]
        compile_error!(
            "Features 'ssl-openssl' and 'ssl-rustls' must not be enabled at the same time"
        );
        #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
        type SslContext = ();
        #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
        type SslContext = crate::ssl::SslContextImpl;
        let ssl: Option<SslContext> = {
            match ssl_config {
                #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                Some(config) => Some(SslContext::from_pem(
                    config.certificate,
                    Zeroizing::new(config.private_key),
                )?),
                #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                Some(_) => return Err(
                    "Building a server with SSL requires enabling the `ssl` feature in tiny-http"
                        .into(),
                ),
                None => None,
            }
        };

        // creating a task where server.accept() is continuously called
        // and ClientConnection objects are pushed in the messages queue
        let messages = MessagesQueue::with_capacity(8);

        // ingestd patch: shared with the connections
        let connections = Arc::new(AtomicUsize::new(0));
        let budget = util::Budget::new(limits.buffer_budget);
        let refusal_hook = limits.refusal;

        let inside_close_trigger = close_trigger.clone();
        let inside_messages = messages.clone();
        let inside_connections = connections.clone();
        let inside_budget = budget.clone();
        let answers = Arc::new(AtomicUsize::new(0));
        let inside_answers = answers.clone();
        let handler: Arc<RwLock<Option<Arc<Handler>>>> = Arc::new(RwLock::new(None));
        let inside_handler = handler.clone();
        thread::spawn(move || {
            // a tasks pool is used to dispatch the connections into threads
            let tasks_pool = util::TaskPool::new();

            log::debug!("Running accept thread");
            while !inside_close_trigger.load(Relaxed) {
                let new_client = match server.accept() {
                    Ok((sock, _)) => {
                        use util::RefinedTcpStream;
                        // ingestd patch: over the connection limit, refuse
                        // at once rather than queue the connection.
                        if limits.max_connections > 0
                            && inside_connections.load(Acquire) >= limits.max_connections
                        {
                            refuse_connection(sock, &limits);
                            continue;
                        }
                        // ingestd patch: a client that stalls while
                        // sending a request or reading a response gives up
                        // its thread instead of holding it for ever. The read
                        // timeout is then shortened to meet the connection's
                        // deadlines (see `Limits`).
                        let _ = sock.set_read_timeout(socket_timeout(limits.head_timeout));
                        let _ = sock.set_write_timeout(socket_timeout(limits.write_timeout));
                        let _ = sock.set_nodelay();
                        // ingestd patch: kept to set the write timeout of
                        // each response (see `write_answer`), and to close
                        // lingering (see `linger`)
                        let socket_clone = sock.try_clone().ok();
                        let (mut read_closable, write_closable) = match ssl {
                            None => RefinedTcpStream::new(sock),
                            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                            Some(ref ssl) => {
                                // trying to apply SSL over the connection
                                // if an error occurs, we just close the socket and resume listening
                                let sock = match ssl.accept(sock) {
                                    Ok(s) => s,
                                    Err(_) => continue,
                                };

                                RefinedTcpStream::new(sock)
                            }
                            #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                            Some(ref _ssl) => unreachable!(),
                        };

                        // ingestd patch: the deadline for the request head
                        // and buffered bodies, checked on every read
                        let deadline = util::Deadline::new();
                        let idle_timeout = socket_timeout(limits.body_timeout);
                        read_closable.set_deadline(deadline.clone(), idle_timeout);

                        Ok(ClientConnection::new(
                            write_closable,
                            read_closable,
                            limits.clone(),
                            deadline.clone(),
                            inside_budget.clone(),
                        ))
                        .map(|client| (client, socket_clone, deadline))
                    }
                    Err(e) => Err(e),
                };

                match new_client {
                    Ok((client, mut socket_clone, deadline)) => {
                        let messages = inside_messages.clone();
                        let handler = inside_handler.clone();
                        let answers = inside_answers.clone();
                        let budget = inside_budget.clone();
                        let write_timeout = limits.write_timeout;
                        // ingestd patch: the connection counts as open until
                        // its task ends, however it ends (or until the task
                        // is dropped without running).
                        let guard = CountGuard::new(&inside_connections);
                        let mut client = Some((client, guard));
                        tasks_pool.spawn(Box::new(move || {
                            if let Some((mut client, _guard)) = client.take() {
                                // ingestd patch: one request at a time per
                                // connection, for plain HTTP too (upstream
                                // did this for HTTPS only). A pipelined
                                // request used to be handed out before the
                                // previous one was answered; its response
                                // then waited for the earlier one, and a
                                // server answering out of order (as group
                                // commit does) could wait for ever.
                                let mut unsent = false;
                                for rq in client.by_ref() {
                                    let (sender, receiver) = mpsc::channel();
                                    // counted until its answer is written
                                    let _unanswered = CountGuard::new(&answers);
                                    // ingestd patch: a handler set runs
                                    // here, saving the hand-off to a thread
                                    // calling `recv` and its wake-up. The
                                    // lock is held while queueing, so that
                                    // `handle_on_connections` finds every
                                    // request queued before it.
                                    let rq = rq.with_notify_sender(sender);
                                    let routed = {
                                        let direct = handler
                                            .read()
                                            .unwrap_or_else(PoisonError::into_inner);
                                        match direct.as_ref() {
                                            Some(handle) => Routed::Direct(handle.clone(), rq),
                                            None => Routed::Queued(messages.push(rq.into())),
                                        }
                                    };
                                    let refused = match routed {
                                        Routed::Direct(handle, rq) => {
                                            handle(rq);
                                            false
                                        }
                                        Routed::Queued(Ok(())) => false,
                                        // the server is gone: refuse here
                                        Routed::Queued(Err(message)) => {
                                            refuse_request(message, refusal_hook);
                                            true
                                        }
                                    };
                                    // The response is written here, on the
                                    // connection's own thread, so that a
                                    // client slow to read it holds up no
                                    // one else. Its bytes count against the
                                    // body budget until written. A request
                                    // dropped unanswered still sends its
                                    // 500 this way.
                                    let (sent, body) = match receiver.recv() {
                                        Ok(request::Answer::Rendered {
                                            mut writer,
                                            bytes,
                                            body,
                                        }) => {
                                            let _held =
                                                util::Reservation::forced(&budget, bytes.len());
                                            let sent = write_answer(
                                                &mut writer,
                                                &bytes,
                                                socket_clone.as_ref(),
                                                write_timeout,
                                            );
                                            // the writer first: dropping it
                                            // lets the next response through
                                            drop(writer);
                                            (sent.is_ok(), body)
                                        }
                                        Ok(request::Answer::Done) => (true, None),
                                        Ok(request::Answer::Failed { body }) => (false, body),
                                        // the request was lost unanswered
                                        Err(_) => (false, None),
                                    };
                                    if !sent {
                                        // read nothing more, not even the
                                        // rest of an unread body
                                        deadline.close();
                                        unsent = true;
                                    }
                                    drop(body);
                                    if !sent || refused {
                                        break;
                                    }
                                }
                                // ingestd patch: a connection closed while
                                // the client may still be sending (a
                                // refusal, a body left unread) closes
                                // lingering, so that the client reads its
                                // answer instead of a reset. Not when the
                                // answer itself could not be written.
                                if deadline.is_closed() && !unsent && !client.refusal_unsent() {
                                    if let Some(sock) = socket_clone.as_mut() {
                                        linger(sock);
                                    }
                                }
                                drop(client);
                            }
                        }));
                    }

                    Err(e) => {
                        // ingestd patch: keep accepting. Upstream ended
                        // the accept thread on the first error, so running
                        // out of file descriptors once stopped the server
                        // for good.
                        log::error!("Error accepting new client: {}", e);
                        // ingestd patch: with a handler set no one calls
                        // `recv`, so the error is not queued for it.
                        if inside_handler
                            .read()
                            .unwrap_or_else(PoisonError::into_inner)
                            .is_none()
                        {
                            let _ = inside_messages.push(e.into());
                        }
                        thread::sleep(std::time::Duration::from_millis(50));
                    }
                }
            }
            log::debug!("Terminating accept thread");
        });

        // result
        Ok(Server {
            messages,
            close: close_trigger,
            listening_addr: local_addr,
            connections,
            budget,
            answers,
            refusal: refusal_hook,
            handler,
        })
    }

    /// Returns an iterator for all the incoming requests.
    ///
    /// The iterator will return `None` if the server socket is shutdown.
    #[inline]
    pub fn incoming_requests(&self) -> IncomingRequests<'_> {
        IncomingRequests { server: self }
    }

    /// Returns the address the server is listening to.
    #[inline]
    pub fn server_addr(&self) -> ListenAddr {
        self.listening_addr.clone()
    }

    /// Returns the number of clients currently connected to the server.
    ///
    /// ingestd patch: implemented (upstream left it `unimplemented!()`).
    pub fn num_connections(&self) -> usize {
        self.connections.load(Acquire)
    }

    /// Returns the bytes of buffered request bodies held now, by requests
    /// not yet handed out and by requests (or their bodies) still alive
    /// (ingestd patch).
    pub fn buffered_bytes(&self) -> usize {
        self.budget.used()
    }

    /// ingestd patch: requests handed out (or queued to be) whose answers
    /// are not yet written to their clients nor given up on. For shutdown:
    /// an answer is written by its connection's thread after `respond`
    /// returns, so a process that exits at once could lose answers already
    /// given.
    pub fn unanswered(&self) -> usize {
        self.answers.load(Acquire)
    }

    /// ingestd patch: for shutdown, once no thread calls `recv` any more:
    /// answers `503` to the requests queued, and to every later one as its
    /// connection reads it, rather than leave them waiting for ever in a
    /// queue no one reads. Dropping the server does this too.
    pub fn refuse_requests(&self) {
        for message in self.messages.close() {
            refuse_request(message, self.refusal);
        }
    }

    /// ingestd patch: from now on each connection's thread hands its
    /// requests to `handler` itself, one at a time, and then writes the
    /// answer as before; `recv` gets no more requests. This saves each
    /// request a hand-off between threads. The handler must not wait on the
    /// client: it gets the request with its body already read when the body
    /// fits `buffer_body_bytes`.
    ///
    /// Requests queued before the call are handled by it, on the calling
    /// thread.
    pub fn handle_on_connections(&self, handler: Arc<Handler>) {
        *self.handler.write().unwrap_or_else(PoisonError::into_inner) = Some(handler.clone());
        while let Some(message) = self.messages.try_pop() {
            if let Message::NewRequest(rq) = message {
                handler(rq);
            }
        }
    }

    /// ingestd patch: unsets the handler: later requests are queued for
    /// `recv` again (or refused, after `refuse_requests`). Returns a weak
    /// handle on the handler, which stays alive while calls to it run.
    pub fn take_handler(&self) -> Option<Weak<Handler>> {
        self.handler
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .map(|h| Arc::downgrade(&h))
    }

    /// Blocks until an HTTP request has been submitted and returns it.
    pub fn recv(&self) -> IoResult<Request> {
        match self.messages.pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(rq),
            None => Err(IoError::new(IoErrorKind::Other, "thread unblocked")),
        }
    }

    /// Same as `recv()` but doesn't block longer than timeout
    pub fn recv_timeout(&self, timeout: Duration) -> IoResult<Option<Request>> {
        match self.messages.pop_timeout(timeout) {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Same as `recv()` but doesn't block.
    pub fn try_recv(&self) -> IoResult<Option<Request>> {
        match self.messages.try_pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Unblock thread stuck in recv() or incoming_requests().
    /// If there are several such threads, only one is unblocked.
    /// This method allows graceful shutdown of server.
    pub fn unblock(&self) {
        self.messages.unblock();
    }
}

impl Iterator for IncomingRequests<'_> {
    type Item = Request;
    fn next(&mut self) -> Option<Request> {
        self.server.recv().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close.store(true, Relaxed);
        self.take_handler();
        self.refuse_requests();
        // Connect briefly to ourselves to unblock the accept thread
        let maybe_stream = match &self.listening_addr {
            ListenAddr::IP(addr) => TcpStream::connect(addr).map(Connection::from),
            #[cfg(unix)]
            ListenAddr::Unix(addr) => {
                // TODO: use connect_addr when its stabilized.
                let path = addr.as_pathname().unwrap();
                std::os::unix::net::UnixStream::connect(path).map(Connection::from)
            }
        };
        if let Ok(stream) = maybe_stream {
            let _ = stream.shutdown(Shutdown::Both);
        }

        #[cfg(unix)]
        if let ListenAddr::Unix(addr) = &self.listening_addr {
            if let Some(path) = addr.as_pathname() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod handler_tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{Limits, Response, Server};

    fn ask(server: &Server) -> TcpStream {
        let addr = server.server_addr().to_ip().unwrap();
        let mut client = TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client.write_all(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").unwrap();
        client
    }

    fn answer(mut client: TcpStream) -> String {
        let mut text = String::new();
        client.read_to_string(&mut text).unwrap();
        text
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The handler runs on the connection's own thread, no one calls
    /// `recv`, and a request that arrived before the handler was set is
    /// handled too rather than left in the queue.
    #[test]
    fn requests_are_handled_on_their_connections_threads() {
        let server = Server::http_with_limits("127.0.0.1:0", Limits::default()).unwrap();
        let early = ask(&server);
        wait_for("the early request to be queued", || server.messages.len() == 1);
        let (threads, seen) = mpsc::channel();
        let main = std::thread::current().id();
        server.handle_on_connections(Arc::new(move |rq: super::Request| {
            threads.send(std::thread::current().id()).unwrap();
            rq.respond(Response::from_string("handled")).unwrap();
        }));
        assert!(answer(early).ends_with("handled"));
        // The queued request was handled by the thread setting the handler.
        assert_eq!(seen.recv().unwrap(), main);
        let later = answer(ask(&server));
        assert!(later.starts_with("HTTP/1.1 200") && later.ends_with("handled"), "{later}");
        let connection = seen.recv().unwrap();
        assert_ne!(connection, main);
    }

    /// Once the handler is taken, requests queue again, and
    /// `refuse_requests` answers them 503; the weak handle shows when the
    /// last call to the handler has returned.
    #[test]
    fn a_taken_handler_stops_handling() {
        let server = Server::http_with_limits("127.0.0.1:0", Limits::default()).unwrap();
        let (entered, inside) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        server.handle_on_connections(Arc::new(move |rq: super::Request| {
            entered.send(()).unwrap();
            released.lock().unwrap().recv().unwrap();
            rq.respond(Response::from_string("handled")).unwrap();
        }));
        let busy = ask(&server);
        inside.recv().unwrap();
        let handler = server.take_handler().expect("a handler was set");
        // A call is still running: the handler lives.
        assert!(handler.upgrade().is_some());
        let queued = ask(&server);
        wait_for("the second request to be queued", || server.messages.len() == 1);
        release.send(()).unwrap();
        assert!(answer(busy).ends_with("handled"));
        wait_for("the handler to be dropped", || handler.upgrade().is_none());
        server.refuse_requests();
        let refused = answer(queued);
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(server.take_handler().is_none());
    }
}
