//! Integration tests against the real PostgreSQL and RabbitMQ. Each test
//! isolates itself in its own schema and AMQP prefix (see `util`).

mod api;
mod blackhole;
mod cloudevents;
mod cluster;
mod docs;
mod encoding;
mod faults;
mod framing;
mod hardening;
mod healthcheck;
mod ingest;
mod openapi;
mod ops;
mod pipeline;
mod ratelimit;
mod retries;
mod shutdown;
mod status;
mod util;
