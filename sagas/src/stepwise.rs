//! A saga that runs a fixed sequence of steps, one at a time, and undoes the finished ones in
//! reverse when a step fails for good: the statig machine every step-by-step saga shares.
//!
//! A saga type is a [`Definition`]: its steps (each with a [`StepKind`], a forward action, an
//! optional compensating action and a default [`StepPolicy`]), the data it carries, how that data
//! becomes commands, and the domain events it emits when it ends. The machine does the rest:
//!
//! ```text
//!             ┌──────────── forward ────────────┐     ┌────────── unwinding ───────────┐
//!  start ──▶  │ running(step, attempt) ◀──┐     │     │ compensating(step, attempt) ◀┐ │
//!             │     │ retryable failure │     │ ──▶ │     │ retryable failure      │ │
//!             │     ▼ or deadline       │     │     │     ▼ or deadline            │ │
//!             │ retrying(step, attempt) ┘     │     │ compensation_retrying ───────┘ │
//!             └───────────────────────────────┘     └────────────────────────────────┘
//!                   │ last step succeeded                 │ all undone     │ gave up
//!                   ▼                                     ▼                ▼
//!               completed                            compensated         failed
//! ```
//!
//! A permanent failure, exhausted attempts or a cancel move the saga from `forward` to
//! `unwinding`. The step whose outcome is unknown (it timed out, or was in flight when the
//! cancel came) is compensated too: compensations are idempotent and leave a tombstone, so a
//! late command for that step finds it and does nothing. A step that answered a *permanent*
//! failure did nothing, so it is not compensated.
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

use crate::api::{self, Effect, Input, Status, Timer, Verdict};
use crate::policy::{self, Policy, StepPolicy, StepPolicyOverride};
use crate::wire::{
    Action, Command, CommandBody, CommandId, DomainEvent, Event, EventId, Invalid, Phase, Reply,
    ReplyOutcome, SagaId, StepOutput, Timestamp,
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

/// One step of a definition.
#[derive(Clone, Debug)]
pub struct StepDef {
    /// Stable name, used in commands, replies, timers, policies and the API.
    pub name: &'static str,
    pub kind: StepKind,
    pub action: Action,
    /// Required for [`StepKind::Compensatable`], absent for the others.
    pub compensation: Option<Action>,
    pub policy: StepPolicy,
}

/// How a saga ended, as the definition sees it when it emits its final events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End<'a> {
    Completed,
    Compensated { reason: &'a str },
    Failed { reason: &'a str },
}

/// A step-by-step saga type. Implemented by a marker type; the `Clone + Debug + PartialEq`
/// bounds only let the machine's storage derive those traits.
pub trait Definition: Clone + Debug + PartialEq + Send + Sync + 'static + Sized {
    /// Stored as the saga's type; never rename.
    const NAME: &'static str;
    /// What the saga carries from its start to its end.
    type Data: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync;
    /// The start request as the engine receives it (JSON).
    type Start: DeserializeOwned;

    fn steps() -> &'static [StepDef];
    fn init(start: Self::Start) -> Result<Self::Data, Invalid>;
    /// The command body of `step` in `phase`.
    fn command(data: &Self::Data, step: &StepDef, phase: Phase) -> CommandBody;
    /// Keep what a finished step handed back, if the definition needs it later.
    fn record(_data: &mut Self::Data, _step: &StepDef, _output: &StepOutput) {}
    /// The domain events to publish when the saga ends.
    fn on_end(data: &Self::Data, saga: SagaId, end: End<'_>) -> Vec<DomainEvent>;
}

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
    Succeeded,
    /// A worker answered a permanent failure: the effect did not and will not happen.
    Rejected,
    /// Given up (attempts exhausted, or cancelled in flight) without knowing whether the effect
    /// happened; it is compensated to be sure.
    Abandoned,
    Compensating,
    CompensationRetrying,
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub status: StepStatus,
    /// Forward attempts dispatched so far.
    pub attempts: u32,
    /// Compensation attempts dispatched so far.
    pub compensation_attempts: u32,
    pub last_error: Option<StepError>,
    pub output: Option<StepOutput>,
}

impl StepRecord {
    fn needs_compensation(&self, def: &StepDef) -> bool {
        def.compensation.is_some()
            && matches!(self.status, StepStatus::Succeeded | StepStatus::Abandoned)
    }
}

/// Why the saga left the forward path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub step: String,
    pub code: String,
    pub reason: String,
}

/// The statig context: where handlers put their effects.
#[derive(Debug)]
pub struct Ctx {
    now: Timestamp,
    effects: Vec<Effect>,
    ignored: Option<String>,
}

