//! A saga that runs a fixed sequence of steps, one at a time, and undoes the finished ones in
//! reverse when a step fails for good: the statig machine every step-by-step saga shares.
//!
//! A saga type is a [`Definition`]: its steps (each with a [`StepKind`], the service its
//! commands go to, a forward and an optional compensating action, an optional signal it awaits,
//! and a default [`StepPolicy`]), the data it carries, how that data becomes commands, read-model
//! rows and domain events. The machine does the rest:
//!
//! ```text
//!             ┌──────────────── forward ────────────────┐     ┌────────── unwinding ───────────┐
//!  start ──▶  │ running(step, attempt) ◀──┐             │     │ compensating(step, attempt) ◀┐ │
//!             │     │ retryable failure │             │ ──▶ │     │ retryable failure      │ │
//!             │     ▼ or deadline       │             │     │     ▼ or deadline            │ │
//!             │ retrying(step, attempt) ┘             │     │ compensation_retrying ───────┘ │
//!             │     │ success, the signal still due   │     └────────────────────────────────┘
//!             │     ▼                                 │
//!             │ awaiting(step) ── signal ─▶ next step │
//!             └───────────────────────────────────────┘
//!                   │ last step succeeded                 │ all undone     │ gave up
//!                   ▼                                     ▼                ▼
//!               completed                            compensated         failed
//!                                                                          │ resolved by
//!                                                                          ▼ an operator
//!                                                                       resolved
//! ```
//!
//! A permanent failure, exhausted attempts, a signal that reports a failure, an expired SLA or a
//! cancel move the saga from `forward` to `unwinding`. The step whose outcome is unknown (it
//! timed out, or was in flight when the cancel came) is compensated too: compensations are
//! idempotent and leave a tombstone, so a late command for that step finds it and does nothing.
//! A step that answered a *permanent* failure did nothing, so it is not compensated.
//!
//! **Signals.** A step may await a signal (something that happens in the world: a carrier's
//! scan), alone or after its command succeeded, under an SLA: a named timer armed when the step
//! starts, beside the step's deadline. A signal is applied when the current step awaits it; one
//! a later step awaits is buffered when that step says so; any other is recorded and ignored. A
//! signal whose id was seen before changes nothing (it is ignored, like a stale reply).
//!
//! **Operators** act on a saga by hand ([`api::OperatorInput`]). *Retry now* makes the attempt
//! the saga waits to make at once: it skips the backoff of a saga that is retrying, or sends
//! the attempt of a parked saga through its open breaker. *Recover* starts a new round of the
//! step a failed saga gave up on (its compensation, or a step after the pivot), with attempt
//! numbers that go on and the policy's attempts counted anew; the saga then goes on unwinding,
//! or forward. *Resolve* closes a failed saga by hand: it ends `resolved`, with who did it and
//! why. Anything else an operator asks is ignored, with a reason written for them.
//!
//! **Timers** are named: `step` (the deadline of the attempt in flight, or the backoff before the
//! next one) and `sla:<step>`. Their payload is this module's [`StepTimer`]; the engine never
//! looks inside.
//!
//! Handlers do no IO: they push [`Effect`]s into the [`Ctx`] passed as statig's context. There
//! are no entry or exit actions, so restoring a machine from its snapshot re-runs nothing.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use statig::blocking::StateMachine;
use statig::prelude::*;

use crate::api::{
    self, Effect, Env, EventStart, FiredTimer, Input, OperatorAction, OperatorInput, ProjectionRow,
    ProjectionTable, Status, StepInfo, Trigger, Verdict,
};
use crate::policy::{self, Policy, StepPolicy, StepPolicyOverride};
use crate::wire::{
    Body, Command, CommandId, Event, EventId, Invalid, Phase, Reply, ReplyOutcome, SCHEMA_VERSION,
    SagaId, Signal, SignalId, Timestamp,
};

/// The role a step plays in the saga, after Garcia-Molina's sagas and their later
/// "pivot" refinement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Has a compensating action; undone in reverse when a later step fails for good.
    Compensatable,
    /// The go/no-go point: once it succeeds the saga can only go forward (no cancel, no
    /// compensation). If it fails for good, the steps before it are compensated.
    Pivot,
    /// Comes after the pivot; retried until it succeeds, never compensated. If it cannot
    /// succeed, the saga waits for an operator.
    RetriableOnly,
}

impl StepKind {
    /// Its name, as serialized: `compensatable`, `pivot` or `retriable_only`.
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Compensatable => "compensatable",
            StepKind::Pivot => "pivot",
            StepKind::RetriableOnly => "retriable_only",
        }
    }
}

/// A signal a step waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Await {
    /// The signal's name.
    pub signal: &'static str,
    /// How long the step waits for it, from the moment the step starts; then the step fails
    /// (`sla_expired`). A saga's policies may override it (`sla_ms`).
    pub sla_ms: u64,
    /// Whether the signal is kept when it arrives before the step starts (a carrier that scans
    /// a parcel before the hand-over's reply came back), instead of being ignored.
    pub buffer: bool,
}

/// One step of a definition.
#[derive(Clone, Debug)]
pub struct StepDef {
    /// Stable name, used in commands, replies, timers, policies and the API.
    pub name: &'static str,
    pub kind: StepKind,
    /// The worker pool its commands go to; `None` for a step that only awaits a signal.
    pub service: Option<&'static str>,
    /// The forward action (for the API and the checks; the command itself comes from
    /// [`Definition::command`]).
    pub action: Option<&'static str>,
    /// The compensating action: required for [`StepKind::Compensatable`], absent for the others.
    pub compensation: Option<&'static str>,
    /// The signal the step waits for, if any (after its command succeeded, when it has one).
    pub awaits: Option<Await>,
    pub policy: StepPolicy,
}

/// How a saga ended, as the definition sees it when it emits its final events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End<'a> {
    Completed,
    Compensated { reason: &'a str },
    Failed { reason: &'a str },
}

/// A domain event as a definition emits it; the machine gives it its id and time.
#[derive(Clone, Debug, PartialEq)]
pub struct Emit {
    /// The service it belongs to, e.g. `order`.
    pub source: &'static str,
    /// Its type, e.g. `OrderConfirmed`.
    pub name: &'static str,
    pub body: Body,
}

/// Why a signal makes its step fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalFailure {
    pub code: String,
    pub reason: String,
}

/// How a saga that failed for good unwinds ([`Definition::on_failure`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Unwind {
    /// Before the pivot: undo the finished steps and end `compensated`. After it: undo nothing
    /// and end `failed`, for an operator to decide.
    #[default]
    Default,
    /// Undo the finished steps [`Definition::undo`] allows (after the pivot too), then end
    /// `failed`: the failure is a case for an operator even though what could be undone was
    /// (a parcel the carrier lost: the customer is refunded, someone must still look).
    Case,
}

/// Whether a step is undone when its saga unwinds ([`Definition::undo`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undo {
    /// Not undone.
    Keep,
    /// Undone if it was ever dispatched (its effect may have happened).
    IfDone,
    /// Undone even if it never ran: its compensation undoes something the saga owns whatever
    /// the step did (the compensations are idempotent and answer success when there was
    /// nothing to undo).
    Always,
}

