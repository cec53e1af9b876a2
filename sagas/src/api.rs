//! The interface between a saga definition and the engine that drives it.
//!
//! The engine knows saga types only through [`SagaType`] and instances only through [`Saga`]: it
//! starts or restores an instance, feeds it one [`Input`] at a time with the current time, and
//! carries out the [`Effect`]s that come back (after committing them). A new saga type plugs in
//! by implementing these two traits and being registered ([`Registry`]); the engine does not
//! change. Nothing here names a particular saga type, step, timer or service.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::wire::{Command, Event, Reply, SagaId, Signal, Timestamp};

/// One thing that happened to a saga.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// A worker answered a command.
    Reply(Reply),
    /// A durable timer came due.
    TimerFired(FiredTimer),
    /// Something happened in the world that the saga may be waiting for.
    Signal(Signal),
    /// A client or an operator asked to stop the saga and undo what it did.
    Cancel { reason: String },
    /// The circuit breaker of a step lets calls through again: a saga parked on it goes on.
    Resume { step: String },
    /// An operator acted on the saga by hand (from the dashboard). Who and why are kept in the
    /// event log with the input: that is how the saga's timeline shows who did what.
    Operator(OperatorInput),
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
            Input::Signal(_) => "signal",
            Input::Cancel { .. } => "cancel_requested",
            Input::Resume { .. } => "resumed",
            Input::Operator(op) => match op.action {
                OperatorAction::RetryNow => "operator_retry_now",
                OperatorAction::Recover => "operator_recover",
                OperatorAction::Resolve => "operator_resolve",
            },
        }
    }
}

/// An operator's action on one saga, with who took it and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperatorInput {
    /// The operator's name.
    pub by: String,
    /// The note the operator typed: why they did it.
    pub reason: String,
    pub action: OperatorAction,
}

/// What an operator can do to a saga by hand. Each applies in some states only; elsewhere the
/// saga ignores it, with a reason written for the operator ([`Saga::operator_actions`] tells
/// which apply now, and why the others do not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorAction {
    /// Make the attempt the saga waits to make now: skip the backoff before a retry, or
    /// dispatch despite the open circuit breaker a saga is parked on.
    RetryNow,
    /// Start a new round of the step a failed saga gave up on (its compensation, or a step
    /// after the pivot), with its attempts counted anew; the saga then goes on from there.
    Recover,
    /// Close a failed saga by hand: the operator dealt with what it could not do. It ends
    /// `resolved`, and nothing moves it any more.
    Resolve,
}

impl OperatorAction {
    /// Every action, in the order the dashboard shows them.
    pub const ALL: [OperatorAction; 3] = [
        OperatorAction::RetryNow,
        OperatorAction::Recover,
        OperatorAction::Resolve,
    ];

    /// Its name in URLs, the event log and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorAction::RetryNow => "retry_now",
            OperatorAction::Recover => "recover",
            OperatorAction::Resolve => "resolve",
        }
    }

    /// The action of a name given by [`OperatorAction::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// A durable timer as it comes due: its name and what the saga stored with it. The engine
/// never looks inside.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FiredTimer {
    /// The timer's name; one saga holds at most one timer of a name. (Timers set before they
    /// had names were all the one named `step`.)
    #[serde(default = "step_timer")]
    pub name: String,
    /// What the saga set it with.
    #[serde(flatten)]
    pub payload: serde_json::Map<String, serde_json::Value>,
}

fn step_timer() -> String {
    "step".to_owned()
}

/// One row of a saga type's read model, written by the commit that writes the saga: a JSON
/// object of the table's columns (see [`ProjectionTable`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProjectionRow {
    pub table: &'static str,
    pub row: serde_json::Map<String, serde_json::Value>,
}

/// A table a saga type projects its sagas into: typed rows that other processes read (the
/// checkout's orders, which the workers check commands against), so that a saga's snapshot is
/// never a contract between processes. The table is made by a migration; it has a `saga_id`
/// column; each row written replaces the one with the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectionTable {
    /// Schema-qualified, e.g. `orders.orders`.
    pub table: &'static str,
    /// The columns of its primary key.
    pub key: &'static [&'static str],
    /// Every column, the key's included.
    pub columns: &'static [&'static str],
}