impl Ctx {
    fn new(now: Timestamp) -> Self {
        Self {
            now,
            effects: Vec::new(),
            ignored: None,
        }
    }

    fn ignore(&mut self, why: impl Into<String>) {
        self.ignored = Some(why.into());
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
    pub policies: Vec<StepPolicy>,
    pub steps: Vec<StepRecord>,
    pub started_at: Timestamp,
    pub cancel_reason: Option<String>,
    pub failure: Option<Failure>,
    pub past_pivot: bool,
    #[serde(skip)]
    marker: PhantomData<fn() -> D>,
}

#[state_machine(
    initial = "State::running(0, 1)",
    state(derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)),
    superstate(derive(Debug))
)]
impl<D: Definition> Stepwise<D> {
    /// A forward attempt is in flight; its deadline timer is armed.
    #[state(superstate = "forward")]
    fn running(
        &mut self,
        step: &mut usize,
        attempt: &mut u32,
        context: &mut Ctx,
        event: &Input,
    ) -> Outcome<State> {
        let (step, attempt) = (*step, *attempt);
        match event {
            Input::Reply(reply) => {
                if let Some(why) = self.fence(reply, step, Phase::Forward, attempt) {
                    context.ignore(why);
                    return Handled;
                }
                match &reply.outcome {
                    ReplyOutcome::Succeeded { output } => {
                        self.step_succeeded(context, step, output)
                    }
                    ReplyOutcome::Failed {
                        retryable,
                        code,
                        reason,
                    } => self.forward_failed(context, step, attempt, *retryable, code, reason),
                }
            }
            Input::TimerFired(Timer::StepDeadline {
                step: s,
                phase: Phase::Forward,
                attempt: a,
            }) if s == self.name(step) && *a == attempt => {
                let reason = format!(
                    "no reply within {} ms",
                    self.policies[step].forward.deadline_ms
                );
                self.forward_failed(context, step, attempt, true, "deadline_exceeded", &reason)
            }
            Input::TimerFired(_) => {
                context.ignore("stale timer");
                Handled
            }
            Input::Cancel { .. } => Super,
        }
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
        let (step, attempt) = (*step, *attempt);
        match event {
            Input::TimerFired(Timer::StepRetry {
                step: s,
                phase: Phase::Forward,
                attempt: a,
            }) if s == self.name(step) && *a == attempt => {
                self.dispatch(context, step, Phase::Forward, attempt);
                Transition(State::running(step, attempt))
            }
            Input::Reply(_) => {
                context.ignore("reply to an earlier attempt while waiting to retry");
                Handled
            }
            Input::TimerFired(_) => {
                context.ignore("stale timer");
                Handled
            }
            Input::Cancel { .. } => Super,
        }
    }

    /// What the forward states share: a cancel turns the saga around, unless the pivot passed.
    #[superstate]
    fn forward(&mut self, step: &mut usize, context: &mut Ctx, event: &Input) -> Outcome<State> {
        match event {
            Input::Cancel { reason } if self.past_pivot => {
                let _ = reason;
                context.ignore("the pivot step has succeeded; the saga can only complete");
                Handled
            }
            Input::Cancel { reason } => {
                let step = *step;
                self.cancel_reason = Some(reason.clone());
                // An attempt in flight, or one that timed out before the backoff, may still take
                // effect: the step is undone to be sure.
                self.steps[step].status = StepStatus::Abandoned;
                self.failure = Some(Failure {
                    step: self.name(step).to_owned(),
                    code: "cancelled".into(),
                    reason: reason.clone(),
                });
                self.compensate_from(context, Some(step))
            }
            _ => {
                context.ignore("not meaningful while running");
                Handled
            }
        }
    }

