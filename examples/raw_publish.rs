//! The broker's ceiling for the relay: a raw amiquip loop publishing
//! persistent messages with confirms per batch, on the same TCP_NODELAY
//! connection code the relay uses, with nothing else around it.
//!
//! Usage: `raw_publish AMQP_URL PREFIX MESSAGES BATCH`. Prints
//! `{"published": N, "seconds": S, "per_second": R}`. Publishes to
//! `<PREFIX>.events` and purges `<PREFIX>.events` afterwards.

use std::time::{Duration, Instant};

use ingestd::broker::{AmqpUrl, Message, Publisher, Topology};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: raw_publish AMQP_URL PREFIX MESSAGES BATCH");
        std::process::exit(2);
    }
    let url = AmqpUrl::parse(&args[1]).expect("AMQP URL");
    let total: usize = args[3].parse().expect("MESSAGES");
    let batch: usize = args[4].parse().expect("BATCH");
    let topology = Topology::new(&args[2], &[]);
    let mut publisher = Publisher::open(&url, &topology, Duration::from_secs(5)).expect("connect");

    // The same body shape and size the relay sends.
    let body = br#"{"id":"00000000-0000-0000-0000-000000000000","payload":{"n":1,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},"created_at":"2026-01-01T00:00:00.000000Z"}"#;
    let messages: Vec<Message> = (0..batch)
        .map(|i| Message {
            id: i.to_string(),
            body: body.to_vec(),
            timestamp: 0,
            attempt: None,
            content_type: "application/json".into(),
            headers: Default::default(),
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
