//! The checkout saga: reserve the stock of an order, charge the customer, book the shipment.
//!
//! All three steps are compensatable: a permanent failure (out of stock, card declined, address
//! the carrier refuses), exhausted attempts or a cancel undo the finished ones in reverse:
//! cancel the shipment, refund the payment, release the stock. The order is confirmed when the
//! last step succeeds; the inventory service then turns the reservation into a stock movement
//! when it sees `OrderConfirmed`.

use serde::{Deserialize, Serialize};

use crate::policy::{Backoff, Policy, StepPolicy};
use crate::stepwise::{self, Definition, End, StepDef, StepKind};
use crate::wire::{
    Action, Address, CommandBody, Currency, Customer, CustomerRef, DomainEvent, Invalid, Line,
    Money, OrderId, Phase, SagaId, StepOutput, Timestamp,
};

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
const COMPENSATION: Policy = Policy {
    max_attempts: 30,
    deadline_ms: 10_000,
    redispatches: 1,
    backoff: Backoff {
        initial_ms: 500,
        max_ms: 60_000,
        factor: 2.0,
        jitter: true,
    },
};

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

static STEPS: [StepDef; 3] = [
    StepDef {
        name: "reserve_stock",
        kind: StepKind::Compensatable,
        action: Action::ReserveStock,
        compensation: Some(Action::ReleaseStock),
        policy: StepPolicy {
            forward: forward(10_000),
            compensation: COMPENSATION,
        },
    },
    StepDef {
        name: "charge_payment",
        kind: StepKind::Compensatable,
        action: Action::ChargePayment,
        compensation: Some(Action::RefundPayment),
        policy: StepPolicy {
            forward: forward(15_000),
            compensation: COMPENSATION,
        },
    },
    StepDef {
        name: "create_shipment",
        kind: StepKind::Compensatable,
        action: Action::CreateShipment,
        compensation: Some(Action::CancelShipment),
        policy: StepPolicy {
            forward: forward(10_000),
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
        })
    }

    fn command(order: &Order, step: &StepDef, phase: Phase) -> CommandBody {
        let order_id = order.order_id;
        let action = match phase {
            Phase::Forward => step.action,
            Phase::Compensation => step
                .compensation
                .expect("only compensatable steps are compensated"),
        };
        match action {
            Action::ReserveStock => CommandBody::ReserveStock {
                order_id,
                lines: order.lines(),
                hold_seconds: order.reservation_hold_seconds,
            },
            Action::ReleaseStock => CommandBody::ReleaseStock { order_id },
            Action::ChargePayment => CommandBody::ChargePayment {
                order_id,
                customer_id: order.customer.id.clone(),
                amount: order.total.clone(),
            },
            Action::RefundPayment => CommandBody::RefundPayment {
                order_id,
                amount: order.total.clone(),
            },
            Action::CreateShipment => CommandBody::CreateShipment {
                order_id,
                lines: order.lines(),
            },
            Action::CancelShipment => CommandBody::CancelShipment { order_id },
        }
    }

    fn record(order: &mut Order, _step: &StepDef, output: &StepOutput) {
        if let StepOutput::StockReserved { expires_at } = output {
            order.reservation_expires_at = Some(*expires_at);
        }
    }

    /// A reservation that expires (or is about to) before payment or shipment is renewed
    /// first: the customer still gets the order if the stock is there, and nothing is charged
    /// or shipped against stock the inventory service may already have released. If the stock
    /// is gone, the renewal fails permanently and the saga compensates (refunding a charge that
    /// was already taken).
    fn must_redo(order: &Order, next: usize, now: Timestamp) -> Option<usize> {
        let expires_at = order.reservation_expires_at?;
        let hold = i64::from(order.reservation_hold_seconds);
        let margin = chrono::Duration::seconds((hold / 4).clamp(1, 60));
        (next > RESERVE && now + margin >= expires_at).then_some(RESERVE)
    }

    fn subject(order: &Order) -> Option<String> {
        Some(order.order_id.to_string())
    }

    fn on_end(order: &Order, saga: SagaId, end: End<'_>) -> Vec<DomainEvent> {
        vec![match end {
            End::Completed => DomainEvent::OrderConfirmed {
                order_id: order.order_id,
                saga_id: saga,
                customer: CustomerRef::from(&order.customer),
                lines: order.lines(),
                total: order.total.clone(),
            },
            End::Compensated { reason } => DomainEvent::OrderCancelled {
                order_id: order.order_id,
                saga_id: saga,
                customer: CustomerRef::from(&order.customer),
                reason: reason.to_owned(),
                needs_operator: false,
            },
            End::Failed { reason } => DomainEvent::OrderCancelled {
                order_id: order.order_id,
                saga_id: saga,
                customer: CustomerRef::from(&order.customer),
                reason: reason.to_owned(),
                needs_operator: true,
            },
        }]
    }
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

/// The checkout saga type, for the engine's registry.
pub static TYPE: stepwise::Type<Checkout> = stepwise::Type::new();

/// A live checkout.
pub type Instance = stepwise::Instance<Checkout>;