    /// A compensation attempt is in flight; its deadline timer is armed.
    #[state(superstate = "unwinding")]
    fn compensating(
        &mut self,
        step: &mut usize,
        attempt: &mut u32,
        context: &mut Ctx,
        event: &Input,
    ) -> Outcome<State> {
        let (step, attempt) = (*step, *attempt);
        match event {
            Input::Reply(reply) => {
                if let Some(why) = self.fence(reply, step, Phase::Compensation, attempt) {
                    context.ignore(why);
                    return Handled;
                }
                match &reply.outcome {
                    ReplyOutcome::Succeeded { .. } => {
                        self.steps[step].status = StepStatus::Compensated;
                        self.compensate_from(context, step.checked_sub(1))
                    }
                    ReplyOutcome::Failed {
                        retryable,
                        code,
                        reason,
                    } => self.compensation_failed(context, step, attempt, *retryable, code, reason),
                }
            }
            Input::TimerFired(Timer::StepDeadline {
                step: s,
                phase: Phase::Compensation,
                attempt: a,
            }) if s == self.name(step) && *a == attempt => {
                let reason = format!(
                    "no reply within {} ms",
                    self.policies[step].compensation.deadline_ms
                );
                self.compensation_failed(context, step, attempt, true, "deadline_exceeded", &reason)
            }
            Input::TimerFired(_) => {
                context.ignore("stale timer");
                Handled
            }
            Input::Cancel { .. } => Super,
        }
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
        let (step, attempt) = (*step, *attempt);
        match event {
            Input::TimerFired(Timer::StepRetry {
                step: s,
                phase: Phase::Compensation,
                attempt: a,
            }) if s == self.name(step) && *a == attempt => {
                self.dispatch(context, step, Phase::Compensation, attempt);
                Transition(State::compensating(step, attempt))
            }
            Input::Reply(_) => {
                context.ignore("reply to an earlier attempt while waiting to retry");
                Handled
            }
            Input::TimerFired(_) => {
                context.ignore("stale timer");
                Handled
            }
            Input::Cancel { .. } => Super,
        }
    }

    /// What the compensating states share: a cancel changes nothing, the saga is already undoing.
    #[superstate]
    fn unwinding(context: &mut Ctx, event: &Input) -> Outcome<State> {
        match event {
            Input::Cancel { .. } => context.ignore("already compensating"),
            _ => context.ignore("not meaningful while compensating"),
        }
        Handled
    }

    #[state(superstate = "ended")]
    fn completed() -> Outcome<State> {
        Super
    }

    #[state(superstate = "ended")]
    fn compensated() -> Outcome<State> {
        Super
    }

    /// A compensation (or a step after the pivot) could not succeed: waiting for an operator.
    #[state(superstate = "ended")]
    fn failed() -> Outcome<State> {
        Super
    }

    /// Nothing moves an ended saga: late replies, timers and cancels are ignored.
    #[superstate]
    fn ended(context: &mut Ctx) -> Outcome<State> {
        context.ignore("the saga has ended");
        Handled
    }
}

impl<D: Definition> Stepwise<D> {
    fn name(&self, step: usize) -> &'static str {
        D::steps()[step].name
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

    fn policy(&self, step: usize, phase: Phase) -> &Policy {
        match phase {
            Phase::Forward => &self.policies[step].forward,
            Phase::Compensation => &self.policies[step].compensation,
        }
    }

