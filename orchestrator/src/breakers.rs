//! Circuit breakers, one per saga step (failsafe). The engine records the outcome of every
//! attempt it applies: a success or a permanent failure is a success for the breaker (the
//! service answered), a retryable failure or a deadline is a failure. A breaker protects a
//! downstream that is failing *for everybody*, so it counts a saga's failures once: after
//! `breakers.failure_threshold` consecutive failures from that many different sagas (no success
//! in between) it opens. One saga that keeps failing (a customer's card that the processor keeps
//! refusing retryably, a compensation stuck on its own data) never opens it alone, and so never
//! parks everybody else. From then on a saga that reaches the step parks (`parked`), spending no
//! attempt, until the breaker lets calls through again. When the breaker's open period ends it turns half-open and the unparker
//! resumes ONE parked saga as a probe; its outcome closes the breaker (and every parked saga
//! is resumed) or opens it again for longer.
//!
//! Each orchestrator keeps its own breakers in memory: replies are spread over all
//! orchestrators by the shared consumer, so each sees a fair sample of the outcomes and trips
//! on its own within a few failures; sharing the counts would cost a write per outcome on the
//! hot path. What an operator forces (open or closed) is different: it is stored in
//! `orchestrator.breaker_overrides` and every orchestrator applies it within a second.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failsafe::failure_policy::ConsecutiveFailures;
use sagas::policy::{Backoff, Delays};
use sagas::wire::SagaId;
use serde::{Deserialize, Serialize};

use crate::config;
use crate::metrics::Metrics;

/// A breaker's state as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => State::HalfOpen,
            2 => State::Open,
            _ => State::Closed,
        }
    }
}

/// What an operator forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Force {
    Open,
    Closed,
}

impl Force {
    pub fn as_str(self) -> &'static str {
        match self {
            Force::Open => "open",
            Force::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(Force::Open),
            "closed" => Some(Force::Closed),
            _ => None,
        }
    }
}

/// failsafe's instrumentation: keeps the state where the API and the metrics can read it.
#[derive(Clone)]
struct Recorder {
    step: &'static str,
    state: Arc<AtomicU8>,
    opened: Arc<AtomicU64>,
    metrics: Metrics,
}

impl Recorder {
    fn set(&self, state: State) {
        self.state.store(state as u8, Ordering::Relaxed);
        self.metrics.breaker_state(self.step, state);
    }
}

impl failsafe::Instrument for Recorder {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.metrics.breaker_opened(self.step);
        tracing::warn!(step = self.step, "circuit breaker opened");
        self.set(State::Open);
    }

    fn on_half_open(&self) {
        tracing::info!(step = self.step, "circuit breaker half-open: probing");
        self.set(State::HalfOpen);
    }

    fn on_closed(&self) {
        tracing::info!(step = self.step, "circuit breaker closed");
        self.set(State::Closed);
    }
}

type Machine = failsafe::StateMachine<ConsecutiveFailures<Delays>, Recorder>;

struct Breaker {
    machine: Machine,
    recorder: Recorder,
    /// The saga sent as the half-open probe, and since when.
    probe: Mutex<Option<Instant>>,
    /// The sagas that failed since the last success: failsafe counts a saga's first failure of
    /// a streak only, so its consecutive failures are failures of distinct sagas.
    failing: Mutex<HashSet<SagaId>>,
}

/// A breaker as `GET /breakers` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub step: &'static str,
    pub state: State,
    pub forced: Option<Force>,
    /// Whether sagas reaching the step park now.
    pub blocking: bool,
    pub times_opened: u64,
}

pub struct Breakers {
    by_step: BTreeMap<&'static str, Breaker>,
    forced: Mutex<BTreeMap<String, Force>>,
    probe_timeout: Duration,
}

