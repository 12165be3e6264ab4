//! `ingestd`: HTTP event ingestion with a transactional outbox, RabbitMQ and
//! worker threads, processing every accepted event in effect exactly once.
//!
//! The binary is a thin wrapper over [`app::start`]; everything lives here so
//! that the integration tests can drive it. The folders are the roles
//! ([`api`], [`relay`], [`worker`]) and the services they share ([`store`],
//! [`broker`], [`ops`]); no role imports another. See `ARCHITECTURE.md` for
//! the data path and the invariants each folder keeps.

pub mod api;
pub mod app;
pub mod backoff;
pub mod broker;
pub mod cli;
pub mod config;
pub mod lifecycle;
pub mod message;
pub mod ops;
pub mod relay;
pub mod store;
pub mod trace;
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
