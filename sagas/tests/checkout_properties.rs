//! A property test over random sequences of step outcomes.
//!
//! A model of the services answers each command the machine dispatches: success, a retryable or
//! permanent failure, or silence (the attempt times out, its effect may or may not have
//! happened). Like the real workers, the model is idempotent per step: once a step's effect
//! happened, every later attempt succeeds; once it was compensated, it stays undone. The commit
//! (the pivot) has no compensation of its own: like the inventory, the release of the
//! reservation undoes a commit that happened, and tombstones it. Cancels, stale replies,
//! reloads from the snapshot and operators' actions are mixed in at random: an operator's retry
//! now applies exactly when the saga waits on a backoff or a breaker (and `operator_actions`
//! says so beforehand), a recover or resolve never while the saga goes on; a saga that failed
//! is recovered (a new round of its compensation, its attempts counted anew) up to a few times,
//! and may then be resolved by hand.
//!
//! Whatever happens, the saga ends, and:
//! - `completed`: all four effects are in place;
//! - `compensated`: every effect that happened was undone;
//! - `failed` (or `resolved`, when an operator then closed it): exactly when, in the generated
//!   outcomes of the last round of a compensation, it failed permanently or failed retryably
//!   as many times as its policy's `max_attempts` (a deadline counts as a failed attempt once
//!   the command was sent `redispatches` more times without a reply).
//!
//! And replaying the saga's log through a fresh machine gives its snapshot.

mod support;

use proptest::prelude::*;
use sagas::api::{Input, OperatorAction, Status, Verdict};
use sagas::checkout::Checkout;
use sagas::stepwise::Definition;
use sagas::wire::{Phase, ReplyOutcome};
use support::{Harness, success_for};

#[derive(Clone, Copy, Debug)]
enum Answer {
    Succeed,
    FailRetryable,
    FailPermanent,
    /// No reply; the effect happened anyway (the reply was lost).
    SilentDone,
    /// No reply; the effect did not happen.
    SilentNothing,
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        6 => Just(Answer::Succeed),
        2 => Just(Answer::FailRetryable),
        1 => Just(Answer::FailPermanent),
        1 => Just(Answer::SilentDone),
        1 => Just(Answer::SilentNothing),
    ]
}

#[derive(Clone, Debug)]
struct Script {
    answers: Vec<Answer>,
    /// Before which answer a cancel is sent, if any.
    cancel_at: Option<usize>,
    /// Before which answers the machine is reloaded from its snapshot.
    reloads: Vec<bool>,
    /// Before which answers a stale reply (of an earlier command) is delivered.
    stale: Vec<bool>,
    /// Which breakers are open before each answer (bit per step).
    breakers: Vec<u8>,
    /// What an operator does before each answer, if anything.
    operator: Vec<Option<OperatorAction>>,
    /// How many times an operator recovers the saga when it fails.
    recoveries: usize,
    /// Whether an operator resolves the saga if it ends failed.
    resolve: bool,
}

fn operator() -> impl Strategy<Value = Option<OperatorAction>> {
    prop_oneof![
        12 => Just(None),
        2 => Just(Some(OperatorAction::RetryNow)),
        1 => Just(Some(OperatorAction::Recover)),
        1 => Just(Some(OperatorAction::Resolve)),
    ]
}

/// Answers enough for the saga to end, even after recoveries.
const ANSWERS: usize = 300;

fn script() -> impl Strategy<Value = Script> {
    (
        prop::collection::vec(answer(), ANSWERS),
        prop::option::of(0usize..12),
        prop::collection::vec(any::<bool>(), ANSWERS),
        prop::collection::vec(prop::bool::weighted(0.2), ANSWERS),
        prop::collection::vec(prop_oneof![4 => Just(0u8), 1 => 0u8..16], ANSWERS),
        prop::collection::vec(operator(), ANSWERS),
        0usize..3,
        any::<bool>(),
    )
        .prop_map(
            |(answers, cancel_at, reloads, stale, breakers, operator, recoveries, resolve)| {
                Script {
                    answers,
                    cancel_at,
                    reloads,
                    stale,
                    breakers,
                    operator,
                    recoveries,
                    resolve,
                }
            },
        )
}

/// The steps: reserve, charge, ship, commit.
const STEPS: usize = 4;
const RESERVE: usize = 0;
const COMMIT: usize = 3;

/// The services as the saga's steps see them.
#[derive(Default, Debug)]
struct World {
    /// Effect in place, per step.
    done: [bool; STEPS],
    /// Compensated (tombstoned) per step: a later forward attempt does nothing.
    undone: [bool; STEPS],
    /// The worker's definitive answer, once it gave one, per step (idempotency).
    forward_verdict: [Option<bool>; STEPS],
    /// A compensation answered a permanent failure, per step.
    compensation_rejected: [bool; STEPS],
    /// Compensation attempts that failed retryably, per step: a retryable failure reply, or
    /// `redispatches + 1` silences in a row (the deadline of every dispatch of one attempt).
    compensation_failures: [u32; STEPS],
    /// Silences since the last compensation attempt of the step ended.
    compensation_silences: [u32; STEPS],
}

