//! Logging. Every line carries the correlation id of what it serves (a request, a command, a
//! reply, an event) through the `correlation_id` field of the span it is logged in.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber, writing to stderr. `RUST_LOG` wins over the configured level.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
    // A second init (tests that start several apps in one process) keeps the first subscriber.
    let _ = result;
}

/// A new correlation id, for what arrives without one.
pub fn new_correlation_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
