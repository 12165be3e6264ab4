//! The `ingestd` binary: parse the command line, start logging, run.

use std::process::ExitCode;
use std::sync::Arc;

use ingestd::store::Since;
use ingestd::{Config, DefaultProcessor, Role, app, config};

const USAGE: &str = "\
Usage: ingestd [ROLE]

Roles:
  (none)    run the API, the relay and the workers in one process
  api       run only the HTTP API
  relay     run only the outbox relay
  worker    run only the consumer and its workers
  migrate   apply the schema and exit
  replay --failed [--since WHEN]
            send failed events back through the outbox; WHEN is a duration
            (1h, 7d: created that long ago or later) or a timestamp

Options:
  -h, --help     print this help
  -V, --version  print the version
";

fn main() -> ExitCode {
    ingestd::api::footprint::tune_allocator();
    let arg = std::env::args().nth(1);
    let role = match arg.as_deref() {
        None | Some("all") => Some(Role::All),
        Some("api") => Some(Role::Api),
        Some("relay") => Some(Role::Relay),
        Some("worker") => Some(Role::Worker),
        Some("migrate" | "replay") => None,
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
    ingestd::ops::logging::init(&config);
    let result = match role {
        Some(role) => run(&config, role),
        None if arg.as_deref() == Some("replay") => replay(&config),
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
    let signals = ingestd::lifecycle::channel()
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
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

fn replay(config: &config::Config) -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let mut failed = false;
    let mut since = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--failed" => failed = true,
            "--since" => {
                let v = it.next().ok_or("--since needs a value")?;
                since = Some(match config::parse_duration(v) {
                    Ok(d) => Since::Ago(d),
                    Err(_) => Since::At(v.clone()),
                });
            }
            other => return Err(format!("replay: unknown argument {other:?}")),
        }
    }
    if !failed {
        return Err("replay: say which events: --failed".into());
    }
    let n = app::replay_failed(config, since.as_ref()).map_err(|e| e.to_string())?;
    println!("requeued {n} failed events");
    Ok(())
}
