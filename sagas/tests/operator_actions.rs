//! What an operator can do to a saga by hand (retry now, recover, resolve), at the machine's
//! boundary: inputs in, effects or the reason they were ignored out, with a simulated clock.
//!
//! A table runs each action in each state a saga can be in, and checks the effects (or the
//! reason an operator reads), the state after, that `operator_actions` said the same in
//! advance, and that a restored machine and a replay of the event log agree. Paths that take
//! several inputs (a compensation recovered twice, a step after the pivot recovered, a case
//! recovered then resolved) follow as tests of their own.

mod support;

use chrono::Duration;
use sagas::api::{Input, OperatorAction, OperatorInput, SagaType, Status, Verdict};
use sagas::fulfilment;
use sagas::policy::{Backoff, Policy, StepPolicy};
use sagas::shop::OrderId;
use sagas::stepwise::{self, Definition, Emit, End, StepDef, StepKind};
use sagas::wire::{Body, Invalid, Phase, SagaId, Signal, SignalId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use support::{Harness, describe};
use uuid::Uuid;

use OperatorAction::{Recover, Resolve, RetryNow};

// A small definition with a step after its pivot: `hold` (compensatable), `commit` (the pivot),
// `notify` (retriable only), the one kind of failure a saga can be recovered forward from. The
// actions are the checkout's, so that the harness knows how to answer them. `Flow<true>` is the
// same with `notify` also awaiting a `delivered` signal after its command.

const P: Policy = Policy {
    max_attempts: 2,
    deadline_ms: 1_000,
    redispatches: 0,
    backoff: Backoff {
        initial_ms: 100,
        max_ms: 1_000,
        factor: 2.0,
        jitter: false,
    },
};

const FLOW_POLICY: StepPolicy = StepPolicy {
    forward: P,
    compensation: P,
};

const DELIVERED: &str = "delivered";

const fn flow_steps(awaits: Option<stepwise::Await>) -> [StepDef; 3] {
    [
        StepDef {
            name: "hold",
            kind: StepKind::Compensatable,
            service: Some("test"),
            action: Some("reserve_stock"),
            compensation: Some("release_stock"),
            awaits: None,
            policy: FLOW_POLICY,
        },
        StepDef {
            name: "commit",
            kind: StepKind::Pivot,
            service: Some("test"),
            action: Some("charge_payment"),
            compensation: None,
            awaits: None,
            policy: FLOW_POLICY,
        },
        StepDef {
            name: "notify",
            kind: StepKind::RetriableOnly,
            service: Some("test"),
            action: Some("create_shipment"),
            compensation: None,
            awaits,
            policy: FLOW_POLICY,
        },
    ]
}

static FLOW_STEPS: [StepDef; 3] = flow_steps(None);

static TRACKED_STEPS: [StepDef; 3] = flow_steps(Some(stepwise::Await {
    signal: DELIVERED,
    sla_ms: 60_000,
    buffer: false,
}));

#[derive(Clone, Debug, PartialEq)]
struct Flow<const AWAITS: bool>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct FlowData {
    order_id: OrderId,
}

impl<const AWAITS: bool> Definition for Flow<AWAITS> {
    const NAME: &'static str = "flow";
    type Data = FlowData;
    type Start = FlowData;
    fn steps() -> &'static [StepDef] {
        if AWAITS { &TRACKED_STEPS } else { &FLOW_STEPS }
    }
    fn init(start: FlowData) -> Result<FlowData, Invalid> {
        Ok(start)
    }
    fn command(data: &FlowData, _saga: SagaId, step: &StepDef, phase: Phase) -> Body {
        let action = match phase {
            Phase::Forward => step.action,
            Phase::Compensation => step.compensation,
        };
        Body::of(&json!({"action": action, "order_id": data.order_id}))
    }
    fn on_end(_: &FlowData, _: SagaId, _: End<'_>) -> Vec<Emit> {
        Vec::new()
    }
}

static FLOW: stepwise::Type<Flow<false>> = stepwise::Type::new();
static TRACKED: stepwise::Type<Flow<true>> = stepwise::Type::new();

// The states, each reached the way a saga gets there.

fn running() -> Harness {
    Harness::start()
}

