//! Retry policies: how often a step is attempted, how long the orchestrator waits for each
//! attempt, and how long it waits between attempts.
//!
//! Backoff delays come from `backon`'s exponential builder with a *seeded* jitter: the seed is
//! derived from the saga, the step and the attempt, so the same saga always computes the same
//! delays. That keeps the machine deterministic (a replay of its event log gives the same
//! timers) while different sagas still spread their retries apart.

use std::time::Duration;

use backon::BackoffBuilder;
use serde::{Deserialize, Serialize};

use crate::wire::Invalid;

/// The longest deadline or backoff delay a policy may have: thirty days (a step may wait on a
/// party that answers in days).
const MAX_MS: u64 = 30 * 86_400_000;

/// Exponential backoff between attempts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial_ms: u64,
    /// No delay is longer than this (before jitter).
    pub max_ms: u64,
    /// Each delay is the previous one times this factor. (An `f64`, so that what the
    /// snapshot stores reads back as the same number.)
    pub factor: f64,
    /// Adds up to 100 % of the delay, deterministically per saga and attempt.
    pub jitter: bool,
}

impl Backoff {
    /// The delay before retry number `retry` (0 is the first retry).
    pub fn delay(&self, retry: u32, seed: u64) -> Duration {
        let mut builder = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.initial_ms))
            .with_max_delay(Duration::from_millis(self.max_ms))
            .with_factor(self.factor as f32)
            .without_max_times();
        if self.jitter {
            builder = builder.with_jitter().with_jitter_seed(seed);
        }
        builder
            .build()
            .nth(retry as usize)
            .unwrap_or(Duration::from_millis(self.max_ms))
    }

    /// The delays one after the other, as an endless iterator (for circuit breakers' open
    /// periods). Cloning it starts over.
    pub fn delays(&self, seed: u64) -> Delays {
        Delays {
            backoff: self.clone(),
            seed,
            next: 0,
        }
    }

    fn validate(&self, what: &str) -> Result<(), Invalid> {
        if self.initial_ms == 0 || self.max_ms < self.initial_ms || self.max_ms > MAX_MS {
            return Err(Invalid(format!(
                "{what}: backoff needs 0 < initial_ms <= max_ms <= thirty days ({MAX_MS}), got {} and {}",
                self.initial_ms, self.max_ms
            )));
        }
        if !(1.0..=10.0).contains(&self.factor) {
            return Err(Invalid(format!(
                "{what}: backoff factor must be between 1 and 10, got {}",
                self.factor
            )));
        }
        Ok(())
    }
}

/// The delays of a [`Backoff`], one after the other.
#[derive(Clone, Debug)]
pub struct Delays {
    backoff: Backoff,
    seed: u64,
    next: u32,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self
            .backoff
            .delay(self.next, self.seed.wrapping_add(u64::from(self.next)));
        self.next = self.next.saturating_add(1);
        Some(d)
    }
}

/// The policy of one phase (forward or compensation) of one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Attempts in all, the first included. A compensation that exhausts them leaves the saga
    /// `failed`, waiting for an operator.
    pub max_attempts: u32,
    /// Start-to-close: how long the orchestrator waits for the reply to one dispatch.
    pub deadline_ms: u64,
    /// When the deadline passes, send the same command (same id: the worker's idempotency
    /// makes it safe) this many times before the attempt counts as failed. 0: a deadline is a
    /// failed attempt at once.
    #[serde(default)]
    pub redispatches: u32,
    pub backoff: Backoff,
}

impl Policy {
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    pub fn validate(&self, what: &str) -> Result<(), Invalid> {
        if self.max_attempts == 0 || self.max_attempts > 10_000 {
            return Err(Invalid(format!(
                "{what}: max_attempts must be between 1 and 10000, got {}",
                self.max_attempts
            )));
        }
        if self.redispatches > 100 {
            return Err(Invalid(format!(
                "{what}: redispatches must be at most 100, got {}",
                self.redispatches
            )));
        }
        if self.deadline_ms < 10 || self.deadline_ms > MAX_MS {
            return Err(Invalid(format!(
                "{what}: deadline_ms must be between 10 ms and thirty days, got {}",
                self.deadline_ms
            )));
        }
        self.backoff.validate(what)
    }
}

