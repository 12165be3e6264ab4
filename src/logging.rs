//! Log setup: one human-readable line per event on standard error.
//!
//! Only the binary calls [`init`]; the library just uses the `log` macros, so
//! an embedding program keeps control of its own logger.

use simplelog::{ColorChoice, ConfigBuilder, TermLogger, TerminalMode, ThreadLogMode};

use crate::config::Config;

/// Installs the logger at `INGEST_LOG`'s level. A second call is a no-op.
pub fn init(config: &Config) {
    let log_config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(log::LevelFilter::Error)
        .set_thread_mode(ThreadLogMode::Names)
        .set_target_level(log::LevelFilter::Off)
        // Dependencies log at debug far more than we do; keep them at warn.
        .add_filter_allow_str("ingestd")
        .build();
    let _ = TermLogger::init(
        config.log_level,
        log_config,
        TerminalMode::Stderr,
        ColorChoice::Never,
    );
}