/// The charge failed retryably: waiting for the backoff before attempt 2.
fn retrying() -> Harness {
    let mut h = Harness::start();
    h.ok().unwrap();
    h.fail(true, "processor_unavailable").unwrap();
    assert_eq!(h.state(), "retrying");
    h
}

/// The payment breaker is open when the charge is due: parked before attempt 1.
fn parked() -> Harness {
    let mut h = Harness::start();
    h.blocked.insert("charge_payment".into());
    h.ok().unwrap();
    assert_eq!(h.state(), "parked");
    h
}

/// The card was declined: the release of the stock is in flight.
fn compensating() -> Harness {
    let mut h = Harness::start();
    h.ok().unwrap();
    h.fail(false, "card_declined").unwrap();
    assert_eq!(h.state(), "compensating");
    h
}

/// The release failed retryably: waiting for the backoff before compensation attempt 2.
fn compensation_retrying() -> Harness {
    let mut h = compensating();
    h.fail(true, "warehouse_offline").unwrap();
    assert_eq!(h.state(), "compensation_retrying");
    h
}

/// The inventory breaker is open when the release is due.
fn compensation_parked() -> Harness {
    let mut h = Harness::start();
    h.ok().unwrap();
    h.blocked.insert("reserve_stock".into());
    h.fail(false, "card_declined").unwrap();
    assert_eq!(h.state(), "compensation_parked");
    h
}

fn fulfilment() -> Harness {
    Harness::start_of(
        &fulfilment::TYPE,
        json!({
            "order_id": "0191d0a0-0000-7000-8000-000000000001",
            "checkout_saga_id": Uuid::from_u128(7),
            "customer": {"id": "c-1"},
            "lines": [{"sku": "TSHIRT-M", "quantity": 2}],
            "total": {"minor": 3000, "currency": "EUR"},
            "charge_id": Uuid::from_u128(9),
            "shipment_id": Uuid::from_u128(10),
            "reservation_id": Uuid::from_u128(11),
        }),
    )
}

/// A fulfilment handed over to the carrier: awaiting its `dispatched` signal.
fn awaiting() -> Harness {
    let mut h = fulfilment();
    for _ in 0..3 {
        h.ok().unwrap();
    }
    assert_eq!(h.state(), "awaiting");
    h
}

fn completed() -> Harness {
    let mut h = Harness::start();
    for _ in 0..4 {
        h.ok().unwrap();
    }
    assert_eq!(h.state(), "completed");
    h
}

fn compensated() -> Harness {
    let mut h = Harness::start();
    h.fail(false, "out_of_stock").unwrap();
    assert_eq!(h.state(), "compensated");
    h
}

/// The release of the stock failed permanently: failed, waiting for an operator.
fn failed() -> Harness {
    let mut h = compensating();
    h.fail(false, "reservation_corrupt").unwrap();
    assert_eq!(h.state(), "failed");
    h
}

/// The carrier did not collect: everything was undone, and the fulfilment is a case.
fn failed_case() -> Harness {
    let mut h = awaiting();
    h.fire_named("sla:dispatch").unwrap();
    while h.status() == Status::Compensating {
        h.ok().unwrap();
    }
    assert_eq!(h.state(), "failed");
    h
}

/// The step after the pivot failed permanently: nothing to undo, failed.
fn failed_past_pivot() -> Harness {
    let mut h = Harness::start_of(&FLOW, json!({"order_id": Uuid::from_u128(6)}));
    h.ok().unwrap();
    h.ok().unwrap();
    h.fail(false, "no_such_address").unwrap();
    assert_eq!(h.state(), "failed");
    h
}

fn resolved() -> Harness {
    let mut h = failed();
    assert!(matches!(h.operator(Resolve), Verdict::Applied(_)));
    assert_eq!(h.state(), "resolved");
    h
}

/// What an action gives: the effects it has, or the reason it is ignored with.
type Expected = Result<&'static [&'static str], &'static str>;

struct Case {
    state: fn() -> Harness,
    action: OperatorAction,
    expected: Expected,
    /// The state after it.
    after: &'static str,
}

