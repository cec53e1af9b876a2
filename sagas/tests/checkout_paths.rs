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
    "emit OrderCreated",
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
                &[
                    "dispatch commit_stock fwd #1",
                    "deadline commit_stock fwd #1 +10000ms",
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
        name: "a deadline passes: the command is sent again, then retried, and succeeds",
        steps: &[
            (
                Step::Fire,
                &[
                    "redispatch reserve_stock fwd #1.1",
                    "deadline reserve_stock fwd #1.1 +10000ms",
                ],
                "running",
            ),
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
                &[
                    "dispatch commit_stock fwd #1",
                    "deadline commit_stock fwd #1 +10000ms",
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
            (
                Step::Fire,
                &[
                    "redispatch reserve_stock fwd #1.1",
                    "deadline reserve_stock fwd #1.1 +10000ms",
                ],
                "running",
            ),
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
                Step::Fire,
                &[
                    "redispatch reserve_stock fwd #2.1",
                    "deadline reserve_stock fwd #2.1 +10000ms",
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
                    "redispatch reserve_stock fwd #3.1",
                    "deadline reserve_stock fwd #3.1 +10000ms",
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
                &[
                    "dispatch commit_stock fwd #1",
                    "deadline commit_stock fwd #1 +10000ms",
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
    Case {
        name: "the stock is gone at the commit: cancel the shipment, refund, release",
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
                &[
                    "dispatch commit_stock fwd #1",
                    "deadline commit_stock fwd #1 +10000ms",
                ],
                "running",
            ),
            (
                Step::Perm("stock_gone"),
                &[
                    "dispatch cancel_shipment comp #1",
                    "deadline create_shipment comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
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
        name: "cancel while committing: everything is undone (the release returns a lost commit's stock)",
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
                &[
                    "dispatch commit_stock fwd #1",
                    "deadline commit_stock fwd #1 +10000ms",
                ],
                "running",
            ),
            (
                Step::Cancel,
                &[
                    "dispatch cancel_shipment comp #1",
                    "deadline create_shipment comp #1 +10000ms",
                ],
                "compensating",
            ),
            (
                Step::Ok,
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
    // Every checkout emits OrderCreated when it starts, then the events of its end.
    assert_eq!(h.events[0], "OrderCreated", "{}", case.name);
    assert_eq!(&h.events[1..], case.events, "{}", case.name);
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
    // Attempt 1 of the charge times out and is sent again, with the same id.
    h.fire();
    let resent = h.command();
    assert_eq!((resent.id, resent.dispatch), (charge1.id, 1));
    assert_ne!(
        resent.msg_id(),
        charge1.msg_id(),
        "JetStream must not drop the resend"
    );
    // It times out again: attempt 2 is dispatched after the backoff.
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
    let (old_timer, _) = h.timers["step"].clone();
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
            .start(id, &empty, &sagas::api::Env::at(support::t0()))
            .is_err()
    );
    let mut dup = support::start_request();
    dup["lines"][1]["sku"] = "TSHIRT-M".into();
    assert!(
        sagas::checkout::TYPE
            .start(id, &dup, &sagas::api::Env::at(support::t0()))
            .is_err()
    );
    let mut policy = support::start_request();
    policy["policies"] = serde_json::json!({"no_such_step": {"forward": {"max_attempts": 2}}});
    assert!(
        sagas::checkout::TYPE
            .start(id, &policy, &sagas::api::Env::at(support::t0()))
            .is_err()
    );
    let mut zero = support::start_request();
    zero["policies"] = serde_json::json!({"charge_payment": {"forward": {"max_attempts": 0}}});
    assert!(
        sagas::checkout::TYPE
            .start(id, &zero, &sagas::api::Env::at(support::t0()))
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

#[test]
fn an_open_breaker_parks_the_saga_without_spending_an_attempt() {
    let mut h = Harness::start();
    h.blocked.insert("charge_payment".into());
    // The reservation succeeds, but the payment breaker is open: park, no command, no timer.
    let effects = h.ok().unwrap();
    assert_eq!(describe(&effects, h.now), ["cancel timer step"]);
    assert_eq!(h.state(), "parked");
    assert_eq!(h.status(), Status::Parked);
    assert_eq!(h.saga.parked_on(), Some("charge_payment"));
    // A resume while the breaker is still open changes nothing.
    assert!(
        h.feed(Input::Resume {
            step: "charge_payment".into()
        })
        .is_none()
    );
    // Nor does a resume for another step.
    h.blocked.clear();
    assert!(
        h.feed(Input::Resume {
            step: "create_shipment".into()
        })
        .is_none()
    );
    // The breaker closes: attempt 1 (not 2) goes out.
    let effects = h
        .feed(Input::Resume {
            step: "charge_payment".into(),
        })
        .unwrap();
    assert_eq!(
        describe(&effects, h.now),
        [
            "dispatch charge_payment fwd #1",
            "deadline charge_payment fwd #1 +15000ms"
        ]
    );
    h.ok();
    h.ok();
    h.ok();
    assert_eq!(h.status(), Status::Completed);
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_retry_that_meets_an_open_breaker_parks_and_keeps_its_attempt() {
    let mut h = Harness::start();
    h.ok();
    h.fail(true, "processor_unavailable");
    h.blocked.insert("charge_payment".into());
    h.fire();
    assert_eq!(h.state(), "parked");
    h.blocked.clear();
    let effects = h
        .feed(Input::Resume {
            step: "charge_payment".into(),
        })
        .unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch charge_payment fwd #2"
    );
    // A cancel while parked undoes what was done (the first attempt may have charged).
    h.blocked.insert("charge_payment".into());
    h.fail(true, "processor_unavailable");
    h.fire();
    assert_eq!(h.state(), "parked");
    h.blocked.clear();
    let effects = h.cancel().unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch refund_payment comp #1"
    );
}

#[test]
fn compensations_park_too() {
    let mut h = Harness::start();
    h.ok();
    h.blocked.insert("reserve_stock".into());
    h.fail(false, "card_declined");
    assert_eq!(h.state(), "compensation_parked");
    assert_eq!(h.status(), Status::Parked);
    h.blocked.clear();
    let effects = h
        .feed(Input::Resume {
            step: "reserve_stock".into(),
        })
        .unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch release_stock comp #1"
    );
    h.ok();
    assert_eq!(h.status(), Status::Compensated);
}

/// Answer the reservation in flight: held for `secs` from now.
fn reserve_for(h: &mut Harness, secs: i64) -> Option<Vec<sagas::api::Effect>> {
    let expires_at = h.now + chrono::Duration::seconds(secs);
    let cmd = h.command();
    h.feed(Harness::reply(
        &cmd,
        ReplyOutcome::succeeded(&sagas::shop::inventory::Output::StockReserved {
            reservation_id: None,
            expires_at,
        }),
    ))
}

#[test]
fn a_reservation_about_to_expire_is_renewed_before_the_payment() {
    let mut req = support::start_request();
    req["reservation_hold_seconds"] = 120.into();
    let mut h = Harness::start_with(req);
    reserve_for(&mut h, 120);
    assert_eq!(h.command().step, "charge_payment");
    // The charge fails retryably and the retry comes 100 s later: less than the margin is left
    // (the charge's 30 s in flight, plus a quarter of the hold), so the stock is reserved
    // again first.
    h.fail(true, "processor_unavailable");
    h.now += chrono::Duration::seconds(100);
    let effects = h.fire().unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch reserve_stock fwd #2"
    );
    assert_eq!(h.saga.snapshot()["steps"][0]["renewals"], 1);
    // Renewed: the charge goes on with the attempt it was about to make.
    let effects = reserve_for(&mut h, 120).unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch charge_payment fwd #2"
    );
    h.ok();
    // The commit is not preceded by a renewal: it takes an expired hold's stock itself.
    h.now += chrono::Duration::seconds(500);
    let effects = h.ok().unwrap();
    assert_eq!(describe(&effects, h.now)[0], "dispatch commit_stock fwd #1");
    h.ok();
    assert_eq!(h.status(), Status::Completed);
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_renewal_that_finds_no_stock_refunds_what_was_charged() {
    let mut req = support::start_request();
    req["reservation_hold_seconds"] = 120.into();
    let mut h = Harness::start_with(req);
    reserve_for(&mut h, 120);
    // The charge is slow: it succeeds 110 s later, just before the shipment is booked.
    h.now += chrono::Duration::seconds(110);
    let effects = h.ok().unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch reserve_stock fwd #2"
    );
    // The stock was sold meanwhile: refund the charge; the reservation holds nothing.
    let effects = h.fail(false, "out_of_stock").unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch refund_payment comp #1"
    );
    h.ok();
    assert_eq!(h.status(), Status::Compensated);
}

#[test]
fn a_renewal_that_fails_also_undoes_a_step_left_mid_attempt() {
    let mut req = support::start_request();
    req["reservation_hold_seconds"] = 120.into();
    let mut h = Harness::start_with(req);
    reserve_for(&mut h, 120);
    h.ok();
    assert_eq!(h.command().step, "create_shipment");
    // The booking's answer does not come (the carrier's worker is down); its retry comes
    // 100 s later, so the reservation is renewed first, and the stock is gone.
    h.fail(true, "carrier_unavailable");
    h.now += chrono::Duration::seconds(100);
    let effects = h.fire().unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch reserve_stock fwd #2"
    );
    // The first booking may still go through (its command can be in a queue): it is
    // cancelled, the charge refunded; the expired reservation holds nothing to release.
    let effects = h.fail(false, "out_of_stock").unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch cancel_shipment comp #1"
    );
    let effects = h.ok().unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch refund_payment comp #1"
    );
    let effects = h.ok().unwrap();
    assert_eq!(
        describe(&effects, h.now),
        ["cancel timer step", "emit OrderCancelled"]
    );
    assert_eq!(h.status(), Status::Compensated);
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_probe_that_must_renew_first_still_reaches_the_step_it_probes() {
    let mut req = support::start_request();
    req["reservation_hold_seconds"] = 120.into();
    let mut h = Harness::start_with(req);
    reserve_for(&mut h, 120);
    h.blocked.insert("create_shipment".into());
    h.ok();
    assert_eq!(h.saga.parked_on(), Some("create_shipment"));
    // Parked past most of its hold; the half-open breaker picks it as its probe (the engine
    // feeds the resume as if the breaker were closed).
    h.now += chrono::Duration::seconds(100);
    h.blocked.clear();
    let effects = h
        .feed(Input::Resume {
            step: "create_shipment".into(),
        })
        .unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch reserve_stock fwd #2"
    );
    // The renewal's answer comes while the breaker is still half-open for everybody else:
    // the probe goes through all the same, so that the breaker learns how the step is doing.
    h.blocked.insert("create_shipment".into());
    let effects = reserve_for(&mut h, 120).unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch create_shipment fwd #1"
    );
    // Once through, the breaker counts again: a retry parks while it blocks.
    h.fail(true, "carrier_unavailable");
    h.fire();
    assert_eq!(h.saga.parked_on(), Some("create_shipment"));
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_hold_too_short_for_its_steps_is_not_renewed_over_and_over() {
    // A 10 s hold under a charge that may be in flight 30 s: renewing cannot cover it, so the
    // saga goes on and the commit decides (the orchestrator refuses such a hold at start-up).
    let mut req = support::start_request();
    req["reservation_hold_seconds"] = 10.into();
    let mut h = Harness::start_with(req);
    let effects = reserve_for(&mut h, 10).unwrap();
    assert_eq!(
        describe(&effects, h.now)[0],
        "dispatch charge_payment fwd #1"
    );
    assert!(
        sagas::checkout::check_hold(10, &Default::default())
            .unwrap_err()
            .0
            .contains("charge_payment")
    );
    assert!(sagas::checkout::check_hold(1800, &Default::default()).is_ok());
}

