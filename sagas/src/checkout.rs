//! The checkout saga: reserve the stock of an order, charge the customer, book the shipment,
//! then commit the stock (the sale).
//!
//! The first three steps are compensatable: a permanent failure (out of stock, card declined,
//! address the carrier refuses), exhausted attempts or a cancel undo the finished ones in
//! reverse: cancel the shipment, refund the payment, release the stock. The last step,
//! `commit_stock`, is the pivot: the inventory service consumes the order's reservation, in the
//! transaction that checks the stock is there, and the order is confirmed when it succeeds.
//! A reservation is a hold with an expiry; if it ran out while the saga was held up (a stalled
//! step, an outage, a breaker open for longer than the hold) and the stock went to another
//! order, the commit fails and everything is undone, the charge refunded. So whatever the
//! timing, the units of completed orders never exceed the stock, and each completed order's
//! units were consumed from its own reservation (ARCHITECTURE.md, "Stock").
//!
//! To make that rare, the saga renews its reservation before charging or shipping when it
//! could run out while the step is in flight (`must_redo`), and the orchestrator refuses at
//! start-up a hold too short for that ([`check_hold`]).

use serde::{Deserialize, Serialize};

use crate::api::{ProjectionRow, ProjectionTable, Status};
use crate::events::{self, DomainEvent};
use crate::policy::{Backoff, Policy, StepPolicy};
use crate::shop::{
    Address, Currency, Customer, CustomerRef, Line, Money, OrderId, ids, inventory, payment,
    shipping,
};
use crate::stepwise::{self, Definition, Emit, End, StepDef, StepKind};
use crate::wire::{Body, Invalid, Phase, SagaId, Timestamp};

/// The name stored in `sagas.type`.
pub const NAME: &str = "checkout";

/// How long a stock reservation holds by default (the Product service's 30 minutes).
pub const DEFAULT_HOLD_SECONDS: u32 = 30 * 60;

const FORWARD_BACKOFF: Backoff = Backoff {
    initial_ms: 200,
    max_ms: 5_000,
    factor: 2.0,
    jitter: true,
};

/// Compensations retry far longer, with a capped delay: giving up leaves money or stock held.
const COMPENSATION: Policy = crate::policy::PATIENT_COMPENSATION;

const fn forward(deadline_ms: u64) -> Policy {
    Policy {
        max_attempts: 3,
        deadline_ms,
        // A missing reply is more often a lost message than a dead worker: send the command
        // once more before the attempt counts as failed.
        redispatches: 1,
        backoff: FORWARD_BACKOFF,
    }
}

/// The index of the reservation step.
const RESERVE: usize = 0;
/// The index of the commit (the pivot).
const COMMIT: usize = 3;

static STEPS: [StepDef; 4] = [
    StepDef {
        name: "reserve_stock",
        kind: StepKind::Compensatable,
        service: Some(inventory::SERVICE),
        action: Some("reserve_stock"),
        compensation: Some("release_stock"),
        awaits: None,
        policy: StepPolicy {
            forward: forward(10_000),
            compensation: COMPENSATION,
        },
    },
    StepDef {
        name: "charge_payment",
        kind: StepKind::Compensatable,
        service: Some(payment::SERVICE),
        action: Some("charge_payment"),
        compensation: Some("refund_payment"),
        awaits: None,
        policy: StepPolicy {
            forward: forward(15_000),
            compensation: COMPENSATION,
        },
    },
    StepDef {
        name: "create_shipment",
        kind: StepKind::Compensatable,
        service: Some(shipping::SERVICE),
        action: Some("create_shipment"),
        compensation: Some("cancel_shipment"),
        awaits: None,
        policy: StepPolicy {
            forward: forward(10_000),
            compensation: COMPENSATION,
        },
    },
    // The pivot: once the stock is committed the order is confirmed and nothing is undone. By
    // then the customer paid and the parcel is booked, so it is tried longer than the others
    // before the saga gives up and undoes all that. (A pivot has no compensation; the release
    // of the first step returns stock that a commit whose answer was lost did consume.)
    StepDef {
        name: "commit_stock",
        kind: StepKind::Pivot,
        service: Some(inventory::SERVICE),
        action: Some("commit_stock"),
        compensation: None,
        awaits: None,
        policy: StepPolicy {
            forward: Policy {
                max_attempts: 6,
                ..forward(10_000)
            },
            compensation: COMPENSATION,
        },
    },
];

