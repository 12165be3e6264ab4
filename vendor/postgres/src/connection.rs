use crate::{Error, Notification};
use futures_util::Stream;
use std::collections::{HashMap, VecDeque};
use std::future::{self, Future};
use std::ops::{Deref, DerefMut};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::Runtime;
use tokio_postgres::{AsyncMessage, Statement};
use tokio_postgres::error::DbError;

pub struct Connection {
    runtime: Runtime,
    connection: Pin<Box<dyn Stream<Item = Result<AsyncMessage, Error>> + Send>>,
    notifications: VecDeque<Notification>,
    notice_callback: Arc<dyn Fn(DbError) + Sync + Send>,
    // ingestd patch: see `Config::response_timeout`
    response_timeout: Option<Duration>,
    // ingestd patch: statements kept by `prepare_cached`, by query text
    statements: HashMap<String, Statement>,
}

impl Connection {
    pub fn new<S, T>(
        runtime: Runtime,
        connection: tokio_postgres::Connection<S, T>,
        notice_callback: Arc<dyn Fn(DbError) + Sync + Send>,
    ) -> Connection
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static + Send,
        T: AsyncRead + AsyncWrite + Unpin + 'static + Send,
    {
        Connection {
            runtime,
            connection: Box::pin(ConnectionStream { connection }),
            notifications: VecDeque::new(),
            notice_callback,
            response_timeout: None,
            statements: HashMap::new(),
        }
    }

    /// ingestd patch: the statement kept for `query`, prepared with
    /// `prepare` the first time and kept for the life of the connection
    /// (`Client::prepare_cached`, `Transaction::prepare_cached`).
    pub fn prepare_cached(
        &mut self,
        query: &str,
        prepare: impl FnOnce(&mut Connection) -> Result<Statement, Error>,
    ) -> Result<Statement, Error> {
        if let Some(statement) = self.statements.get(query) {
            return Ok(statement.clone());
        }
        let statement = prepare(self)?;
        self.statements.insert(query.to_owned(), statement.clone());
        Ok(statement)
    }

    /// ingestd patch: bounds every `block_on` (see `Config::response_timeout`).
    pub fn set_response_timeout(&mut self, timeout: Option<Duration>) {
        self.response_timeout = timeout;
    }

    pub fn as_ref(&mut self) -> ConnectionRef<'_> {
        ConnectionRef { connection: self }
    }

    pub fn enter<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T,
    {
        let _guard = self.runtime.enter();
        f()
    }

    pub fn block_on<F, T>(&mut self, future: F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let mut future = pin!(future);
        self.bounded_poll_block_on(|cx, _, _| future.as_mut().poll(cx))
    }

    /// ingestd patch: `poll_block_on` within the response timeout, if one is
    /// set. A server that does not answer within it is given up, and the
    /// connection closed: dropping the connection future closes its
    /// socket, so the client's pending and later requests fail at once and
    /// `is_closed` is true.
    pub fn bounded_poll_block_on<F, T>(&mut self, f: F) -> Result<T, Error>
    where
        F: FnMut(&mut Context<'_>, &mut VecDeque<Notification>, bool) -> Poll<Result<T, Error>>,
    {
        match self.response_timeout {
            None => self.poll_block_on(f),
            Some(timeout) => self.poll_block_on_within(timeout, f),
        }
    }

    /// ingestd patch: closes the connection without waiting for the server:
    /// the connection future is dropped, which closes the socket.
    pub fn abandon(&mut self) {
        self.connection = Box::pin(futures_util::stream::empty());
    }

    /// ingestd patch: `poll_block_on` for at most `timeout`; on expiry the
    /// connection is abandoned and the call fails with a timeout error.
    pub fn poll_block_on_within<F, T>(&mut self, timeout: Duration, mut f: F) -> Result<T, Error>
    where
        F: FnMut(&mut Context<'_>, &mut VecDeque<Notification>, bool) -> Poll<Result<T, Error>>,
    {
        let mut expiry = pin!(self.enter(|| tokio::time::sleep(timeout)));
        let mut expired = false;
        let result = self.poll_block_on(|cx, notifications, done| {
            match f(cx, notifications, done) {
                Poll::Ready(result) => Poll::Ready(result),
                Poll::Pending => match expiry.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        expired = true;
                        Poll::Ready(Err(Error::__private_api_timeout()))
                    }
                    Poll::Pending => Poll::Pending,
                },
            }
        });
        if expired {
            self.abandon();
        }
        result
    }

    pub fn poll_block_on<F, T>(&mut self, mut f: F) -> Result<T, Error>
    where
        F: FnMut(&mut Context<'_>, &mut VecDeque<Notification>, bool) -> Poll<Result<T, Error>>,
    {
        let connection = &mut self.connection;
        let notifications = &mut self.notifications;
        let notice_callback = &mut self.notice_callback;
        self.runtime.block_on({
            future::poll_fn(|cx| {
                let done = loop {
                    match connection.as_mut().poll_next(cx) {
                        Poll::Ready(Some(Ok(AsyncMessage::Notification(notification)))) => {
                            notifications.push_back(notification);
                        }
                        Poll::Ready(Some(Ok(AsyncMessage::Notice(notice)))) => {
                            notice_callback(notice)
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        Poll::Ready(None) => break true,
                        Poll::Pending => break false,
                    }
                };

                f(cx, notifications, done)
            })
        })
    }

    pub fn notifications(&self) -> &VecDeque<Notification> {
        &self.notifications
    }

    pub fn notifications_mut(&mut self) -> &mut VecDeque<Notification> {
        &mut self.notifications
    }
}

pub struct ConnectionRef<'a> {
    connection: &'a mut Connection,
}

// no-op impl to extend the borrow until drop
impl Drop for ConnectionRef<'_> {
    #[inline]
    fn drop(&mut self) {}
}

impl Deref for ConnectionRef<'_> {
    type Target = Connection;

    #[inline]
    fn deref(&self) -> &Connection {
        self.connection
    }
}

impl DerefMut for ConnectionRef<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Connection {
        self.connection
    }
}

struct ConnectionStream<S, T> {
    connection: tokio_postgres::Connection<S, T>,
}

impl<S, T> Stream for ConnectionStream<S, T>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Result<AsyncMessage, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connection.poll_message(cx)
    }
}
