//! The command line: one [`Command`] parsed from the arguments, once.
//! Everything else `ingestd` is told comes from `INGEST_*` variables
//! ([`crate::config`]).

use std::fmt;

use crate::app::Role;
use crate::config;
use crate::store::Since;

/// The usage text of `--help`, before the configuration's table.
pub const USAGE: &str = "\
Usage: ingestd [ROLE | COMMAND]

Roles and commands:
  (none)    run the API, the relay and the workers in one process
  api       run only the HTTP API
  relay     run only the outbox relay
  worker    run only the consumer and its workers
  migrate   apply the schema and exit
  replay --failed [--since WHEN]
            send failed events back through the outbox; WHEN is a duration
            (1h, 7d: created that long ago or later) or a timestamp
  healthcheck
            exit 0 if the API at INGEST_HTTP_ADDR answers /readyz with 200
            within 1 s, else 1 with the reason on stderr (for containers)

Options:
  -h, --help     print this help
  -V, --version  print the version
";

/// `docs/configuration.md`, generated from [`config::VARS`], the table
/// `--help` prints: a test fails when the file is stale, and
/// `make docs` writes it again.
pub fn configuration_markdown() -> String {
    let mut out = String::from(
        "# Configuration\n\n\
         <!-- Generated from the table in src/config.rs by `make docs`; do not edit. -->\n\n\
         Environment variables only; `ingestd --help` prints the same table.\n\n\
         | Variable | Default | Meaning |\n|---|---|---|\n",
    );
    for v in config::VARS {
        let default = if v.default.is_empty() {
            "none".to_string()
        } else {
            format!("`{}`", v.default)
        };
        out.push_str(&format!(
            "| `{}` | {default} | {} |\n",
            v.name,
            v.help.replace('|', "\\|")
        ));
    }
    out.push('\n');
    out.push_str(CONFIGURATION_NOTES);
    out.push('\n');
    out
}

/// The rules every value follows, below the table.
const CONFIGURATION_NOTES: &str = "\
A duration is a whole number followed by a unit: `500ms`, `2s`, `5m`, `1h` or
`7d`. All durations must be greater than zero, except
`INGEST_SIMULATED_WORK`; `INGEST_RETENTION` is `off` or a duration. All counts
must be positive whole numbers.

`INGEST_DB_SCHEMA` is a lowercase identifier (`a-z`, `0-9`, `_`),
`INGEST_AMQP_PREFIX` only letters, digits, `.`, `-` and `_`, and
`INGEST_AMQP_URL` a plain `amqp://` URL (no TLS). An invalid value stops
start-up with `invalid <VARIABLE>: <reason>` and exit code 2.";

/// What `ingestd` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run a role until SIGTERM or SIGINT.
    Run(Role),
    /// Apply the schema and exit.
    Migrate,
    /// Send failed events (created since the bound, when given) back
    /// through the outbox.
    Replay {
        /// Only events created at or after this.
        since: Option<Since>,
    },
    /// Ask the API this configuration describes whether it is ready, and
    /// exit 0 if it is (a container's health check).
    Healthcheck,
    /// Print the usage and the configuration variables.
    Help,
    /// Print the version.
    Version,
}

/// A command line that says nothing `ingestd` can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

impl Command {
    /// Parses the arguments after the program's name.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, UsageError> {
        let mut args = args.into_iter();
        let first = args.next();
        let command = match first.as_deref() {
            None | Some("all") => Command::Run(Role::All),
            Some("api") => Command::Run(Role::Api),
            Some("relay") => Command::Run(Role::Relay),
            Some("worker") => Command::Run(Role::Worker),
            Some("migrate") => Command::Migrate,
            Some("replay") => return replay(args),
            Some("healthcheck") => Command::Healthcheck,
            Some("-h" | "--help") => Command::Help,
            Some("-V" | "--version") => Command::Version,
            Some(other) => return Err(UsageError(format!("unknown argument {other:?}"))),
        };
        match args.next() {
            None => Ok(command),
            Some(extra) => Err(UsageError(format!("unexpected argument {extra:?}"))),
        }
    }
}

/// The arguments of `replay`.
fn replay(mut args: impl Iterator<Item = String>) -> Result<Command, UsageError> {
    let (mut failed, mut since) = (false, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--failed" => failed = true,
            "--since" => {
                let value = args
                    .next()
                    .ok_or_else(|| UsageError("replay: --since needs a value".into()))?;
                since = Some(match config::parse_duration(&value) {
                    Ok(d) => Since::Ago(d),
                    Err(_) => Since::At(value),
                });
            }
            other => return Err(UsageError(format!("replay: unknown argument {other:?}"))),
        }
    }
    if !failed {
        return Err(UsageError("replay: say which events: --failed".into()));
    }
    Ok(Command::Replay { since })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(args: &[&str]) -> Result<Command, UsageError> {
        Command::parse(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn roles_and_commands() {
        assert_eq!(parse(&[]), Ok(Command::Run(Role::All)));
        assert_eq!(parse(&["all"]), Ok(Command::Run(Role::All)));
        assert_eq!(parse(&["api"]), Ok(Command::Run(Role::Api)));
        assert_eq!(parse(&["relay"]), Ok(Command::Run(Role::Relay)));
        assert_eq!(parse(&["worker"]), Ok(Command::Run(Role::Worker)));
        assert_eq!(parse(&["migrate"]), Ok(Command::Migrate));
        assert_eq!(parse(&["healthcheck"]), Ok(Command::Healthcheck));
        assert!(parse(&["healthcheck", "now"]).is_err());
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
        assert_eq!(parse(&["-V"]), Ok(Command::Version));
        assert!(parse(&["nope"]).unwrap_err().0.contains("\"nope\""));
        assert!(parse(&["api", "extra"]).is_err());
    }

    #[test]
    fn replay_takes_its_own_arguments() {
        assert_eq!(
            parse(&["replay", "--failed"]),
            Ok(Command::Replay { since: None })
        );
        assert_eq!(
            parse(&["replay", "--since", "1h", "--failed"]),
            Ok(Command::Replay {
                since: Some(Since::Ago(Duration::from_secs(3600)))
            })
        );
        assert_eq!(
            parse(&["replay", "--failed", "--since", "2026-01-31T12:00:00Z"]),
            Ok(Command::Replay {
                since: Some(Since::At("2026-01-31T12:00:00Z".into()))
            })
        );
        assert!(parse(&["replay"]).unwrap_err().0.contains("--failed"));
        assert!(parse(&["replay", "--failed", "--since"]).is_err());
        assert!(parse(&["replay", "--all"]).is_err());
    }
}