/// The two policies of a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepPolicy {
    pub forward: Policy,
    /// Compensations are retried with a capped backoff far longer than forward steps: giving up
    /// on one means money or stock stays held until an operator acts.
    pub compensation: Policy,
}

/// A partial override of a [`StepPolicy`], as read from configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyOverride {
    pub max_attempts: Option<u32>,
    pub deadline_ms: Option<u64>,
    pub redispatches: Option<u32>,
    pub backoff_initial_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub backoff_factor: Option<f64>,
    pub jitter: Option<bool>,
}

impl PolicyOverride {
    pub fn apply(&self, base: &Policy) -> Policy {
        Policy {
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            deadline_ms: self.deadline_ms.unwrap_or(base.deadline_ms),
            redispatches: self.redispatches.unwrap_or(base.redispatches),
            backoff: Backoff {
                initial_ms: self.backoff_initial_ms.unwrap_or(base.backoff.initial_ms),
                max_ms: self.backoff_max_ms.unwrap_or(base.backoff.max_ms),
                factor: self.backoff_factor.unwrap_or(base.backoff.factor),
                jitter: self.jitter.unwrap_or(base.backoff.jitter),
            },
        }
    }
}

/// Overrides of one step, forward and compensation, and the SLA of the signal it awaits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepPolicyOverride {
    #[serde(default)]
    pub forward: PolicyOverride,
    #[serde(default)]
    pub compensation: PolicyOverride,
    /// How long the step waits for its signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_ms: Option<u64>,
}

/// The compensation policy of the shop's sagas: tried far longer than a forward step, with a
/// capped delay, because giving up leaves money taken or stock off the shelf.
pub const PATIENT_COMPENSATION: Policy = Policy {
    max_attempts: 30,
    deadline_ms: 10_000,
    redispatches: 1,
    backoff: Backoff {
        initial_ms: 500,
        max_ms: 60_000,
        factor: 2.0,
        jitter: true,
    },
};

/// A stable 64-bit seed from arbitrary parts (FNV-1a), for the jitter of one attempt.
pub(crate) fn seed(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(jitter: bool) -> Backoff {
        Backoff {
            initial_ms: 100,
            max_ms: 1_000,
            factor: 2.0,
            jitter,
        }
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let b = backoff(false);
        let d: Vec<u128> = (0..6).map(|i| b.delay(i, 0).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_is_deterministic_per_seed_and_bounded() {
        let b = backoff(true);
        for retry in 0..5 {
            let base = backoff(false).delay(retry, 0);
            let a = b.delay(retry, 42);
            assert_eq!(a, b.delay(retry, 42));
            assert!(a >= base && a <= base * 2, "{a:?} outside [{base:?}, 2x]");
        }
        assert_ne!(b.delay(0, 1), b.delay(0, 2));
    }

    #[test]
    fn delays_iterate_and_start_over_when_cloned() {
        let d = backoff(false).delays(7);
        let first: Vec<u128> = d.clone().take(4).map(|x| x.as_millis()).collect();
        assert_eq!(first, vec![100, 200, 400, 800]);
        assert_eq!(d.clone().next(), Some(Duration::from_millis(100)));
    }

    #[test]
    fn invalid_policies_are_refused() {
        let mut p = Policy {
            max_attempts: 3,
            deadline_ms: 1_000,
            redispatches: 1,
            backoff: backoff(true),
        };
        assert!(p.validate("x").is_ok());
        p.max_attempts = 0;
        assert!(p.validate("x").is_err());
        p.max_attempts = 1;
        p.backoff.factor = 0.5;
        assert!(p.validate("x").is_err());
        p.backoff.factor = 2.0;
        p.backoff.max_ms = 30 * 86_400_000 + 1;
        assert!(p.validate("x").is_err());
    }

    #[test]
    fn a_factor_reads_back_as_written() {
        // The snapshot is stored as JSON text and compared, as a value, with a replayed one.
        let b = Backoff {
            factor: 1.1,
            ..backoff(true)
        };
        let text = serde_json::to_string(&b).unwrap();
        let stored: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(stored, serde_json::to_value(&b).unwrap());
    }
}