#[test]
fn a_compensation_gives_up_only_past_its_configured_limit() {
    let mut req = support::start_request();
    req["policies"] = serde_json::json!({"reserve_stock": {"compensation": {"max_attempts": 3}}});
    let mut h = Harness::start_with(req);
    h.ok();
    h.fail(false, "card_declined");
    for attempt in 1..3 {
        assert_eq!(h.command().attempt, attempt);
        h.fail(true, "warehouse_offline");
        assert_eq!(h.state(), "compensation_retrying");
        h.fire();
    }
    let effects = h.fail(true, "warehouse_offline").unwrap();
    assert_eq!(
        describe(&effects, h.now),
        ["cancel timer step", "emit OrderCancelled"]
    );
    assert_eq!(h.status(), Status::Failed);
    assert_eq!(
        h.saga.snapshot()["steps"][0]["status"],
        "compensation_failed"
    );
}

#[test]
fn each_answer_tells_the_breaker_how_its_step_is_doing() {
    // A success and a permanent failure are the service answering (healthy); a retryable
    // failure and a deadline are not. Stale answers say nothing.
    let mut h = Harness::start();
    h.ok();
    h.fail(true, "processor_unavailable");
    h.fire(); // the retry: attempt 2
    let stale = h.command();
    h.fire(); // its deadline: sent again
    h.fail(false, "card_declined");
    assert!(
        h.feed(Harness::reply(&stale, support::success_for(&stale)))
            .is_none()
    );
    assert_eq!(
        h.health,
        [
            ("reserve_stock".to_owned(), true),
            ("charge_payment".to_owned(), false),
            ("charge_payment".to_owned(), false),
            ("charge_payment".to_owned(), true),
        ]
    );
}
