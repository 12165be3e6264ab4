//! RabbitMQ: the connection, the topology and confirmed publishing.
//!
//! This module owns how we talk AMQP: it parses the URL and its list of
//! cluster nodes, picks the node a connection goes to ([`Nodes`]), opens
//! connections on a socket with `TCP_NODELAY` (amiquip's own socket leaves
//! Nagle on, which stalls every publish-and-confirm round trip by about
//! 40 ms), declares the exchanges and queues idempotently, and publishes
//! batches with publisher confirms. It does not decide what to publish (that
//! is the relay) nor what a delivery means (that is the consumer and the
//! workers).

use std::collections::VecDeque;
use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use amiquip::{
    AmqpValue, Auth, Channel, Confirm, ConfirmSmoother, Connection, ConnectionBlockedNotification,
    ConnectionOptions, ConnectionTuning, ExchangeDeclareOptions, ExchangeType, FieldTable,
    QueueDeclareOptions, Return,
};
use crossbeam_channel::Receiver;
use log::warn;

pub use crate::message::Message;

/// How long a connection to the broker may take (TCP and handshake), for
/// every role and the status page's sampler alike.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Routing key of event messages on the events exchange.
pub const EVENT_ROUTING_KEY: &str = "event";

/// AMQP's reply code for a declaration that does not match what exists.
const PRECONDITION_FAILED: u16 = 406;

/// `x-delivery-limit` of the quorum queues when the configuration sets
/// none: deliveries of one message before the broker dead-letters it.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 100;

