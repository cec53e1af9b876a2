//! The fulfilment saga at its boundary: the carrier's reports in (as signals), commands,
//! timers and events out, with a simulated clock. Every path of the module's doc: delivered,
//! cancelled before dispatch, refused after, the carrier that does not come, the lost parcel,
//! the parcel that never arrives; and signals that come early, twice or late.

mod support;

use chrono::Duration;
use sagas::api::{Input, Status};
use sagas::fulfilment::{self, CarrierReport};
use sagas::wire::{Signal, SignalId};
use serde_json::json;
use support::{Harness, t0};
use uuid::Uuid;

const CHECKOUT: u128 = 0x0191_d0a0_0000_7000_8000_0000_0000_0007;

fn start() -> Harness {
    Harness::start_of(
        &fulfilment::TYPE,
        json!({
            "order_id": "0191d0a0-0000-7000-8000-000000000001",
            "checkout_saga_id": Uuid::from_u128(CHECKOUT),
            "customer": {"id": "c-1"},
            "lines": [{"sku": "TSHIRT-M", "quantity": 2}, {"sku": "MUG", "quantity": 1}],
            "total": {"minor": 3900, "currency": "EUR"},
            "charge_id": Uuid::from_u128(9),
            "shipment_id": Uuid::from_u128(10),
            "reservation_id": Uuid::from_u128(11),
        }),
    )
}

fn report(
    h: &mut Harness,
    n: u128,
    name: &str,
    report: CarrierReport,
) -> Option<Vec<sagas::api::Effect>> {
    h.feed(Input::Signal(Signal {
        id: SignalId::from_uuid(Uuid::from_u128(n)),
        name: name.into(),
        payload: serde_json::to_value(report).unwrap(),
    }))
}

fn dispatched(h: &mut Harness, n: u128) -> Option<Vec<sagas::api::Effect>> {
    let at = h.now;
    report(
        h,
        n,
        fulfilment::DISPATCHED,
        CarrierReport::Dispatched {
            tracking_number: "TRK-9".into(),
            at,
        },
    )
}

fn delivered(h: &mut Harness, n: u128) -> Option<Vec<sagas::api::Effect>> {
    let at = h.now;
    report(h, n, fulfilment::DELIVERY, CarrierReport::Delivered { at })
}

fn lost(h: &mut Harness, n: u128) -> Option<Vec<sagas::api::Effect>> {
    let at = h.now;
    report(
        h,
        n,
        fulfilment::DELIVERY,
        CarrierReport::Lost {
            reason: "damaged at the hub".into(),
            at,
        },
    )
}

/// Verify, pick and hand over: the saga then awaits the carrier.
fn handed_over() -> Harness {
    let mut h = start();
    for action in ["verify_charge", "pick_order", "request_pickup"] {
        assert_eq!(h.command().action(), action);
        h.ok().expect("the step's reply is applied");
    }
    assert_eq!(h.state(), "awaiting");
    assert!(
        h.timers.contains_key("sla:dispatch"),
        "the dispatch SLA is armed"
    );
    h
}

fn actions_after(h: &mut Harness) -> Vec<String> {
    // Answer every command with success until the saga ends, and name them.
    let mut done = Vec::new();
    while !matches!(
        h.status(),
        Status::Completed | Status::Compensated | Status::Failed
    ) {
        done.push(h.command().action().to_owned());
        h.ok().expect("applied");
    }
    done
}

fn projection(h: &Harness) -> serde_json::Map<String, serde_json::Value> {
    let rows = h.saga.projection();
    assert_eq!(rows.len(), 1);
    rows[0].row.clone()
}

