//! The life of a process, the same for the orchestrator and every worker: load the settings (a
//! bad value exits with status 2 and names it), start logging and the async runtime, run the
//! body, and turn its end into an exit status.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use crate::config::{Log, Runtime};

/// Run `body` with the settings `load` returns, logging and running as their sections (which
/// `sections` picks out) say; `name` says which process failed in the log.
pub fn main<S, E, F, Fut>(
    name: &str,
    load: impl FnOnce() -> Result<S, E>,
    sections: impl FnOnce(&S) -> (&Log, &Runtime),
    body: F,
) -> ExitCode
where
    E: Display,
    F: FnOnce(S) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let settings = match load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (log, runtime) = sections(&settings);
    crate::telemetry::init(log.format, &log.level, name);
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(body(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // The last spans of the traces, if they are exported.
    crate::telemetry::shutdown();
    code
}