/// A step-by-step saga type. Implemented by a marker type; the `Clone + Debug + PartialEq`
/// bounds only let the machine's storage derive those traits.
pub trait Definition: Clone + Debug + PartialEq + Send + Sync + 'static + Sized {
    /// Stored as the saga's type; never rename.
    const NAME: &'static str;
    /// The tables of its read model ([`Definition::project`] writes their rows).
    const PROJECTIONS: &'static [ProjectionTable] = &[];
    /// The domain events that start it ([`Definition::start_on`] says with what).
    const TRIGGERS: &'static [Trigger] = &[];
    /// What the saga carries from its start to its end.
    type Data: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync;
    /// The start request as the engine receives it (JSON).
    type Start: DeserializeOwned;

    fn steps() -> &'static [StepDef];
    fn init(start: Self::Start) -> Result<Self::Data, Invalid>;
    /// The command body (an object with its `action`) of `step` in `phase`, for `saga`.
    fn command(data: &Self::Data, saga: SagaId, step: &StepDef, phase: Phase) -> Body;
    /// Keep what a finished step handed back, if the definition needs it later.
    fn record(_data: &mut Self::Data, _step: &StepDef, _output: &Body) {}
    /// Keep what the compensation of a step handed back (that a refund was made), if the
    /// definition needs it later.
    fn record_undo(_data: &mut Self::Data, _step: &StepDef, _output: &Body) {}
    /// A signal the current step awaits has come: keep what it says, or say why it makes the
    /// step fail (a carrier reporting a lost parcel).
    fn on_signal(
        _data: &mut Self::Data,
        _step: &StepDef,
        _signal: &Signal,
    ) -> Result<(), SignalFailure> {
        Ok(())
    }
    /// The saga failed for good at `step` (not a cancel): keep what happened in `data` if the
    /// definition needs it, and say how the saga unwinds. Called once, when it turns around.
    fn on_failure(_data: &mut Self::Data, _step: &StepDef, _code: &str, _reason: &str) -> Unwind {
        Unwind::Default
    }
    /// Whether `step` is undone when the saga unwinds ([`Undo`]): by default when it was
    /// dispatched; a definition can keep a step whose effect cannot or need not be undone any
    /// more (stock that left the warehouse with its parcel is not restocked), or undo one that
    /// never ran, when its compensation undoes what the saga took over rather than what the
    /// step did (a fulfilment cancelled before its first step still refunds the checkout).
    fn undo(_data: &Self::Data, _step: &StepDef) -> Undo {
        Undo::IfDone
    }
    /// Before an attempt of step `next` is dispatched: `Some(earlier)` to do an earlier,
    /// finished step again first (for a checkout, to renew a stock reservation that could run
    /// out while the attempt is in flight). `in_flight` is how long the attempt may take at
    /// most before the saga gives up on it: its deadline times its dispatches.
    fn must_redo(
        _data: &Self::Data,
        _next: usize,
        _now: Timestamp,
        _in_flight: std::time::Duration,
    ) -> Option<usize> {
        None
    }
    /// The domain events to publish when the saga starts.
    fn on_start(_data: &Self::Data, _saga: SagaId) -> Vec<Emit> {
        Vec::new()
    }
    /// The domain events to publish when forward step `step` succeeds (each time it does: a
    /// step done again, e.g. a renewal, emits again, under another id).
    fn on_step_done(_data: &Self::Data, _saga: SagaId, _step: &StepDef) -> Vec<Emit> {
        Vec::new()
    }
    /// The domain events to publish when the saga ends.
    fn on_end(data: &Self::Data, saga: SagaId, end: End<'_>) -> Vec<Emit>;
    /// The business entity the saga runs for (for a checkout, its order id): stored and
    /// indexed with the saga so it can be found by it.
    fn subject(_data: &Self::Data) -> Option<String> {
        None
    }
    /// The saga `event` starts (one of [`Definition::TRIGGERS`]): its key (one saga per key)
    /// and its start request.
    fn start_on(_event: &Event) -> Option<EventStart> {
        None
    }
    /// The domain events that reach sagas of this type as signals ([`Definition::signal_on`]
    /// says which saga and which signal).
    const SIGNALS: &'static [Trigger] = &[];
    /// The signal `event` (one of [`Definition::SIGNALS`]) is, and the subject of the saga it is
    /// for (the newest saga of this type for that subject gets it). Its id must be derived from
    /// the event's, so that a redelivered event is applied once.
    fn signal_on(_event: &Event) -> Option<(String, Signal)> {
        None
    }
    /// The saga's rows in the tables of [`Definition::PROJECTIONS`], as it stands now.
    fn project(
        _data: &Self::Data,
        _saga: SagaId,
        _status: Status,
        _started_at: Timestamp,
    ) -> Vec<ProjectionRow> {
        Vec::new()
    }
}

/// The longest SLA a step may wait for its signal: thirty days.
const MAX_SLA_MS: u64 = 30 * 86_400_000;

/// Checks the rules a definition must follow; run by each definition's tests.
pub fn validate_definition(steps: &[StepDef]) -> Result<(), Invalid> {
    if steps.is_empty() {
        return Err(Invalid("a saga needs at least one step".into()));
    }
    let mut seen_pivot = false;
    for (i, s) in steps.iter().enumerate() {
        if steps[..i].iter().any(|o| o.name == s.name) {
            return Err(Invalid(format!("step {} is declared twice", s.name)));
        }
        if s.service.is_none() && (s.action.is_some() || s.compensation.is_some()) {
            return Err(Invalid(format!(
                "step {} has actions but no service to send them to",
                s.name
            )));
        }
        if s.action.is_none() && s.awaits.is_none() {
            return Err(Invalid(format!(
                "step {} neither sends a command nor awaits a signal",
                s.name
            )));
        }
        if let Some(a) = s.awaits
            && !(1_000..=MAX_SLA_MS).contains(&a.sla_ms)
        {
            return Err(Invalid(format!(
                "step {}: an SLA must be from 1 s to 30 days, got {} ms",
                s.name, a.sla_ms
            )));
        }
        match s.kind {
            StepKind::Compensatable if s.compensation.is_none() => {
                return Err(Invalid(format!(
                    "compensatable step {} has no compensation",
                    s.name
                )));
            }
            StepKind::Compensatable if seen_pivot => {
                return Err(Invalid(format!(
                    "compensatable step {} comes after the pivot",
                    s.name
                )));
            }
            StepKind::Pivot | StepKind::RetriableOnly if s.compensation.is_some() => {
                return Err(Invalid(format!(
                    "step {} is {:?} and cannot have a compensation",
                    s.name, s.kind
                )));
            }
            StepKind::Pivot if seen_pivot => {
                return Err(Invalid(format!("step {} is a second pivot", s.name)));
            }
            StepKind::RetriableOnly if !seen_pivot => {
                return Err(Invalid(format!(
                    "retriable-only step {} must come after a pivot",
                    s.name
                )));
            }
            StepKind::Pivot => seen_pivot = true,
            _ => {}
        }
        s.policy.forward.validate(s.name)?;
        s.policy.compensation.validate(s.name)?;
    }
    Ok(())
}

/// Where one step stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    /// A forward attempt is in flight.
    Running,
    /// Waiting for the backoff before the next forward attempt.
    Retrying,
    /// Waiting for the step's circuit breaker to close; the attempt is not spent.
    Parked,
    /// Its command (if any) succeeded; waiting for the signal it awaits.
    Awaiting,
    Succeeded,
    /// A worker answered a permanent failure: the effect did not and will not happen.
    Rejected,
    /// Given up (attempts exhausted, an SLA expired, a signal reported a failure, or cancelled
    /// in flight) without knowing whether the effect happened; it is compensated to be sure.
    Abandoned,
    Compensating,
    CompensationRetrying,
    CompensationParked,
    Compensated,
    CompensationFailed,
}

/// A step's failure as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    pub phase: Phase,
    pub attempt: u32,
    pub code: String,
    pub reason: String,
    pub at: Timestamp,
}

/// The history of one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub status: StepStatus,
    /// Forward attempts dispatched so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Compensation attempts dispatched so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compensation_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<StepError>,
    /// What the step's command handed back (an object with a `kind`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Body>,
    /// How often the step was done again because the definition asked (e.g. a stock
    /// reservation renewed before it expired).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub renewals: u32,
    /// The first forward attempt of the current round; attempts are counted from here.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub round_start: u32,
    /// The first compensation attempt of the current round: an operator who recovers a saga
    /// whose compensation failed starts a new round, with attempt numbers that go on (a
    /// command's id is derived from its attempt, and a worker would answer a reused one with
    /// the old failure) and its policy's `max_attempts` counted from here.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub compensation_round_start: u32,
    /// When the signal the step awaits came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_at: Option<Timestamp>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn one() -> u32 {
    1
}

impl StepRecord {
    fn round_start(&self, phase: Phase) -> u32 {
        match phase {
            Phase::Forward => self.round_start,
            Phase::Compensation => self.compensation_round_start,
        }
    }

    fn needs_compensation(&self, def: &StepDef) -> bool {
        def.compensation.is_some()
            && matches!(
                self.status,
                StepStatus::Succeeded | StepStatus::Abandoned | StepStatus::Awaiting
            )
    }
}

/// Why the saga left the forward path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub step: String,
    pub code: String,
    pub reason: String,
}

/// What became of a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalOutcome {
    /// The current step awaited it.
    Applied,
    /// A later step awaits it: kept until that step starts.
    Buffered,
    /// Nothing awaited it.
    Ignored,
}

/// How an operator closed a failed saga by hand ([`OperatorAction::Resolve`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// The operator's name.
    pub by: String,
    /// What they wrote about it.
    pub note: String,
    pub at: Timestamp,
}

/// A signal the saga received, and what became of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignalRecord {
    pub id: SignalId,
    pub name: String,
    pub at: Timestamp,
    pub outcome: SignalOutcome,
}

/// The payload of the durable timers of a step-by-step saga.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "timer", rename_all = "snake_case")]
pub enum StepTimer {
    /// The start-to-close deadline of one dispatch of an attempt: when it fires before the
    /// reply arrives, the command is sent again, or (after `redispatches`) the attempt counts
    /// as failed.
    StepDeadline {
        step: String,
        phase: Phase,
        attempt: u32,
        #[serde(default)]
        dispatch: u32,
    },
    /// The backoff between two attempts: when it fires, the next attempt is dispatched.
    StepRetry {
        step: String,
        phase: Phase,
        attempt: u32,
    },
    /// The SLA of the signal a step awaits: when it fires before the signal, the step fails.
    Sla { step: String },
}

impl StepTimer {
    /// The name of its slot: a step's deadline and retry share one, each SLA has its own.
    pub fn name(&self) -> String {
        match self {
            StepTimer::StepDeadline { .. } | StepTimer::StepRetry { .. } => STEP_TIMER.to_owned(),
            StepTimer::Sla { step } => sla_timer(step),
        }
    }

