//! The orders a command may act for, read from the checkout's read model (`orders.orders`,
//! typed rows the orchestrator writes in the commit of the saga), and the check that tells a
//! command the orchestrator sent from a stray, old or forged one.
//!
//! The orchestrator publishes a command only from its outbox, after the commit that wrote the
//! saga row, so the saga of a command it sent is always an order, and the command names that
//! order (and, for a charge or a refund, its total): `sagas::checkout` builds every command from
//! the order. A command that fails the check is poison ([`crate::bus::Error::Poison`]): it is
//! dead-lettered and nothing is done, not even the tombstone of a compensation (a release,
//! refund or cancel for a saga that does not exist has nothing of ours to undo). A compensation
//! for a known saga whose forward effect never happened passes, and leaves its tombstone.
//!
//! Each service reads the order in a statement it runs anyway for a batch of commands (payment
//! and shipping join it to their record lookup, the inventory writer to its batch's
//! transaction), by `saga_id`, unique in `orders.orders`, so a lookup is an index probe whatever the table's size. Statements select the columns
//! `o.saga_id, o.id, o.status` (named `order_saga_id`, `order_id` and `order_status` where an
//! outer join puts them next to a service's own columns, and nullable there), read by name
//! into the statement's row, and [`Order::new`] or [`Order::found`] makes the order of them;
//! the payment service adds `o.total_minor, o.currency` ([`Order::with_total`]). Only the
//! columns a statement names are read, so the others leave the totals out.
//!
//! Must never: write the read model's tables (they are the orchestrator's), or be asked for anything
//! but a command's own saga.

use sagas::shop::{Currency, Money, OrderId};
use sagas::wire::SagaId;
use uuid::Uuid;

/// A checkout saga's order as the read model shows it.
#[derive(Debug, Clone)]
pub struct Order {
    pub saga_id: SagaId,
    /// The order id (the saga's subject).
    pub id: Option<Uuid>,
    /// `pending`, `confirmed`, `cancelled` or `needs_attention`.
    pub status: String,
    /// The total, when the statement read it ([`Order::with_total`]).
    pub total_minor: Option<i64>,
    pub currency: Option<String>,
}

impl Order {
    /// The order of a row's `o.saga_id, o.id, o.status`, without its total.
    pub fn new(saga_id: Uuid, id: Option<Uuid>, status: String) -> Order {
        Order {
            saga_id: SagaId::from_uuid(saga_id),
            id,
            status,
            total_minor: None,
            currency: None,
        }
    }

    /// The order an outer join found, from the same columns; `None` when it found none (its
    /// saga id and status, never NULL in the table, are NULL then).
    pub fn found(saga_id: Option<Uuid>, id: Option<Uuid>, status: Option<String>) -> Option<Order> {
        Some(Order::new(saga_id?, id, status?))
    }

    /// The order with its total, from a row's `o.total_minor, o.currency`.
    pub fn with_total(self, total_minor: Option<i64>, currency: Option<String>) -> Order {
        Order {
            total_minor,
            currency,
            ..self
        }
    }

    /// The total, as the read model has it, for a message.
    fn total(&self) -> String {
        match (self.total_minor, self.currency.as_deref()) {
            (Some(minor), Some(code)) => match Currency::parse(code) {
                Ok(currency) => Money { minor, currency }.to_string(),
                Err(_) => format!("{minor} (minor units) {code}"),
            },
            _ => "unknown".to_owned(),
        }
    }
}

/// Whether a command of `action` for `saga`, naming order `named`, is one the orchestrator
/// could have sent: its saga is an order (`order`, found by the saga id), and that order is
/// `named`. The order, or the reason the command is poison.
pub fn check_order<'a>(
    action: &str,
    saga: SagaId,
    named: OrderId,
    order: Option<&'a Order>,
) -> Result<&'a Order, String> {
    let Some(order) = order else {
        return Err(format!("{action} command for unknown saga {saga}"));
    };
    if order.id != Some(named.as_uuid()) {
        let actual = order
            .id
            .map_or_else(|| "no order".to_owned(), |id| format!("order {id}"));
        return Err(format!(
            "{action} command names order {named}, but saga {saga} is {actual}"
        ));
    }
    Ok(order)
}

/// [`check_order`], and for a charge or a refund (`amount`), that the amount is the order's
/// total (the orchestrator charges and refunds exactly that; an order read without its total
/// matches no amount). `Err` with the reason for a poison command.
pub fn check(
    action: &str,
    saga: SagaId,
    named: OrderId,
    amount: Option<&Money>,
    order: Option<&Order>,
) -> Result<(), String> {
    let order = check_order(action, saga, named, order)?;
    if let Some(amount) = amount
        && (order.total_minor != Some(amount.minor)
            || order.currency.as_deref() != Some(amount.currency.as_str()))
    {
        let what = if action == "charge_payment" {
            "charge"
        } else {
            "refund"
        };
        return Err(format!(
            "{what} amount {amount} does not match order total {} (saga {saga})",
            order.total()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn eur(minor: i64) -> Money {
        Money {
            minor,
            currency: Currency::parse("EUR").unwrap(),
        }
    }

    fn order(saga: SagaId, id: OrderId, total: i64) -> Order {
        Order {
            saga_id: saga,
            id: Some(id.as_uuid()),
            status: "pending".into(),
            total_minor: Some(total),
            currency: Some("EUR".into()),
        }
    }

    #[test]
    fn a_command_of_its_order_passes_and_others_are_poison() {
        let saga = SagaId::from_uuid(Uuid::now_v7());
        let id = OrderId::from_uuid(Uuid::now_v7());
        let known = order(saga, id, 200);
        let charge = "charge_payment";

        assert!(check(charge, saga, id, Some(&eur(200)), Some(&known)).is_ok());
        assert!(check("release_stock", saga, id, None, Some(&known)).is_ok());

        let why = check("release_stock", saga, id, None, None).unwrap_err();
        assert!(
            why.contains("unknown saga") && why.contains(&saga.to_string()),
            "{why}"
        );

        let other = OrderId::from_uuid(Uuid::now_v7());
        let why = check(charge, saga, other, Some(&eur(200)), Some(&known)).unwrap_err();
        assert!(why.contains(&other.to_string()), "{why}");

        let why = check(charge, saga, id, Some(&eur(100)), Some(&known)).unwrap_err();
        assert_eq!(
            why,
            format!("charge amount 1.00 EUR does not match order total 2.00 EUR (saga {saga})")
        );
        let usd = Money {
            minor: 200,
            currency: Currency::parse("USD").unwrap(),
        };
        assert!(check(charge, saga, id, Some(&usd), Some(&known)).is_err());
    }
}