impl World {
    /// Count an answer to a compensation of step `s` (`None`: silence, the deadline fires).
    /// The count follows from the answers alone, not from what the machine did with them, so
    /// that a machine giving up early (or too late) disagrees with it.
    fn compensation_answered(&mut self, s: usize, outcome: Option<&ReplyOutcome>) {
        let policy = &Checkout::steps()[s].policy.compensation;
        match outcome {
            Some(ReplyOutcome::Failed {
                retryable: false, ..
            }) => {
                self.compensation_rejected[s] = true;
                self.compensation_silences[s] = 0;
            }
            Some(ReplyOutcome::Failed {
                retryable: true, ..
            }) => {
                self.compensation_failures[s] += 1;
                self.compensation_silences[s] = 0;
            }
            Some(ReplyOutcome::Succeeded { .. }) => self.compensation_silences[s] = 0,
            None => {
                self.compensation_silences[s] += 1;
                if self.compensation_silences[s] > policy.redispatches {
                    self.compensation_failures[s] += 1;
                    self.compensation_silences[s] = 0;
                }
            }
        }
    }

    /// An operator recovered the compensation of step `s`: its attempts are counted anew.
    fn new_round(&mut self, s: usize) {
        self.compensation_rejected[s] = false;
        self.compensation_failures[s] = 0;
        self.compensation_silences[s] = 0;
    }

    /// Whether the outcomes of step `s`'s compensation leave the saga no choice but to fail.
    fn compensation_gave_up(&self, s: usize) -> bool {
        let policy = &Checkout::steps()[s].policy.compensation;
        self.compensation_rejected[s] || self.compensation_failures[s] >= policy.max_attempts
    }
}

/// The step whose compensation gave up, in a failed saga.
fn failed_compensation(h: &Harness) -> usize {
    let snapshot = h.saga.snapshot();
    snapshot["steps"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s["status"] == "compensation_failed")
        .expect("a compensation failed")
}