#[test]
fn a_parcel_delivered_completes_with_shipped_then_delivered() {
    let mut h = handed_over();
    assert!(h.events.is_empty(), "nothing is emitted before dispatch");
    assert_eq!(projection(&h)["status"], "preparing");
    dispatched(&mut h, 1).expect("the carrier's dispatch is applied");
    assert_eq!(h.events, ["OrderShipped"]);
    assert!(h.timers.contains_key("sla:deliver"));
    assert!(
        !h.timers.contains_key("sla:dispatch"),
        "the dispatch SLA is disarmed"
    );
    assert_eq!(projection(&h)["status"], "shipped");
    assert_eq!(projection(&h)["tracking_number"], "TRK-9");
    h.now += Duration::days(2);
    delivered(&mut h, 2).expect("applied");
    assert_eq!(h.status(), Status::Completed);
    assert_eq!(h.events, ["OrderShipped", "OrderDelivered"]);
    assert_eq!(projection(&h)["status"], "delivered");
    assert!(h.timers.is_empty(), "no timer left: {:?}", h.timers.keys());
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_cancel_before_dispatch_cancels_the_shipment_restocks_and_refunds_in_that_order() {
    let mut h = handed_over();
    h.cancel().expect("a cancel before dispatch is taken");
    let undone = actions_after(&mut h);
    assert_eq!(undone, ["cancel_shipment", "restock", "refund_payment"]);
    assert_eq!(h.status(), Status::Compensated);
    let row = projection(&h);
    assert_eq!(row["status"], "cancelled");
    assert_eq!(row["refunded"], true);
    assert_eq!(row["restocked"], true);
    assert_eq!(h.events, ["OrderCancelled"]);
    let cancelled = h.saga.snapshot();
    assert!(
        cancelled
            .to_string()
            .contains("customer changed their mind")
    );
}

#[test]
fn a_cancel_before_any_step_is_done_still_undoes_what_the_checkout_did() {
    let mut h = start();
    assert_eq!(h.command().action(), "verify_charge");
    h.cancel().expect("taken");
    // The checkout's shipment, stock and charge: undone whatever the fulfilment did yet.
    assert_eq!(
        actions_after(&mut h),
        ["cancel_shipment", "restock", "refund_payment"]
    );
    assert_eq!(h.status(), Status::Compensated);
    assert_eq!(projection(&h)["refunded"], true);
    assert_eq!(projection(&h)["restocked"], true);
}

#[test]
fn a_cancel_after_dispatch_is_refused_and_changes_nothing() {
    let mut h = handed_over();
    dispatched(&mut h, 1).unwrap();
    let before = h.saga.snapshot();
    assert!(h.cancel().is_none(), "a cancel after dispatch is ignored");
    assert_eq!(h.saga.snapshot(), before);
}

#[test]
fn a_carrier_that_does_not_collect_undoes_everything_and_opens_a_case() {
    let mut h = handed_over();
    let sla = h.timers["sla:dispatch"].1;
    assert_eq!(
        sla,
        t0() + Duration::milliseconds(fulfilment::DISPATCH_SLA_MS as i64)
    );
    h.fire_named("sla:dispatch").expect("the SLA expires");
    let undone = actions_after(&mut h);
    assert_eq!(undone, ["cancel_shipment", "restock", "refund_payment"]);
    assert_eq!(h.status(), Status::Failed, "a case for an operator");
    let row = projection(&h);
    assert_eq!(row["status"], "needs_attention");
    assert!(
        row["case_reason"]
            .as_str()
            .unwrap()
            .contains("did not collect"),
        "{row:?}"
    );
    assert_eq!(h.events, ["OrderCancelled"]);
}

#[test]
fn a_lost_parcel_refunds_only_and_opens_a_case() {
    let mut h = handed_over();
    dispatched(&mut h, 1).unwrap();
    lost(&mut h, 2).expect("the loss is applied");
    let undone = actions_after(&mut h);
    assert_eq!(
        undone,
        ["refund_payment"],
        "nothing left the warehouse to restock"
    );
    assert_eq!(h.status(), Status::Failed);
    let row = projection(&h);
    assert_eq!(row["status"], "needs_attention");
    assert_eq!(row["refunded"], true);
    assert_eq!(row["restocked"], false);
    assert!(
        row["case_reason"]
            .as_str()
            .unwrap()
            .contains("lost the parcel")
    );
    assert_eq!(h.events, ["OrderShipped", "OrderCancelled"]);
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_parcel_not_delivered_within_its_sla_refunds_and_opens_a_case() {
    let mut h = handed_over();
    dispatched(&mut h, 1).unwrap();
    h.fire_named("sla:deliver")
        .expect("the delivery SLA expires");
    assert_eq!(actions_after(&mut h), ["refund_payment"]);
    assert_eq!(h.status(), Status::Failed);
    assert!(
        projection(&h)["case_reason"]
            .as_str()
            .unwrap()
            .contains("not delivered in time")
    );
}

#[test]
fn reports_that_come_early_are_kept_and_those_sent_twice_are_applied_once() {
    let mut h = start();
    h.ok().unwrap(); // verify
    h.ok().unwrap(); // pick
    assert_eq!(h.command().action(), "request_pickup");
    // The carrier collects and delivers before the hand-over's reply is back.
    dispatched(&mut h, 1).expect("kept for the dispatch step");
    assert!(
        dispatched(&mut h, 1).is_none(),
        "the same report twice changes nothing"
    );
    delivered(&mut h, 2).expect("kept for the deliver step");
    h.ok().unwrap();
    assert_eq!(h.status(), Status::Completed);
    assert_eq!(h.events, ["OrderShipped", "OrderDelivered"]);
    h.reload();
    assert_eq!(h.replayed_snapshot(), h.saga.snapshot());
}

#[test]
fn a_report_after_the_end_is_ignored() {
    let mut h = handed_over();
    dispatched(&mut h, 1).unwrap();
    delivered(&mut h, 2).unwrap();
    assert!(lost(&mut h, 3).is_none());
    assert_eq!(h.status(), Status::Completed);
}

#[test]
fn a_charge_that_cannot_be_verified_is_not_shipped_and_opens_a_case() {
    let mut h = start();
    h.fail(false, "charge_refunded").unwrap();
    // Nothing leaves for an order that is not paid: the shipment is cancelled and the stock
    // put back (the refund finds nothing more to refund).
    assert_eq!(
        actions_after(&mut h),
        ["cancel_shipment", "restock", "refund_payment"]
    );
    assert_eq!(h.status(), Status::Failed);
    assert!(
        projection(&h)["case_reason"]
            .as_str()
            .unwrap()
            .contains("could not be fulfilled")
    );
    assert_eq!(h.events, ["OrderCancelled"]);
}

#[test]
fn it_starts_on_order_confirmed_once_per_order_and_takes_the_carriers_events_as_signals() {
    use sagas::api::SagaType;
    use sagas::events::{self, DomainEvent};
    let order_id = "0191d0a0-0000-7000-8000-000000000001";
    let event = |name: &str, source: &str, body: serde_json::Value| sagas::wire::Event {
        id: sagas::wire::EventId::from_uuid(Uuid::from_u128(77)),
        name: name.into(),
        v: 1,
        occurred_at: t0(),
        source: source.into(),
        correlation_id: None,
        body: serde_json::from_value(body).unwrap(),
    };
    let confirmed = event(
        events::order::OrderConfirmed::NAME,
        "order",
        json!({
            "order_id": order_id,
            "saga_id": Uuid::from_u128(CHECKOUT),
            "customer": {"id": "c-1"},
            "lines": [{"sku": "MUG", "quantity": 1}],
            "total": {"minor": 900, "currency": "EUR"},
        }),
    );
    let start = fulfilment::TYPE
        .start_on(&confirmed)
        .expect("a confirmed order starts one");
    assert_eq!(start.key, order_id, "one fulfilment per order");
    let checkout = sagas::wire::SagaId::from_uuid(Uuid::from_u128(CHECKOUT));
    assert_eq!(
        start.request["charge_id"],
        json!(sagas::shop::ids::charge(checkout, "charge_payment")),
        "an event without the ids names the checkout's all the same"
    );
    let dispatched = event(
        events::shipping::ShipmentDispatched::NAME,
        "shipping",
        json!({"shipment_id": Uuid::from_u128(10), "order_id": order_id,
               "tracking_number": "TRK-9", "carrier_event_id": "c-1"}),
    );
    let (subject, signal) = fulfilment::TYPE.signal_on(&dispatched).expect("a signal");
    assert_eq!(subject, order_id);
    assert_eq!(signal.name, fulfilment::DISPATCHED);
    let (_, again) = fulfilment::TYPE.signal_on(&dispatched).unwrap();
    assert_eq!(signal.id, again.id, "the same event is the same signal");
}