impl Breakers {
    pub fn new(steps: &[&'static str], settings: &config::Breakers, metrics: Metrics) -> Self {
        let by_step = steps
            .iter()
            .map(|&step| {
                let recorder = Recorder {
                    step,
                    state: Arc::new(AtomicU8::new(State::Closed as u8)),
                    opened: Arc::new(AtomicU64::new(0)),
                    metrics: metrics.clone(),
                };
                recorder.set(State::Closed);
                // How long the breaker stays open: backon's exponential backoff with jitter.
                let backoff = Backoff {
                    initial_ms: settings.open_initial_ms,
                    max_ms: settings.open_max_ms,
                    factor: 2.0,
                    jitter: true,
                }
                .delays(step.len() as u64);
                let machine = failsafe::Config::new()
                    .failure_policy(failsafe::failure_policy::consecutive_failures(
                        settings.failure_threshold,
                        backoff,
                    ))
                    .instrument(recorder.clone())
                    .build();
                (
                    step,
                    Breaker {
                        machine,
                        recorder,
                        probe: Mutex::new(None),
                        failing: Mutex::new(HashSet::new()),
                    },
                )
            })
            .collect();
        Self {
            by_step,
            forced: Mutex::new(BTreeMap::new()),
            probe_timeout: config::ms(settings.probe_timeout_ms),
        }
    }

    fn state(&self, b: &Breaker) -> State {
        // Asking failsafe whether a call is permitted moves an open breaker whose open period
        // ended to half-open (that is how it notices time passing).
        b.machine.is_call_permitted();
        State::from_u8(b.recorder.state.load(Ordering::Relaxed))
    }

    /// The steps a saga must not be dispatched to now.
    pub fn blocked(&self) -> BTreeSet<String> {
        let forced = self.forced.lock().expect("breakers lock").clone();
        self.by_step
            .iter()
            .filter(|(step, b)| match forced.get(**step) {
                Some(Force::Open) => true,
                Some(Force::Closed) => false,
                None => self.state(b) != State::Closed,
            })
            .map(|(step, _)| (*step).to_owned())
            .collect()
    }

    /// Record what an attempt of `step` by `saga` came to.
    pub fn record(&self, step: &str, saga: SagaId, ok: bool) {
        let Some(b) = self.by_step.get(step) else {
            return;
        };
        if ok {
            b.failing.lock().expect("failing lock").clear();
            b.machine.on_success();
        } else {
            let state = self.state(b);
            let mut failing = b.failing.lock().expect("failing lock");
            // A half-open breaker's probe failing opens it again, whoever the probe was; a
            // closed breaker counts each saga once per streak.
            let counts = state == State::HalfOpen || failing.insert(saga);
            drop(failing);
            if counts {
                b.machine.on_error();
                if self.state(b) == State::Open {
                    // A new streak starts when it lets calls through again.
                    b.failing.lock().expect("failing lock").clear();
                }
            }
        }
        // Any outcome settles a half-open breaker (closed or open again): the probe is done.
        if self.state(b) != State::HalfOpen {
            b.probe.lock().expect("probe lock").take();
        }
    }

    /// When the breaker of `step` is half-open and no probe is out (or the last one is lost),
    /// claim the probe: the caller resumes one parked saga through the breaker.
    pub fn claim_probe(&self, step: &str) -> bool {
        let Some(b) = self.by_step.get(step) else {
            return false;
        };
        if self
            .forced
            .lock()
            .expect("breakers lock")
            .contains_key(step)
            || self.state(b) != State::HalfOpen
        {
            return false;
        }
        let mut probe = b.probe.lock().expect("probe lock");
        match *probe {
            Some(since) if since.elapsed() < self.probe_timeout => false,
            _ => {
                *probe = Some(Instant::now());
                true
            }
        }
    }

    /// Release a claimed probe that found no saga to send.
    pub fn release_probe(&self, step: &str) {
        if let Some(b) = self.by_step.get(step) {
            b.probe.lock().expect("probe lock").take();
        }
    }

    /// Replace the operator's overrides (read from the database).
    pub fn set_forced(&self, forced: BTreeMap<String, Force>) {
        let mut current = self.forced.lock().expect("breakers lock");
        if *current != forced {
            tracing::info!(?forced, "breaker overrides changed");
            *current = forced;
        }
    }

    pub fn has(&self, step: &str) -> bool {
        self.by_step.contains_key(step)
    }

    /// The steps with a breaker.
    pub fn steps(&self) -> Vec<&'static str> {
        self.by_step.keys().copied().collect()
    }

    pub fn views(&self) -> Vec<View> {
        let forced = self.forced.lock().expect("breakers lock").clone();
        let blocked = self.blocked();
        self.by_step
            .iter()
            .map(|(step, b)| View {
                step,
                state: self.state(b),
                forced: forced.get(*step).copied(),
                blocking: blocked.contains(*step),
                times_opened: b.recorder.opened.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers(threshold: u32) -> Breakers {
        let settings = config::Breakers {
            failure_threshold: threshold,
            open_initial_ms: 60_000,
            open_max_ms: 60_000,
            probe_timeout_ms: 1_000,
            unpark_interval_ms: 100,
        };
        Breakers::new(&["charge_payment"], &settings, Metrics::new())
    }

    fn saga(n: u128) -> SagaId {
        SagaId::from_uuid(uuid::Uuid::from_u128(n))
    }

    fn state(b: &Breakers) -> State {
        b.views()[0].state
    }

    #[test]
    fn one_saga_failing_for_ever_never_opens_the_breaker() {
        let b = breakers(3);
        for _ in 0..1_000 {
            b.record("charge_payment", saga(1), false);
        }
        assert_eq!(state(&b), State::Closed);
        assert!(b.blocked().is_empty());
        // Two more sagas failing make three distinct ones in a row: now it opens.
        b.record("charge_payment", saga(2), false);
        assert_eq!(state(&b), State::Closed);
        b.record("charge_payment", saga(3), false);
        assert_eq!(state(&b), State::Open);
        assert!(b.blocked().contains("charge_payment"));
    }

    #[test]
    fn a_success_starts_the_count_again() {
        let b = breakers(3);
        b.record("charge_payment", saga(1), false);
        b.record("charge_payment", saga(2), false);
        b.record("charge_payment", saga(9), true);
        b.record("charge_payment", saga(1), false);
        b.record("charge_payment", saga(2), false);
        assert_eq!(state(&b), State::Closed);
        b.record("charge_payment", saga(3), false);
        assert_eq!(state(&b), State::Open);
    }

    #[test]
    fn distinct_sagas_interleaved_with_repeats_count_once_each() {
        let b = breakers(4);
        for n in [1, 1, 2, 1, 2, 2, 3, 1, 3] {
            b.record("charge_payment", saga(n), false);
        }
        assert_eq!(state(&b), State::Closed, "three sagas, however often");
        b.record("charge_payment", saga(4), false);
        assert_eq!(state(&b), State::Open);
    }
}
