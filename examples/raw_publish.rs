//! The broker's ceiling for the relay: a raw amiquip loop publishing
//! persistent messages with confirms per batch, on the same TCP_NODELAY
//! connection code the relay uses, with nothing else around it.
//!
//! Usage: `raw_publish AMQP_URL PREFIX MESSAGES BATCH [bare|relay]`. Prints
//! `{"published": N, "seconds": S, "per_second": R}`. Publishes to
//! `<PREFIX>.events` and purges `<PREFIX>.events` afterwards. `bare` (the
//! default) sends the relay's body with no headers; `relay` sends the very
//! messages the relay builds for such an event, CloudEvents and trace
//! context headers included, so that the two loops tell the broker's cost
//! of the headers from the relay's own.

use std::time::{Duration, Instant};

use ingestd::broker::{AmqpUrl, Message, Publisher, Topology};
use ingestd::message;
use ingestd::store::outbox::OutboxRow;
use ingestd::trace::TraceContext;
use uuid::Uuid;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let relay_messages = match args.get(5).map(String::as_str) {
        None | Some("bare") => false,
        Some("relay") => true,
        Some(_) => usage(),
    };
    if args.len() < 5 || args.len() > 6 {
        usage();
    }
    let url = AmqpUrl::parse(&args[1]).expect("AMQP URL");
    let total: usize = args[3].parse().expect("MESSAGES");
    let batch: usize = args[4].parse().expect("BATCH");
    let topology = Topology::new(&args[2], &[]);
    let mut publisher = Publisher::open(&url, &topology, Duration::from_secs(5)).expect("connect");

    // The same body shape and size the relay sends.
    let body = br#"{"id":"00000000-0000-0000-0000-000000000000","payload":{"n":1,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},"created_at":"2026-01-01T00:00:00.000000Z"}"#;
    let messages: Vec<Message> = (0..batch)
        .map(|i| {
            if relay_messages {
                Message::for_event(&row(), 0, &message::Settings::default())
            } else {
                Message::json(i.to_string(), body.to_vec())
            }
        })
        .collect();
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = batch.min(total - sent);
        publisher
            .publish_batch(&messages[..n], Duration::from_secs(30))
            .expect("publish");
        sent += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    publisher.close();
    println!(
        "{{\"published\": {sent}, \"seconds\": {seconds:.3}, \"per_second\": {:.0}}}",
        sent as f64 / seconds
    );
}

fn usage() -> ! {
    eprintln!("usage: raw_publish AMQP_URL PREFIX MESSAGES BATCH [bare|relay]");
    std::process::exit(2);
}

/// An outbox row as the relay claims it for a plain event of the
/// benchmark's shape, accepted with a fresh trace.
fn row() -> OutboxRow {
    let trace = TraceContext::start();
    OutboxRow {
        outbox_id: 1,
        event_id: Uuid::new_v4(),
        event_type: None,
        key: None,
        payload: r#"{"n": 1, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#.into(),
        created_at: "2026-01-01T00:00:00.000000Z".into(),
        created_epoch: 1_767_225_600,
        refusals: 0,
        queued_epoch: 0.0,
        attributes: None,
        traceparent: Some(trace.traceparent),
        tracestate: None,
    }
}