    fn payload(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self).expect("timers serialize") {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("a tagged enum serializes to an object"),
        }
    }

    fn of(fired: &FiredTimer) -> Option<Self> {
        serde_json::from_value(serde_json::Value::Object(fired.payload.clone())).ok()
    }
}

/// The timer slot of a step's deadline and retry.
pub const STEP_TIMER: &str = "step";

fn sla_timer(step: &str) -> String {
    format!("sla:{step}")
}

/// The statig context: what the handlers know of the world, and where they put their effects.
#[derive(Debug)]
pub struct Ctx {
    now: Timestamp,
    blocked: std::collections::BTreeSet<String>,
    effects: Vec<Effect>,
    ignored: Option<String>,
}

impl Ctx {
    fn new(env: &Env) -> Self {
        Self {
            now: env.now,
            blocked: env.blocked.clone(),
            effects: Vec::new(),
            ignored: None,
        }
    }

    fn ignore(&mut self, why: impl Into<String>) {
        self.ignored = Some(why.into());
    }

    fn set_timer(&mut self, timer: StepTimer, at: Timestamp) {
        self.effects.push(Effect::SetTimer {
            name: timer.name(),
            payload: timer.payload(),
            at,
        });
    }

    fn cancel_timer(&mut self, name: String) {
        self.effects.push(Effect::CancelTimer { name });
    }

    fn verdict(self) -> Verdict {
        match self.ignored {
            Some(why) => Verdict::Ignored(why),
            None => Verdict::Applied(self.effects),
        }
    }
}

/// The shared storage of the machine: everything a step-by-step saga knows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Stepwise<D: Definition> {
    pub id: SagaId,
    pub data: D::Data,
    /// Per-step overrides of the definition's policies, fixed when the saga started (most sagas
    /// have none: the snapshot stays small).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, StepPolicyOverride>,
    pub steps: Vec<StepRecord>,
    pub started_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub past_pivot: bool,
    /// The failure is a case for an operator ([`Unwind::Case`]): the saga ends `failed` once
    /// what could be undone is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub case: bool,
    /// The forward step whose breaker let this saga through when it resumed (a half-open
    /// breaker's probe, or a breaker that closed). Its next dispatch goes out even if the
    /// breaker blocks again meanwhile: a resumed saga may have to renew an earlier step first
    /// (a reservation that ran out while it was parked), and the probe must still reach the
    /// step it probes, or the breaker would never hear how that step is doing. An operator's
    /// retry now lets a parked step through the same way, a compensation too (it is sent at
    /// once, so the field never outlives that input then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub let_through: Option<String>,
    /// Every signal received, in order, with what became of it (also how a signal sent twice
    /// is told apart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<SignalRecord>,
    /// Signals a later step awaits, kept until it starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbox: Vec<Signal>,
    /// The SLA timers armed now, by name, to disarm when the saga leaves their step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slas: Vec<String>,
    /// Who closed the saga by hand, and why, once an operator resolved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    /// Counts the changes of `data` since the saga was started or restored ([`api::Saga::revision`]).
    #[serde(skip)]
    revision: Revision,
    #[serde(skip)]
    marker: PhantomData<fn() -> D>,
}

/// How often a live saga's data changed: a counter of this process, not part of the saga (two
/// sagas alike but for it are equal; a restored saga starts again from zero).
#[derive(Clone, Copy, Debug, Default)]
struct Revision(u64);

impl PartialEq for Revision {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Revision {
    fn bump(&mut self) {
        self.0 += 1;
    }
}

#[state_machine(
    initial = "State::running(0, 1, 0)",
    state(derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)),
    superstate(derive(Debug))
)]
impl<D: Definition> Stepwise<D> {
    /// Dispatch `dispatch` of forward attempt `attempt` is in flight; its deadline is armed.
    #[state(superstate = "forward")]
    fn running(
        &mut self,
        step: &mut usize,
        attempt: &mut u32,
        dispatch: &mut u32,
        context: &mut Ctx,
        event: &Input,
    ) -> Outcome<State> {
        self.awaiting_reply(context, event, Phase::Forward, *step, *attempt, *dispatch)
    }

    /// Waiting for the backoff timer before forward attempt `attempt`.
    #[state(superstate = "forward")]
    fn retrying(
        &mut self,
        step: &mut usize,
        attempt: &mut u32,
        context: &mut Ctx,
        event: &Input,
    ) -> Outcome<State> {
        self.backing_off(context, event, Phase::Forward, *step, *attempt)
    }

    /// The breaker of the step is open: forward attempt `attempt` waits, unspent, for a resume.
    #[state(superstate = "forward")]
    fn parked(
        &mut self,
        step: &mut usize,
        attempt: &mut u32,
        context: &mut Ctx,
        event: &Input,
    ) -> Outcome<State> {
        self.waiting_for_breaker(context, event, Phase::Forward, *step, *attempt)
    }

    /// The step's command (if it has one) is done; its signal has not come yet.
    #[state(superstate = "forward")]
    fn awaiting(&mut self, step: &mut usize, context: &mut Ctx, event: &Input) -> Outcome<State> {
        // The step is part of the state (where the saga is); what comes here is the same for
        // every step.
        let _ = step;
        match event {
            Input::Reply(_) => {
                context.ignore("reply to a step that is done; waiting for its signal");
                Handled
            }
            Input::Resume { .. } => {
                context.ignore("not parked");
                Handled
            }
            Input::Operator(op) => {
                let def = &D::steps()[*step];
                context.ignore(match op.action {
                    OperatorAction::RetryNow => format!(
                        "nothing is waiting to be retried: {} awaits its signal {}",
                        def.name,
                        def.awaits.map_or("", |a| a.signal)
                    ),
                    action => only_failed(action, Status::Running),
                });
                Handled
            }
            _ => Super,
        }
    }

    /// What the forward states share: signals, SLAs and cancels. A cancel turns the saga
    /// around, unless the pivot passed.
    #[superstate]
    fn forward(&mut self, step: &mut usize, context: &mut Ctx, event: &Input) -> Outcome<State> {
        let step = *step;
        match event {
            Input::Cancel { .. } if self.past_pivot => {
                context.ignore("the pivot step has succeeded; the saga can only complete");
                Handled
            }
            Input::Cancel { reason } => {
                self.cancel_reason = Some(reason.clone());
                // An attempt in flight, or one that timed out before the backoff, may still
                // take effect: a step that was ever dispatched is undone to be sure.
                self.steps[step].status = if self.steps[step].attempts > 0 {
                    StepStatus::Abandoned
                } else {
                    StepStatus::Pending
                };
                self.failure = Some(Failure {
                    step: self.name(step).to_owned(),
                    code: "cancelled".into(),
                    reason: reason.clone(),
                });
                self.compensate_next(context)
            }
            Input::Signal(signal) => self.on_signal(context, step, signal),
            Input::TimerFired(fired) => match StepTimer::of(fired) {
                Some(StepTimer::Sla { step: s })
                    if s == self.name(step) && self.slas.contains(&fired.name) =>
                {
                    self.slas.retain(|n| *n != fired.name);
                    let sla = self.sla_ms(step).unwrap_or_default();
                    let awaited = D::steps()[step].awaits.map_or("", |a| a.signal);
                    self.step_failed(
                        context,
                        step,
                        "sla_expired",
                        &format!("no {awaited} within {sla} ms"),
                    )
                }
                _ => {
                    context.ignore("stale timer");
                    Handled
                }
            },
            _ => {
                context.ignore("not meaningful while running");
                Handled
            }
        }
    }

    /// Dispatch `dispatch` of compensation attempt `attempt` is in flight.
    #[state(superstate = "unwinding")]
    fn compensating(
        &mut self,
        step: &mut usize,
        attempt: &mut u32,
        dispatch: &mut u32,
        context: &mut Ctx,
        event: &Input,
    ) -> Outcome<State> {
        self.awaiting_reply(
            context,
            event,
            Phase::Compensation,
            *step,
            *attempt,
            *dispatch,
        )
    }

    /// Waiting for the backoff timer before compensation attempt `attempt`.
    #[state(superstate = "unwinding")]
    fn compensation_retrying(
        &mut self,
        step: &mut usize,
        attempt: &mut u32,
        context: &mut Ctx,
        event: &Input,
    ) -> Outcome<State> {
        self.backing_off(context, event, Phase::Compensation, *step, *attempt)
    }

    /// The breaker of the step is open: compensation attempt `attempt` waits for a resume.
    #[state(superstate = "unwinding")]
    fn compensation_parked(
        &mut self,
        step: &mut usize,
        attempt: &mut u32,
        context: &mut Ctx,
        event: &Input,
    ) -> Outcome<State> {
        self.waiting_for_breaker(context, event, Phase::Compensation, *step, *attempt)
    }

    /// What the compensating states share: a cancel changes nothing, the saga is already
    /// undoing; a signal comes too late.
    #[superstate]
    fn unwinding(context: &mut Ctx, event: &Input) -> Outcome<State> {
        match event {
            Input::Cancel { .. } => context.ignore("already compensating"),
            Input::Signal(_) => {
                context.ignore("the saga is compensating; the signal comes too late")
            }
            _ => context.ignore("not meaningful while compensating"),
        }
        Handled
    }

