//! The circuit breaker in front of a remote party (the card processor, the carrier, the
//! Product service's API): failsafe's state machine, opened by consecutive failures, open
//! for a delay that doubles with jitter (backon's exponential backoff, `sagas::policy`).

use failsafe::failure_policy::ConsecutiveFailures;
use sagas::policy::{Backoff, Delays};

pub type Breaker = failsafe::StateMachine<ConsecutiveFailures<Delays>, ()>;

/// A breaker that opens after `failures` consecutive failures and stays open `open_ms` the
/// first time, then twice as long each time it opens again (with jitter), up to
/// `open_max_ms`. The jitter is seeded by the process id, so that processes do not probe
/// in step.
pub fn consecutive_failures(failures: u32, open_ms: u64, open_max_ms: u64) -> Breaker {
    let delays = Backoff {
        initial_ms: open_ms,
        max_ms: open_max_ms,
        factor: 2.0,
        jitter: true,
    }
    .delays(u64::from(std::process::id()));
    failsafe::Config::new()
        .failure_policy(failsafe::failure_policy::consecutive_failures(
            failures, delays,
        ))
        .build()
}