/// The quorum-queue arguments that make dead-lettering at-least-once and
/// the delivery limit explicit. A broker may refuse them on an existing
/// queue that was declared without them; see [`Topology::declare`].
const QUORUM_GUARANTEES: [&str; 3] = ["x-delivery-limit", "x-dead-letter-strategy", "x-overflow"];

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
    /// No node of the URL's list answered: each node (`host:port`) with
    /// its failure, in the order they were tried.
    NoNode(Vec<(String, Error)>),
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
            Error::NoNode(failures) => {
                f.write_str("no broker node answered")?;
                for (i, (node, e)) in failures.iter().enumerate() {
                    let sep = if i == 0 { ": " } else { "; " };
                    write!(f, "{sep}{node}: {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect(e) => Some(e),
            Error::Amqp(e) => Some(e),
            Error::NoNode(failures) => failures
                .last()
                .map(|(_, e)| e as &(dyn std::error::Error + 'static)),
            _ => None,
        }
    }
}

impl From<amiquip::Error> for Error {
    fn from(e: amiquip::Error) -> Error {
        Error::Amqp(e)
    }
}

/// The parts of an `amqp://user:pass@host:port/vhost` URL, whose authority
/// may list several nodes of one cluster, comma-separated, which share the
/// credentials, the vhost and the query:
/// `amqp://user:pass@host1:5672,host2:5672,host3/vhost`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    /// The nodes, in the order a connection tries them; at least one.
    pub nodes: Vec<Node>,
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

/// One broker node of an [`AmqpUrl`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Host name or address.
    pub host: String,
    /// TCP port, 5672 when absent.
    pub port: u16,
}

impl fmt::Display for Node {
    /// `host:port`, with an IPv6 address in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The heartbeat interval when the URL sets none: a vanished broker is
/// noticed within about 20 s (RabbitMQ's own default of 60 s would take
/// two minutes).
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

impl AmqpUrl {
    /// Parses an `amqp://` URL following RabbitMQ's URI spec (percent-encoding
    /// in user, password and vhost; `%2f` is the default vhost `/`), with
    /// one extension: the host may be a comma-separated list of nodes,
    /// each `host`, `host:port` or `[v6-address]:port`.
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
        let (userinfo, hosts) = match authority.rsplit_once('@') {
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
        let nodes = if hosts.contains(',') {
            hosts
                .split(',')
                .map(|h| match h {
                    "" => Err("empty node in the comma-separated list".to_string()),
                    h => Node::parse(h).map_err(|e| format!("node {h:?}: {e}")),
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            vec![Node::parse(hosts)?]
        };
        let vhost = match vhost {
            None | Some("") => "/".to_string(),
            Some(v) => decode(v)?,
        };
        Ok(AmqpUrl {
            nodes,
            user,
            password,
            vhost,
            heartbeat,
        })
    }

    /// The URL without its password, every node listed, for logs and
    /// error messages.
    pub fn redacted(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(Node::to_string).collect();
        self.redacted_with(&nodes.join(","))
    }

    /// The URL of one of its nodes, without the password.
    pub fn redacted_at(&self, node: &Node) -> String {
        self.redacted_with(&node.to_string())
    }

    fn redacted_with(&self, hosts: &str) -> String {
        format!(
            "amqp://{}@{hosts}/{}",
            self.user,
            self.vhost.replace('/', "%2f")
        )
    }
}

impl Node {
    /// Parses `host`, `host:port` or `[v6-address]:port`; an empty host is
    /// `localhost`.
    fn parse(hostport: &str) -> Result<Node, String> {
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
        Ok(Node {
            host: if host.is_empty() {
                "localhost".into()
            } else {
                host
            },
            port,
        })
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
    /// `x-delivery-limit` of every quorum queue.
    pub delivery_limit: u32,
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
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
        }
    }

    /// The same names, declared as quorum queues when `quorum` is set.
    pub fn with_quorum(mut self, quorum: bool) -> Topology {
        self.quorum = quorum;
        self
    }

    /// The same, with `limit` as the quorum queues' `x-delivery-limit`.
    pub fn with_delivery_limit(mut self, limit: u32) -> Topology {
        self.delivery_limit = limit;
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
    ///
    /// A quorum queue gets an explicit `x-delivery-limit` (RabbitMQ 4
    /// otherwise applies 20, 3.x none), and one that dead-letters (the
    /// events queue, the delay queues) gets `x-dead-letter-strategy:
    /// at-least-once` with the `x-overflow: reject-publish` it requires
    /// (RabbitMQ 3.10+), so that a dead-lettered message stays in its queue
    /// until the queue it moves to has taken it. When the broker refuses
    /// these (a queue declared without them by an earlier ingestd, or a
    /// broker that does not know them), the queue is declared again
    /// without them and used as it is, with a warning: its dead-lettering
    /// is then at-most-once, and its delivery limit the broker's.
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

    /// Declares one durable queue: a quorum one with the arguments that
    /// keep its promises, or a classic one with `x-queue-version` 2; or,
    /// if the broker refuses those, as it is (the broker closes `channel`
    /// on the refusal; a new one takes its place).
    fn declare_queue(
        &self,
        connection: &mut Connection,
        channel: &mut Channel,
        name: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        let (extra, refused): (&[(&str, AmqpValue)], &[&str]) = if self.quorum {
            (&self.quorum_arguments(&arguments), &QUORUM_GUARANTEES)
        } else {
            (
                &[("x-queue-version", AmqpValue::LongInt(2))],
                &["x-queue-version"],
            )
        };
        let mut full = arguments.clone();
        for (key, value) in extra {
            full.insert((*key).into(), value.clone());
        }
        match declare_queue(channel, name, full) {
            Err(Error::Amqp(amiquip::Error::ServerClosedChannel { code, message, .. }))
                if code == PRECONDITION_FAILED && refused.iter().any(|a| message.contains(a)) =>
            {
                *channel = connection.open_channel(None)?;
                declare_queue(channel, name, arguments)?;
                if self.quorum {
                    warn!(
                        "broker: queue {name} is used as it is, without {}, which the broker \
                         refused ({message}): its dead-lettering is at-most-once and its \
                         delivery limit the broker's; see the quorum queue notes in \
                         docs/scaling.md",
                        QUORUM_GUARANTEES.join(", ")
                    );
                }
                Ok(())
            }
            other => other,
        }
    }

    /// What a quorum queue declared with `arguments` adds to them: the
    /// delivery limit, and at-least-once dead-lettering when it
    /// dead-letters.
    fn quorum_arguments(&self, arguments: &FieldTable) -> Vec<(&'static str, AmqpValue)> {
        let limit = i32::try_from(self.delivery_limit).unwrap_or(i32::MAX);
        let mut extra = vec![("x-delivery-limit", AmqpValue::LongInt(limit))];
        if arguments.contains_key("x-dead-letter-exchange") {
            extra.push((
                "x-dead-letter-strategy",
                AmqpValue::LongString("at-least-once".into()),
            ));
            extra.push(("x-overflow", AmqpValue::LongString("reject-publish".into())));
        }
        extra
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

/// Opens a connection to the first node of `url` that answers (see
/// [`Nodes`]), each node failing within `timeout`.
pub fn connect(url: &AmqpUrl, timeout: Duration) -> Result<Connection, Error> {
    Nodes::new(url.clone()).connect(timeout)
}

/// The nodes of a URL as one component sees them: which node its
/// connection is on, and where the next one starts. A connection goes to
/// the first node that answers, trying each node once, in the URL's order
/// from where the last connection left off: the first node at start, and
/// after that the node after the one last used. A component reconnects
/// when its connection failed, so the node that failed it is tried last,
/// and one that does not answer (a blackhole costs the whole connect
/// timeout) is not tried first again and again.
#[derive(Debug, Clone)]
pub struct Nodes {
    url: AmqpUrl,
    next: usize,
    current: Option<usize>,
}

impl Nodes {
    /// The nodes of `url`, none connected yet.
    pub fn new(url: AmqpUrl) -> Nodes {
        Nodes {
            url,
            next: 0,
            current: None,
        }
    }

    /// The node of the last connection opened; none before the first and
    /// after a connect that found no node.
    pub fn current(&self) -> Option<&Node> {
        self.current.map(|i| &self.url.nodes[i])
    }

    /// Opens a connection with `TCP_NODELAY` to the first node that
    /// answers within `timeout`, trying each node once from where the last
    /// connection left off. With a single node its error is returned as
    /// it is; with several, [`Error::NoNode`] names each node's.
    pub fn connect(&mut self, timeout: Duration) -> Result<Connection, Error> {
        let n = self.url.nodes.len();
        let mut failures = Vec::new();
        for i in self.order() {
            let node = &self.url.nodes[i];
            match connect_node(&self.url, node, timeout) {
                Ok(connection) => {
                    self.current = Some(i);
                    self.next = (i + 1) % n;
                    return Ok(connection);
                }
                Err(e) => failures.push((node.to_string(), e)),
            }
        }
        self.current = None;
        if failures.len() == 1 {
            return Err(failures.remove(0).1);
        }
        Err(Error::NoNode(failures))
    }

    /// The indexes of the nodes in the order the next connect tries them.
    fn order(&self) -> impl Iterator<Item = usize> + use<> {
        let (n, next) = (self.url.nodes.len(), self.next);
        (0..n).map(move |k| (next + k) % n)
    }
}

/// Opens a connection to `node` with `TCP_NODELAY`, failing within `timeout`.
fn connect_node(url: &AmqpUrl, node: &Node, timeout: Duration) -> Result<Connection, Error> {
    let mut last = None;
    let addrs = (node.host.as_str(), node.port)
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
    /// Messages published, and confirmed, on this channel.
    published: u64,
    confirmed: u64,
    /// The outcomes (acked or not) of confirmed messages whose batch was
    /// not awaited yet, in publishing order.
    outcomes: VecDeque<bool>,
    /// The last message whose batch was awaited.
    awaited: u64,
    /// Message ids of returned (unroutable) messages whose batch was not
    /// awaited yet.
    returned: Vec<String>,
}

/// A batch published on a [`ConfirmChannel`] whose confirms were not
/// awaited yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The channel's count of published messages after the batch.
    through: u64,
    /// Messages in the batch.
    count: usize,
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
            outcomes: VecDeque::new(),
            awaited: 0,
            returned: Vec::new(),
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
        let pending = self.publish(exchange, routing_key, messages)?;
        self.await_confirms(pending, messages, timeout)
    }

    /// Publishes `messages` without waiting for their confirms: the
    /// returned [`Pending`] is what [`ConfirmChannel::await_confirms`]
    /// waits for, so that the next batch can be prepared meanwhile.
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        messages: &[Message],
    ) -> Result<Pending, Error> {
        // One hand-off to amiquip's I/O thread for the batch, not three
        // per message (vendor/amiquip/PATCHED.md). After an error the
        // channel is given up, so the count does not matter then.
        self.channel.basic_publish_all(
            exchange,
            routing_key,
            true,
            messages.iter().map(|m| (&m.body[..], m.properties())),
        )?;
        self.published += messages.len() as u64;
        Ok(Pending {
            through: self.published,
            count: messages.len(),
        })
    }

    /// Waits for the confirms of a batch [`ConfirmChannel::publish`]
    /// published (`messages` are the batch's, which tell its returns from
    /// others') and tells which messages the broker took. Batches are
    /// awaited in the order they were published; the broker confirms in
    /// that order too, and any confirm of an earlier batch that was never
    /// awaited is dropped. A message of this batch the broker returned as
    /// unroutable fails the batch.
    pub fn await_confirms(
        &mut self,
        pending: Pending,
        messages: &[Message],
        timeout: Duration,
    ) -> Result<Vec<bool>, Error> {
        let count = pending.count;
        let first = pending.through - count as u64;
        if first < self.awaited {
            // Awaited out of order: its outcomes are gone, its state unknown.
            debug_assert!(false, "batches awaited out of order");
            return Err(Error::ConfirmTimeout);
        }
        let deadline = Instant::now() + timeout;
        while self.confirmed < pending.through {
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
            // The smoother hands the confirms over one by one, in
            // publishing order.
            for c in self.smoother.process(raw) {
                self.confirmed += 1;
                self.outcomes.push_back(matches!(c, Confirm::Ack(_)));
            }
        }
        // What is left of earlier batches, then this batch's outcomes:
        // every message from `awaited` on has one, in order.
        self.outcomes.drain(..(first - self.awaited) as usize);
        let taken: Vec<bool> = self.outcomes.drain(..count).collect();
        self.awaited = pending.through;
        // The broker sends basic.return before the confirm of the same
        // message, so every return of this batch is queued by now; returns
        // of a later batch may be too, and wait for it.
        self.returned.extend(
            self.returns
                .try_iter()
                .map(|r| r.properties.message_id().clone().unwrap_or_default()),
        );
        let before = self.returned.len();
        if before > 0 {
            self.returned
                .retain(|id| !messages.iter().any(|m| m.id() == id));
        }
        let unroutable = self.returned.len() < before;
        if self.awaited == self.published {
            // No later batch: what is left is of batches never awaited.
            self.returned.clear();
        }
        if unroutable {
            return Err(Error::Unroutable);
        }
        Ok(taken)
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
    /// The events go to quorum queues, where a refusal is the queue's
    /// state, not the message's (see [`Publisher::publish_each`]).
    quorum: bool,
}

impl Publisher {
    /// Connects to the first node of `url` that answers, declares the
    /// topology and opens a confirm channel.
    pub fn open(url: &AmqpUrl, topology: &Topology, timeout: Duration) -> Result<Publisher, Error> {
        Publisher::on(connect(url, timeout)?, topology)
    }

    /// Declares the topology on `connection` and opens a confirm channel.
    pub fn on(mut connection: Connection, topology: &Topology) -> Result<Publisher, Error> {
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
            quorum: topology.quorum,
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
    ///
    /// To quorum queues, a refusal fails the whole batch instead
    /// ([`Error::Nacked`]): what a quorum queue refuses is not a message
    /// but every publish while this channel finds no leader for it. On
    /// RabbitMQ 3.10 a channel opened while the queue's leader is changing
    /// keeps the node that went away as the leader and refuses every
    /// publish for as long as it lives, while a new connection publishes
    /// at once; so the batch is treated like one whose confirms did not
    /// come, and the relay reconnects (to the next node) and tries it
    /// again, instead of counting refusals against the events.
    pub fn publish_each(
        &mut self,
        messages: &[Message],
        timeout: Duration,
    ) -> Result<Vec<bool>, Error> {
        let pending = self.publish(messages)?;
        self.await_confirms(pending, messages, timeout)
    }

    /// Publishes a batch of events without waiting for its confirms (see
    /// [`ConfirmChannel::publish`]).
    pub fn publish(&mut self, messages: &[Message]) -> Result<Pending, Error> {
        self.channel
            .publish(&self.exchange, EVENT_ROUTING_KEY, messages)
    }

    /// Waits for the confirms of a batch [`Publisher::publish`] published,
    /// as [`Publisher::publish_each`] does.
    pub fn await_confirms(
        &mut self,
        pending: Pending,
        messages: &[Message],
        timeout: Duration,
    ) -> Result<Vec<bool>, Error> {
        let taken = self.channel.await_confirms(pending, messages, timeout)?;
        if self.quorum && taken.contains(&false) {
            return Err(Error::Nacked);
        }
        Ok(taken)
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
        assert_eq!(u.nodes, [node("127.0.0.1", 5672)]);
        assert_eq!(u.user, "guest");
        assert_eq!(u.password, "guest");
        assert_eq!(u.vhost, "/");
        assert_eq!(u.redacted(), "amqp://guest@127.0.0.1:5672/%2f");
    }

    fn node(host: &str, port: u16) -> Node {
        Node {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_partial_urls() {
        let u = AmqpUrl::parse("amqp://rabbit").unwrap();
        assert_eq!(u.nodes, [node("rabbit", 5672)]);
        assert_eq!(u.vhost, "/");
        assert_eq!(u.user, "guest");
        let u = AmqpUrl::parse("amqp://a%40b:p%3Ass@h:1234/prod?heartbeat=5").unwrap();
        assert_eq!((u.user.as_str(), u.password.as_str()), ("a@b", "p:ss"));
        assert_eq!((u.nodes[0].port, u.vhost.as_str()), (1234, "prod"));
        assert_eq!(u.heartbeat, 5);
        assert_eq!(AmqpUrl::parse("amqp://h").unwrap().heartbeat, 10);
        assert_eq!(
            AmqpUrl::parse("amqp://h/?x=1&heartbeat=0")
                .unwrap()
                .heartbeat,
            0
        );
        let u = AmqpUrl::parse("amqp://[::1]:5673/").unwrap();
        assert_eq!(u.nodes, [node("::1", 5673)]);
        assert_eq!(u.nodes[0].to_string(), "[::1]:5673");
        assert_eq!(
            AmqpUrl::parse("amqp://").unwrap().nodes,
            [node("localhost", 5672)]
        );
    }

    #[test]
    fn parses_a_list_of_nodes_sharing_credentials_and_vhost() {
        let u =
            AmqpUrl::parse("amqp://u:p,w@h1:5672,h2:5673,[::1]:5674,h4/prod?heartbeat=3").unwrap();
        assert_eq!(
            u.nodes,
            [
                node("h1", 5672),
                node("h2", 5673),
                node("::1", 5674),
                node("h4", 5672)
            ]
        );
        // A comma before the @ belongs to the password.
        assert_eq!((u.user.as_str(), u.password.as_str()), ("u", "p,w"));
        assert_eq!((u.vhost.as_str(), u.heartbeat), ("prod", 3));
        assert_eq!(
            u.redacted(),
            "amqp://u@h1:5672,h2:5673,[::1]:5674,h4:5672/prod"
        );
        assert_eq!(u.redacted_at(&u.nodes[1]), "amqp://u@h2:5673/prod");
        for bad in [
            "amqp://h1,,h2",
            "amqp://h1,",
            "amqp://,h2/",
            "amqp://h1,h2:x",
        ] {
            let e = AmqpUrl::parse(bad).unwrap_err();
            assert!(e.contains("node"), "{bad}: {e}");
        }
        assert!(
            AmqpUrl::parse("amqp://h1:5672,h2:port")
                .unwrap_err()
                .contains("\"h2:port\"")
        );
    }

    #[test]
    fn nodes_are_tried_from_the_one_after_the_last_used() {
        let url = AmqpUrl::parse("amqp://a,b,c").unwrap();
        let mut nodes = Nodes::new(url);
        assert_eq!(nodes.order().collect::<Vec<_>>(), [0, 1, 2]);
        // As after a connection to the second node.
        nodes.current = Some(1);
        nodes.next = 2;
        assert_eq!(nodes.current(), Some(&node("b", 5672)));
        assert_eq!(nodes.order().collect::<Vec<_>>(), [2, 0, 1]);
    }

    #[test]
    fn a_connect_that_finds_no_node_names_each() {
        // Ports that refuse: bound once, then closed.
        let refusing: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let url = AmqpUrl::parse(&format!(
            "amqp://127.0.0.1:{},127.0.0.1:{}",
            refusing[0], refusing[1]
        ))
        .unwrap();
        let mut nodes = Nodes::new(url);
        let e = nodes.connect(Duration::from_secs(1)).unwrap_err();
        let Error::NoNode(failures) = &e else {
            panic!("{e}")
        };
        assert_eq!(failures.len(), 2);
        let text = e.to_string();
        assert!(
            text.starts_with("no broker node answered: 127.0.0.1:"),
            "{text}"
        );
        assert!(
            text.contains(&format!("; 127.0.0.1:{}: ", refusing[1])),
            "{text}"
        );
        assert_eq!(nodes.current(), None);
        // One node: its own error, as before there were lists.
        let one = AmqpUrl::parse(&format!("amqp://127.0.0.1:{}", refusing[0])).unwrap();
        assert!(matches!(
            connect(&one, Duration::from_secs(1)),
            Err(Error::Connect(_))
        ));
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
    fn quorum_queues_that_dead_letter_get_at_least_once_dead_lettering() {
        let t = Topology::new("t", &[Duration::from_secs(1)])
            .with_quorum(true)
            .with_delivery_limit(7);
        let keys = |args: &FieldTable| -> Vec<&'static str> {
            t.quorum_arguments(args).iter().map(|(k, _)| *k).collect()
        };
        assert_eq!(keys(&FieldTable::new()), ["x-delivery-limit"]);
        let mut dead_letters = FieldTable::new();
        dead_letters.insert(
            "x-dead-letter-exchange".into(),
            AmqpValue::LongString("t.dlx".into()),
        );
        assert_eq!(
            keys(&dead_letters),
            ["x-delivery-limit", "x-dead-letter-strategy", "x-overflow"]
        );
        assert!(matches!(
            t.quorum_arguments(&dead_letters)[0].1,
            AmqpValue::LongInt(7)
        ));
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