    #[state(superstate = "ended")]
    fn completed(context: &mut Ctx, event: &Input) -> Outcome<State> {
        refuse_when_ended(context, event, Status::Completed)
    }

    #[state(superstate = "ended")]
    fn compensated(context: &mut Ctx, event: &Input) -> Outcome<State> {
        refuse_when_ended(context, event, Status::Compensated)
    }

    /// A compensation (or a step after the pivot) could not succeed: waiting for an operator,
    /// who recovers the saga (a new round of that step) or resolves it by hand.
    #[state(superstate = "ended")]
    fn failed(&mut self, context: &mut Ctx, event: &Input) -> Outcome<State> {
        match event {
            Input::Operator(op) => match op.action {
                OperatorAction::Recover => self.recover(context),
                OperatorAction::Resolve => self.resolve(context, op),
                OperatorAction::RetryNow => {
                    context.ignore(
                        "the saga has failed: nothing is waiting to be retried (recover it to \
                         start a new round of the step it gave up on)",
                    );
                    Handled
                }
            },
            _ => Super,
        }
    }

    /// A failed saga an operator closed by hand.
    #[state(superstate = "ended")]
    fn resolved(&self, context: &mut Ctx, event: &Input) -> Outcome<State> {
        match (event, &self.resolution) {
            (
                Input::Operator(OperatorInput {
                    action: OperatorAction::Resolve,
                    ..
                }),
                Some(r),
            ) => {
                context.ignore(format!(
                    "the saga was already resolved by hand, by {} at {}",
                    r.by,
                    r.at.to_rfc3339()
                ));
                Handled
            }
            _ => refuse_when_ended(context, event, Status::Resolved),
        }
    }

    /// Nothing moves an ended saga but an operator, and only a failed one: late replies,
    /// timers, signals and cancels are ignored.
    #[superstate]
    fn ended(context: &mut Ctx) -> Outcome<State> {
        context.ignore("the saga has ended");
        Handled
    }
}

/// Why an operator's `action` does not apply to a saga that is not failed but `status`.
fn only_failed(action: OperatorAction, status: Status) -> String {
    let status = status.as_str();
    match action {
        OperatorAction::Recover => {
            format!("only a failed saga can be recovered; this one is {status}")
        }
        OperatorAction::Resolve => {
            format!("only a failed saga can be resolved by hand; this one is {status}")
        }
        OperatorAction::RetryNow => {
            format!("nothing is waiting to be retried; the saga is {status}")
        }
    }
}

/// An operator's input to a saga that ended `status` (not failed) is ignored with what the
/// operator needs to read; anything else goes to the `ended` superstate.
fn refuse_when_ended(context: &mut Ctx, event: &Input, status: Status) -> Outcome<State> {
    match event {
        Input::Operator(op) => {
            context.ignore(match op.action {
                OperatorAction::RetryNow => {
                    format!("the saga has ended ({}): nothing to retry", status.as_str())
                }
                action => only_failed(action, status),
            });
            Handled
        }
        _ => Super,
    }
}

