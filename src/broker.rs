//! RabbitMQ: the connection, the topology and confirmed publishing.
//!
//! This module owns how we talk AMQP: it opens connections on a socket with
//! `TCP_NODELAY` (amiquip's own socket leaves Nagle on, which stalls every
//! publish-and-confirm round trip by about 40 ms), declares the exchanges and
//! queues idempotently, and publishes batches with publisher confirms. It does
//! not decide what to publish (that is the relay) nor what a delivery means
//! (that is the consumer and the workers).

use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use amiquip::{
    AmqpValue, Auth, Channel, Confirm, ConfirmSmoother, Connection, ConnectionBlockedNotification,
    ConnectionOptions, ConnectionTuning, ExchangeDeclareOptions, ExchangeType, FieldTable, Publish,
    QueueDeclareOptions, Return,
};
use crossbeam_channel::Receiver;

pub use crate::message::Message;

/// How long a connection to the broker may take (TCP and handshake), for
/// every role and the status page's sampler alike.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Routing key of event messages on the events exchange.
pub const EVENT_ROUTING_KEY: &str = "event";

/// AMQP's reply code for a declaration that does not match what exists.
const PRECONDITION_FAILED: u16 = 406;

/// Failures talking to the broker.
#[derive(Debug)]
pub enum Error {
    /// The TCP connection could not be made.
    Connect(std::io::Error),
    /// The AMQP library reported an error (handshake, channel, closed connection).
    Amqp(amiquip::Error),
    /// The broker refused at least one message of a batch.
    Nacked,
    /// The broker could not route a message (no queue bound to the exchange).
    Unroutable,
    /// Confirms did not arrive in time; the state of the batch is unknown.
    ConfirmTimeout,
    /// The connection closed while we waited for confirms.
    Closed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "cannot connect to the broker: {e}"),
            Error::Amqp(e) => write!(f, "broker error: {e}"),
            Error::Nacked => f.write_str("the broker refused a message (nack)"),
            Error::Unroutable => f.write_str("the broker returned an unroutable message"),
            Error::ConfirmTimeout => f.write_str("publisher confirms timed out"),
            Error::Closed => f.write_str("the broker connection closed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect(e) => Some(e),
            Error::Amqp(e) => Some(e),
            _ => None,
        }
    }
}

impl From<amiquip::Error> for Error {
    fn from(e: amiquip::Error) -> Error {
        Error::Amqp(e)
    }
}

/// The parts of an `amqp://user:pass@host:port/vhost` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port, 5672 when absent.
    pub port: u16,
    /// User name, `guest` when absent.
    pub user: String,
    /// Password, `guest` when absent.
    pub password: String,
    /// Virtual host, `/` when absent.
    pub vhost: String,
    /// Heartbeat interval in seconds, from the `heartbeat` query parameter
    /// of the RabbitMQ URI spec; [`DEFAULT_HEARTBEAT_SECS`] when absent, 0
    /// turns heartbeats off. A connection silent for two intervals is
    /// given up: a broker that vanished without closing it is noticed
    /// within about twice this.
    pub heartbeat: u16,
}

/// The heartbeat interval when the URL sets none: a vanished broker is
/// noticed within about 20 s (RabbitMQ's own default of 60 s would take
/// two minutes).
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

impl AmqpUrl {
    /// Parses an `amqp://` URL following RabbitMQ's URI spec (percent-encoding
    /// in user, password and vhost; `%2f` is the default vhost `/`).
    pub fn parse(url: &str) -> Result<AmqpUrl, String> {
        let rest = url
            .strip_prefix("amqp://")
            .ok_or_else(|| "expected an amqp:// URL (TLS is not built in)".to_string())?;
        let (rest, query) = match rest.split('#').next().unwrap_or("").split_once('?') {
            Some((rest, query)) => (rest, query),
            None => (rest.split('#').next().unwrap_or(""), ""),
        };
        let mut heartbeat = DEFAULT_HEARTBEAT_SECS;
        for (name, value) in query.split('&').filter_map(|p| p.split_once('=')) {
            if name == "heartbeat" {
                heartbeat = value
                    .parse()
                    .map_err(|_| format!("bad heartbeat {value:?}: seconds from 0 to 65535"))?;
            }
        }
        let (authority, vhost) = match rest.split_once('/') {
            Some((a, v)) => (a, Some(v)),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (decode(user)?, decode(pass)?),
                None => (decode(u)?, String::new()),
            },
            None => ("guest".to_string(), "guest".to_string()),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or("unclosed [ in host")?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
            None => 5672,
        };
        let vhost = match vhost {
            None | Some("") => "/".to_string(),
            Some(v) => decode(v)?,
        };
        Ok(AmqpUrl {
            host: if host.is_empty() {
                "localhost".into()
            } else {
                host
            },
            port,
            user,
            password,
            vhost,
            heartbeat,
        })
    }

    /// The URL without its password, for logs and error messages.
    pub fn redacted(&self) -> String {
        format!(
            "amqp://{}@{}:{}/{}",
            self.user,
            self.host,
            self.port,
            self.vhost.replace('/', "%2f")
        )
    }
}

fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// Names of everything we declare, all derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Durable topic exchange the relay publishes to.
    pub exchange: String,
    /// Durable queue the consumer reads, bound to `exchange`.
    pub queue: String,
    /// Fanout exchange that rejected messages are dead-lettered to.
    pub dead_exchange: String,
    /// Durable queue holding dead-lettered messages for operators.
    pub dead_queue: String,
    /// Retry delays, one delay queue each, in schedule order.
    pub delays: Vec<Duration>,
    /// Declare quorum queues (replicated on a cluster) instead of classic.
    pub quorum: bool,
}

impl Topology {
    /// Names for `prefix`: `<prefix>.events`, `<prefix>.dlx`, `<prefix>.dead`
    /// and one `<prefix>.delay.<ms>` queue per retry delay.
    pub fn new(prefix: &str, delays: &[Duration]) -> Topology {
        Topology {
            exchange: format!("{prefix}.events"),
            queue: format!("{prefix}.events"),
            dead_exchange: format!("{prefix}.dlx"),
            dead_queue: format!("{prefix}.dead"),
            delays: delays.to_vec(),
            quorum: false,
        }
    }

    /// The same names, declared as quorum queues when `quorum` is set.
    pub fn with_quorum(mut self, quorum: bool) -> Topology {
        self.quorum = quorum;
        self
    }

    /// The delay queue of retry step `step` (0-based). The name carries the
    /// delay, so changing the schedule declares new queues instead of
    /// clashing with the arguments of existing ones.
    pub fn delay_queue(&self, step: usize) -> String {
        let prefix = self.queue.strip_suffix(".events").unwrap_or(&self.queue);
        format!("{prefix}.delay.{}ms", self.delays[step].as_millis())
    }

    /// Declares every exchange, queue and binding on channels of its own;
    /// safe to repeat. A classic queue that does not exist yet is created
    /// as version 2 (`x-queue-version`, RabbitMQ 3.10+: about a quarter
    /// less broker CPU per message than version 1, which 3.10 and 3.11
    /// otherwise choose). The broker refuses to redeclare an existing queue
    /// with a version argument it was not created with, so when it says so,
    /// the queue is declared again without one and keeps its version:
    /// queues made by an earlier ingestd, or by RabbitMQ 3.12+ and 4.x
    /// (where version 2 is the default or the only one), are used as they
    /// are. Any other difference in arguments still fails.
    pub fn declare(&self, connection: &mut Connection) -> Result<(), Error> {
        let mut channel = connection.open_channel(None)?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel.exchange_declare(ExchangeType::Fanout, &*self.dead_exchange, durable.clone())?;
        self.declare_queue(connection, &mut channel, &self.dead_queue, self.arguments())?;
        channel.queue_bind(
            &*self.dead_queue,
            &*self.dead_exchange,
            "",
            FieldTable::new(),
        )?;

        channel.exchange_declare(ExchangeType::Topic, &*self.exchange, durable)?;
        let mut arguments = self.arguments();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AmqpValue::LongString(self.dead_exchange.clone()),
        );
        self.declare_queue(connection, &mut channel, &self.queue, arguments)?;
        channel.queue_bind(&*self.queue, &*self.exchange, "#", FieldTable::new())?;

        // A delay queue has no consumer: its messages expire after the delay
        // and are dead-lettered back to the events exchange.
        for (step, delay) in self.delays.iter().enumerate() {
            let mut arguments = self.arguments();
            arguments.insert(
                "x-message-ttl".into(),
                AmqpValue::LongLongInt(delay.as_millis() as i64),
            );
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AmqpValue::LongString(self.exchange.clone()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AmqpValue::LongString(EVENT_ROUTING_KEY.into()),
            );
            self.declare_queue(connection, &mut channel, &self.delay_queue(step), arguments)?;
        }
        channel.close()?;
        Ok(())
    }

    /// Declares one durable queue: a classic one with `x-queue-version` 2,
    /// or, if it exists without that argument, as it is (the broker closes
    /// `channel` on the mismatch; a new one takes its place).
    fn declare_queue(
        &self,
        connection: &mut Connection,
        channel: &mut Channel,
        name: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        if self.quorum {
            return declare_queue(channel, name, arguments);
        }
        let mut versioned = arguments.clone();
        versioned.insert("x-queue-version".into(), AmqpValue::LongInt(2));
        match declare_queue(channel, name, versioned) {
            Err(Error::Amqp(amiquip::Error::ServerClosedChannel { code, message, .. }))
                if code == PRECONDITION_FAILED && message.contains("x-queue-version") =>
            {
                *channel = connection.open_channel(None)?;
                declare_queue(channel, name, arguments)
            }
            other => other,
        }
    }

    fn arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::new();
        if self.quorum {
            arguments.insert(
                "x-queue-type".into(),
                AmqpValue::LongString("quorum".into()),
            );
        }
        arguments
    }

    /// Every queue name, for cleanup and inspection.
    pub fn queues(&self) -> Vec<String> {
        let mut out = vec![self.queue.clone(), self.dead_queue.clone()];
        out.extend((0..self.delays.len()).map(|i| self.delay_queue(i)));
        out
    }
}