/// An order line with the price it was sold at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricedLine {
    #[serde(flatten)]
    pub line: Line,
    /// Price of one unit when the checkout started.
    pub unit_price: Money,
}

/// What the orchestrator starts a checkout with. The payment token itself is not here: it is a
/// secret of the saga (`orchestrator.saga_secrets`), given to the payment service only; the
/// saga keeps a redacted form to show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    pub order_id: OrderId,
    pub customer: Customer,
    pub lines: Vec<PricedLine>,
    /// The payment token, redacted ([`token_hint`]).
    #[serde(default)]
    pub payment_token_hint: String,
    pub shipping_address: Address,
    #[serde(default = "default_hold")]
    pub reservation_hold_seconds: u32,
}

fn default_hold() -> u32 {
    DEFAULT_HOLD_SECONDS
}

/// What a checkout carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: OrderId,
    pub customer: Customer,
    pub lines: Vec<PricedLine>,
    pub total: Money,
    /// The payment token, redacted ([`token_hint`]).
    #[serde(default)]
    pub payment_token_hint: String,
    pub shipping_address: Address,
    pub reservation_hold_seconds: u32,
    /// When the current stock reservation runs out (from the inventory's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_expires_at: Option<Timestamp>,
    /// The charge was refunded (a refund was made, not only a tombstone left).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refunded: bool,
}

impl Order {
    fn lines(&self) -> Vec<Line> {
        self.lines.iter().map(|l| l.line.clone()).collect()
    }
}

/// The checkout definition.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkout;

impl Definition for Checkout {
    const NAME: &'static str = NAME;
    const PROJECTIONS: &'static [ProjectionTable] = &[ORDERS, ORDER_LINES];
    type Data = Order;
    type Start = Start;