impl<D: Definition> Stepwise<D> {
    fn name(&self, step: usize) -> &'static str {
        D::steps()[step].name
    }

    /// An attempt is in flight: its reply or its deadline moves the saga.
    fn awaiting_reply(
        &mut self,
        ctx: &mut Ctx,
        event: &Input,
        phase: Phase,
        step: usize,
        attempt: u32,
        dispatch: u32,
    ) -> Outcome<State> {
        match event {
            Input::Reply(reply) => {
                if let Some(why) = self.fence(reply, step, phase, attempt) {
                    ctx.ignore(why);
                    return Handled;
                }
                let healthy = !matches!(
                    reply.outcome,
                    ReplyOutcome::Failed {
                        retryable: true,
                        ..
                    }
                );
                ctx.effects.push(Effect::Health {
                    step: self.name(step).to_owned(),
                    ok: healthy,
                });
                match (&reply.outcome, phase) {
                    (ReplyOutcome::Succeeded { output }, Phase::Forward) => {
                        self.command_succeeded(ctx, step, output)
                    }
                    (ReplyOutcome::Succeeded { output }, Phase::Compensation) => {
                        self.steps[step].status = StepStatus::Compensated;
                        self.revision.bump();
                        D::record_undo(&mut self.data, &D::steps()[step], output);
                        self.compensate_next(ctx)
                    }
                    (
                        ReplyOutcome::Failed {
                            retryable,
                            code,
                            reason,
                        },
                        _,
                    ) => self.attempt_failed(ctx, phase, step, attempt, *retryable, code, reason),
                }
            }
            Input::TimerFired(fired) => match StepTimer::of(fired) {
                Some(StepTimer::StepDeadline {
                    step: s,
                    phase: p,
                    attempt: a,
                    dispatch: d,
                }) if s == self.name(step) && p == phase && a == attempt && d == dispatch => {
                    ctx.effects.push(Effect::Health {
                        step: self.name(step).to_owned(),
                        ok: false,
                    });
                    let policy = self.policy(step, phase);
                    if dispatch < policy.redispatches {
                        // The reply may be lost, or the command: send the same command again.
                        self.dispatch(ctx, step, phase, attempt, dispatch + 1);
                        return Transition(match phase {
                            Phase::Forward => State::running(step, attempt, dispatch + 1),
                            Phase::Compensation => State::compensating(step, attempt, dispatch + 1),
                        });
                    }
                    let reason = format!(
                        "no reply within {} ms ({} dispatches)",
                        policy.deadline_ms,
                        dispatch + 1
                    );
                    self.attempt_failed(
                        ctx,
                        phase,
                        step,
                        attempt,
                        true,
                        "deadline_exceeded",
                        &reason,
                    )
                }
                _ => Super,
            },
            Input::Resume { .. } => {
                ctx.ignore("not parked");
                Handled
            }
            Input::Operator(op) => {
                ctx.ignore(match (op.action, phase) {
                    (OperatorAction::RetryNow, Phase::Forward) => format!(
                        "nothing is waiting to be retried: attempt {attempt} of {} is in flight",
                        self.name(step)
                    ),
                    (OperatorAction::RetryNow, Phase::Compensation) => format!(
                        "nothing is waiting to be retried: compensation attempt {attempt} of {} \
                         is in flight",
                        self.name(step)
                    ),
                    (action, phase) => only_failed(action, Self::status_in(phase)),
                });
                Handled
            }
            Input::Cancel { .. } | Input::Signal(_) => Super,
        }
    }

    /// The status of a saga that goes on in `phase` (not parked).
    fn status_in(phase: Phase) -> Status {
        match phase {
            Phase::Forward => Status::Running,
            Phase::Compensation => Status::Compensating,
        }
    }

    /// Waiting for a retry timer.
    fn backing_off(
        &mut self,
        ctx: &mut Ctx,
        event: &Input,
        phase: Phase,
        step: usize,
        attempt: u32,
    ) -> Outcome<State> {
        match event {
            Input::TimerFired(fired) => match StepTimer::of(fired) {
                Some(StepTimer::StepRetry {
                    step: s,
                    phase: p,
                    attempt: a,
                }) if s == self.name(step) && p == phase && a == attempt => match phase {
                    Phase::Forward => self.proceed(ctx, step),
                    Phase::Compensation => Transition(self.send(ctx, step, phase, attempt)),
                },
                _ => Super,
            },
            // The operator skips the backoff: what the retry timer would do, done now. The
            // new attempt's deadline replaces the retry timer in the step's slot, so the old
            // retry timer no longer fires (and would be stale if it did).
            Input::Operator(OperatorInput {
                action: OperatorAction::RetryNow,
                ..
            }) => match phase {
                Phase::Forward => self.proceed(ctx, step),
                Phase::Compensation => Transition(self.send(ctx, step, phase, attempt)),
            },
            Input::Operator(op) => {
                ctx.ignore(only_failed(op.action, Self::status_in(phase)));
                Handled
            }
            Input::Reply(_) => {
                ctx.ignore("reply to an earlier attempt while waiting to retry");
                Handled
            }
            Input::Resume { .. } => {
                ctx.ignore("not parked");
                Handled
            }
            Input::Cancel { .. } | Input::Signal(_) => Super,
        }
    }

    /// Parked on an open breaker.
    fn waiting_for_breaker(
        &mut self,
        ctx: &mut Ctx,
        event: &Input,
        phase: Phase,
        step: usize,
        attempt: u32,
    ) -> Outcome<State> {
        match event {
            Input::Resume { step: s } if s == self.name(step) => {
                if ctx.blocked.contains(s) {
                    ctx.ignore("the breaker is still open");
                    return Handled;
                }
                match phase {
                    Phase::Forward => {
                        self.let_through = Some(s.clone());
                        self.proceed(ctx, step)
                    }
                    Phase::Compensation => Transition(self.send(ctx, step, phase, attempt)),
                }
            }
            // The operator overrides the breaker: the attempt goes out now, as if the breaker
            // had let this saga through (and the breaker hears how it went from its reply).
            Input::Operator(OperatorInput {
                action: OperatorAction::RetryNow,
                ..
            }) => {
                self.let_through = Some(self.name(step).to_owned());
                match phase {
                    Phase::Forward => self.proceed(ctx, step),
                    Phase::Compensation => Transition(self.send(ctx, step, phase, attempt)),
                }
            }
            Input::Operator(op) => {
                ctx.ignore(only_failed(op.action, Status::Parked));
                Handled
            }
            Input::Cancel { .. } | Input::Signal(_) | Input::TimerFired(_) => Super,
            _ => {
                ctx.ignore("parked: waiting for the breaker");
                Handled
            }
        }
    }

    /// `Some(reason)` when a reply does not belong to the attempt the saga waits for.
    fn fence(&self, reply: &Reply, step: usize, phase: Phase, attempt: u32) -> Option<String> {
        let expected = CommandId::derive(self.id, self.name(step), phase, attempt);
        if reply.command_id == expected
            && reply.step == self.name(step)
            && reply.phase == phase
            && reply.attempt == attempt
        {
            None
        } else {
            Some(format!(
                "stale or duplicate reply: got {} {} attempt {}, waiting for {} {} attempt {}",
                reply.step,
                reply.phase.as_str(),
                reply.attempt,
                self.name(step),
                phase.as_str(),
                attempt
            ))
        }
    }

    /// The policy of `step` in `phase`: the definition's, with this saga's overrides.
    fn policy(&self, step: usize, phase: Phase) -> Policy {
        let def = &D::steps()[step];
        let o = self.policies.get(def.name);
        match phase {
            Phase::Forward => match o {
                Some(o) => o.forward.apply(&def.policy.forward),
                None => def.policy.forward.clone(),
            },
            Phase::Compensation => match o {
                Some(o) => o.compensation.apply(&def.policy.compensation),
                None => def.policy.compensation.clone(),
            },
        }
    }

    /// The SLA of the signal `step` awaits: the definition's, or this saga's override.
    fn sla_ms(&self, step: usize) -> Option<u64> {
        let def = &D::steps()[step];
        let awaits = def.awaits?;
        Some(
            self.policies
                .get(def.name)
                .and_then(|o| o.sla_ms)
                .unwrap_or(awaits.sla_ms),
        )
    }

    /// Start `step` going forward: arm the SLA of the signal it awaits (taking a signal that
    /// came early from the inbox), then dispatch its command, or wait for its signal.
    fn enter(&mut self, ctx: &mut Ctx, step: usize) -> Outcome<State> {
        // A step entered again after its signal came (an operator recovering a step whose
        // command failed once its signal was in) does not wait for it a second time.
        if let Some(awaits) = D::steps()[step].awaits
            && self.steps[step].signal_at.is_none()
        {
            if let Some(i) = self.inbox.iter().position(|s| s.name == awaits.signal) {
                let signal = self.inbox.remove(i);
                self.revision.bump();
                if let Err(f) = D::on_signal(&mut self.data, &D::steps()[step], &signal) {
                    return self.step_failed(ctx, step, &f.code, &f.reason);
                }
                self.steps[step].signal_at = Some(ctx.now);
            } else {
                let sla = self.sla_ms(step).unwrap_or(awaits.sla_ms);
                let timer = StepTimer::Sla {
                    step: self.name(step).to_owned(),
                };
                self.slas.push(timer.name());
                ctx.set_timer(timer, ctx.now + std::time::Duration::from_millis(sla));
            }
        }
        if D::steps()[step].action.is_some() {
            self.proceed(ctx, step)
        } else {
            self.command_done(ctx, step)
        }
    }

    /// Dispatch attempt `attempt` of `step` in `phase`, or park on the step when its breaker is
    /// open (the attempt is not spent) and it was not let through. Returns the state to move
    /// to.
    fn send(&mut self, ctx: &mut Ctx, step: usize, phase: Phase, attempt: u32) -> State {
        // A forward step is let through by a resume or an operator's retry now; a
        // compensation only by the operator, who sends it at once. (When the saga turns
        // around, `compensate_next` forgets a forward step's pass before it sends anything.)
        let let_through = self.let_through.as_deref() == Some(self.name(step));
        if ctx.blocked.contains(self.name(step)) && !let_through {
            self.steps[step].status = match phase {
                Phase::Forward => StepStatus::Parked,
                Phase::Compensation => StepStatus::CompensationParked,
            };
            ctx.cancel_timer(STEP_TIMER.to_owned());
            return match phase {
                Phase::Forward => State::parked(step, attempt),
                Phase::Compensation => State::compensation_parked(step, attempt),
            };
        }
        if let_through {
            self.let_through = None;
        }
        self.dispatch(ctx, step, phase, attempt, 0);
        match phase {
            Phase::Forward => State::running(step, attempt, 0),
            Phase::Compensation => State::compensating(step, attempt, 0),
        }
    }

    /// Send the command of `attempt` of `step` in `phase` and arm its deadline.
    fn dispatch(&mut self, ctx: &mut Ctx, step: usize, phase: Phase, attempt: u32, dispatch: u32) {
        let def = &D::steps()[step];
        let deadline = ctx.now + self.policy(step, phase).deadline();
        let record = &mut self.steps[step];
        match phase {
            Phase::Forward => {
                record.status = StepStatus::Running;
                record.attempts = attempt;
            }
            Phase::Compensation => {
                record.status = StepStatus::Compensating;
                record.compensation_attempts = attempt;
            }
        }
        ctx.effects.push(Effect::Dispatch(Command {
            v: SCHEMA_VERSION,
            saga_type: D::NAME.to_owned(),
            id: CommandId::derive(self.id, def.name, phase, attempt),
            saga_id: self.id,
            step: def.name.to_owned(),
            phase,
            attempt,
            dispatch,
            deadline,
            service: def.service.unwrap_or_default().to_owned(),
            partition: None,
            body: D::command(&self.data, self.id, def, phase),
        }));
        ctx.set_timer(
            StepTimer::StepDeadline {
                step: def.name.to_owned(),
                phase,
                attempt,
                dispatch,
            },
            deadline,
        );
    }

    /// Arm the backoff timer before attempt `next` of `step` in `phase`.
    fn schedule_retry(&mut self, ctx: &mut Ctx, step: usize, phase: Phase, next: u32) -> State {
        let name = self.name(step);
        let seed = policy::seed(&[
            self.id.as_uuid().as_bytes(),
            name.as_bytes(),
            phase.as_str().as_bytes(),
            &next.to_le_bytes(),
        ]);
        let retry = next.saturating_sub(self.steps[step].round_start(phase) + 1);
        let delay = self.policy(step, phase).backoff.delay(retry, seed);
        self.steps[step].status = match phase {
            Phase::Forward => StepStatus::Retrying,
            Phase::Compensation => StepStatus::CompensationRetrying,
        };
        ctx.set_timer(
            StepTimer::StepRetry {
                step: name.to_owned(),
                phase,
                attempt: next,
            },
            ctx.now + delay,
        );
        match phase {
            Phase::Forward => State::retrying(step, next),
            Phase::Compensation => State::compensation_retrying(step, next),
        }
    }

    /// The step's command succeeded: keep its output, then finish the step (or wait for its
    /// signal).
    fn command_succeeded(&mut self, ctx: &mut Ctx, step: usize, output: &Body) -> Outcome<State> {
        let def = &D::steps()[step];
        self.revision.bump();
        D::record(&mut self.data, def, output);
        self.steps[step].output = Some(output.clone());
        self.command_done(ctx, step)
    }

    /// The step's command is done (or it has none): it succeeded, unless it still waits for
    /// its signal.
    fn command_done(&mut self, ctx: &mut Ctx, step: usize) -> Outcome<State> {
        let def = &D::steps()[step];
        if def.awaits.is_some() && self.steps[step].signal_at.is_none() {
            self.steps[step].status = StepStatus::Awaiting;
            // No command of the saga is in flight while it waits: no deadline either.
            ctx.cancel_timer(STEP_TIMER.to_owned());
            return Transition(State::awaiting(step));
        }
        self.step_succeeded(ctx, step)
    }

    fn step_succeeded(&mut self, ctx: &mut Ctx, step: usize) -> Outcome<State> {
        let def = &D::steps()[step];
        self.steps[step].status = StepStatus::Succeeded;
        let emits = D::on_step_done(&self.data, self.id, def);
        let key = format!("{}/{}", def.name, self.steps[step].attempts);
        self.emit(ctx, &key, emits);
        if def.kind == StepKind::Pivot {
            self.past_pivot = true;
        }
        self.advance(ctx, step)
    }

    /// Move on to the first unfinished step after `after`, or end `completed`.
    fn advance(&mut self, ctx: &mut Ctx, after: usize) -> Outcome<State> {
        let n = D::steps().len();
        match (after + 1..n).find(|&i| self.steps[i].status != StepStatus::Succeeded) {
            Some(next) => self.enter(ctx, next),
            None => self.end(ctx, End::Completed),
        }
    }

    /// Dispatch the next forward attempt of `step`, unless the definition asks to do an earlier
    /// step again first (a stock reservation about to expire): then renew that one, and come
    /// back to `step` when it succeeded.
    fn proceed(&mut self, ctx: &mut Ctx, step: usize) -> Outcome<State> {
        let policy = self.policy(step, Phase::Forward);
        let in_flight = policy.deadline() * (policy.redispatches + 1);
        if let Some(redo) = D::must_redo(&self.data, step, ctx.now, in_flight)
            && redo < step
        {
            let record = &mut self.steps[redo];
            let attempt = record.attempts + 1;
            record.renewals += 1;
            record.round_start = attempt;
            return Transition(self.send(ctx, redo, Phase::Forward, attempt));
        }
        let attempt = self.steps[step].attempts + 1;
        Transition(self.send(ctx, step, Phase::Forward, attempt))
    }

    /// A signal arrived while the saga goes forward, at `step`.
    fn on_signal(&mut self, ctx: &mut Ctx, step: usize, signal: &Signal) -> Outcome<State> {
        if self.signals.iter().any(|s| s.id == signal.id) {
            ctx.ignore(format!(
                "signal {} ({}) was received before",
                signal.id, signal.name
            ));
            return Handled;
        }
        let def = &D::steps()[step];
        let awaited_now = def.awaits.is_some_and(|a| a.signal == signal.name)
            && self.steps[step].signal_at.is_none();
        let buffered_for_later = !awaited_now
            && D::steps()[step + 1..].iter().enumerate().any(|(i, d)| {
                d.awaits
                    .is_some_and(|a| a.signal == signal.name && a.buffer)
                    && self.steps[step + 1 + i].signal_at.is_none()
            })
            && !self.inbox.iter().any(|s| s.name == signal.name);
        let outcome = if awaited_now {
            SignalOutcome::Applied
        } else if buffered_for_later {
            SignalOutcome::Buffered
        } else {
            SignalOutcome::Ignored
        };
        self.signals.push(SignalRecord {
            id: signal.id,
            name: signal.name.clone(),
            at: ctx.now,
            outcome,
        });
        match outcome {
            SignalOutcome::Ignored => Handled,
            SignalOutcome::Buffered => {
                self.inbox.push(signal.clone());
                Handled
            }
            SignalOutcome::Applied => {
                let name = sla_timer(def.name);
                if self.slas.contains(&name) {
                    self.slas.retain(|n| *n != name);
                    ctx.cancel_timer(name);
                }
                self.revision.bump();
                if let Err(f) = D::on_signal(&mut self.data, def, signal) {
                    return self.step_failed(ctx, step, &f.code, &f.reason);
                }
                self.steps[step].signal_at = Some(ctx.now);
                if self.steps[step].status == StepStatus::Awaiting {
                    self.step_succeeded(ctx, step)
                } else {
                    // The command is still on its way: the step succeeds with its reply.
                    Handled
                }
            }
        }
    }

    /// `step` failed for good without a worker saying so (its SLA expired, or its signal
    /// reported a failure): its effect may have happened, so a step that was ever dispatched
    /// is undone.
    fn step_failed(
        &mut self,
        ctx: &mut Ctx,
        step: usize,
        code: &str,
        reason: &str,
    ) -> Outcome<State> {
        ctx.cancel_timer(STEP_TIMER.to_owned());
        let attempt = self.steps[step].attempts;
        self.steps[step].last_error = Some(StepError {
            phase: Phase::Forward,
            attempt,
            code: code.to_owned(),
            reason: reason.to_owned(),
            at: ctx.now,
        });
        self.steps[step].status = if attempt > 0 {
            StepStatus::Abandoned
        } else {
            StepStatus::Rejected
        };
        self.turn_around(ctx, step, code, reason)
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt_failed(
        &mut self,
        ctx: &mut Ctx,
        phase: Phase,
        step: usize,
        attempt: u32,
        retryable: bool,
        code: &str,
        reason: &str,
    ) -> Outcome<State> {
        self.steps[step].last_error = Some(StepError {
            phase,
            attempt,
            code: code.to_owned(),
            reason: reason.to_owned(),
            at: ctx.now,
        });
        let policy = self.policy(step, phase);
        let in_round = attempt + 1 - self.steps[step].round_start(phase);
        if retryable && in_round < policy.max_attempts {
            return Transition(self.schedule_retry(ctx, step, phase, attempt + 1));
        }
        let name = self.name(step);
        if phase == Phase::Compensation {
            self.steps[step].status = StepStatus::CompensationFailed;
            let reason = if retryable {
                format!("compensation of {name} gave up after {in_round} attempts: {reason}")
            } else {
                format!("compensation of {name} failed: {reason}")
            };
            return self.end(ctx, End::Failed { reason: &reason });
        }
        let (status, why) = if retryable {
            (
                StepStatus::Abandoned,
                format!("gave up after {in_round} attempts: {reason}"),
            )
        } else {
            (StepStatus::Rejected, reason.to_owned())
        };
        self.steps[step].status = status;
        self.turn_around(ctx, step, code, &why)
    }

    /// Leave the forward path because `step` failed for good: compensate, or, past the pivot,
    /// end `failed` for an operator.
    fn turn_around(&mut self, ctx: &mut Ctx, step: usize, code: &str, why: &str) -> Outcome<State> {
        let name = self.name(step);
        self.failure = Some(Failure {
            step: name.to_owned(),
            code: code.to_owned(),
            reason: why.to_owned(),
        });
        self.revision.bump();
        let def = &D::steps()[step];
        self.case = D::on_failure(&mut self.data, def, code, why) == Unwind::Case;
        if self.past_pivot && !self.case {
            // After the pivot there is nothing to undo and no way back: an operator decides.
            let reason = format!("{name} could not complete: {why}");
            return self.end(ctx, End::Failed { reason: &reason });
        }
        self.compensate_next(ctx)
    }

    /// Disarm every SLA timer armed now.
    fn cancel_slas(&mut self, ctx: &mut Ctx) {
        for name in std::mem::take(&mut self.slas) {
            ctx.cancel_timer(name);
        }
    }

    /// Compensate the highest step that needs it, or end `compensated`.
    fn compensate_next(&mut self, ctx: &mut Ctx) -> Outcome<State> {
        self.let_through = None;
        self.cancel_slas(ctx);
        // A forward step left behind in the middle of an attempt (waiting to retry or parked,
        // when the saga turned around on another step, e.g. a renewal that failed) may still
        // take effect: its command can be in a queue. It is undone to be sure, like a step
        // abandoned in flight; one never dispatched has nothing to undo.
        for record in &mut self.steps {
            if matches!(
                record.status,
                StepStatus::Running | StepStatus::Retrying | StepStatus::Parked
            ) {
                record.status = if record.attempts > 0 {
                    StepStatus::Abandoned
                } else {
                    StepStatus::Pending
                };
            }
        }
        for step in (0..D::steps().len()).rev() {
            let def = &D::steps()[step];
            let record = &self.steps[step];
            let undo = match D::undo(&self.data, def) {
                Undo::Keep => false,
                Undo::IfDone => record.needs_compensation(def),
                Undo::Always => {
                    def.compensation.is_some()
                        && !matches!(
                            record.status,
                            StepStatus::Compensated | StepStatus::CompensationFailed
                        )
                }
            };
            if undo {
                return Transition(self.send(ctx, step, Phase::Compensation, 1));
            }
        }
        let reason = self.unwind_reason();
        if self.case {
            let reason = match &self.failure {
                Some(f) => format!("{} could not complete: {}", f.step, f.reason),
                None => reason,
            };
            return self.end(ctx, End::Failed { reason: &reason });
        }
        self.end(ctx, End::Compensated { reason: &reason })
    }

    /// An operator recovers a failed saga: a new round of the step it gave up on, with its
    /// attempts counted anew, after which the saga goes on as it would have: a compensation
    /// that failed is sent again and the saga unwinds on; a step after the pivot is tried
    /// again and the saga goes on forward.
    fn recover(&mut self, ctx: &mut Ctx) -> Outcome<State> {
        // A pass through a breaker is for the dispatch it was given for, not for this round.
        self.let_through = None;
        if let Some(step) = self
            .steps
            .iter()
            .position(|r| r.status == StepStatus::CompensationFailed)
        {
            // The attempt number goes on: the command's id is derived from it, and the worker,
            // which dedups commands by id, would answer attempt 1 with its old failure.
            let record = &mut self.steps[step];
            let attempt = record.compensation_attempts + 1;
            record.compensation_round_start = attempt;
            return Transition(self.send(ctx, step, Phase::Compensation, attempt));
        }
        let forward = match &self.failure {
            Some(f) if self.past_pivot && !self.case => D::steps()
                .iter()
                .position(|d| d.name == f.step)
                .filter(|&s| {
                    matches!(
                        self.steps[s].status,
                        StepStatus::Rejected | StepStatus::Abandoned
                    )
                }),
            _ => None,
        };
        let Some(step) = forward else {
            ctx.ignore(match &self.failure {
                // The definition made the failure a case ([`Unwind::Case`]): what could be
                // undone was, so there is no step to go on with.
                Some(f) if self.case => format!(
                    "nothing to recover: {} failed and what could be undone was; the case is \
                     for an operator to handle, then to resolve",
                    f.step
                ),
                _ => "nothing to recover: no compensation failed, and no step after the pivot"
                    .to_owned(),
            });
            return Handled;
        };
        // The saga goes forward again as if the step had not failed: the failure is history,
        // kept in the step's last error and the event log.
        self.failure = None;
        let record = &mut self.steps[step];
        record.round_start = record.attempts + 1;
        record.status = StepStatus::Pending;
        self.enter(ctx, step)
    }

    /// An operator closes a failed saga by hand: who, why and when are kept; nothing else
    /// happens (no domain event: what the saga could not do was done by hand, elsewhere).
    fn resolve(&mut self, ctx: &mut Ctx, op: &OperatorInput) -> Outcome<State> {
        self.resolution = Some(Resolution {
            by: op.by.clone(),
            note: op.reason.clone(),
            at: ctx.now,
        });
        // A saga disarms its timers when it fails; disarm them again, as an end does, so that
        // a resolved saga leaves certainly none behind.
        ctx.cancel_timer(STEP_TIMER.to_owned());
        self.cancel_slas(ctx);
        Transition(State::resolved())
    }

    fn unwind_reason(&self) -> String {
        match (&self.cancel_reason, &self.failure) {
            (Some(r), _) => format!("cancelled: {r}"),
            (None, Some(f)) => format!("{} failed: {}", f.step, f.reason),
            (None, None) => "compensated".into(),
        }
    }

    /// Push the definition's events. Their ids are derived from the saga, `key` (where in the
    /// saga they come from; the end's is empty, as it always was) and their place in the list.
    fn emit(&self, ctx: &mut Ctx, key: &str, emits: Vec<Emit>) {
        for (i, emit) in emits.into_iter().enumerate() {
            let name = if key.is_empty() {
                format!("{}#{i}", emit.name)
            } else {
                format!("{key}:{}#{i}", emit.name)
            };
            ctx.effects.push(Effect::Emit(Event {
                id: EventId::derive(self.id, &name),
                name: emit.name.to_owned(),
                v: SCHEMA_VERSION,
                occurred_at: ctx.now,
                source: emit.source.to_owned(),
                correlation_id: None,
                body: emit.body,
            }));
        }
    }

    fn end(&mut self, ctx: &mut Ctx, end: End<'_>) -> Outcome<State> {
        ctx.cancel_timer(STEP_TIMER.to_owned());
        self.cancel_slas(ctx);
        let emits = D::on_end(&self.data, self.id, end.clone());
        self.emit(ctx, "", emits);
        Transition(match end {
            End::Completed => State::completed(),
            End::Compensated { .. } => State::compensated(),
            End::Failed { .. } => State::failed(),
        })
    }
}

