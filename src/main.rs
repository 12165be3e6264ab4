//! The `ingestd` binary: parse the command line, start logging, run.

use std::process::ExitCode;
use std::sync::Arc;

use ingestd::{Config, DefaultProcessor, Role, app, config};

const USAGE: &str = "\
Usage: ingestd [ROLE]

Roles:
  (none)    run the API, the relay and the workers in one process
  api       run only the HTTP API
  relay     run only the outbox relay
  worker    run only the consumer and its workers
  migrate   apply the schema and exit

Options:
  -h, --help     print this help
  -V, --version  print the version
";

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    let role = match arg.as_deref() {
        None | Some("all") => Some(Role::All),
        Some("api") => Some(Role::Api),
        Some("relay") => Some(Role::Relay),
        Some("worker") => Some(Role::Worker),
        Some("migrate") => None,
        Some("-h" | "--help") => {
            print!("{USAGE}\n{}", Config::help());
            return ExitCode::SUCCESS;
        }
        Some("-V" | "--version") => {
            println!("{}", ingestd::version());
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("ingestd: unknown argument {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ingestd: {e}");
            return ExitCode::from(2);
        }
    };
    ingestd::logging::init(&config);
    let result = match role {
        Some(role) => run(&config, role),
        None => app::migrate(&config).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &config::Config, role: Role) -> Result<(), String> {
    let signals =
        ingestd::signals::channel().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let processor = Arc::new(DefaultProcessor {
        work: config.simulated_work,
    });
    log::info!("{} starting as {role:?}", ingestd::version());
    let app = app::start(config, role, processor).map_err(|e| e.to_string())?;
    let signal = signals
        .recv()
        .map_err(|_| "signal thread ended".to_string())?;
    log::info!("received {signal}");
    app.shutdown().map_err(|e| e.to_string())
}
