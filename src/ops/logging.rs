//! Log setup: one line per event on standard error, human-readable by
//! default or one JSON object per line with `INGEST_LOG_FORMAT=json`.
//!
//! Only the binary calls [`init`]; the library just uses the `log` macros, so
//! an embedding program keeps control of its own logger. Lines about one
//! event start with `event <id>:` (or `event <id> trace <trace-id>:`, see
//! [`crate::trace::Subject`]); the JSON form lifts them into `event_id` and
//! `trace_id` fields so one event can be followed through relay and workers.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};
use simplelog::{ColorChoice, ConfigBuilder, TermLogger, TerminalMode, ThreadLogMode};

use crate::config::{Config, LogFormat};

/// Installs the logger at `INGEST_LOG`'s level. A second call is a no-op.
pub fn init(config: &Config) {
    match config.log_format {
        LogFormat::Text => {
            let log_config = ConfigBuilder::new()
                .set_time_format_rfc3339()
                .set_thread_level(LevelFilter::Error)
                .set_thread_mode(ThreadLogMode::Names)
                .set_target_level(LevelFilter::Off)
                // Dependencies log at debug far more than we do.
                .add_filter_allow_str("ingestd")
                .build();
            let _ = TermLogger::init(
                config.log_level,
                log_config,
                TerminalMode::Stderr,
                ColorChoice::Never,
            );
        }
        LogFormat::Json => {
            if log::set_boxed_logger(Box::new(JsonLogger {
                level: config.log_level,
            }))
            .is_ok()
            {
                log::set_max_level(config.log_level);
            }
        }
    }
}

struct JsonLogger {
    level: LevelFilter,
}

impl Log for JsonLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level && metadata.target().starts_with("ingestd")
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = json_line(record, SystemTime::now());
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// One log record as a JSON object.
fn json_line(record: &Record, now: SystemTime) -> String {
    let message = record.args().to_string();
    let ts = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut object = serde_json::json!({
        "ts": (ts * 1000.0).round() / 1000.0,
        "level": record.level().as_str().to_ascii_lowercase(),
        "thread": std::thread::current().name().unwrap_or("?"),
        "msg": message,
    });
    // `event <id>: ...` or `event <id> trace <trace-id>: ...`.
    let subject = message
        .strip_prefix("event ")
        .and_then(|rest| rest.split(':').next());
    if let Some(subject) = subject {
        let (id, trace) = match subject.split_once(" trace ") {
            Some((id, trace)) => (id, Some(trace)),
            None => (subject, None),
        };
        if uuid::Uuid::parse_str(id).is_ok() {
            object["event_id"] = id.into();
            if let Some(trace) = trace.filter(|t| t.len() == 32) {
                object["trace_id"] = trace.into();
            }
        }
    }
    object.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_the_event_id() {
        let id = uuid::Uuid::new_v4();
        let args = format!("event {id}: processed");
        let line = json_line(
            &Record::builder()
                .args(format_args!("{args}"))
                .level(log::Level::Info)
                .target("ingestd::worker")
                .build(),
            UNIX_EPOCH + std::time::Duration::from_millis(1500),
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event_id"], id.to_string());
        assert_eq!(v["level"], "info");
        assert_eq!(v["ts"], 1.5);
        assert_eq!(v["msg"], format!("event {id}: processed"));

        let trace = "0af7651916cd43dd8448eb211c80319c";
        let args = format!("event {id} trace {trace}: attempt 1 failed");
        let line = json_line(
            &Record::builder()
                .args(format_args!("{args}"))
                .level(log::Level::Warn)
                .target("ingestd::worker")
                .build(),
            UNIX_EPOCH,
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (v["event_id"].as_str(), v["trace_id"].as_str()),
            (Some(&*id.to_string()), Some(trace))
        );

        let line = json_line(
            &Record::builder()
                .args(format_args!("relay: connected \"quoted\""))
                .level(log::Level::Warn)
                .build(),
            UNIX_EPOCH,
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v.get("event_id").is_none());
        assert_eq!(v["msg"], "relay: connected \"quoted\"");
    }
}
