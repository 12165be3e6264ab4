//! Turns SIGTERM and SIGINT into a channel message from one dedicated thread.

use crossbeam_channel::{Receiver, bounded};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// A receiver that yields the name of each SIGTERM or SIGINT received.
pub fn channel() -> std::io::Result<Receiver<&'static str>> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let (tx, rx) = bounded(4);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let name = if signal == SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGINT"
                };
                if tx.send(name).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}