/// The persisted form of a leaf state. Kept apart from statig's generated `State` so that the
/// storage format does not change when the machine's code does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum StateSnapshot {
    Running {
        step: usize,
        attempt: u32,
        #[serde(default)]
        dispatch: u32,
    },
    Retrying {
        step: usize,
        attempt: u32,
    },
    Parked {
        step: usize,
        attempt: u32,
    },
    Awaiting {
        step: usize,
    },
    Compensating {
        step: usize,
        attempt: u32,
        #[serde(default)]
        dispatch: u32,
    },
    CompensationRetrying {
        step: usize,
        attempt: u32,
    },
    CompensationParked {
        step: usize,
        attempt: u32,
    },
    Completed,
    Compensated,
    Failed,
    Resolved,
}

impl StateSnapshot {
    fn of(state: &State) -> Self {
        match *state {
            State::Running {
                step,
                attempt,
                dispatch,
            } => Self::Running {
                step,
                attempt,
                dispatch,
            },
            State::Retrying { step, attempt } => Self::Retrying { step, attempt },
            State::Parked { step, attempt } => Self::Parked { step, attempt },
            State::Awaiting { step } => Self::Awaiting { step },
            State::Compensating {
                step,
                attempt,
                dispatch,
            } => Self::Compensating {
                step,
                attempt,
                dispatch,
            },
            State::CompensationRetrying { step, attempt } => {
                Self::CompensationRetrying { step, attempt }
            }
            State::CompensationParked { step, attempt } => {
                Self::CompensationParked { step, attempt }
            }
            State::Completed {} => Self::Completed,
            State::Compensated {} => Self::Compensated,
            State::Failed {} => Self::Failed,
            State::Resolved {} => Self::Resolved,
        }
    }

