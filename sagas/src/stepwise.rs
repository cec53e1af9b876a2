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

use crate::api::{self, Effect, Env, Input, Status, Timer, Verdict};
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
    /// The domain events to publish when the saga ends.
    fn on_end(data: &Self::Data, saga: SagaId, end: End<'_>) -> Vec<DomainEvent>;
    /// The business entity the saga runs for (for a checkout, its order id): stored and
    /// indexed with the saga so it can be found by it.
    fn subject(_data: &Self::Data) -> Option<String> {
        None
    }
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
    /// Waiting for the step's circuit breaker to close; the attempt is not spent.
    Parked,
    Succeeded,
    /// A worker answered a permanent failure: the effect did not and will not happen.
    Rejected,
    /// Given up (attempts exhausted, or cancelled in flight) without knowing whether the effect
    /// happened; it is compensated to be sure.
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<StepOutput>,
    /// How often the step was done again because the definition asked (e.g. a stock
    /// reservation renewed before it expired).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub renewals: u32,
    /// The first forward attempt of the current round; attempts are counted from here.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub round_start: u32,
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
            Phase::Compensation => 1,
        }
    }

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
    /// The forward step whose breaker let this saga through when it resumed (a half-open
    /// breaker's probe, or a breaker that closed). Its next dispatch goes out even if the
    /// breaker blocks again meanwhile: a resumed saga may have to renew an earlier step first
    /// (a reservation that ran out while it was parked), and the probe must still reach the
    /// step it probes, or the breaker would never hear how that step is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub let_through: Option<String>,
    #[serde(skip)]
    marker: PhantomData<fn() -> D>,
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
        self.awaiting(context, event, Phase::Forward, *step, *attempt, *dispatch)
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

    /// What the forward states share: a cancel turns the saga around, unless the pivot passed.
    #[superstate]
    fn forward(&mut self, step: &mut usize, context: &mut Ctx, event: &Input) -> Outcome<State> {
        match event {
            Input::Cancel { .. } if self.past_pivot => {
                context.ignore("the pivot step has succeeded; the saga can only complete");
                Handled
            }
            Input::Cancel { reason } => {
                let step = *step;
                self.cancel_reason = Some(reason.clone());
                // An attempt in flight, or one that timed out before the backoff, may still
                // take effect: a step that was ever dispatched is undone to be sure.
                if self.steps[step].attempts > 0 {
                    self.steps[step].status = StepStatus::Abandoned;
                } else {
                    self.steps[step].status = StepStatus::Pending;
                }
                self.failure = Some(Failure {
                    step: self.name(step).to_owned(),
                    code: "cancelled".into(),
                    reason: reason.clone(),
                });
                self.compensate_next(context)
            }
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
        self.awaiting(
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

    /// An attempt is in flight: its reply or its deadline moves the saga.
    fn awaiting(
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
                match (&reply.outcome, phase) {
                    (ReplyOutcome::Succeeded { output }, Phase::Forward) => {
                        self.step_succeeded(ctx, step, output)
                    }
                    (ReplyOutcome::Succeeded { .. }, Phase::Compensation) => {
                        self.steps[step].status = StepStatus::Compensated;
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
            Input::TimerFired(Timer::StepDeadline {
                step: s,
                phase: p,
                attempt: a,
                dispatch: d,
            }) if s == self.name(step) && *p == phase && *a == attempt && *d == dispatch => {
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
            Input::TimerFired(_) => {
                ctx.ignore("stale timer");
                Handled
            }
            Input::Resume { .. } => {
                ctx.ignore("not parked");
                Handled
            }
            Input::Cancel { .. } => Super,
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
            Input::TimerFired(Timer::StepRetry {
                step: s,
                phase: p,
                attempt: a,
            }) if s == self.name(step) && *p == phase && *a == attempt => match phase {
                Phase::Forward => self.proceed(ctx, step),
                Phase::Compensation => Transition(self.send(ctx, step, phase, attempt)),
            },
            Input::Reply(_) => {
                ctx.ignore("reply to an earlier attempt while waiting to retry");
                Handled
            }
            Input::TimerFired(_) => {
                ctx.ignore("stale timer");
                Handled
            }
            Input::Resume { .. } => {
                ctx.ignore("not parked");
                Handled
            }
            Input::Cancel { .. } => Super,
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
            Input::Cancel { .. } => Super,
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

    /// Dispatch attempt `attempt` of `step` in `phase`, or park on the step when its breaker is
    /// open (the attempt is not spent). Returns the state to move to.
    fn send(&mut self, ctx: &mut Ctx, step: usize, phase: Phase, attempt: u32) -> State {
        let let_through =
            phase == Phase::Forward && self.let_through.as_deref() == Some(self.name(step));
        if ctx.blocked.contains(self.name(step)) && !let_through {
            self.steps[step].status = match phase {
                Phase::Forward => StepStatus::Parked,
                Phase::Compensation => StepStatus::CompensationParked,
            };
            ctx.effects.push(Effect::CancelTimer { key: "step".into() });
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
            id: CommandId::derive(self.id, def.name, phase, attempt),
            saga_id: self.id,
            step: def.name.to_owned(),
            phase,
            attempt,
            dispatch,
            deadline,
            body: D::command(&self.data, def, phase),
        }));
        ctx.effects.push(Effect::SetTimer {
            timer: Timer::StepDeadline {
                step: def.name.to_owned(),
                phase,
                attempt,
                dispatch,
            },
            at: deadline,
        });
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
        ctx.effects.push(Effect::SetTimer {
            timer: Timer::StepRetry {
                step: name.to_owned(),
                phase,
                attempt: next,
            },
            at: ctx.now + delay,
        });
        match phase {
            Phase::Forward => State::retrying(step, next),
            Phase::Compensation => State::compensation_retrying(step, next),
        }
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
        self.advance(ctx, step)
    }

    /// Move on to the first unfinished step after `after`, or end `completed`.
    fn advance(&mut self, ctx: &mut Ctx, after: usize) -> Outcome<State> {
        let n = D::steps().len();
        match (after + 1..n).find(|&i| self.steps[i].status != StepStatus::Succeeded) {
            Some(next) => self.proceed(ctx, next),
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
        self.failure = Some(Failure {
            step: name.to_owned(),
            code: code.to_owned(),
            reason: why.clone(),
        });
        if self.past_pivot {
            // After the pivot there is nothing to undo and no way back: an operator decides.
            let reason = format!("{name} could not complete: {why}");
            return self.end(ctx, End::Failed { reason: &reason });
        }
        self.compensate_next(ctx)
    }

    /// Compensate the highest step that needs it, or end `compensated`.
    fn compensate_next(&mut self, ctx: &mut Ctx) -> Outcome<State> {
        self.let_through = None;
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
            if self.steps[step].needs_compensation(&D::steps()[step]) {
                return Transition(self.send(ctx, step, Phase::Compensation, 1));
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
        }
    }

    /// The step the saga is at, if it is not ended.
    pub fn step(&self) -> Option<usize> {
        match *self {
            Self::Running { step, .. }
            | Self::Retrying { step, .. }
            | Self::Parked { step, .. }
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
            Self::Compensating { .. } => "compensating",
            Self::CompensationRetrying { .. } => "compensation_retrying",
            Self::CompensationParked { .. } => "compensation_parked",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
        }
    }

    pub fn status(&self) -> Status {
        match self {
            Self::Running { .. } | Self::Retrying { .. } => Status::Running,
            Self::Compensating { .. } | Self::CompensationRetrying { .. } => Status::Compensating,
            Self::Parked { .. } | Self::CompensationParked { .. } => Status::Parked,
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

impl<D: Definition> Instance<D> {
    /// Start a saga: validate the request, fix its policies, and dispatch the first step.
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
        if let Some(unknown) = request
            .policies
            .keys()
            .find(|k| !steps.iter().any(|s| s.name == k.as_str()))
        {
            return Err(api::Error::InvalidStart(format!(
                "policy for unknown step {unknown:?}"
            )));
        }
        for def in steps {
            if let Some(o) = request.policies.get(def.name) {
                let policy = StepPolicy {
                    forward: o.forward.apply(&def.policy.forward),
                    compensation: o.compensation.apply(&def.policy.compensation),
                };
                policy
                    .forward
                    .validate(def.name)
                    .and_then(|()| policy.compensation.validate(def.name))
                    .map_err(|e| api::Error::InvalidStart(e.0))?;
            }
        }
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
                })
                .collect(),
            started_at: now,
            cancel_reason: None,
            failure: None,
            past_pivot: false,
            let_through: None,
            marker: PhantomData,
        };
        let mut ctx = Ctx::new(env);
        let state = saga.send(&mut ctx, 0, Phase::Forward, 1);
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

    fn steps(&self) -> Vec<&'static str> {
        D::steps().iter().map(|s| s.name).collect()
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