    fn steps() -> &'static [StepDef] {
        &STEPS
    }

    fn init(start: Start) -> Result<Order, Invalid> {
        let first = start
            .lines
            .first()
            .ok_or_else(|| Invalid("an order needs at least one line".into()))?;
        let currency: Currency = first.unit_price.currency.clone();
        let mut total: i64 = 0;
        for (i, l) in start.lines.iter().enumerate() {
            if start.lines[..i].iter().any(|o| o.line.sku == l.line.sku) {
                return Err(Invalid(format!("SKU {} appears twice", l.line.sku)));
            }
            if l.unit_price.currency != currency {
                return Err(Invalid("all lines must have the same currency".into()));
            }
            if l.unit_price.minor < 0 {
                return Err(Invalid(format!("negative price for {}", l.line.sku)));
            }
            total = l
                .unit_price
                .minor
                .checked_mul(i64::from(l.line.quantity.get()))
                .and_then(|x| x.checked_add(total))
                .ok_or_else(|| Invalid("order total overflows".into()))?;
        }
        Ok(Order {
            order_id: start.order_id,
            customer: start.customer,
            total: Money {
                minor: total,
                currency,
            },
            lines: start.lines,
            payment_token_hint: start.payment_token_hint,
            shipping_address: start.shipping_address,
            reservation_hold_seconds: start.reservation_hold_seconds,
            reservation_expires_at: None,
            refunded: false,
        })
    }

    fn command(order: &Order, saga: SagaId, step: &StepDef, phase: Phase) -> Body {
        let order_id = order.order_id;
        match (step.name, phase) {
            ("reserve_stock", Phase::Forward) => Body::of(&inventory::Command::ReserveStock {
                order_id,
                lines: order.lines(),
                hold_seconds: order.reservation_hold_seconds,
            }),
            ("reserve_stock", Phase::Compensation) => Body::of(&inventory::Command::ReleaseStock {
                order_id,
                reservation_id: Some(ids::reservation(saga, step.name)),
            }),
            ("charge_payment", Phase::Forward) => Body::of(&payment::Command::ChargePayment {
                order_id,
                customer_id: order.customer.id.clone(),
                amount: order.total.clone(),
            }),
            ("charge_payment", Phase::Compensation) => Body::of(&payment::Command::RefundPayment {
                order_id,
                amount: order.total.clone(),
                charge_id: Some(ids::charge(saga, step.name)),
            }),
            ("create_shipment", Phase::Forward) => Body::of(&shipping::Command::CreateShipment {
                order_id,
                lines: order.lines(),
            }),
            ("create_shipment", Phase::Compensation) => {
                Body::of(&shipping::Command::CancelShipment {
                    order_id,
                    shipment_id: Some(ids::shipment(saga, step.name)),
                })
            }
            ("commit_stock", _) => Body::of(&inventory::Command::CommitStock { order_id }),
            (other, phase) => unreachable!("the checkout has no {} of {other}", phase.as_str()),
        }
    }

    fn record(order: &mut Order, _step: &StepDef, output: &Body) {
        if let Ok(inventory::Output::StockReserved { expires_at, .. }) = output.decode() {
            order.reservation_expires_at = Some(expires_at);
        }
    }

    /// A reservation that could run out while the next payment or shipment attempt is in
    /// flight (`in_flight`: its deadline times its dispatches) is renewed first, with some
    /// slack: the customer keeps the stock if it is there, and is not charged against stock the
    /// inventory service may have released. If the stock is gone, the renewal fails
    /// permanently and the saga compensates (refunding a charge already taken). A hold too
    /// short to cover the step is not renewed over and over: then the commit decides (and
    /// [`check_hold`] refuses such a hold at start-up). The commit itself is not preceded by a
    /// renewal: it takes the stock of an expired reservation if the stock is still there.
    fn must_redo(
        order: &Order,
        next: usize,
        now: Timestamp,
        in_flight: std::time::Duration,
    ) -> Option<usize> {
        if next == RESERVE || next >= COMMIT {
            return None;
        }
        let expires_at = order.reservation_expires_at?;
        let hold = std::time::Duration::from_secs(u64::from(order.reservation_hold_seconds));
        let margin = in_flight + slack(hold);
        if hold <= margin {
            return None;
        }
        let margin = chrono::Duration::from_std(margin).ok()?;
        (now + margin >= expires_at).then_some(RESERVE)
    }

    fn subject(order: &Order) -> Option<String> {
        Some(order.order_id.to_string())
    }

    /// `OrderCreated`: the order exists, nothing is held or charged yet.
    fn on_start(order: &Order, saga: SagaId) -> Vec<Emit> {
        vec![emit(&events::order::OrderCreated {
            order_id: order.order_id,
            saga_id: saga,
            customer: CustomerRef::from(&order.customer),
            lines: order.lines(),
            total: order.total.clone(),
        })]
    }

    fn record_undo(order: &mut Order, step: &StepDef, output: &Body) {
        if step.name == "charge_payment"
            && let Ok(payment::Output::PaymentRefunded { refund_id: Some(_) }) = output.decode()
        {
            order.refunded = true;
        }
    }

    fn on_end(order: &Order, saga: SagaId, end: End<'_>) -> Vec<Emit> {
        let customer = CustomerRef::from(&order.customer);
        let cancelled = |reason: &str, needs_operator: bool| events::order::OrderCancelled {
            order_id: order.order_id,
            saga_id: saga,
            customer: customer.clone(),
            reason: reason.to_owned(),
            needs_operator,
            refunded: Some(order.refunded),
        };
        vec![match end {
            End::Completed => emit(&events::order::OrderConfirmed {
                order_id: order.order_id,
                saga_id: saga,
                customer: customer.clone(),
                lines: order.lines(),
                total: order.total.clone(),
                charge_id: Some(ids::charge(saga, "charge_payment")),
                shipment_id: Some(ids::shipment(saga, "create_shipment")),
            }),
            End::Compensated { reason } => emit(&cancelled(reason, false)),
            End::Failed { reason } => emit(&cancelled(reason, true)),
        }]
    }

    /// The order, as the workers check commands against it and the notification service
    /// writes to its customer: one row per order, and its lines.
    fn project(
        order: &Order,
        saga: SagaId,
        status: Status,
        started_at: Timestamp,
    ) -> Vec<ProjectionRow> {
        let status = match status {
            Status::Completed => "confirmed",
            Status::Compensated => "cancelled",
            Status::Failed => "needs_attention",
            // A checkout fails only while it unwinds: its order was cancelled (and the customer
            // told so); the operator who resolved it by hand did what the saga could not undo.
            Status::Resolved => "cancelled",
            Status::Running | Status::Parked | Status::Compensating => "pending",
        };
        let row = |table: &'static str, v: serde_json::Value| ProjectionRow {
            table,
            row: match v {
                serde_json::Value::Object(map) => map,
                _ => unreachable!("a row is an object"),
            },
        };
        let mut rows = vec![row(
            ORDERS.table,
            serde_json::json!({
                "id": order.order_id,
                "saga_id": saga,
                "customer_id": order.customer.id,
                "customer_email": order.customer.email,
                "status": status,
                "total_minor": order.total.minor,
                "currency": order.total.currency,
                "shipping_address": order.shipping_address,
                "payment_token_hint": order.payment_token_hint,
                "created_at": started_at,
            }),
        )];
        rows.extend(order.lines.iter().enumerate().map(|(i, l)| {
            row(
                ORDER_LINES.table,
                serde_json::json!({
                    "order_id": order.order_id,
                    "line_no": i + 1,
                    "saga_id": saga,
                    "sku": l.line.sku,
                    "quantity": l.line.quantity,
                    "unit_price_minor": l.unit_price.minor,
                }),
            )
        }));
        rows
    }
}

