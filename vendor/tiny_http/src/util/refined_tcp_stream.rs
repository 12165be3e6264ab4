use std::io::Result as IoResult;
use std::io::{Error as IoError, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::connection::Connection;
use crate::util::{Deadline, Remaining};
#[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
use crate::ssl::SslStream;

pub(crate) enum Stream {
    Http(Connection),
    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
    Https(SslStream),
}

impl Clone for Stream {
    fn clone(&self) -> Self {
        match self {
            Stream::Http(tcp_stream) => Stream::Http(tcp_stream.try_clone().unwrap()),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => Stream::Https(ssl_stream.clone()),
        }
    }
}

impl From<Connection> for Stream {
    fn from(tcp_stream: Connection) -> Self {
        Stream::Http(tcp_stream)
    }
}

impl Stream {
    fn secure(&self) -> bool {
        match self {
            Stream::Http(_) => false,
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => true,
        }
    }

    fn peer_addr(&mut self) -> IoResult<Option<SocketAddr>> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.peer_addr(),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.peer_addr(),
        }
    }

    // ingestd patch: lets reads meet the connection's deadline
    fn set_read_timeout(&self, timeout: Option<Duration>) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.set_read_timeout(timeout),
            // the deadline is still checked before every read, but the socket
            // keeps the read timeout it was given when accepted
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => Ok(()),
        }
    }

    fn shutdown(&mut self, how: Shutdown) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.shutdown(how),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.read(buf),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.write(buf),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.write(buf),
        }
    }

    fn flush(&mut self) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.flush(),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.flush(),
        }
    }
}

pub struct RefinedTcpStream {
    stream: Stream,
    close_read: bool,
    close_write: bool,

    // ingestd patch: the connection's read deadline, checked before every
    // read (that is, every refill of the `BufReader` above, not every byte)
    deadline: Option<Arc<Deadline>>,

    // read timeout of the socket while no deadline is set
    idle_timeout: Option<Duration>,

    // the read timeout last given to the socket
    applied: Applied,
}

#[derive(Clone, Copy, PartialEq)]
enum Applied {
    Unknown,
    Idle,
    // `timeout` was set so that a read starting then would end at `at`
    Until { at: Instant, timeout: Duration },
}

/// How late past its deadline a read may time out before the socket's read
/// timeout is set again, and how late past its time an answer's first
/// writes may end before the socket's write timeout is shortened. Setting
/// it on every call would cost a system call per read or write; as it is,
/// a read timeout is set when the deadline changes and then at most once
/// per this much time, and a write timeout only for a slow client.
pub(crate) const SOCKET_SLACK: Duration = Duration::from_millis(50);

impl RefinedTcpStream {
    pub(crate) fn new<S>(stream: S) -> (RefinedTcpStream, RefinedTcpStream)
    where
        S: Into<Stream>,
    {
        let stream: Stream = stream.into();

        let (read, write) = (stream.clone(), stream);

        let read = RefinedTcpStream {
            stream: read,
            close_read: true,
            close_write: false,
            deadline: None,
            idle_timeout: None,
            applied: Applied::Unknown,
        };

        let write = RefinedTcpStream {
            stream: write,
            close_read: false,
            close_write: true,
            deadline: None,
            idle_timeout: None,
            applied: Applied::Unknown,
        };

        (read, write)
    }

    /// Returns true if this struct wraps around a secure connection.
    #[inline]
    pub(crate) fn secure(&self) -> bool {
        self.stream.secure()
    }

    pub(crate) fn peer_addr(&mut self) -> IoResult<Option<SocketAddr>> {
        self.stream.peer_addr()
    }

    /// ingestd patch: makes reads obey `deadline`: a read once it has passed
    /// fails with `TimedOut`, and a read before then times out when it
    /// passes. While no deadline is set, a read times out after
    /// `idle_timeout` without data.
    pub(crate) fn set_deadline(&mut self, deadline: Arc<Deadline>, idle_timeout: Option<Duration>) {
        self.deadline = Some(deadline);
        self.idle_timeout = idle_timeout.map(at_least_1ms);
        self.applied = Applied::Unknown;
    }

    fn apply_idle_timeout(&mut self) -> IoResult<()> {
        if self.applied != Applied::Idle {
            self.stream.set_read_timeout(self.idle_timeout)?;
            self.applied = Applied::Idle;
        }
        Ok(())
    }

    /// Sets the socket's read timeout so that a read now ends by `at`, `left`
    /// from now, unless the timeout already set ends it at most
    /// `SOCKET_SLACK` later.
    fn apply_deadline(&mut self, at: Instant, left: Duration) -> IoResult<()> {
        let close_enough = match self.applied {
            Applied::Until {
                at: applied_at,
                timeout,
            } => applied_at == at && timeout.saturating_sub(left) <= SOCKET_SLACK,
            _ => false,
        };
        if !close_enough {
            let timeout = at_least_1ms(left);
            self.stream.set_read_timeout(Some(timeout))?;
            self.applied = Applied::Until { at, timeout };
        }
        Ok(())
    }
}

// a zero timeout is refused by the socket
fn at_least_1ms(timeout: Duration) -> Duration {
    timeout.max(Duration::from_millis(1))
}

impl Drop for RefinedTcpStream {
    fn drop(&mut self) {
        if self.close_read {
            self.stream.shutdown(Shutdown::Read).ok();
        }

        if self.close_write {
            self.stream.shutdown(Shutdown::Write).ok();
        }
    }
}

impl Read for RefinedTcpStream {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        // ingestd patch: obey the connection's read deadline, if any.
        loop {
            let remaining = match self.deadline {
                Some(ref deadline) => deadline.remaining(),
                None => return self.stream.read(buf),
            };
            let bounded = match remaining {
                Remaining::Closed => {
                    return Err(IoError::new(ErrorKind::ConnectionAborted, "connection is closing"))
                }
                Remaining::Expired => {
                    return Err(IoError::new(ErrorKind::TimedOut, "read deadline has passed"))
                }
                Remaining::Unbounded => {
                    self.apply_idle_timeout()?;
                    false
                }
                Remaining::Left(at, left) => {
                    self.apply_deadline(at, left)?;
                    true
                }
            };
            match self.stream.read(buf) {
                // a socket read timeout shows as `WouldBlock` on Unix
                Err(ref e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
                {
                    if !bounded {
                        return Err(IoError::new(ErrorKind::TimedOut, "read timed out"));
                    }
                    // woken before the deadline: check it again and retry
                }
                result => return result,
            }
        }
    }
}

impl Write for RefinedTcpStream {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> IoResult<()> {
        self.stream.flush()
    }
}