fn declare_queue(channel: &Channel, name: &str, arguments: FieldTable) -> Result<(), Error> {
    channel.queue_declare(
        name,
        QueueDeclareOptions {
            durable: true,
            arguments,
            ..QueueDeclareOptions::default()
        },
    )?;
    Ok(())
}

/// Opens a connection with `TCP_NODELAY`, failing within `timeout`.
pub fn connect(url: &AmqpUrl, timeout: Duration) -> Result<Connection, Error> {
    let mut last = None;
    let addrs = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(Error::Connect)?;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(Error::Connect)?;
                let stream = mio::net::TcpStream::from_stream(stream).map_err(Error::Connect)?;
                let options = ConnectionOptions::default()
                    .auth(Auth::Plain {
                        username: url.user.clone(),
                        password: url.password.clone(),
                    })
                    .virtual_host(url.vhost.clone())
                    .heartbeat(url.heartbeat)
                    .connection_timeout(Some(timeout))
                    .information(Some(format!("ingestd {}", env!("CARGO_PKG_VERSION"))));
                return Ok(Connection::insecure_open_stream(
                    stream,
                    options,
                    ConnectionTuning::default(),
                )?);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(Error::Connect(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "host resolved to no address")
    })))
}

/// A channel in confirm mode: publishes and waits for the broker's confirms.
/// After any error its state is unknown: drop it and reconnect.
pub struct ConfirmChannel {
    channel: Channel,
    confirms: Receiver<Confirm>,
    returns: Receiver<Return>,
    smoother: ConfirmSmoother,
    published: u64,
    confirmed: u64,
}

impl ConfirmChannel {
    /// Opens a new channel on `connection` and puts it in confirm mode.
    pub fn open(connection: &mut Connection) -> Result<ConfirmChannel, Error> {
        let channel = connection.open_channel(None)?;
        let confirms = channel.listen_for_publisher_confirms()?;
        let returns = channel.listen_for_returns()?;
        channel.enable_publisher_confirms()?;
        Ok(ConfirmChannel {
            channel,
            confirms,
            returns,
            smoother: ConfirmSmoother::new(),
            published: 0,
            confirmed: 0,
        })
    }

    /// The underlying channel, for declarations.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes every message as persistent JSON to `exchange` with
    /// `routing_key` and returns once the broker confirmed all of them; any
    /// nack, return or timeout fails the whole batch.
    pub fn publish_confirmed(
        &mut self,
        exchange: &str,
        routing_key: &str,
        messages: &[Message],
        timeout: Duration,
    ) -> Result<(), Error> {
        let taken = self.publish_each(exchange, routing_key, messages, timeout)?;
        if taken.iter().all(|t| *t) {
            Ok(())
        } else {
            Err(Error::Nacked)
        }
    }

    /// Publishes `messages` and waits for every confirm, like
    /// [`ConfirmChannel::publish_confirmed`], but tells which messages the
    /// broker took (`true`) and which it refused with a nack, so that one
    /// message the broker will not take does not fail the others.
    pub fn publish_each(
        &mut self,
        exchange: &str,
        routing_key: &str,
        messages: &[Message],
        timeout: Duration,
    ) -> Result<Vec<bool>, Error> {
        for m in messages {
            let properties = m.properties();
            self.channel.basic_publish(
                exchange,
                Publish {
                    body: &m.body,
                    routing_key: routing_key.into(),
                    mandatory: true,
                    immediate: false,
                    properties,
                },
            )?;
            self.published += 1;
        }
        let taken = self.await_confirms(messages.len(), timeout)?;
        // The broker sends basic.return before the confirm of the same
        // message, so every return of this batch is already queued.
        if self.returns.try_recv().is_ok() {
            return Err(Error::Unroutable);
        }
        Ok(taken)
    }

