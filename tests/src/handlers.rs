//! Helpers for tests that drive a worker's command handler directly (no JetStream between):
//! a remote's settings, a command as a saga would send it, and the code of a refusal.

use sagas::wire::{Body, Command, CommandId, Phase, ReplyOutcome, SCHEMA_VERSION, SagaId};

/// A third party's settings for a handler under test: generous timeouts, a breaker that a
/// test's few failures do not open.
pub fn remote(url: &str) -> workers::config::Remote {
    workers::config::Remote {
        url: url.to_owned(),
        timeout_ms: 10_000,
        record_pending_after_ms: 20,
        breaker_failures: 5,
        breaker_open_ms: 1000,
        breaker_open_max_ms: 30_000,
    }
}

/// The first attempt of `step`'s command in `phase`, as a saga of `saga_type` sends it.
pub fn command(
    saga_type: &str,
    saga: SagaId,
    step: &str,
    phase: Phase,
    service: &str,
    body: Body,
) -> Command {
    Command {
        v: SCHEMA_VERSION,
        saga_type: saga_type.into(),
        id: CommandId::derive(saga, step, phase, 1),
        saga_id: saga,
        step: step.into(),
        phase,
        attempt: 1,
        dispatch: 0,
        deadline: chrono::Utc::now() + chrono::Duration::seconds(30),
        service: service.into(),
        partition: None,
        body,
    }
}

/// The code of a refusal (a failure that is not retried), or `None` for any other outcome.
pub fn refused_with(outcome: &ReplyOutcome) -> Option<&str> {
    match outcome {
        ReplyOutcome::Failed {
            retryable: false,
            code,
            ..
        } => Some(code),
        _ => None,
    }
}
