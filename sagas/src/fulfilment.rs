//! The fulfilment saga: what happens to a confirmed order until it is in the customer's hands.
//!
//! It starts on `OrderConfirmed` (one saga per order, whatever how often the event comes) and
//! runs five steps:
//!
//! 1. `verify_payment` (compensatable, `payment`): the checkout's charge was taken and is not
//!    refunded. Its compensation refunds that charge: every way this saga gives up refunds.
//! 2. `pick_and_pack` (compensatable, `inventory`): the warehouse picks the units the checkout
//!    consumed (ARCHITECTURE.md, "Stock": a completed checkout holds consumed stock). Undone by
//!    a `restock` movement, but only while nothing left the warehouse.
//! 3. `hand_over` (compensatable, `shipping`): the carrier is asked to collect the shipment the
//!    checkout booked. Undone by cancelling the shipment, while it was not dispatched.
//! 4. `dispatch` (the pivot): awaits the carrier's `ShipmentDispatched` (as the `dispatched`
//!    signal) under an SLA of hours. Once the parcel left, the order can no longer be cancelled;
//!    the saga emits `OrderShipped`.
//! 5. `deliver` (retriable only): awaits `ShipmentDelivered` or `ShipmentLost` (as the `delivery`
//!    signal) under an SLA of days; delivered, the saga completes (`OrderDelivered`).
//!
//! How it ends when it does not deliver:
//! - a customer's cancel before dispatch: the shipment is cancelled, the stock restocked, the
//!   charge refunded, in that order; the saga ends `compensated` (`OrderCancelled`);
//! - the carrier does not collect within the SLA: the same, and the saga ends `failed`: a case
//!   for an operator (why did the carrier not come?);
//! - a lost parcel, or no delivery within the SLA: the charge is refunded (the stock left with
//!   the parcel and is not restocked) and the saga ends `failed`, a case.
//!
//! A case is the `needs_attention` status of the read model (`orders.fulfilments`), with what
//! is needed in `case_reason`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::{EventStart, ProjectionRow, ProjectionTable, Status, Trigger};
use crate::events::{self, DomainEvent};
use crate::policy::{Backoff, Policy, StepPolicy};
use crate::shop::{CustomerRef, Line, Money, OrderId, ids, inventory, payment, shipping};
use crate::stepwise::{
    self, Await, Definition, Emit, End, SignalFailure, StepDef, StepKind, Undo, Unwind,
};
use crate::wire::{Body, Event, Invalid, Phase, SagaId, Signal, SignalId, Timestamp};

/// The name stored in `sagas.type`.
pub const NAME: &str = "fulfilment";

/// The signal a `ShipmentDispatched` event becomes.
pub const DISPATCHED: &str = "dispatched";
/// The signal a `ShipmentDelivered` or `ShipmentLost` event becomes.
pub const DELIVERY: &str = "delivery";

/// How long the carrier has to collect a parcel by default: twelve hours.
pub const DISPATCH_SLA_MS: u64 = 12 * 3_600_000;
/// How long the carrier has to deliver it once collected, by default: seven days.
pub const DELIVERY_SLA_MS: u64 = 7 * 86_400_000;

const FORWARD: Policy = Policy {
    max_attempts: 5,
    deadline_ms: 10_000,
    redispatches: 1,
    backoff: Backoff {
        initial_ms: 500,
        max_ms: 30_000,
        factor: 2.0,
        jitter: true,
    },
};

/// Compensations retry far longer, with a capped delay: giving up leaves money or stock held.
const COMPENSATION: Policy = crate::policy::PATIENT_COMPENSATION;

const POLICY: StepPolicy = StepPolicy {
    forward: FORWARD,
    compensation: COMPENSATION,
};

/// The index of the pivot, the carrier's collection.
const DISPATCH: usize = 3;

static STEPS: [StepDef; 5] = [
    StepDef {
        name: "verify_payment",
        kind: StepKind::Compensatable,
        service: Some(payment::SERVICE),
        action: Some("verify_charge"),
        compensation: Some("refund_payment"),
        awaits: None,
        policy: POLICY,
    },
    StepDef {
        name: "pick_and_pack",
        kind: StepKind::Compensatable,
        service: Some(inventory::SERVICE),
        action: Some("pick_order"),
        compensation: Some("restock"),
        awaits: None,
        policy: POLICY,
    },
    StepDef {
        name: "hand_over",
        kind: StepKind::Compensatable,
        service: Some(shipping::SERVICE),
        action: Some("request_pickup"),
        compensation: Some("cancel_shipment"),
        awaits: None,
        policy: POLICY,
    },
    StepDef {
        name: "dispatch",
        kind: StepKind::Pivot,
        service: None,
        action: None,
        compensation: None,
        awaits: Some(Await {
            signal: DISPATCHED,
            sla_ms: DISPATCH_SLA_MS,
            // The carrier may collect before the hand-over's reply is back.
            buffer: true,
        }),
        policy: POLICY,
    },
    StepDef {
        name: "deliver",
        kind: StepKind::RetriableOnly,
        service: None,
        action: None,
        compensation: None,
        awaits: Some(Await {
            signal: DELIVERY,
            sla_ms: DELIVERY_SLA_MS,
            buffer: true,
        }),
        policy: POLICY,
    },
];