    /// Send attempt `attempt` of `step` in `phase` and arm its deadline.
    fn dispatch(&mut self, ctx: &mut Ctx, step: usize, phase: Phase, attempt: u32) {
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
            id: CommandId::derive(self.id, def.name, phase, attempt),
            saga_id: self.id,
            step: def.name.to_owned(),
            phase,
            attempt,
            deadline,
            body: D::command(&self.data, def, phase),
        }));
        ctx.effects.push(Effect::SetTimer {
            timer: Timer::StepDeadline {
                step: def.name.to_owned(),
                phase,
                attempt,
            },
            at: deadline,
        });
    }

    /// Arm the backoff timer before attempt `next` of `step` in `phase`.
    fn schedule_retry(&mut self, ctx: &mut Ctx, step: usize, phase: Phase, next: u32) {
        let name = self.name(step);
        let seed = policy::seed(&[
            self.id.as_uuid().as_bytes(),
            name.as_bytes(),
            phase.as_str().as_bytes(),
            &next.to_le_bytes(),
        ]);
        let delay = self.policy(step, phase).backoff.delay(next - 2, seed);
        self.steps[step].status = match phase {
            Phase::Forward => StepStatus::Retrying,
            Phase::Compensation => StepStatus::CompensationRetrying,
        };
        ctx.effects.push(Effect::SetTimer {
            timer: Timer::StepRetry {
                step: name.to_owned(),
                phase,
                attempt: next,
            },
            at: ctx.now + delay,
        });
    }

    fn record_error(
        &mut self,
        ctx: &Ctx,
        step: usize,
        phase: Phase,
        attempt: u32,
        code: &str,
        reason: &str,
    ) {
        self.steps[step].last_error = Some(StepError {
            phase,
            attempt,
            code: code.to_owned(),
            reason: reason.to_owned(),
            at: ctx.now,
        });
    }

    fn step_succeeded(
        &mut self,
        ctx: &mut Ctx,
        step: usize,
        output: &StepOutput,
    ) -> Outcome<State> {
        let def = &D::steps()[step];
        D::record(&mut self.data, def, output);
        let record = &mut self.steps[step];
        record.status = StepStatus::Succeeded;
        record.output = Some(output.clone());
        if def.kind == StepKind::Pivot {
            self.past_pivot = true;
        }
        let next = step + 1;
        if next < D::steps().len() {
            self.dispatch(ctx, next, Phase::Forward, 1);
            Transition(State::running(next, 1))
        } else {
            self.end(ctx, End::Completed)
        }
    }

    fn forward_failed(
        &mut self,
        ctx: &mut Ctx,
        step: usize,
        attempt: u32,
        retryable: bool,
        code: &str,
        reason: &str,
    ) -> Outcome<State> {
        self.record_error(ctx, step, Phase::Forward, attempt, code, reason);
        let max = self.policies[step].forward.max_attempts;
        if retryable && attempt < max {
            self.schedule_retry(ctx, step, Phase::Forward, attempt + 1);
            return Transition(State::retrying(step, attempt + 1));
        }
        let (status, why) = if retryable {
            (
                StepStatus::Abandoned,
                format!("gave up after {attempt} attempts: {reason}"),
            )
        } else {
            (StepStatus::Rejected, reason.to_owned())
        };
        self.steps[step].status = status;
        self.failure = Some(Failure {
            step: self.name(step).to_owned(),
            code: code.to_owned(),
            reason: why.clone(),
        });
        if self.past_pivot {
            // After the pivot there is nothing to undo and no way back: an operator decides.
            let reason = format!("{} could not complete: {why}", self.name(step));
            return self.end(ctx, End::Failed { reason: &reason });
        }
        self.compensate_from(ctx, Some(step))
    }

    fn compensation_failed(
        &mut self,
        ctx: &mut Ctx,
        step: usize,
        attempt: u32,
        retryable: bool,
        code: &str,
        reason: &str,
    ) -> Outcome<State> {
        self.record_error(ctx, step, Phase::Compensation, attempt, code, reason);
        let max = self.policies[step].compensation.max_attempts;
        if retryable && attempt < max {
            self.schedule_retry(ctx, step, Phase::Compensation, attempt + 1);
            return Transition(State::compensation_retrying(step, attempt + 1));
        }
        self.steps[step].status = StepStatus::CompensationFailed;
        let reason = if retryable {
            format!(
                "compensation of {} gave up after {attempt} attempts: {reason}",
                self.name(step)
            )
        } else {
            format!("compensation of {} failed: {reason}", self.name(step))
        };
        self.end(ctx, End::Failed { reason: &reason })
    }

    /// Compensate the highest step at or below `from` that needs it, or end `compensated`.
    fn compensate_from(&mut self, ctx: &mut Ctx, from: Option<usize>) -> Outcome<State> {
        if let Some(from) = from {
            for step in (0..=from).rev() {
                if self.steps[step].needs_compensation(&D::steps()[step]) {
                    self.dispatch(ctx, step, Phase::Compensation, 1);
                    return Transition(State::compensating(step, 1));
                }
            }
        }
        let reason = self.unwind_reason();
        self.end(ctx, End::Compensated { reason: &reason })
    }

    fn unwind_reason(&self) -> String {
        match (&self.cancel_reason, &self.failure) {
            (Some(r), _) => format!("cancelled: {r}"),
            (None, Some(f)) => format!("{} failed: {}", f.step, f.reason),
            (None, None) => "compensated".into(),
        }
    }

    fn end(&mut self, ctx: &mut Ctx, end: End<'_>) -> Outcome<State> {
        ctx.effects.push(Effect::CancelTimer { key: "step".into() });
        for (i, event) in D::on_end(&self.data, self.id, end.clone())
            .into_iter()
            .enumerate()
        {
            let name = format!("{}#{i}", event.name());
            ctx.effects.push(Effect::Emit(Event {
                id: EventId::derive(self.id, &name),
                occurred_at: ctx.now,
                event,
            }));
        }
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
    Running { step: usize, attempt: u32 },
    Retrying { step: usize, attempt: u32 },
    Compensating { step: usize, attempt: u32 },
    CompensationRetrying { step: usize, attempt: u32 },
    Completed,
    Compensated,
    Failed,
}

impl StateSnapshot {
    fn of(state: &State) -> Self {
        match *state {
            State::Running { step, attempt } => Self::Running { step, attempt },
            State::Retrying { step, attempt } => Self::Retrying { step, attempt },
            State::Compensating { step, attempt } => Self::Compensating { step, attempt },
            State::CompensationRetrying { step, attempt } => {
                Self::CompensationRetrying { step, attempt }
            }
            State::Completed {} => Self::Completed,
            State::Compensated {} => Self::Compensated,
            State::Failed {} => Self::Failed,
        }
    }