fn step_index(step: &str) -> usize {
    match step {
        "reserve_stock" => 0,
        "charge_payment" => 1,
        "create_shipment" => 2,
        "commit_stock" => 3,
        other => panic!("unknown step {other}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, .. ProptestConfig::default() })]

    #[test]
    fn every_saga_ends_consistently(script in script()) {
        let mut h = Harness::start();
        let mut world = World::default();
        let mut seen = Vec::new();
        let mut i = 0;
        let mut recoveries = 0;
        loop {
            if h.status().is_terminal() {
                if h.status() == Status::Failed && recoveries < script.recoveries {
                    // The operator recovers the compensation that gave up: a new round.
                    recoveries += 1;
                    let s = failed_compensation(&h);
                    prop_assert!(matches!(h.operator(OperatorAction::Recover), Verdict::Applied(_)));
                    world.new_round(s);
                    continue;
                }
                break;
            }
            prop_assert!(i < script.answers.len(), "saga did not end after {} answers", i);
            if script.reloads[i] {
                h.reload();
            }
            if script.cancel_at == Some(i) {
                h.cancel();
            }
            if script.stale[i] && !seen.is_empty() {
                let (old, outcome): &(sagas::wire::Command, ReplyOutcome) = &seen[i % seen.len()];
                // A redelivered old reply: ignored unless it happens to be the current one.
                let current = h.in_flight.as_ref().map(|c| c.id);
                let applied = h.feed(Input::Reply(old.reply(outcome.clone()))).is_some();
                prop_assert!(!applied || current == Some(old.id));
                if applied && old.phase == Phase::Compensation {
                    // The machine took it as the current attempt's answer: so does the count.
                    world.compensation_answered(step_index(&old.step), Some(outcome));
                }
            }
            if h.status().is_terminal() {
                continue;
            }
            if let Some(action) = script.operator[i] {
                // Only a saga waiting on a backoff or a breaker can be retried now; the saga
                // goes on, so a recover or a resolve never applies. The dashboard's offer says
                // the same beforehand.
                let waiting = h.state().ends_with("retrying") || h.state().ends_with("parked");
                let expected = action == OperatorAction::RetryNow && waiting;
                let offer = h.saga.operator_actions(h.now).into_iter().find(|(a, _)| *a == action);
                let applied = matches!(h.operator(action), Verdict::Applied(_));
                prop_assert_eq!(applied, expected, "{:?} in {}", action, h.state());
                prop_assert_eq!(offer.map(|(_, r)| r.is_ok()), Some(applied));
            }
            // Breakers open and close at random; a parked saga is resumed once its breaker
            // closed, and must then go on with the attempt it had not spent.
            h.blocked = ["reserve_stock", "charge_payment", "create_shipment", "commit_stock"]
                .iter()
                .enumerate()
                .filter(|(b, _)| script.breakers[i] & (1 << b) != 0)
                .map(|(_, s)| (*s).to_owned())
                .collect();
            if let Some(step) = h.saga.parked_on() {
                h.blocked.clear();
                prop_assert!(h.feed(Input::Resume { step: step.to_owned() }).is_some(), "a resume applies");
                i += 1;
                continue;
            }
            if h.state().ends_with("retrying") {
                h.fire();
                i += 1;
                continue;
            }
            let cmd = h.command();
            let s = step_index(&cmd.step);
            let answer = script.answers[i];
            i += 1;
            let outcome = match cmd.phase {
                Phase::Forward => {
                    if world.undone[s] {
                        // Tombstoned: the worker refuses the late forward command.
                        Some(ReplyOutcome::Failed { retryable: false, code: "cancelled".into(), reason: "compensated".into() })
                    } else if let Some(ok) = world.forward_verdict[s] {
                        // Idempotent: the first definitive answer is repeated.
                        Some(if ok { success_for(&cmd) } else {
                            ReplyOutcome::Failed { retryable: false, code: "declined".into(), reason: "again".into() }
                        })
                    } else {
                        match answer {
                            Answer::Succeed => {
                                world.done[s] = true;
                                world.forward_verdict[s] = Some(true);
                                Some(success_for(&cmd))
                            }
                            Answer::FailRetryable => Some(ReplyOutcome::Failed { retryable: true, code: "busy".into(), reason: "busy".into() }),
                            Answer::FailPermanent => {
                                world.forward_verdict[s] = Some(false);
                                Some(ReplyOutcome::Failed { retryable: false, code: "declined".into(), reason: "no".into() })
                            }
                            Answer::SilentDone => {
                                world.done[s] = true;
                                world.forward_verdict[s] = Some(true);
                                None
                            }
                            Answer::SilentNothing => None,
                        }
                    }
                }
                Phase::Compensation => match answer {
                    Answer::Succeed | Answer::SilentDone => {
                        world.done[s] = false;
                        world.undone[s] = true;
                        if s == RESERVE {
                            // The release returns a commit's stock, and a late commit finds
                            // the reservation released.
                            world.done[COMMIT] = false;
                            world.undone[COMMIT] = true;
                        }
                        matches!(answer, Answer::Succeed).then(|| success_for(&cmd))
                    }
                    Answer::FailRetryable => Some(ReplyOutcome::Failed { retryable: true, code: "busy".into(), reason: "busy".into() }),
                    Answer::FailPermanent => Some(ReplyOutcome::Failed { retryable: false, code: "stuck".into(), reason: "no".into() }),
                    Answer::SilentNothing => None,
                },
            };
            if cmd.phase == Phase::Compensation {
                world.compensation_answered(s, outcome.as_ref());
            }
            match outcome {
                Some(outcome) => {
                    seen.push((cmd.clone(), outcome.clone()));
                    prop_assert!(h.feed(Input::Reply(cmd.reply(outcome))).is_some(), "the current reply applies");
                }
                None => {
                    // Silence: the deadline fires.
                    prop_assert!(h.fire().is_some(), "the deadline applies");
                }
            }
        }
        let gave_up: Vec<usize> = (0..STEPS).filter(|&s| world.compensation_gave_up(s)).collect();
        match h.status() {
            Status::Completed => prop_assert_eq!(world.done, [true; STEPS]),
            Status::Compensated => {
                prop_assert_eq!(world.done, [false; STEPS], "world {:?}", world);
                prop_assert!(gave_up.is_empty(), "compensated although a compensation could not succeed: {:?}", world);
            }
            Status::Failed => {
                // Failed only because the outcomes left no choice, and on a step whose
                // outcomes did: never a compensation given up before its attempts ran out.
                let snapshot = h.saga.snapshot();
                let failed_steps: Vec<usize> = snapshot["steps"].as_array().unwrap().iter()
                    .enumerate()
                    .filter(|(_, s)| s["status"] == "compensation_failed")
                    .map(|(i, _)| i)
                    .collect();
                prop_assert_eq!(failed_steps.len(), 1, "one compensation failed: {}", snapshot);
                prop_assert!(
                    gave_up.contains(&failed_steps[0]),
                    "failed on {} without a permanent failure or {} retryable failures of its compensation: {:?}",
                    failed_steps[0],
                    Checkout::steps()[failed_steps[0]].policy.compensation.max_attempts,
                    world
                );
            }
            // Not `resolved` either: only the operator below resolves it.
            other => prop_assert!(false, "not an end the outcomes lead to: {:?}", other),
        }
        if h.status() == Status::Failed && script.resolve {
            prop_assert!(matches!(h.operator(OperatorAction::Resolve), Verdict::Applied(_)));
            prop_assert_eq!(h.status(), Status::Resolved);
            h.reload();
        }
        prop_assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
    }
}
