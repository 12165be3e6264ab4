//! The `ingestd` binary: parse the command line, load the configuration,
//! start logging, run; map the result to an exit code.

use std::process::ExitCode;

use ingestd::cli::{Command, USAGE};
use ingestd::{Config, app};

fn main() -> ExitCode {
    ingestd::api::footprint::tune_allocator();
    let command = match Command::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ingestd: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => print!("{USAGE}\n{}", Config::help()),
        Command::Version => println!("{}", ingestd::version()),
        // Silent when ready; one line on stderr and 1 otherwise.
        Command::Healthcheck => {
            if let Err(e) = ingestd::ops::healthcheck::run() {
                eprintln!("ingestd healthcheck: {e}");
                return ExitCode::FAILURE;
            }
        }
        command => {
            let config = match Config::from_env() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ingestd: {e}");
                    return ExitCode::from(2);
                }
            };
            ingestd::ops::logging::init(&config);
            if let Err(e) = app::run(&config, command) {
                log::error!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
