//! Every path of the checkout machine as a table: inputs in, expected effects and state out.
//! Each case also runs a second time with the machine restored from its snapshot before every
//! input, and checks that replaying the event log gives the final snapshot.

mod support;

use sagas::api::{Input, Status};
use sagas::wire::ReplyOutcome;
use support::{Harness, describe, retry_delay_ms};

#[derive(Clone, Copy, Debug)]
enum Step {
    /// The command in flight succeeds.
    Ok,
    /// The command in flight fails retryably.
    Retry,
    /// The command in flight fails permanently.
    Perm(&'static str),
    /// The armed timer fires (deadline or backoff).
    Fire,
    Cancel,
}

struct Case {
    name: &'static str,
    steps: &'static [(Step, &'static [&'static str], &'static str)],
    status: Status,
    events: &'static [&'static str],
}

const START: &[&str] = &[
    "dispatch reserve_stock fwd #1",
    "deadline reserve_stock fwd #1 +10000ms",
];

const CASES: &[Case] = &[
    Case {
        name: "happy path",
        steps: &[
            (
                Step::Ok,
                &[
                    "dispatch charge_payment fwd #1",
                    "deadline charge_payment fwd #1 +15000ms",
                ],
                "running",
            ),
            (
                Step::Ok,
                &[
                    "dispatch create_shipment fwd #1",
                    "deadline create_shipment fwd #1 +10000ms",
                ],
                "running",
            ),
            (
                Step::Ok,
                &["cancel timer step", "emit OrderConfirmed"],
                "completed",
            ),
        ],
        status: Status::Completed,
        events: &["OrderConfirmed"],
    },
    Case {
        name: "out of stock: nothing to undo",
        steps: &[(
            Step::Perm("out_of_stock"),
            &["cancel timer step", "emit OrderCancelled"],
            "compensated",
        )],
        status: Status::Compensated,
        events: &["OrderCancelled"],
    },
    Case {
        name: "card declined: release the stock",
        steps: &[
            (
                Step::Ok,
                &[
                    "dispatch charge_payment fwd #1",
                    "deadline charge_payment fwd #1 +15000ms",
                ],
                "running",
            ),
            (
                Step::Perm("card_declined"),
                &[
                    "dispatch release_stock comp #1",
                    "deadline reserve_stock comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
                &["cancel timer step", "emit OrderCancelled"],
                "compensated",
            ),
        ],
        status: Status::Compensated,
        events: &["OrderCancelled"],
    },
    Case {
        name: "shipment refused: refund, then release",
        steps: &[
            (
                Step::Ok,
                &[
                    "dispatch charge_payment fwd #1",
                    "deadline charge_payment fwd #1 +15000ms",
                ],
                "running",
            ),
            (
                Step::Ok,
                &[
                    "dispatch create_shipment fwd #1",
                    "deadline create_shipment fwd #1 +10000ms",
                ],
                "running",
            ),
            (
                Step::Perm("address_rejected"),
                &[
                    "dispatch refund_payment comp #1",
                    "deadline charge_payment comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
                &[
                    "dispatch release_stock comp #1",
                    "deadline reserve_stock comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
                &["cancel timer step", "emit OrderCancelled"],
                "compensated",
            ),
        ],
        status: Status::Compensated,
        events: &["OrderCancelled"],
    },
    Case {
        name: "retryable failures until exhaustion: undo the charge too, to be sure",
        steps: &[
            (
                Step::Ok,
                &[
                    "dispatch charge_payment fwd #1",
                    "deadline charge_payment fwd #1 +15000ms",
                ],
                "running",
            ),
            (Step::Retry, &["retry charge_payment fwd #2"], "retrying"),
            (
                Step::Fire,
                &[
                    "dispatch charge_payment fwd #2",
                    "deadline charge_payment fwd #2 +15000ms",
                ],
                "running",
            ),
            (Step::Retry, &["retry charge_payment fwd #3"], "retrying"),
            (
                Step::Fire,
                &[
                    "dispatch charge_payment fwd #3",
                    "deadline charge_payment fwd #3 +15000ms",
                ],
                "running",
            ),
            (
                Step::Retry,
                &[
                    "dispatch refund_payment comp #1",
                    "deadline charge_payment comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
                &[
                    "dispatch release_stock comp #1",
                    "deadline reserve_stock comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
                &["cancel timer step", "emit OrderCancelled"],
                "compensated",
            ),
        ],
        status: Status::Compensated,
        events: &["OrderCancelled"],
    },
    Case {
        name: "a deadline passes, the retry succeeds",
        steps: &[
            (Step::Fire, &["retry reserve_stock fwd #2"], "retrying"),
            (
                Step::Fire,
                &[
                    "dispatch reserve_stock fwd #2",
                    "deadline reserve_stock fwd #2 +10000ms",
                ],
                "running",
            ),
            (
                Step::Ok,
                &[
                    "dispatch charge_payment fwd #1",
                    "deadline charge_payment fwd #1 +15000ms",
                ],
                "running",
            ),
            (
                Step::Ok,
                &[
                    "dispatch create_shipment fwd #1",
                    "deadline create_shipment fwd #1 +10000ms",
                ],
                "running",
            ),
            (
                Step::Ok,
                &["cancel timer step", "emit OrderConfirmed"],
                "completed",
            ),
        ],
        status: Status::Completed,
        events: &["OrderConfirmed"],
    },
    Case {
        name: "every deadline passes: the unknown step is undone",
        steps: &[
            (Step::Fire, &["retry reserve_stock fwd #2"], "retrying"),
            (
                Step::Fire,
                &[
                    "dispatch reserve_stock fwd #2",
                    "deadline reserve_stock fwd #2 +10000ms",
                ],
                "running",
            ),
            (Step::Fire, &["retry reserve_stock fwd #3"], "retrying"),
            (
                Step::Fire,
                &[
                    "dispatch reserve_stock fwd #3",
                    "deadline reserve_stock fwd #3 +10000ms",
                ],
                "running",
            ),
            (
                Step::Fire,
                &[
                    "dispatch release_stock comp #1",
                    "deadline reserve_stock comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
                &["cancel timer step", "emit OrderCancelled"],
                "compensated",
            ),
        ],
        status: Status::Compensated,
        events: &["OrderCancelled"],
    },
    Case {
        name: "cancel while charging: the charge in flight is refunded",
        steps: &[
            (
                Step::Ok,
                &[
                    "dispatch charge_payment fwd #1",
                    "deadline charge_payment fwd #1 +15000ms",
                ],
                "running",
            ),
            (
                Step::Cancel,
                &[
                    "dispatch refund_payment comp #1",
                    "deadline charge_payment comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
                &[
                    "dispatch release_stock comp #1",
                    "deadline reserve_stock comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
                &["cancel timer step", "emit OrderCancelled"],
                "compensated",
            ),
        ],
        status: Status::Compensated,
        events: &["OrderCancelled"],
    },
    Case {
        name: "cancel after completion changes nothing",
        steps: &[
            (
                Step::Ok,
                &[
                    "dispatch charge_payment fwd #1",
                    "deadline charge_payment fwd #1 +15000ms",
                ],
                "running",
            ),
            (
                Step::Ok,
                &[
                    "dispatch create_shipment fwd #1",
                    "deadline create_shipment fwd #1 +10000ms",
                ],
                "running",
            ),
            (
                Step::Ok,
                &["cancel timer step", "emit OrderConfirmed"],
                "completed",
            ),
            (Step::Cancel, &["ignored"], "completed"),
        ],
        status: Status::Completed,
        events: &["OrderConfirmed"],
    },
    Case {
        name: "a compensation retries, then succeeds",
        steps: &[
            (
                Step::Ok,
                &[
                    "dispatch charge_payment fwd #1",
                    "deadline charge_payment fwd #1 +15000ms",
                ],
                "running",
            ),
            (
                Step::Perm("card_declined"),
                &[
                    "dispatch release_stock comp #1",
                    "deadline reserve_stock comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Retry,
                &["retry reserve_stock comp #2"],
                "compensation_retrying",
            ),
            (
                Step::Fire,
                &[
                    "dispatch release_stock comp #2",
                    "deadline reserve_stock comp #2 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
                &["cancel timer step", "emit OrderCancelled"],
                "compensated",
            ),
        ],
        status: Status::Compensated,
        events: &["OrderCancelled"],
    },
    Case {
        name: "a compensation fails permanently: failed, waiting for an operator",
        steps: &[
            (
                Step::Ok,
                &[
                    "dispatch charge_payment fwd #1",
                    "deadline charge_payment fwd #1 +15000ms",
                ],
                "running",
            ),
            (
                Step::Perm("card_declined"),
                &[
                    "dispatch release_stock comp #1",
                    "deadline reserve_stock comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Perm("reservation_corrupt"),
                &["cancel timer step", "emit OrderCancelled"],
                "failed",
            ),
            (Step::Cancel, &["ignored"], "failed"),
        ],
        status: Status::Failed,
        events: &["OrderCancelled"],
    },
];

fn run(case: &Case, reload_between: bool) {
    let mut h = Harness::start();
    assert_eq!(
        describe(&h.start_effects, h.now),
        START,
        "{}: start",
        case.name
    );
    for (i, (step, expected, state)) in case.steps.iter().enumerate() {
        if reload_between {
            h.reload();
        }
        let before = h.now;
        let effects = match step {
            Step::Ok => h.ok(),
            Step::Retry => h.fail(true, "processor_unavailable"),
            Step::Perm(code) => h.fail(false, code),
            Step::Fire => h.fire(),
            Step::Cancel => h.cancel(),
        };
        let got = match &effects {
            Some(e) => describe(e, h.now),
            None => vec!["ignored".to_owned()],
        };
        assert_eq!(
            got, *expected,
            "{} (reload: {reload_between}): step {i} {step:?}",
            case.name
        );
        assert_eq!(h.state(), *state, "{}: state after step {i}", case.name);
        if let Some(e) = &effects
            && matches!(step, Step::Retry | Step::Fire)
            && got.iter().any(|g| g.starts_with("retry "))
        {
            let ms = retry_delay_ms(e, h.now);
            assert!(
                (200..=120_000).contains(&ms),
                "{}: retry delay {ms} ms",
                case.name
            );
        }
        let _ = before;
    }
    assert_eq!(h.status(), case.status, "{}", case.name);
    assert_eq!(h.events, case.events, "{}", case.name);
    assert_eq!(
        h.replayed_snapshot(),
        h.saga.snapshot(),
        "{}: replaying the log gives the stored snapshot",
        case.name
    );
}

#[test]
fn every_path_gives_its_effects() {
    for case in CASES {
        run(case, false);
    }
}

#[test]
fn every_path_survives_a_reload_before_each_input() {
    for case in CASES {
        run(case, true);
    }
}

#[test]
fn forward_retry_delays_grow_exponentially_with_jitter() {
    let mut h = Harness::start();
    h.ok();
    let first = retry_delay_ms(&h.fail(true, "busy").unwrap(), h.now);
    assert!((200..=400).contains(&first), "first retry after {first} ms");
    h.fire();
    let second = retry_delay_ms(&h.fail(true, "busy").unwrap(), h.now);
    assert!(
        (400..=800).contains(&second),
        "second retry after {second} ms"
    );
}

#[test]
fn late_duplicate_and_foreign_replies_change_nothing() {
    let mut h = Harness::start();
    let reserve = h.command();
    h.ok();
    // The same reply again (a redelivery) is fenced off.
    assert!(
        h.feed(Harness::reply(&reserve, support::success_for(&reserve)))
            .is_none()
    );
    let charge1 = h.command();
    // Attempt 1 of the charge times out; attempt 2 is dispatched.
    h.fire();
    h.fire();
    let charge2 = h.command();
    assert_eq!(charge2.attempt, 2);
    assert_ne!(charge1.id, charge2.id);
    // The late reply of attempt 1 arrives: fenced off, whatever it says.
    assert!(
        h.feed(Harness::reply(&charge1, support::success_for(&charge1)))
            .is_none()
    );
    assert!(
        h.feed(Harness::reply(
            &charge1,
            ReplyOutcome::Failed {
                retryable: false,
                code: "card_declined".into(),
                reason: "late".into()
            }
        ))
        .is_none()
    );
    // A reply that names the current step and attempt but another command id is refused too.
    let mut forged = charge2.reply(support::success_for(&charge2));
    forged.command_id = reserve.id;
    assert!(h.feed(Input::Reply(forged)).is_none());
    assert_eq!(h.state(), "running");
    // The real reply moves the saga on.
    assert!(h.ok().is_some());
    assert_eq!(h.command().step, "create_shipment");
}

#[test]
fn stale_timers_are_ignored() {
    let mut h = Harness::start();
    let (old_timer, _) = h.timer.clone().unwrap();
    h.ok();
    assert!(h.feed(Input::TimerFired(old_timer)).is_none());
    assert_eq!(h.command().step, "charge_payment");
}

#[test]
fn bad_start_requests_are_refused() {
    use sagas::api::SagaType;
    let id = sagas::wire::SagaId::from_uuid(uuid::Uuid::nil());
    let mut empty = support::start_request();
    empty["lines"] = serde_json::json!([]);
    assert!(
        sagas::checkout::TYPE
            .start(id, &empty, support::t0())
            .is_err()
    );
    let mut dup = support::start_request();
    dup["lines"][1]["sku"] = "TSHIRT-M".into();
    assert!(
        sagas::checkout::TYPE
            .start(id, &dup, support::t0())
            .is_err()
    );
    let mut policy = support::start_request();
    policy["policies"] = serde_json::json!({"no_such_step": {"forward": {"max_attempts": 2}}});
    assert!(
        sagas::checkout::TYPE
            .start(id, &policy, support::t0())
            .is_err()
    );
    let mut zero = support::start_request();
    zero["policies"] = serde_json::json!({"charge_payment": {"forward": {"max_attempts": 0}}});
    assert!(
        sagas::checkout::TYPE
            .start(id, &zero, support::t0())
            .is_err()
    );
}

#[test]
fn policy_overrides_are_fixed_at_start() {
    let mut req = support::start_request();
    req["policies"] = serde_json::json!({
        "charge_payment": {"forward": {"max_attempts": 1, "deadline_ms": 500}}
    });
    let mut h = Harness::start_with(req);
    let effects = h.ok().unwrap();
    assert_eq!(
        describe(&effects, h.now)[1],
        "deadline charge_payment fwd #1 +500ms"
    );
    // One attempt only: the first retryable failure compensates.
    let effects = h.fail(true, "busy").unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch refund_payment comp #1"
    );
}

#[test]
fn order_total_and_commands_carry_the_order() {
    let h = Harness::start();
    let snapshot = h.saga.snapshot();
    assert_eq!(snapshot["data"]["total"]["minor"], 3900);
    assert_eq!(snapshot["format"], 1);
    assert_eq!(snapshot["state"]["name"], "running");
    let cmd = h.command();
    assert_eq!(cmd.step, "reserve_stock");
    assert_eq!(cmd.attempt, 1);
    assert_eq!(cmd.deadline, support::t0() + chrono::Duration::seconds(10));
}

#[test]
fn the_definition_follows_the_rules() {
    sagas::stepwise::validate_definition(
        <sagas::checkout::Checkout as sagas::stepwise::Definition>::steps(),
    )
    .unwrap();
}