/// What a fulfilment starts with: the confirmed order, from its `OrderConfirmed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    pub order_id: OrderId,
    /// The checkout saga that confirmed the order.
    pub checkout_saga_id: SagaId,
    pub customer: CustomerRef,
    pub lines: Vec<Line>,
    pub total: Money,
    /// The checkout's charge (what a refund names).
    pub charge_id: Uuid,
    /// The shipment the checkout booked.
    pub shipment_id: Uuid,
    /// The stock reservation the checkout consumed.
    pub reservation_id: Uuid,
}

/// What a fulfilment carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    #[serde(flatten)]
    pub order: Start,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_number: Option<String>,
    /// When the carrier collected the parcel (from its event): nothing is restocked or
    /// cancelled after that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Timestamp>,
    /// What an operator must look at, once the saga opened a case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<String>,
    /// The charge was refunded by this saga.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refunded: bool,
    /// The picked units went back on the shelf.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restocked: bool,
}

/// What the carrier's events carry to the saga, as signal payloads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CarrierReport {
    Dispatched {
        tracking_number: String,
        at: Timestamp,
    },
    Delivered {
        at: Timestamp,
    },
    Lost {
        reason: String,
        at: Timestamp,
    },
}

/// The fulfilment definition.
#[derive(Clone, Debug, PartialEq)]
pub struct Fulfilment;

/// The fulfilment's read model: one row per order it ships.
pub const FULFILMENTS: ProjectionTable = ProjectionTable {
    table: "orders.fulfilments",
    key: &["order_id"],
    columns: &[
        "order_id",
        "saga_id",
        "status",
        "shipment_id",
        "tracking_number",
        "dispatched_at",
        "delivered_at",
        "case_reason",
        "refunded",
        "restocked",
        "started_at",
    ],
};