/// What the engine must do after committing a transition. Plain data; nothing here has happened
/// yet when the machine returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Publish this command to its worker pool (through the outbox).
    Dispatch(Command),
    /// Arm the durable timer `name`, replacing any timer of that name; `payload` comes back
    /// with it when it fires.
    SetTimer {
        name: String,
        at: Timestamp,
        payload: serde_json::Map<String, serde_json::Value>,
    },
    /// Disarm the timer `name`.
    CancelTimer { name: String },
    /// Publish this domain event (through the outbox).
    Emit(Event),
    /// What the input says about the health of a step's downstream, for its circuit breaker:
    /// `ok` unless the service failed retryably or did not answer in time.
    Health { step: String, ok: bool },
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
    /// A failed saga an operator closed by hand ([`OperatorAction::Resolve`]).
    Resolved,
}

impl Status {
    /// Whether the saga ended: no reply, timer, signal or cancel moves it any more. Only an
    /// operator may, and only a failed saga (recovered, or resolved by hand).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Compensated | Status::Failed | Status::Resolved
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
            Status::Resolved => "resolved",
        }
    }

    /// Every status, in the order a saga may pass through them.
    pub const ALL: [Status; 7] = [
        Status::Running,
        Status::Parked,
        Status::Compensating,
        Status::Completed,
        Status::Compensated,
        Status::Failed,
        Status::Resolved,
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
    /// The business entity the saga runs for (an order id), if its type has one: a signal can
    /// name the saga by it.
    fn subject(&self) -> Option<String> {
        None
    }
    /// The rows of its type's read model as the saga stands now (written when they change).
    fn projection(&self) -> Vec<ProjectionRow> {
        Vec::new()
    }
    /// A number that changes whenever [`Saga::projection`] may change other than through
    /// [`Saga::status`] (while neither changes, the engine does not compute the rows again);
    /// it need not survive a restore. `None`: unknown, the rows are computed at every change.
    fn revision(&self) -> Option<u64> {
        None
    }
    fn status(&self) -> Status;
    /// The name of the current leaf state, for the API and the dashboard.
    fn state_name(&self) -> &'static str;
    /// Each operator action, and whether applying it at `now` would change the saga: `Err`
    /// holds the reason the saga would ignore it with (what the dashboard shows beside a
    /// disabled button). A type without operator actions answers none.
    fn operator_actions(&self, _now: Timestamp) -> Vec<(OperatorAction, Result<(), String>)> {
        Vec::new()
    }
    fn clone_box(&self) -> Box<dyn Saga>;
}

impl Clone for Box<dyn Saga> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// A domain event that starts sagas of a type: when it is published, the orchestrator starts
/// one saga per the key [`SagaType::start_on`] gives (so a redelivered or duplicated event
/// never starts a second).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trigger {
    /// The service that publishes it, e.g. `order`.
    pub source: &'static str,
    /// Its type, e.g. `OrderConfirmed`.
    pub event: &'static str,
}

/// What an event starts: a saga with this start request, once per `key` (within its type).
#[derive(Clone, Debug, PartialEq)]
pub struct EventStart {
    pub key: String,
    pub request: serde_json::Value,
}

/// A step of a saga type, as the engine and the operators see it (the dashboard draws the
/// saga's machine from these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepInfo {
    pub name: &'static str,
    /// The worker pool its commands go to; `None` for a step that only awaits a signal.
    pub service: Option<&'static str>,
    /// The role it plays: `compensatable`, `pivot` or `retriable_only`.
    pub kind: &'static str,
    /// The action of its forward command; `None` for a step that only awaits a signal.
    pub action: Option<&'static str>,
    /// The action of its compensating command, if it has one.
    pub compensation: Option<&'static str>,
    /// The name of the signal it awaits, if any.
    pub awaits: Option<&'static str>,
}