    fn state(&self) -> State {
        match *self {
            Self::Running {
                step,
                attempt,
                dispatch,
            } => State::running(step, attempt, dispatch),
            Self::Retrying { step, attempt } => State::retrying(step, attempt),
            Self::Parked { step, attempt } => State::parked(step, attempt),
            Self::Awaiting { step } => State::awaiting(step),
            Self::Compensating {
                step,
                attempt,
                dispatch,
            } => State::compensating(step, attempt, dispatch),
            Self::CompensationRetrying { step, attempt } => {
                State::compensation_retrying(step, attempt)
            }
            Self::CompensationParked { step, attempt } => State::compensation_parked(step, attempt),
            Self::Completed => State::completed(),
            Self::Compensated => State::compensated(),
            Self::Failed => State::failed(),
            Self::Resolved => State::resolved(),
        }
    }

    /// The step the saga is at, if it is not ended.
    pub fn step(&self) -> Option<usize> {
        match *self {
            Self::Running { step, .. }
            | Self::Retrying { step, .. }
            | Self::Parked { step, .. }
            | Self::Awaiting { step }
            | Self::Compensating { step, .. }
            | Self::CompensationRetrying { step, .. }
            | Self::CompensationParked { step, .. } => Some(step),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Running { .. } => "running",
            Self::Retrying { .. } => "retrying",
            Self::Parked { .. } => "parked",
            Self::Awaiting { .. } => "awaiting",
            Self::Compensating { .. } => "compensating",
            Self::CompensationRetrying { .. } => "compensation_retrying",
            Self::CompensationParked { .. } => "compensation_parked",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
            Self::Resolved => "resolved",
        }
    }

    pub fn status(&self) -> Status {
        match self {
            Self::Running { .. } | Self::Retrying { .. } | Self::Awaiting { .. } => Status::Running,
            Self::Compensating { .. } | Self::CompensationRetrying { .. } => Status::Compensating,
            Self::Parked { .. } | Self::CompensationParked { .. } => Status::Parked,
            Self::Completed => Status::Completed,
            Self::Compensated => Status::Compensated,
            Self::Failed => Status::Failed,
            Self::Resolved => Status::Resolved,
        }
    }
}

/// The versioned snapshot of a step-by-step saga, as stored in `sagas.snapshot`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Snapshot<D: Definition> {
    /// Bumped when the layout changes; [`Instance::restore`] reads every version it knows.
    pub format: u32,
    pub state: StateSnapshot,
    #[serde(flatten)]
    pub saga: Stepwise<D>,
}

impl<D: Definition> Snapshot<D> {
    pub const FORMAT: u32 = 1;
}

/// [`Snapshot`] by reference, for writing it without copying the saga.
#[derive(Serialize)]
#[serde(bound = "")]
struct SnapshotRef<'a, D: Definition> {
    format: u32,
    state: StateSnapshot,
    #[serde(flatten)]
    saga: &'a Stepwise<D>,
}

/// The start request of any step-by-step saga: the definition's own fields plus optional
/// per-step policy overrides (from the orchestrator's configuration).
#[derive(Deserialize)]
struct StartRequest<S> {
    #[serde(flatten)]
    start: S,
    #[serde(default)]
    policies: BTreeMap<String, StepPolicyOverride>,
}

/// A live step-by-step saga: the statig machine and its shared storage.
pub struct Instance<D: Definition> {
    machine: StateMachine<Stepwise<D>>,
}

impl<D: Definition> Clone for Instance<D> {
    fn clone(&self) -> Self {
        Self {
            machine: self.machine.clone(),
        }
    }
}

impl<D: Definition> Debug for Instance<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("state", self.machine.state())
            .field("saga", self.machine.inner())
            .finish()
    }
}

/// Checks per-step overrides against a definition: every step named exists, and every policy
/// they make is valid.
pub fn validate_overrides<D: Definition>(
    policies: &BTreeMap<String, StepPolicyOverride>,
) -> Result<(), Invalid> {
    let steps = D::steps();
    if let Some(unknown) = policies
        .keys()
        .find(|k| !steps.iter().any(|s| s.name == k.as_str()))
    {
        let names: Vec<&str> = steps.iter().map(|s| s.name).collect();
        return Err(Invalid(format!(
            "policy for unknown step {unknown:?} (steps: {})",
            names.join(", ")
        )));
    }
    for def in steps {
        if let Some(o) = policies.get(def.name) {
            o.forward
                .apply(&def.policy.forward)
                .validate(def.name)
                .and_then(|()| {
                    o.compensation
                        .apply(&def.policy.compensation)
                        .validate(def.name)
                })?;
            if let Some(sla) = o.sla_ms {
                if def.awaits.is_none() {
                    return Err(Invalid(format!(
                        "{}: sla_ms for a step that awaits no signal",
                        def.name
                    )));
                }
                if !(1_000..=MAX_SLA_MS).contains(&sla) {
                    return Err(Invalid(format!(
                        "{}: an SLA must be from 1 s to 30 days, got {sla} ms",
                        def.name
                    )));
                }
            }
        }
    }
    Ok(())
}