const CASES: &[Case] = &[
    Case {
        state: running,
        action: RetryNow,
        expected: Err("nothing is waiting to be retried: attempt 1 of reserve_stock is in flight"),
        after: "running",
    },
    Case {
        state: running,
        action: Recover,
        expected: Err("only a failed saga can be recovered; this one is running"),
        after: "running",
    },
    Case {
        state: running,
        action: Resolve,
        expected: Err("only a failed saga can be resolved by hand; this one is running"),
        after: "running",
    },
    Case {
        state: retrying,
        action: RetryNow,
        expected: Ok(&[
            "dispatch charge_payment fwd #2",
            "deadline charge_payment fwd #2 +15000ms",
        ]),
        after: "running",
    },
    Case {
        state: retrying,
        action: Recover,
        expected: Err("only a failed saga can be recovered; this one is running"),
        after: "retrying",
    },
    Case {
        state: parked,
        action: RetryNow,
        // The breaker is still open: the operator sends the attempt through it.
        expected: Ok(&[
            "dispatch charge_payment fwd #1",
            "deadline charge_payment fwd #1 +15000ms",
        ]),
        after: "running",
    },
    Case {
        state: parked,
        action: Resolve,
        expected: Err("only a failed saga can be resolved by hand; this one is parked"),
        after: "parked",
    },
    Case {
        state: compensating,
        action: RetryNow,
        expected: Err(
            "nothing is waiting to be retried: compensation attempt 1 of reserve_stock is in flight",
        ),
        after: "compensating",
    },
    Case {
        state: compensating,
        action: Recover,
        expected: Err("only a failed saga can be recovered; this one is compensating"),
        after: "compensating",
    },
    Case {
        state: compensation_retrying,
        action: RetryNow,
        expected: Ok(&[
            "dispatch release_stock comp #2",
            "deadline reserve_stock comp #2 +10000ms",
        ]),
        after: "compensating",
    },
    Case {
        state: compensation_parked,
        action: RetryNow,
        expected: Ok(&[
            "dispatch release_stock comp #1",
            "deadline reserve_stock comp #1 +10000ms",
        ]),
        after: "compensating",
    },
    Case {
        state: compensation_parked,
        action: Recover,
        expected: Err("only a failed saga can be recovered; this one is parked"),
        after: "compensation_parked",
    },
    Case {
        state: awaiting,
        action: RetryNow,
        expected: Err("nothing is waiting to be retried: dispatch awaits its signal dispatched"),
        after: "awaiting",
    },
    Case {
        state: awaiting,
        action: Resolve,
        expected: Err("only a failed saga can be resolved by hand; this one is running"),
        after: "awaiting",
    },
    Case {
        state: completed,
        action: RetryNow,
        expected: Err("the saga has ended (completed): nothing to retry"),
        after: "completed",
    },
    Case {
        state: completed,
        action: Recover,
        expected: Err("only a failed saga can be recovered; this one is completed"),
        after: "completed",
    },
    Case {
        state: compensated,
        action: Resolve,
        expected: Err("only a failed saga can be resolved by hand; this one is compensated"),
        after: "compensated",
    },
    Case {
        state: failed,
        action: RetryNow,
        expected: Err(
            "the saga has failed: nothing is waiting to be retried (recover it to start a new \
             round of the step it gave up on)",
        ),
        after: "failed",
    },
    Case {
        state: failed,
        action: Recover,
        // Attempt 2, not 1: attempt 1's id would get its old failure back from the worker.
        expected: Ok(&[
            "dispatch release_stock comp #2",
            "deadline reserve_stock comp #2 +10000ms",
        ]),
        after: "compensating",
    },
    Case {
        state: failed,
        action: Resolve,
        expected: Ok(&["cancel timer step"]),
        after: "resolved",
    },
    Case {
        state: failed_case,
        action: Recover,
        expected: Err(
            "nothing to recover: dispatch failed and what could be undone was; the case is for \
             an operator to handle, then to resolve",
        ),
        after: "failed",
    },
    Case {
        state: failed_case,
        action: Resolve,
        expected: Ok(&["cancel timer step"]),
        after: "resolved",
    },
    Case {
        state: failed_past_pivot,
        action: Recover,
        expected: Ok(&[
            "dispatch create_shipment fwd #2",
            "deadline notify fwd #2 +1000ms",
        ]),
        after: "running",
    },
    Case {
        state: failed_past_pivot,
        action: RetryNow,
        expected: Err(
            "the saga has failed: nothing is waiting to be retried (recover it to start a new \
             round of the step it gave up on)",
        ),
        after: "failed",
    },
    Case {
        state: resolved,
        action: RetryNow,
        expected: Err("the saga has ended (resolved): nothing to retry"),
        after: "resolved",
    },
    Case {
        state: resolved,
        action: Recover,
        expected: Err("only a failed saga can be recovered; this one is resolved"),
        after: "resolved",
    },
    Case {
        state: resolved,
        action: Resolve,
        expected: Err("the saga was already resolved by hand, by ada at 2027-01-15T08:00:00+00:00"),
        after: "resolved",
    },
];