/// A kind of saga (checkout, fulfilment, ...).
pub trait SagaType: Send + Sync + 'static {
    /// Stored in the `type` column; never rename one.
    fn name(&self) -> &'static str;
    /// Its steps: the engine keeps a circuit breaker per step, the orchestrator a command
    /// consumer per service.
    fn steps(&self) -> Vec<StepInfo>;
    /// The tables of its read model.
    fn projections(&self) -> &'static [ProjectionTable] {
        &[]
    }
    /// The domain events that start sagas of this type.
    fn triggers(&self) -> &'static [Trigger] {
        &[]
    }
    /// The saga `event` (one of [`SagaType::triggers`]) starts, if it starts one.
    fn start_on(&self, _event: &Event) -> Option<EventStart> {
        None
    }
    /// The domain events that reach sagas of this type as signals.
    fn signal_triggers(&self) -> &'static [Trigger] {
        &[]
    }
    /// The signal `event` (one of [`SagaType::signal_triggers`]) is, and the subject of the
    /// saga of this type it is for.
    fn signal_on(&self, _event: &Event) -> Option<(String, crate::wire::Signal)> {
        None
    }
    /// Whether `policies` are valid overrides of this type's steps (known steps, valid values):
    /// what configuration may add to its start requests.
    fn validate_policies(
        &self,
        _policies: &BTreeMap<String, crate::policy::StepPolicyOverride>,
    ) -> Result<(), crate::wire::Invalid> {
        Ok(())
    }
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

/// The saga types a process runs, by name. Binaries build one from the types they serve: the
/// shop's orchestrator registers the shop's ([`crate::shop_types`]); another deployment (or a
/// test) registers its own beside or instead of them, and nothing else changes.
#[derive(Clone, Default)]
pub struct Registry {
    types: BTreeMap<&'static str, &'static dyn SagaType>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a saga type. Two types of one name are a programming error.
    pub fn with(mut self, t: &'static dyn SagaType) -> Self {
        assert!(
            self.types.insert(t.name(), t).is_none(),
            "saga type {} registered twice",
            t.name()
        );
        self
    }

    /// The registry without the types named in `names`; `Err` names one it does not have.
    pub fn without(mut self, names: &[&str]) -> Result<Self, String> {
        for name in names {
            if self.types.remove(*name).is_none() {
                let known: Vec<&str> = self.types.keys().copied().collect();
                return Err(format!(
                    "no saga type {name:?} to disable (this binary has: {})",
                    known.join(", ")
                ));
            }
        }
        Ok(self)
    }

    pub fn get(&self, name: &str) -> Option<&'static dyn SagaType> {
        self.types.get(name).copied()
    }

    pub fn types(&self) -> impl Iterator<Item = &'static dyn SagaType> + '_ {
        self.types.values().copied()
    }

    /// Every step of every type (a step name shared by several types is one breaker: one
    /// downstream).
    pub fn steps(&self) -> Vec<&'static str> {
        let mut steps: Vec<&'static str> = self
            .types()
            .flat_map(|t| t.steps().into_iter().map(|s| s.name))
            .collect();
        steps.sort_unstable();
        steps.dedup();
        steps
    }

    /// Every worker pool the registered types send commands to.
    pub fn services(&self) -> Vec<&'static str> {
        let mut services: Vec<&'static str> = self
            .types()
            .flat_map(|t| t.steps().into_iter().filter_map(|s| s.service))
            .collect();
        services.sort_unstable();
        services.dedup();
        services
    }

    /// The registered types an event of `source` and type `name` starts.
    pub fn triggered_by(&self, source: &str, name: &str) -> Vec<&'static dyn SagaType> {
        self.types()
            .filter(|t| {
                t.triggers()
                    .iter()
                    .any(|tr| tr.source == source && tr.event == name)
            })
            .collect()
    }

    /// The registered types that get an event of `source` and type `name` as a signal.
    pub fn signalled_by(&self, source: &str, name: &str) -> Vec<&'static dyn SagaType> {
        self.types()
            .filter(|t| {
                t.signal_triggers()
                    .iter()
                    .any(|tr| tr.source == source && tr.event == name)
            })
            .collect()
    }

    /// Every read-model table of the registered types.
    pub fn projections(&self) -> Vec<ProjectionTable> {
        let mut tables: Vec<ProjectionTable> = self
            .types()
            .flat_map(|t| t.projections().iter().copied())
            .collect();
        tables.sort_by_key(|t| t.table);
        tables.dedup();
        tables
    }
}