    /// Waits for the confirms of the last `count` messages published, which
    /// the smoother hands over one by one in publishing order.
    fn await_confirms(&mut self, count: usize, timeout: Duration) -> Result<Vec<bool>, Error> {
        let deadline = Instant::now() + timeout;
        let mut taken = Vec::with_capacity(count);
        while self.confirmed < self.published {
            let raw = match self.confirms.recv_deadline(deadline) {
                Ok(c) => c,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(Error::ConfirmTimeout);
                }
                // The I/O thread ended: the connection is gone.
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Closed);
                }
            };
            for c in self.smoother.process(raw) {
                self.confirmed += 1;
                taken.push(matches!(c, Confirm::Ack(_)));
            }
        }
        // Confirms of earlier batches all arrived before this one started.
        let extra = taken.len().saturating_sub(count);
        Ok(taken.split_off(extra))
    }

    /// Closes the channel politely.
    pub fn close(self) {
        let _ = self.channel.close();
    }
}

/// The relay's connection: one confirm channel publishing events to the
/// events exchange.
pub struct Publisher {
    // Field order matters: the channel must close before its connection.
    channel: ConfirmChannel,
    connection: Connection,
    exchange: String,
    blocked: Receiver<ConnectionBlockedNotification>,
}

impl Publisher {
    /// Connects, declares the topology and opens a confirm channel.
    pub fn open(url: &AmqpUrl, topology: &Topology, timeout: Duration) -> Result<Publisher, Error> {
        let mut connection = connect(url, timeout)?;
        // RabbitMQ says when it stops taking this connection's messages (a
        // memory or disk alarm) and when it takes them again.
        let blocked = connection.listen_for_connection_blocked()?;
        topology.declare(&mut connection)?;
        let channel = ConfirmChannel::open(&mut connection)?;
        Ok(Publisher {
            channel,
            connection,
            exchange: topology.exchange.clone(),
            blocked,
        })
    }

    /// The broker's `connection.blocked` and `connection.unblocked`
    /// notifications for this connection.
    pub fn blocked_notifications(&self) -> &Receiver<ConnectionBlockedNotification> {
        &self.blocked
    }

    /// Publishes a batch of events and waits for all confirms.
    pub fn publish_batch(&mut self, messages: &[Message], timeout: Duration) -> Result<(), Error> {
        self.channel
            .publish_confirmed(&self.exchange, EVENT_ROUTING_KEY, messages, timeout)
    }

    /// Publishes a batch of events, waits for all confirms, and tells which
    /// the broker took (see [`ConfirmChannel::publish_each`]).
    pub fn publish_each(
        &mut self,
        messages: &[Message],
        timeout: Duration,
    ) -> Result<Vec<bool>, Error> {
        self.channel
            .publish_each(&self.exchange, EVENT_ROUTING_KEY, messages, timeout)
    }

    /// Closes the channel and connection politely.
    pub fn close(self) {
        self.channel.close();
        let _ = self.connection.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default_url() {
        let u = AmqpUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, 5672);
        assert_eq!(u.user, "guest");
        assert_eq!(u.password, "guest");
        assert_eq!(u.vhost, "/");
        assert_eq!(u.redacted(), "amqp://guest@127.0.0.1:5672/%2f");
    }

    #[test]
    fn parses_partial_urls() {
        let u = AmqpUrl::parse("amqp://rabbit").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.vhost.as_str()),
            ("rabbit", 5672, "/")
        );
        assert_eq!(u.user, "guest");
        let u = AmqpUrl::parse("amqp://a%40b:p%3Ass@h:1234/prod?heartbeat=5").unwrap();
        assert_eq!((u.user.as_str(), u.password.as_str()), ("a@b", "p:ss"));
        assert_eq!((u.port, u.vhost.as_str()), (1234, "prod"));
        assert_eq!(u.heartbeat, 5);
        assert_eq!(AmqpUrl::parse("amqp://h").unwrap().heartbeat, 10);
        assert_eq!(
            AmqpUrl::parse("amqp://h/?x=1&heartbeat=0")
                .unwrap()
                .heartbeat,
            0
        );
        let u = AmqpUrl::parse("amqp://[::1]:5673/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 5673));
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(AmqpUrl::parse("amqps://h").is_err());
        assert!(AmqpUrl::parse("http://h").is_err());
        assert!(AmqpUrl::parse("amqp://h:port").is_err());
        assert!(AmqpUrl::parse("amqp://h/%zz").is_err());
        assert!(AmqpUrl::parse("amqp://h/?heartbeat=-1").is_err());
        assert!(AmqpUrl::parse("amqp://h/?heartbeat=ten").is_err());
    }

    #[test]
    fn topology_names_follow_the_prefix() {
        let t = Topology::new("t1", &[Duration::from_secs(1), Duration::from_secs(120)]);
        assert_eq!(t.exchange, "t1.events");
        assert_eq!(t.dead_queue, "t1.dead");
        assert_eq!(t.delay_queue(0), "t1.delay.1000ms");
        assert_eq!(t.delay_queue(1), "t1.delay.120000ms");
        assert_eq!(t.queues().len(), 4);
    }
}