/// The checkout's read model: its orders (migration 0013).
pub const ORDERS: ProjectionTable = ProjectionTable {
    table: "orders.orders",
    key: &["id"],
    columns: &[
        "id",
        "saga_id",
        "customer_id",
        "customer_email",
        "status",
        "total_minor",
        "currency",
        "shipping_address",
        "payment_token_hint",
        "created_at",
    ],
};

/// The lines of the checkout's orders.
pub const ORDER_LINES: ProjectionTable = ProjectionTable {
    table: "orders.order_lines",
    key: &["order_id", "line_no"],
    columns: &[
        "order_id",
        "line_no",
        "saga_id",
        "sku",
        "quantity",
        "unit_price_minor",
    ],
};

/// The renewal's slack beyond a step's time in flight: a quarter of the hold, from one second
/// to a minute.
fn slack(hold: std::time::Duration) -> std::time::Duration {
    (hold / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    )
}

/// Whether a reservation of `hold_seconds` can be renewed ahead of every step it must cover
/// (charge and shipment, with `policies` overriding their defaults): the hold must be longer
/// than the longest time such a step is in flight (its deadline times its dispatches) plus the
/// slack. With a shorter hold, reservations would run out under steps that are merely slow, and
/// orders paid for would lose their stock. `Err` says which step needs how long.
pub fn check_hold(
    hold_seconds: u32,
    policies: &std::collections::BTreeMap<String, crate::policy::StepPolicyOverride>,
) -> Result<(), Invalid> {
    let hold = std::time::Duration::from_secs(u64::from(hold_seconds));
    for def in &STEPS[RESERVE + 1..COMMIT] {
        let policy = match policies.get(def.name) {
            Some(o) => o.forward.apply(&def.policy.forward),
            None => def.policy.forward.clone(),
        };
        let in_flight = policy.deadline() * (policy.redispatches + 1);
        let needed = in_flight + slack(hold);
        if hold <= needed {
            return Err(Invalid(format!(
                "a reservation hold of {hold_seconds} s is too short: {} can be in flight for {} ms \
                 (a {} ms deadline, {} dispatches), and the hold must be longer than that plus {} ms \
                 of slack so that it can be renewed first",
                def.name,
                in_flight.as_millis(),
                policy.deadline_ms,
                policy.redispatches + 1,
                slack(hold).as_millis()
            )));
        }
    }
    Ok(())
}

/// The name of the checkout's payment token among its secrets.
pub const PAYMENT_TOKEN: &str = "payment_token";

/// How a payment token is shown: enough to tell two cards apart, never enough to use one. The
/// first four and last four characters of a long token (`tok_…a1b2`), the last two of a short
/// one. Migration 0012 computes the same for the tokens it moved.
pub fn token_hint(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    let n = chars.len();
    if n > 12 {
        let head: String = chars[..4].iter().collect();
        let tail: String = chars[n - 4..].iter().collect();
        format!("{head}…{tail}")
    } else {
        let tail: String = chars[n.saturating_sub(2)..].iter().collect();
        format!("…{tail}")
    }
}

fn emit<E: DomainEvent>(e: &E) -> Emit {
    Emit {
        source: E::SOURCE,
        name: E::NAME,
        body: events::body(e),
    }
}

/// The checkout saga type, for the engine's registry.
pub static TYPE: stepwise::Type<Checkout> = stepwise::Type::new();

/// A live checkout.
pub type Instance = stepwise::Instance<Checkout>;