impl Definition for Fulfilment {
    const NAME: &'static str = NAME;
    const PROJECTIONS: &'static [ProjectionTable] = &[FULFILMENTS];
    const TRIGGERS: &'static [Trigger] = &[Trigger {
        source: events::order::OrderConfirmed::SOURCE,
        event: events::order::OrderConfirmed::NAME,
    }];
    const SIGNALS: &'static [Trigger] = &[
        Trigger {
            source: events::shipping::ShipmentDispatched::SOURCE,
            event: events::shipping::ShipmentDispatched::NAME,
        },
        Trigger {
            source: events::shipping::ShipmentDelivered::SOURCE,
            event: events::shipping::ShipmentDelivered::NAME,
        },
        Trigger {
            source: events::shipping::ShipmentLost::SOURCE,
            event: events::shipping::ShipmentLost::NAME,
        },
    ];
    type Data = Delivery;
    type Start = Start;

    fn steps() -> &'static [StepDef] {
        &STEPS
    }

    fn init(start: Start) -> Result<Delivery, Invalid> {
        if start.lines.is_empty() {
            return Err(Invalid("an order to fulfil needs at least one line".into()));
        }
        Ok(Delivery {
            order: start,
            tracking_number: None,
            dispatched_at: None,
            delivered_at: None,
            case: None,
            refunded: false,
            restocked: false,
        })
    }

    fn command(d: &Delivery, _saga: SagaId, step: &StepDef, phase: Phase) -> Body {
        let o = &d.order;
        let order_id = o.order_id;
        match (step.name, phase) {
            ("verify_payment", Phase::Forward) => Body::of(&payment::Command::VerifyCharge {
                order_id,
                amount: o.total.clone(),
                charge_id: o.charge_id,
            }),
            ("verify_payment", Phase::Compensation) => Body::of(&payment::Command::RefundPayment {
                order_id,
                amount: o.total.clone(),
                charge_id: Some(o.charge_id),
            }),
            ("pick_and_pack", Phase::Forward) => Body::of(&inventory::Command::PickOrder {
                order_id,
                reservation_id: o.reservation_id,
            }),
            ("pick_and_pack", Phase::Compensation) => Body::of(&inventory::Command::Restock {
                order_id,
                reservation_id: o.reservation_id,
            }),
            ("hand_over", Phase::Forward) => Body::of(&shipping::Command::RequestPickup {
                order_id,
                shipment_id: o.shipment_id,
            }),
            ("hand_over", Phase::Compensation) => Body::of(&shipping::Command::CancelShipment {
                order_id,
                shipment_id: Some(o.shipment_id),
            }),
            (other, phase) => unreachable!("the fulfilment has no {} of {other}", phase.as_str()),
        }
    }

    fn record(d: &mut Delivery, _step: &StepDef, output: &Body) {
        if let Ok(shipping::Output::PickupRequested {
            tracking_number, ..
        }) = output.decode()
        {
            d.tracking_number.get_or_insert(tracking_number);
        }
    }

    fn record_undo(d: &mut Delivery, step: &StepDef, _output: &Body) {
        match step.name {
            "verify_payment" => d.refunded = true,
            "pick_and_pack" => d.restocked = true,
            _ => {}
        }
    }

    fn on_signal(d: &mut Delivery, _step: &StepDef, signal: &Signal) -> Result<(), SignalFailure> {
        let report: CarrierReport =
            serde_json::from_value(signal.payload.clone()).map_err(|e| SignalFailure {
                code: "bad_signal".into(),
                reason: format!("the carrier's report could not be read: {e}"),
            })?;
        match (signal.name.as_str(), report) {
            (
                DISPATCHED,
                CarrierReport::Dispatched {
                    tracking_number,
                    at,
                },
            ) => {
                d.tracking_number = Some(tracking_number);
                d.dispatched_at = Some(at);
                Ok(())
            }
            (DELIVERY, CarrierReport::Delivered { at }) => {
                d.delivered_at = Some(at);
                Ok(())
            }
            (DELIVERY, CarrierReport::Lost { reason, .. }) => Err(SignalFailure {
                code: "parcel_lost".into(),
                reason: format!("the carrier lost the parcel: {reason}"),
            }),
            (name, report) => Err(SignalFailure {
                code: "bad_signal".into(),
                reason: format!("signal {name} cannot report {report:?}"),
            }),
        }
    }

    /// Every failure is a case for an operator: the carrier did not collect, lost the parcel
    /// or did not deliver in time, or a step could not be done. (A customer's cancel is not a
    /// failure.)
    fn on_failure(d: &mut Delivery, step: &StepDef, code: &str, reason: &str) -> Unwind {
        let what = match (step.name, code) {
            ("dispatch", "sla_expired") => {
                "the carrier did not collect the parcel in time: ask the carrier why; the \
                 shipment was cancelled, the stock restocked and the customer refunded"
            }
            ("deliver", "sla_expired") => {
                "the parcel was not delivered in time: trace it with the carrier; the customer \
                 was refunded"
            }
            ("deliver", "parcel_lost") => {
                "the carrier lost the parcel: claim it from the carrier; the customer was refunded"
            }
            _ => "the order could not be fulfilled; what could be undone was",
        };
        d.case = Some(format!("{what} ({}: {reason})", step.name));
        Unwind::Case
    }

    /// The compensations undo what the checkout did (its charge, the stock it consumed, the
    /// shipment it booked), which the fulfilment took over: they run whether or not their step
    /// ran (a cancel that comes before the pick still restocks). Once the parcel left the
    /// warehouse, its units are not restocked and its shipment not cancelled; the refund is
    /// always made.
    fn undo(d: &Delivery, step: &StepDef) -> Undo {
        match step.name {
            "pick_and_pack" | "hand_over" if d.dispatched_at.is_some() => Undo::Keep,
            _ => Undo::Always,
        }
    }

    fn subject(d: &Delivery) -> Option<String> {
        Some(d.order.order_id.to_string())
    }

    fn start_on(event: &Event) -> Option<EventStart> {
        let confirmed: events::order::OrderConfirmed = events::decode(event).ok()?;
        let checkout = confirmed.saga_id;
        let start = Start {
            order_id: confirmed.order_id,
            checkout_saga_id: checkout,
            customer: confirmed.customer,
            lines: confirmed.lines,
            total: confirmed.total,
            charge_id: confirmed
                .charge_id
                .unwrap_or_else(|| ids::charge(checkout, "charge_payment")),
            shipment_id: confirmed
                .shipment_id
                .unwrap_or_else(|| ids::shipment(checkout, "create_shipment")),
            reservation_id: ids::reservation(checkout, "reserve_stock"),
        };
        Some(EventStart {
            key: confirmed.order_id.to_string(),
            request: serde_json::to_value(&start).expect("starts serialize"),
        })
    }

    fn signal_on(event: &Event) -> Option<(String, Signal)> {
        use events::shipping::{ShipmentDelivered, ShipmentDispatched, ShipmentLost};
        let (order_id, name, report) = match event.name.as_str() {
            ShipmentDispatched::NAME => {
                let e: ShipmentDispatched = events::decode(event).ok()?;
                let report = CarrierReport::Dispatched {
                    tracking_number: e.tracking_number,
                    at: event.occurred_at,
                };
                (e.order_id, DISPATCHED, report)
            }
            ShipmentDelivered::NAME => {
                let e: ShipmentDelivered = events::decode(event).ok()?;
                let report = CarrierReport::Delivered {
                    at: event.occurred_at,
                };
                (e.order_id, DELIVERY, report)
            }
            ShipmentLost::NAME => {
                let e: ShipmentLost = events::decode(event).ok()?;
                let report = CarrierReport::Lost {
                    reason: e.reason,
                    at: event.occurred_at,
                };
                (e.order_id, DELIVERY, report)
            }
            _ => return None,
        };
        let signal = Signal {
            id: SignalId::from_event(event.id, name),
            name: name.to_owned(),
            payload: serde_json::to_value(&report).expect("reports serialize"),
        };
        Some((order_id.to_string(), signal))
    }

    fn on_step_done(d: &Delivery, saga: SagaId, step: &StepDef) -> Vec<Emit> {
        if step.name != STEPS[DISPATCH].name {
            return Vec::new();
        }
        let o = &d.order;
        vec![emit(&events::order::OrderShipped {
            order_id: o.order_id,
            saga_id: saga,
            customer: o.customer.clone(),
            shipment_id: o.shipment_id,
            tracking_number: d.tracking_number.clone().unwrap_or_default(),
        })]
    }

    fn on_end(d: &Delivery, saga: SagaId, end: End<'_>) -> Vec<Emit> {
        let o = &d.order;
        match end {
            End::Completed => vec![emit(&events::order::OrderDelivered {
                order_id: o.order_id,
                saga_id: saga,
                customer: o.customer.clone(),
                shipment_id: o.shipment_id,
            })],
            End::Compensated { reason } | End::Failed { reason } => {
                vec![emit(&events::order::OrderCancelled {
                    order_id: o.order_id,
                    saga_id: saga,
                    customer: o.customer.clone(),
                    reason: d.case.clone().unwrap_or_else(|| reason.to_owned()),
                    needs_operator: matches!(end, End::Failed { .. }),
                    refunded: Some(d.refunded),
                })]
            }
        }
    }

    fn project(
        d: &Delivery,
        saga: SagaId,
        status: Status,
        started_at: Timestamp,
    ) -> Vec<ProjectionRow> {
        let status = match status {
            Status::Completed => "delivered",
            Status::Compensated => "cancelled",
            Status::Failed => "needs_attention",
            // Every failed fulfilment undid what it could and told the customer its order was
            // cancelled; once an operator resolved the case by hand it needs no attention.
            Status::Resolved => "cancelled",
            Status::Compensating => "cancelling",
            Status::Running | Status::Parked if d.dispatched_at.is_some() => "shipped",
            Status::Running | Status::Parked => "preparing",
        };
        let row = serde_json::json!({
            "order_id": d.order.order_id,
            "saga_id": saga,
            "status": status,
            "shipment_id": d.order.shipment_id,
            "tracking_number": d.tracking_number,
            "dispatched_at": d.dispatched_at,
            "delivered_at": d.delivered_at,
            "case_reason": d.case,
            "refunded": d.refunded,
            "restocked": d.restocked,
            "started_at": started_at,
        });
        let serde_json::Value::Object(row) = row else {
            unreachable!("a row is an object")
        };
        vec![ProjectionRow {
            table: FULFILMENTS.table,
            row,
        }]
    }
}

fn emit<E: DomainEvent>(e: &E) -> Emit {
    Emit {
        source: E::SOURCE,
        name: E::NAME,
        body: events::body(e),
    }
}

/// The fulfilment saga type, for the engine's registry.
pub static TYPE: stepwise::Type<Fulfilment> = stepwise::Type::new();

/// A live fulfilment.
pub type Instance = stepwise::Instance<Fulfilment>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_valid() {
        stepwise::validate_definition(&STEPS).unwrap();
    }
}