impl<D: Definition> Instance<D> {
    /// Start a saga: validate the request, fix its policies, and enter the first step.
    pub fn start(
        id: SagaId,
        request: &serde_json::Value,
        env: &Env,
    ) -> Result<(Self, Vec<Effect>), api::Error> {
        let now = env.now;
        let request: StartRequest<D::Start> = serde_json::from_value(request.clone())
            .map_err(|e| api::Error::InvalidStart(e.to_string()))?;
        let data = D::init(request.start).map_err(|e| api::Error::InvalidStart(e.0))?;
        let steps = D::steps();
        validate_overrides::<D>(&request.policies).map_err(|e| api::Error::InvalidStart(e.0))?;
        let policies = request
            .policies
            .into_iter()
            .filter(|(_, o)| *o != StepPolicyOverride::default())
            .collect();
        let mut saga = Stepwise::<D> {
            id,
            data,
            policies,
            steps: steps
                .iter()
                .map(|s| StepRecord {
                    name: s.name.to_owned(),
                    status: StepStatus::Pending,
                    attempts: 0,
                    compensation_attempts: 0,
                    last_error: None,
                    output: None,
                    renewals: 0,
                    round_start: 1,
                    compensation_round_start: 1,
                    signal_at: None,
                })
                .collect(),
            started_at: now,
            cancel_reason: None,
            failure: None,
            past_pivot: false,
            case: false,
            let_through: None,
            signals: Vec::new(),
            inbox: Vec::new(),
            slas: Vec::new(),
            resolution: None,
            revision: Revision::default(),
            marker: PhantomData,
        };
        let mut ctx = Ctx::new(env);
        let emits = D::on_start(&saga.data, saga.id);
        saga.emit(&mut ctx, "start", emits);
        let state = match saga.enter(&mut ctx, 0) {
            Transition(state) => state,
            _ => unreachable!("entering the first step moves the saga"),
        };
        let instance = Self::assemble(saga, state)?;
        Ok((instance, ctx.effects))
    }

    /// Rebuild a saga from its snapshot.
    pub fn restore(snapshot: &serde_json::Value) -> Result<Self, api::Error> {
        let snapshot: Snapshot<D> = serde_json::from_value(snapshot.clone())
            .map_err(|e| api::Error::Snapshot(e.to_string()))?;
        if snapshot.format != Snapshot::<D>::FORMAT {
            return Err(api::Error::Snapshot(format!(
                "unknown snapshot format {}",
                snapshot.format
            )));
        }
        let n = D::steps().len();
        if snapshot.saga.steps.len() != n {
            return Err(api::Error::Snapshot(format!(
                "snapshot has {} steps, the definition {n}",
                snapshot.saga.steps.len()
            )));
        }
        if snapshot.state.step().is_some_and(|s| s >= n) {
            return Err(api::Error::Snapshot(
                "state names a step out of range".into(),
            ));
        }
        Self::assemble(snapshot.saga, snapshot.state.state())
    }

    /// Put shared storage and a leaf state together into a statig machine. statig builds a
    /// machine in a given state only through its serde support, so the two parts go through a
    /// JSON value; this runs on start, restore and cache misses, never per input.
    fn assemble(saga: Stepwise<D>, state: State) -> Result<Self, api::Error> {
        let value =
            serde_json::to_value((saga, state)).map_err(|e| api::Error::Snapshot(e.to_string()))?;
        let machine: StateMachine<Stepwise<D>> =
            serde_json::from_value(value).map_err(|e| api::Error::Snapshot(e.to_string()))?;
        Ok(Self { machine })
    }

    pub fn saga(&self) -> &Stepwise<D> {
        self.machine.inner()
    }

    pub fn state(&self) -> StateSnapshot {
        StateSnapshot::of(self.machine.state())
    }

    /// The snapshot, borrowing the machine's storage (no copy).
    fn snapshot_ref(&self) -> SnapshotRef<'_, D> {
        SnapshotRef {
            format: Snapshot::<D>::FORMAT,
            state: self.state(),
            saga: self.machine.inner(),
        }
    }

    pub fn to_snapshot(&self) -> Snapshot<D> {
        Snapshot {
            format: Snapshot::<D>::FORMAT,
            state: self.state(),
            saga: self.machine.inner().clone(),
        }
    }

    /// Feed one input.
    pub fn handle(&mut self, input: &Input, env: &Env) -> Verdict {
        let mut ctx = Ctx::new(env);
        self.machine.handle_with_context(input, &mut ctx);
        ctx.verdict()
    }
}

impl<D: Definition> api::Saga for Instance<D> {
    fn id(&self) -> SagaId {
        self.machine.inner().id
    }

    fn apply(&mut self, input: &Input, env: &Env) -> Verdict {
        self.handle(input, env)
    }

    fn parked_on(&self) -> Option<&'static str> {
        match self.state() {
            StateSnapshot::Parked { step, .. } | StateSnapshot::CompensationParked { step, .. } => {
                Some(D::steps()[step].name)
            }
            _ => None,
        }
    }

    fn snapshot(&self) -> serde_json::Value {
        serde_json::to_value(self.snapshot_ref()).expect("a snapshot always serializes")
    }

    fn snapshot_json(&self) -> String {
        serde_json::to_string(&self.snapshot_ref()).expect("a snapshot always serializes")
    }

    fn subject(&self) -> Option<String> {
        D::subject(&self.machine.inner().data)
    }

    fn projection(&self) -> Vec<ProjectionRow> {
        let saga = self.machine.inner();
        D::project(&saga.data, saga.id, self.status(), saga.started_at)
    }

    fn revision(&self) -> Option<u64> {
        Some(self.machine.inner().revision.0)
    }

    fn status(&self) -> Status {
        self.state().status()
    }

    fn state_name(&self) -> &'static str {
        self.state().name()
    }

    /// Asks the machine itself: each action is applied to a copy of the saga, so the answer
    /// is the verdict the saga would give, never a second opinion that could drift from it.
    fn operator_actions(&self, now: Timestamp) -> Vec<(OperatorAction, Result<(), String>)> {
        OperatorAction::ALL
            .into_iter()
            .map(|action| {
                let input = Input::Operator(OperatorInput {
                    by: String::new(),
                    reason: String::new(),
                    action,
                });
                let verdict = match self.clone().handle(&input, &Env::at(now)) {
                    Verdict::Applied(_) => Ok(()),
                    Verdict::Ignored(why) => Err(why),
                };
                (action, verdict)
            })
            .collect()
    }

    fn clone_box(&self) -> Box<dyn api::Saga> {
        Box::new(self.clone())
    }
}

/// The [`api::SagaType`] of a definition.
pub struct Type<D>(PhantomData<fn() -> D>);

impl<D> Type<D> {
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<D> Default for Type<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Definition> api::SagaType for Type<D> {
    fn name(&self) -> &'static str {
        D::NAME
    }

    fn steps(&self) -> Vec<StepInfo> {
        D::steps()
            .iter()
            .map(|s| StepInfo {
                name: s.name,
                service: s.service,
                kind: s.kind.as_str(),
                action: s.action,
                compensation: s.compensation,
                awaits: s.awaits.map(|a| a.signal),
            })
            .collect()
    }

    fn projections(&self) -> &'static [ProjectionTable] {
        D::PROJECTIONS
    }

    fn triggers(&self) -> &'static [Trigger] {
        D::TRIGGERS
    }

    fn start_on(&self, event: &Event) -> Option<EventStart> {
        D::start_on(event)
    }

    fn signal_triggers(&self) -> &'static [Trigger] {
        D::SIGNALS
    }

    fn validate_policies(
        &self,
        policies: &BTreeMap<String, StepPolicyOverride>,
    ) -> Result<(), Invalid> {
        validate_overrides::<D>(policies)
    }

    fn signal_on(&self, event: &Event) -> Option<(String, Signal)> {
        D::signal_on(event)
    }

    fn start(
        &self,
        id: SagaId,
        request: &serde_json::Value,
        env: &Env,
    ) -> Result<(Box<dyn api::Saga>, Vec<Effect>), api::Error> {
        let (instance, effects) = Instance::<D>::start(id, request, env)?;
        Ok((Box::new(instance), effects))
    }

    fn restore(&self, snapshot: &serde_json::Value) -> Result<Box<dyn api::Saga>, api::Error> {
        Ok(Box::new(Instance::<D>::restore(snapshot)?))
    }
}