fn run(case: &Case, reload_first: bool) {
    let mut h = (case.state)();
    let name = format!(
        "{} in {} (reload: {reload_first})",
        case.action.as_str(),
        h.state()
    );
    if reload_first {
        h.reload();
    }
    let before = h.saga.snapshot();
    // What the dashboard is told in advance, without changing the saga.
    let offered: Vec<_> = h.saga.operator_actions(h.now);
    assert_eq!(
        offered.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        OperatorAction::ALL,
        "{name}"
    );
    assert_eq!(h.saga.snapshot(), before, "{name}: asking changes nothing");
    let offer = offered
        .into_iter()
        .find(|(a, _)| *a == case.action)
        .map(|(_, r)| r)
        .unwrap();
    let got = match h.operator(case.action) {
        Verdict::Applied(effects) => Ok(describe(&effects, h.now)),
        Verdict::Ignored(why) => Err(why),
    };
    let expected = case
        .expected
        .map(|e| e.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        .map_err(str::to_owned);
    assert_eq!(got, expected, "{name}");
    assert_eq!(
        offer,
        got.clone().map(|_| ()),
        "{name}: the offer is the verdict"
    );
    assert_eq!(h.state(), case.after, "{name}");
    if got.is_err() {
        assert_eq!(
            h.saga.snapshot(),
            before,
            "{name}: ignored, nothing changed"
        );
    }
    h.reload();
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot(), "{name}: replay");
}

#[test]
fn each_action_in_each_state() {
    for case in CASES {
        run(case, false);
    }
}

#[test]
fn each_action_in_each_state_after_a_reload() {
    for case in CASES {
        run(case, true);
    }
}

