//! Operations: what lets a person see and run the service. Counters and
//! their Prometheus text ([`metrics`]), the links each role reports
//! ([`health`]), the figures of `/v1/stats` and the status page ([`stats`]),
//! log output ([`logging`]), and `ingestd healthcheck`, the probe a
//! container runs against its own API ([`healthcheck`]). Every role writes
//! into these; nothing here drives the pipeline.

pub mod health;
pub mod healthcheck;
pub mod logging;
pub mod metrics;
pub mod stats;