    fn state(&self) -> State {
        match *self {
            Self::Running { step, attempt } => State::running(step, attempt),
            Self::Retrying { step, attempt } => State::retrying(step, attempt),
            Self::Compensating { step, attempt } => State::compensating(step, attempt),
            Self::CompensationRetrying { step, attempt } => {
                State::compensation_retrying(step, attempt)
            }
            Self::Completed => State::completed(),
            Self::Compensated => State::compensated(),
            Self::Failed => State::failed(),
        }
    }

    fn step(&self) -> Option<usize> {
        match *self {
            Self::Running { step, .. }
            | Self::Retrying { step, .. }
            | Self::Compensating { step, .. }
            | Self::CompensationRetrying { step, .. } => Some(step),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Running { .. } => "running",
            Self::Retrying { .. } => "retrying",
            Self::Compensating { .. } => "compensating",
            Self::CompensationRetrying { .. } => "compensation_retrying",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
        }
    }

    pub fn status(&self) -> Status {
        match self {
            Self::Running { .. } | Self::Retrying { .. } => Status::Running,
            Self::Compensating { .. } | Self::CompensationRetrying { .. } => Status::Compensating,
            Self::Completed => Status::Completed,
            Self::Compensated => Status::Compensated,
            Self::Failed => Status::Failed,
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

impl<D: Definition> Instance<D> {
    /// Start a saga: validate the request, fix its policies, and dispatch the first step.
    pub fn start(
        id: SagaId,
        request: &serde_json::Value,
        now: Timestamp,
    ) -> Result<(Self, Vec<Effect>), api::Error> {
        let request: StartRequest<D::Start> = serde_json::from_value(request.clone())
            .map_err(|e| api::Error::InvalidStart(e.to_string()))?;
        let data = D::init(request.start).map_err(|e| api::Error::InvalidStart(e.0))?;
        let steps = D::steps();
        if let Some(unknown) = request
            .policies
            .keys()
            .find(|k| !steps.iter().any(|s| s.name == k.as_str()))
        {
            return Err(api::Error::InvalidStart(format!(
                "policy for unknown step {unknown:?}"
            )));
        }
        let mut policies = Vec::with_capacity(steps.len());
        for def in steps {
            let policy = match request.policies.get(def.name) {
                Some(o) => StepPolicy {
                    forward: o.forward.apply(&def.policy.forward),
                    compensation: o.compensation.apply(&def.policy.compensation),
                },
                None => def.policy.clone(),
            };
            policy
                .forward
                .validate(def.name)
                .and_then(|()| policy.compensation.validate(def.name))
                .map_err(|e| api::Error::InvalidStart(e.0))?;
            policies.push(policy);
        }
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
                })
                .collect(),
            started_at: now,
            cancel_reason: None,
            failure: None,
            past_pivot: false,
            marker: PhantomData,
        };
        let mut ctx = Ctx::new(now);
        saga.dispatch(&mut ctx, 0, Phase::Forward, 1);
        let instance = Self::assemble(saga, State::running(0, 1))?;
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
        if snapshot.saga.steps.len() != n || snapshot.saga.policies.len() != n {
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

    pub fn to_snapshot(&self) -> Snapshot<D> {
        Snapshot {
            format: Snapshot::<D>::FORMAT,
            state: self.state(),
            saga: self.machine.inner().clone(),
        }
    }

    /// Feed one input.
    pub fn handle(&mut self, input: &Input, now: Timestamp) -> Verdict {
        let mut ctx = Ctx::new(now);
        self.machine.handle_with_context(input, &mut ctx);
        ctx.verdict()
    }
}

impl<D: Definition> api::Saga for Instance<D> {
    fn id(&self) -> SagaId {
        self.machine.inner().id
    }

    fn apply(&mut self, input: &Input, now: Timestamp) -> Verdict {
        self.handle(input, now)
    }

    fn snapshot(&self) -> serde_json::Value {
        serde_json::to_value(self.to_snapshot()).expect("a snapshot always serializes")
    }

    fn status(&self) -> Status {
        self.state().status()
    }

    fn state_name(&self) -> &'static str {
        self.state().name()
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

    fn start(
        &self,
        id: SagaId,
        request: &serde_json::Value,
        now: Timestamp,
    ) -> Result<(Box<dyn api::Saga>, Vec<Effect>), api::Error> {
        let (instance, effects) = Instance::<D>::start(id, request, now)?;
        Ok((Box::new(instance), effects))
    }

    fn restore(&self, snapshot: &serde_json::Value) -> Result<Box<dyn api::Saga>, api::Error> {
        Ok(Box::new(Instance::<D>::restore(snapshot)?))
    }
}
