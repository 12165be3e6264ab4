//! `ingestd`: HTTP event ingestion with a transactional outbox, RabbitMQ and
//! worker threads, processing every accepted event in effect exactly once.
//!
//! The binary is a thin wrapper over [`app::start`]; everything lives here so
//! that the integration tests can drive it. See `ARCHITECTURE.md` for the data
//! path and the invariants each module keeps.

pub mod app;
pub mod auth;
pub mod backoff;
pub mod broker;
pub mod commit;
pub mod config;
pub mod consumer;
pub mod footprint;
pub mod health;
pub mod http;
pub mod ingest;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod relay;
pub mod retention;
pub mod signals;
pub mod stats;
pub mod store;
pub mod worker;

pub use app::{App, Role, start};
pub use config::Config;
pub use worker::{DefaultProcessor, Event, ProcessError, Processor};

/// Version and git revision, as `--version` prints them.
pub fn version() -> String {
    format!(
        "ingestd {} ({})",
        env!("CARGO_PKG_VERSION"),
        env!("INGESTD_GIT_REVISION")
    )
}
