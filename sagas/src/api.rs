//! The interface between a saga definition and the engine that drives it.
//!
//! The engine knows saga types only through [`SagaType`] and instances only through [`Saga`]: it
//! starts or restores an instance, feeds it one [`Input`] at a time with the current time, and
//! carries out the [`Effect`]s that come back (after committing them). A new saga type plugs in
//! by implementing these two traits and being listed in [`crate::types`]; the engine does not
//! change.

use serde::{Deserialize, Serialize};

use crate::wire::{Command, Event, Phase, Reply, SagaId, Timestamp};

/// One thing that happened to a saga.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// A worker answered a command.
    Reply(Reply),
    /// A durable timer came due.
    TimerFired(Timer),
    /// A client or an operator asked to stop the saga and undo what it did.
    Cancel { reason: String },
    /// The circuit breaker of a step lets calls through again: a saga parked on it goes on.
    Resume { step: String },
}

impl Input {
    /// A short name for logs and the event log.
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Reply(r) => match r.outcome {
                crate::wire::ReplyOutcome::Succeeded { .. } => "step_succeeded",
                crate::wire::ReplyOutcome::Failed {
                    retryable: true, ..
                } => "step_failed_retryable",
                crate::wire::ReplyOutcome::Failed {
                    retryable: false, ..
                } => "step_failed_permanent",
            },
            Input::TimerFired(_) => "timer_fired",
            Input::Cancel { .. } => "cancel_requested",
            Input::Resume { .. } => "resumed",
        }
    }
}

/// The closed set of durable timers. Each is stored as a row keyed by the saga and [`Timer::key`]:
/// setting a timer with the same key replaces the previous one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "timer", rename_all = "snake_case")]
pub enum Timer {
    /// The start-to-close deadline of one attempt: when it fires before the reply arrives, the
    /// attempt counts as failed (timed out).
    StepDeadline {
        step: String,
        phase: Phase,
        attempt: u32,
        /// Which dispatch of the attempt this deadline is for (0 for the first).
        #[serde(default)]
        dispatch: u32,
    },
    /// The backoff between two attempts: when it fires, the next attempt is dispatched.
    StepRetry {
        step: String,
        phase: Phase,
        attempt: u32,
    },
}

impl Timer {
    /// The slot this timer occupies. A step-by-step saga waits on at most one thing at a time,
    /// so its deadline and retry timers share one slot.
    pub fn key(&self) -> &'static str {
        match self {
            Timer::StepDeadline { .. } | Timer::StepRetry { .. } => "step",
        }
    }
}

/// What the engine must do after committing a transition. Plain data; nothing here has happened
/// yet when the machine returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Publish this command to its worker pool (through the outbox).
    Dispatch(Command),
    /// Arm a durable timer, replacing any timer with the same key.
    SetTimer { timer: Timer, at: Timestamp },
    /// Disarm the timer with this key.
    CancelTimer { key: String },
    /// Publish this domain event (through the outbox).
    Emit(Event),
}

/// Where a saga stands, as the engine and the API see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Moving forward through its steps.
    Running,
    /// Undoing finished steps after a permanent failure or a cancel.
    Compensating,
    /// Waiting for the circuit breaker of its next step to close; no attempt is spent.
    Parked,
    /// Every step succeeded.
    Completed,
    /// Every finished step was undone.
    Compensated,
    /// A compensation could not succeed: waiting for an operator.
    Failed,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Compensated | Status::Failed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Compensating => "compensating",
            Status::Parked => "parked",
            Status::Completed => "completed",
            Status::Compensated => "compensated",
            Status::Failed => "failed",
        }
    }

    /// Every status, in the order a saga may pass through them.
    pub const ALL: [Status; 6] = [
        Status::Running,
        Status::Parked,
        Status::Compensating,
        Status::Completed,
        Status::Compensated,
        Status::Failed,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// What the engine knows of the world when it feeds an input: the time, and the steps whose
/// circuit breaker is open. It is stored with the input in the event log, so a replay sees
/// exactly what the machine saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Env {
    pub now: Timestamp,
    /// Steps that must not be dispatched now; a saga that reaches one parks on it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub blocked: std::collections::BTreeSet<String>,
}

impl Env {
    pub fn at(now: Timestamp) -> Self {
        Self {
            now,
            blocked: Default::default(),
        }
    }

    pub fn is_blocked(&self, step: &str) -> bool {
        self.blocked.contains(step)
    }
}

/// What one input did to a saga.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The input changed the saga; persist the new snapshot and carry out the effects.
    Applied(Vec<Effect>),
    /// The input was stale, duplicated or not meaningful in the current state; nothing changed.
    Ignored(String),
}

/// Why a saga could not be started or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid start request: {0}")]
    InvalidStart(String),
    #[error("snapshot cannot be read: {0}")]
    Snapshot(String),
}

/// One live saga instance.
pub trait Saga: Send + Sync + std::fmt::Debug {
    fn id(&self) -> SagaId;
    /// Feed one input. `env.now` is the only source of time.
    fn apply(&mut self, input: &Input, env: &Env) -> Verdict;
    /// The step this saga is parked on (its breaker was open), if any.
    fn parked_on(&self) -> Option<&'static str>;
    /// The versioned snapshot to persist.
    fn snapshot(&self) -> serde_json::Value;
    /// The same snapshot as JSON text (what the engine writes, without building a value tree).
    fn snapshot_json(&self) -> String {
        self.snapshot().to_string()
    }
    /// The business entity the saga runs for (an order id), if its type has one.
    fn subject(&self) -> Option<String> {
        None
    }
    fn status(&self) -> Status;
    /// The name of the current leaf state, for the API and the dashboard.
    fn state_name(&self) -> &'static str;
    fn clone_box(&self) -> Box<dyn Saga>;
}

impl Clone for Box<dyn Saga> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// A kind of saga (checkout, fulfilment, ...).
pub trait SagaType: Send + Sync + 'static {
    /// Stored in the `type` column; never rename one.
    fn name(&self) -> &'static str;
    /// The steps its instances dispatch commands to: the engine keeps a circuit breaker per step.
    fn steps(&self) -> Vec<&'static str>;
    /// Start a new instance from its start request. The effects are those of entering the first
    /// step.
    fn start(
        &self,
        id: SagaId,
        request: &serde_json::Value,
        env: &Env,
    ) -> Result<(Box<dyn Saga>, Vec<Effect>), Error>;
    /// Rebuild an instance from a snapshot written by [`Saga::snapshot`].
    fn restore(&self, snapshot: &serde_json::Value) -> Result<Box<dyn Saga>, Error>;
}