#[test]
fn retry_now_skips_the_backoff_and_the_old_retry_timer_is_then_stale() {
    let mut h = retrying();
    let (old_retry, due) = h.timers["step"].clone();
    assert!(due > h.now, "the retry is still ahead");
    let effects = match h.operator(RetryNow) {
        Verdict::Applied(e) => e,
        other => panic!("{other:?}"),
    };
    let sent = h.command();
    assert_eq!((sent.step.as_str(), sent.attempt), ("charge_payment", 2));
    assert_eq!(
        sent.deadline,
        h.now + Duration::seconds(15),
        "sent now, not when the backoff would have ended"
    );
    // The deadline took the retry timer's slot: the engine replaces it.
    assert!(effects.iter().any(|e| matches!(
        e,
        sagas::api::Effect::SetTimer { name, .. } if name == "step"
    )));
    // Were the old retry timer to fire all the same, it would change nothing.
    h.now = due;
    assert_eq!(
        h.apply(Input::TimerFired(old_retry)),
        Verdict::Ignored("stale timer".into())
    );
    assert_eq!(h.state(), "running");
    for _ in 0..3 {
        h.ok().unwrap();
    }
    assert_eq!(h.status(), Status::Completed);
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn retry_now_lets_a_parked_saga_through_its_open_breaker_once() {
    let mut h = parked();
    assert!(
        h.blocked.contains("charge_payment"),
        "the breaker stays open"
    );
    assert!(matches!(h.operator(RetryNow), Verdict::Applied(_)));
    assert_eq!(h.command().attempt, 1, "the parked attempt was not spent");
    assert!(
        h.saga.snapshot().get("let_through").is_none(),
        "the pass was used up by the dispatch"
    );
    // The breaker counts again for the next attempt: a retry parks while it is open.
    h.fail(true, "processor_unavailable").unwrap();
    h.fire().unwrap();
    assert_eq!(h.state(), "parked");
    assert_eq!(h.saga.parked_on(), Some("charge_payment"));
    // And the operator can send it through again.
    assert!(matches!(h.operator(RetryNow), Verdict::Applied(_)));
    assert_eq!(h.command().attempt, 2);
    h.blocked.clear();
    for _ in 0..3 {
        h.ok().unwrap();
    }
    assert_eq!(h.status(), Status::Completed);
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn retry_now_sends_a_parked_compensation_through_its_open_breaker() {
    let mut h = compensation_parked();
    assert!(matches!(h.operator(RetryNow), Verdict::Applied(_)));
    let sent = h.command();
    assert_eq!(
        (sent.step.as_str(), sent.phase, sent.attempt),
        ("reserve_stock", Phase::Compensation, 1)
    );
    h.ok().unwrap();
    assert_eq!(h.status(), Status::Compensated);
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_recovered_compensation_counts_its_attempts_anew_with_new_numbers() {
    let mut req = support::start_request();
    req["policies"] = json!({"reserve_stock": {"compensation": {"max_attempts": 3}}});
    let mut h = Harness::start_with(req);
    h.ok().unwrap();
    h.fail(false, "card_declined").unwrap();
    for _ in 1..3 {
        h.fail(true, "warehouse_offline").unwrap();
        h.fire().unwrap();
    }
    let gave_up = h.command();
    assert_eq!(gave_up.attempt, 3);
    h.fail(true, "warehouse_offline").unwrap();
    assert_eq!(h.status(), Status::Failed);

    // The operator recovers it: attempt 4, with an id of its own.
    assert!(matches!(h.operator(Recover), Verdict::Applied(_)));
    assert_eq!(h.status(), Status::Compensating);
    let first = h.command();
    assert_eq!((first.phase, first.attempt), (Phase::Compensation, 4));
    assert_ne!(first.id, gave_up.id);
    assert_eq!(h.saga.snapshot()["steps"][0]["compensation_round_start"], 4);
    // Three attempts again (4, 5, 6), as the policy says, before it gives up again.
    h.reload();
    for attempt in 4..6 {
        assert_eq!(h.command().attempt, attempt);
        h.fail(true, "warehouse_offline").unwrap();
        assert_eq!(h.state(), "compensation_retrying");
        h.fire().unwrap();
    }
    assert_eq!(h.command().attempt, 6);
    h.fail(true, "warehouse_offline").unwrap();
    assert_eq!(h.status(), Status::Failed);
    let snapshot = h.saga.snapshot();
    assert_eq!(snapshot["steps"][0]["last_error"]["attempt"], 6);

    // A second recovery, and the warehouse is back: the saga ends as it would have.
    assert!(matches!(h.operator(Recover), Verdict::Applied(_)));
    assert_eq!(h.command().attempt, 7);
    let effects = h.ok().unwrap();
    assert_eq!(
        describe(&effects, h.now),
        ["cancel timer step", "emit OrderCancelled"]
    );
    assert_eq!(h.status(), Status::Compensated);
    assert_eq!(h.saga.snapshot()["steps"][0]["status"], "compensated");
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_recovered_compensation_unwinds_the_steps_below_it_too() {
    // The refund fails for good; once recovered and done, the stock is released as well.
    let mut h = Harness::start();
    h.ok().unwrap();
    h.ok().unwrap();
    h.fail(false, "address_rejected").unwrap();
    assert_eq!(h.command().action(), "refund_payment");
    h.fail(false, "processor_lost_the_charge").unwrap();
    assert_eq!(h.status(), Status::Failed);
    assert_eq!(
        h.saga.snapshot()["steps"][0]["status"],
        "succeeded",
        "the stock is still held"
    );
    assert!(matches!(h.operator(Recover), Verdict::Applied(_)));
    let effects = h.ok().unwrap();
    assert_eq!(
        describe(&effects, h.now),
        [
            "dispatch release_stock comp #1",
            "deadline reserve_stock comp #1 +10000ms"
        ]
    );
    h.ok().unwrap();
    assert_eq!(h.status(), Status::Compensated);
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_step_after_the_pivot_is_recovered_with_new_attempts_and_the_saga_completes() {
    let mut h = Harness::start_of(&FLOW, json!({"order_id": Uuid::from_u128(6)}));
    h.ok().unwrap();
    h.ok().unwrap();
    // The retriable-only step runs out of attempts.
    h.fail(true, "mail_server_down").unwrap();
    h.fire().unwrap();
    h.fail(true, "mail_server_down").unwrap();
    assert_eq!(h.status(), Status::Failed);
    assert_eq!(h.saga.snapshot()["failure"]["step"], "notify");

    assert!(matches!(h.operator(Recover), Verdict::Applied(_)));
    assert_eq!(h.state(), "running");
    assert_eq!(h.command().attempt, 3);
    let snapshot = h.saga.snapshot();
    assert_eq!(snapshot["steps"][2]["round_start"], 3);
    assert!(
        snapshot.get("failure").is_none(),
        "the saga goes forward again"
    );
    // Its policy's two attempts again: 3 fails, 4 is made.
    h.fail(true, "mail_server_down").unwrap();
    assert_eq!(h.state(), "retrying");
    h.fire().unwrap();
    assert_eq!(h.command().attempt, 4);
    h.ok().unwrap();
    assert_eq!(h.status(), Status::Completed);
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_case_whose_compensation_failed_is_recovered_then_resolved() {
    // The carrier did not collect; the cancel of the shipment fails for good.
    let mut h = awaiting();
    h.fire_named("sla:dispatch").unwrap();
    assert_eq!(h.command().action(), "cancel_shipment");
    h.fail(false, "carrier_api_gone").unwrap();
    assert_eq!(h.status(), Status::Failed);
    assert_eq!(
        h.saga.operator_actions(h.now)[1],
        (Recover, Ok(())),
        "the compensation can be recovered"
    );
    assert!(matches!(h.operator(Recover), Verdict::Applied(_)));
    assert_eq!(h.command().attempt, 2);
    // It unwinds on, and ends failed again: the case is still for an operator.
    while h.status() == Status::Compensating {
        h.ok().unwrap();
    }
    assert_eq!(h.status(), Status::Failed);
    let rows = h.saga.projection();
    assert_eq!(rows[0].row["status"], "needs_attention");
    assert_eq!(rows[0].row["refunded"], true);
    let (_, offer) = &h.saga.operator_actions(h.now)[1];
    let why = offer.clone().expect_err("nothing is left to recover");
    assert!(
        why.starts_with("nothing to recover: dispatch failed"),
        "{why}"
    );
    // The operator handled it with the carrier, and closes it.
    assert!(matches!(h.operator(Resolve), Verdict::Applied(_)));
    assert_eq!(h.status(), Status::Resolved);
    assert_eq!(h.saga.projection()[0].row["status"], "cancelled");
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_resolved_saga_keeps_who_resolved_it_and_nothing_moves_it_any_more() {
    let mut h = failed();
    let events = h.events.clone();
    let stale = h.command();
    h.now += Duration::minutes(5);
    let effects = match h.apply(Input::Operator(OperatorInput {
        by: "grace".into(),
        reason: "released the reservation in the warehouse system".into(),
        action: Resolve,
    })) {
        Verdict::Applied(e) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(describe(&effects, h.now), ["cancel timer step"]);
    assert_eq!(h.events, events, "no domain event");
    assert_eq!(h.status(), Status::Resolved);
    assert!(h.status().is_terminal());
    assert_eq!(h.state(), "resolved");
    let snapshot = h.saga.snapshot();
    assert_eq!(snapshot["state"]["name"], "resolved");
    assert_eq!(
        snapshot["resolution"],
        json!({
            "by": "grace",
            "note": "released the reservation in the warehouse system",
            "at": h.now,
        })
    );
    assert_eq!(h.saga.projection()[0].row["status"], "cancelled");
    // Late replies, cancels and operators change nothing.
    assert!(
        h.feed(Harness::reply(&stale, support::success_for(&stale)))
            .is_none()
    );
    assert!(h.cancel().is_none());
    assert!(
        h.saga
            .operator_actions(h.now)
            .iter()
            .all(|(_, r)| r.is_err())
    );
    assert!(matches!(h.operator(Recover), Verdict::Ignored(_)));
    assert_eq!(h.saga.snapshot(), snapshot);
    h.reload();
    assert_eq!(h.replayed_snapshot(), snapshot);
}

#[test]
fn snapshots_of_the_new_states_restore_and_older_snapshots_still_do() {
    // A resolved saga, and one in a recovered compensation round, restore losslessly.
    let mut h = resolved();
    h.reload();
    assert_eq!(h.status(), Status::Resolved);
    let mut h = failed();
    h.operator(Recover);
    h.reload();
    let again = h.command();
    h.fail(false, "still_corrupt").unwrap();
    assert_eq!(
        h.saga.snapshot()["steps"][0]["last_error"]["attempt"],
        again.attempt
    );
    // A snapshot written before operators existed (no resolution, no compensation round)
    // restores, and the new fields stay out of it until they are needed.
    let h = failed();
    let old = h.saga.snapshot();
    assert!(old.get("resolution").is_none());
    assert!(old["steps"][0].get("compensation_round_start").is_none());
    let restored = sagas::checkout::TYPE.restore(&old).unwrap();
    assert_eq!(restored.snapshot(), old);
    assert_eq!(restored.status(), Status::Failed);
}

#[test]
fn the_event_log_with_operator_inputs_replays_to_the_same_snapshot() {
    let mut h = compensation_retrying();
    h.operator(RetryNow);
    h.fail(false, "reservation_corrupt").unwrap();
    h.operator(Recover);
    h.fail(false, "reservation_corrupt").unwrap();
    h.operator(Resolve);
    assert_eq!(h.status(), Status::Resolved);
    // The log as the engine stores it: each input and its environment as JSON.
    let stored: Vec<(serde_json::Value, serde_json::Value)> = h
        .log
        .iter()
        .map(|l| {
            (
                serde_json::to_value(&l.input).unwrap(),
                serde_json::to_value(&l.env).unwrap(),
            )
        })
        .collect();
    let kinds: Vec<&str> = h.log.iter().map(|l| l.input.kind()).collect();
    assert_eq!(
        kinds,
        [
            "step_succeeded",
            "step_failed_permanent",
            "step_failed_retryable",
            "operator_retry_now",
            "step_failed_permanent",
            "operator_recover",
            "step_failed_permanent",
            "operator_resolve",
        ]
    );
    assert_eq!(
        stored[3].0,
        json!({"input": "operator", "by": "ada", "reason": "retry_now from the test",
               "action": "retry_now"})
    );
    let (mut saga, _) = sagas::checkout::TYPE
        .start(
            h.saga.id(),
            &support::start_request(),
            &sagas::api::Env::at(support::t0()),
        )
        .unwrap();
    for (input, env) in stored {
        let input: Input = serde_json::from_value(input).unwrap();
        let env: sagas::api::Env = serde_json::from_value(env).unwrap();
        assert!(matches!(saga.apply(&input, &env), Verdict::Applied(_)));
    }
    assert_eq!(saga.snapshot(), h.saga.snapshot());
}

#[test]
fn operator_actions_name_what_applies_in_each_state() {
    let offers = |h: Harness| -> Vec<bool> {
        h.saga
            .operator_actions(h.now)
            .into_iter()
            .map(|(_, r)| r.is_ok())
            .collect()
    };
    // [retry now, recover, resolve]
    assert_eq!(offers(running()), [false, false, false]);
    assert_eq!(offers(retrying()), [true, false, false]);
    assert_eq!(offers(parked()), [true, false, false]);
    assert_eq!(offers(compensation_retrying()), [true, false, false]);
    assert_eq!(offers(compensation_parked()), [true, false, false]);
    assert_eq!(offers(awaiting()), [false, false, false]);
    assert_eq!(offers(completed()), [false, false, false]);
    assert_eq!(offers(compensated()), [false, false, false]);
    assert_eq!(offers(failed()), [false, true, true]);
    assert_eq!(offers(failed_case()), [false, false, true]);
    assert_eq!(offers(failed_past_pivot()), [false, true, true]);
    assert_eq!(offers(resolved()), [false, false, false]);
}

#[test]
fn actions_statuses_and_inputs_have_stable_names() {
    for action in OperatorAction::ALL {
        assert_eq!(OperatorAction::parse(action.as_str()), Some(action));
        assert_eq!(
            serde_json::to_value(action).unwrap(),
            json!(action.as_str())
        );
    }
    assert_eq!(OperatorAction::parse("retry"), None);
    assert_eq!(Status::parse("resolved"), Some(Status::Resolved));
    assert_eq!(Status::ALL.last(), Some(&Status::Resolved));
    let input = |action| {
        Input::Operator(OperatorInput {
            by: "ada".into(),
            reason: "why".into(),
            action,
        })
    };
    assert_eq!(input(RetryNow).kind(), "operator_retry_now");
    assert_eq!(input(Recover).kind(), "operator_recover");
    assert_eq!(input(Resolve).kind(), "operator_resolve");
}

#[test]
fn step_infos_describe_each_step_for_the_dashboard() {
    let checkout = sagas::checkout::TYPE.steps();
    assert_eq!(checkout[0].name, "reserve_stock");
    assert_eq!(checkout[0].kind, "compensatable");
    assert_eq!(checkout[0].action, Some("reserve_stock"));
    assert_eq!(checkout[0].compensation, Some("release_stock"));
    assert_eq!(checkout[0].awaits, None);
    assert_eq!(checkout[3].kind, "pivot");
    assert_eq!(checkout[3].compensation, None);
    let fulfilment = fulfilment::TYPE.steps();
    let dispatch = fulfilment[3];
    assert_eq!(
        (
            dispatch.name,
            dispatch.kind,
            dispatch.service,
            dispatch.action
        ),
        ("dispatch", "pivot", None, None)
    );
    assert_eq!(dispatch.awaits, Some(fulfilment::DISPATCHED));
    assert_eq!(fulfilment[4].kind, "retriable_only");
    assert_eq!(fulfilment[4].awaits, Some(fulfilment::DELIVERY));
    assert_eq!(FLOW.steps()[2].kind, "retriable_only");
}

fn delivered(h: &mut Harness, n: u128) -> Option<Vec<sagas::api::Effect>> {
    h.feed(Input::Signal(Signal {
        id: SignalId::from_uuid(Uuid::from_u128(n)),
        name: DELIVERED.into(),
        payload: json!({}),
    }))
}

/// `Flow<true>` at its step after the pivot: the command in flight, the SLA armed.
fn tracking() -> Harness {
    let mut h = Harness::start_of(&TRACKED, json!({"order_id": Uuid::from_u128(6)}));
    h.ok().unwrap();
    let effects = h.ok().unwrap();
    assert_eq!(
        describe(&effects, h.now),
        [
            "sla notify +60000ms",
            "dispatch create_shipment fwd #1",
            "deadline notify fwd #1 +1000ms"
        ]
    );
    h
}

#[test]
fn a_recovered_step_whose_signal_came_does_not_wait_for_it_again() {
    let mut h = tracking();
    // The signal comes while the command is on its way; then the command fails for good.
    delivered(&mut h, 1).unwrap();
    h.fail(false, "no_such_address").unwrap();
    assert_eq!(h.status(), Status::Failed);
    let Verdict::Applied(effects) = h.operator(Recover) else {
        panic!("recovered")
    };
    assert_eq!(
        describe(&effects, h.now),
        [
            "dispatch create_shipment fwd #2",
            "deadline notify fwd #2 +1000ms"
        ],
        "no new SLA: the signal is in"
    );
    let effects = h.ok().unwrap();
    assert_eq!(describe(&effects, h.now), ["cancel timer step"]);
    assert_eq!(h.status(), Status::Completed);
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_recovered_step_whose_sla_expired_waits_for_its_signal_anew() {
    let mut h = tracking();
    h.ok().unwrap();
    assert_eq!(h.state(), "awaiting");
    h.fire_named("sla:notify").unwrap();
    assert_eq!(h.status(), Status::Failed);
    assert_eq!(h.saga.snapshot()["failure"]["code"], "sla_expired");
    h.now += Duration::hours(1);
    let Verdict::Applied(effects) = h.operator(Recover) else {
        panic!("recovered")
    };
    // A new round: the command again (its worker answers it as it did), and a new SLA.
    assert_eq!(
        describe(&effects, h.now),
        [
            "sla notify +60000ms",
            "dispatch create_shipment fwd #2",
            "deadline notify fwd #2 +1000ms"
        ]
    );
    h.ok().unwrap();
    assert_eq!(h.state(), "awaiting");
    let effects = delivered(&mut h, 2).unwrap();
    assert_eq!(
        describe(&effects, h.now),
        ["cancel timer sla:notify", "cancel timer step"]
    );
    assert_eq!(h.status(), Status::Completed);
    h.reload();
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}
