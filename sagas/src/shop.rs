//! The shop's vocabulary and its services' contracts: what the checkout (and every saga of the
//! shop) sends to the inventory, payment and shipping pools, what they answer, and the order's
//! domain events. The platform ([`crate::wire`]) carries these as payloads in its envelopes;
//! the services and the saga definitions both read them from here, so that a command cannot
//! mean one thing to its sender and another to its worker.
//!
//! The types here parse, they do not merely validate: a [`Sku`], a [`Quantity`] or a [`Money`]
//! can only be built through a constructor that checks it, so code that holds one never checks
//! again.
//!
//! Compensations name what they undo (the reservation, charge or shipment id) and the ids of
//! effects are derived from the saga and the step ([`ids`]), never random: a compensation of a
//! step whose answer was lost knows the id all the same, and a worker tells an undo of its own
//! saga's effect (made, or not yet made) from an undo of something it does not know, which is
//! refused.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::wire::{Invalid, id_type};

id_type!(
    /// An order of the shop; one checkout saga per order.
    OrderId
);

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// A stock keeping unit: 1 to 64 characters of `A-Z a-z 0-9 - _ .`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Sku(#[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,64}$"))] String);

impl Sku {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(invalid(format!(
                "a SKU has 1 to {} characters, got {}",
                Self::MAX_LEN,
                s.len()
            )));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(invalid(format!(
                "SKU {s:?} may contain only letters, digits, '-', '_' and '.'"
            )));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sku {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Sku::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// How many units of one SKU a line holds: 1 to [`Quantity::MAX`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, schemars::JsonSchema,
)]
#[serde(transparent)]
#[schemars(description = "How many units of one SKU a line holds: 1 to 1000.")]
pub struct Quantity(#[schemars(range(min = 1, max = Quantity::MAX))] u32);

impl Quantity {
    /// More than this in one line is a typo or an attack, not an order.
    pub const MAX: u32 = 1_000;

    pub fn new(n: i64) -> Result<Self, Invalid> {
        if n < 1 {
            return Err(invalid(format!("quantity must be at least 1, got {n}")));
        }
        if n > i64::from(Self::MAX) {
            return Err(invalid(format!(
                "quantity must be at most {}, got {n}",
                Self::MAX
            )));
        }
        Ok(Self(n as u32))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        Quantity::new(n).map_err(serde::de::Error::custom)
    }
}

/// An ISO 4217 currency code, three upper-case letters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Currency(#[schemars(regex(pattern = r"^[A-Z]{3}$"))] String);

impl Currency {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(s.to_owned()))
        } else {
            Err(invalid(format!(
                "currency must be an ISO 4217 code such as EUR, got {s:?}"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Currency::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An amount in the currency's minor unit (cents). Never a float.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Money {
    #[schemars(description = "The amount in the currency's minor unit (cents for EUR).")]
    pub minor: i64,
    pub currency: Currency,
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:02} {}",
            self.minor / 100,
            (self.minor % 100).abs(),
            self.currency.as_str()
        )
    }
}

/// One line of an order as the workers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Line {
    pub sku: Sku,
    pub quantity: Quantity,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub name: String,
    pub line1: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
}

/// A customer as the saga knows them: personal data, kept in the saga's own storage and never
/// put on the wire (commands, replies and events name the customer by [`CustomerRef`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    pub email: String,
}

/// A customer as messages name them: by id only. A service that needs to reach the customer
/// reads the contact details from the read model it is allowed to read, so that no message,
/// dead letter or log line carries personal data. (It reads an older message's `{id, email}`
/// too, and drops the email.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CustomerRef {
    #[schemars(description = "The customer's id.")]
    pub id: String,
}

impl From<&Customer> for CustomerRef {
    fn from(c: &Customer) -> Self {
        Self { id: c.id.clone() }
    }
}

/// The ids of the effects of a saga's steps, derived from the saga and the step: the same on
/// the saga's side and the worker's, with or without a reply.
pub mod ids {
    use uuid::Uuid;

    use crate::wire::SagaId;

    fn derive(saga: SagaId, what: &str, step: &str) -> Uuid {
        Uuid::new_v5(&saga.as_uuid(), format!("{what}/{step}").as_bytes())
    }

    /// The stock reservation made by `step` of `saga`.
    pub fn reservation(saga: SagaId, step: &str) -> Uuid {
        derive(saga, "reservation", step)
    }

    /// The charge made by `step` of `saga`.
    pub fn charge(saga: SagaId, step: &str) -> Uuid {
        derive(saga, "charge", step)
    }

    /// The shipment booked by `step` of `saga`.
    pub fn shipment(saga: SagaId, step: &str) -> Uuid {
        derive(saga, "shipment", step)
    }
}

/// The inventory pool: stock reservations of the Product service.
pub mod inventory {
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use super::{Line, OrderId};
    use crate::wire::Timestamp;

    pub const SERVICE: &str = "inventory";

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "action", rename_all = "snake_case")]
    pub enum Command {
        /// Hold the order's lines, all or nothing, for `hold_seconds`.
        ReserveStock {
            order_id: OrderId,
            lines: Vec<Line>,
            hold_seconds: u32,
        },
        /// Undo the reservation `reservation_id`: put held stock back, or, when its stock was
        /// committed (the order did not complete after all), return it to the shelf. (Older
        /// commands name no reservation: the order's.)
        ReleaseStock {
            order_id: OrderId,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            reservation_id: Option<Uuid>,
        },
        /// Consume the order's reservation: the sale. Refused (permanently) when the
        /// reservation ran out and its stock went to another order meanwhile.
        CommitStock { order_id: OrderId },
        /// Pick and pack the order at the warehouse, from the stock its checkout consumed
        /// (the reservation `reservation_id`, committed). Refused (permanently) when that stock
        /// was not consumed: nothing was sold to pick.
        PickOrder {
            order_id: OrderId,
            reservation_id: Uuid,
        },
        /// Put the units picked for the order back on the shelf (a `restock` movement), once.
        /// An undo of a pick that never happened leaves a tombstone; of an order that has no
        /// consumed reservation `reservation_id`, is refused.
        Restock {
            order_id: OrderId,
            reservation_id: Uuid,
        },
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    pub enum Output {
        StockReserved {
            #[serde(default, skip_serializing_if = "Option::is_none")]
            reservation_id: Option<Uuid>,
            expires_at: Timestamp,
        },
        StockReleased,
        StockCommitted,
        OrderPicked,
        /// `units`: how many units went back (0 for the tombstone of a pick never made).
        Restocked {
            units: i64,
        },
    }
}

/// The payment pool: charges and refunds through the card processor.
pub mod payment {
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use super::{Money, OrderId};

    pub const SERVICE: &str = "payment";

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "action", rename_all = "snake_case")]
    pub enum Command {
        /// The card is not in the command: the payment service reads the saga's payment token
        /// from the secrets store (`orchestrator.saga_secrets`), so that it is never on the
        /// wire.
        ChargePayment {
            order_id: OrderId,
            customer_id: String,
            amount: Money,
        },
        /// Refund the charge `charge_id`. (Older commands name no charge: the step's.)
        RefundPayment {
            order_id: OrderId,
            amount: Money,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            charge_id: Option<Uuid>,
        },
        /// Check that the charge `charge_id` of the order was taken and is not refunded: what a
        /// saga that may refund it later starts with.
        VerifyCharge {
            order_id: OrderId,
            amount: Money,
            charge_id: Uuid,
        },
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    pub enum Output {
        PaymentCharged {
            charge_id: Uuid,
            processor_ref: String,
        },
        PaymentRefunded {
            refund_id: Option<Uuid>,
        },
        ChargeVerified {
            charge_id: Uuid,
        },
    }
}

/// The shipping pool: shipments booked with the carrier.
pub mod shipping {
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use super::{Line, OrderId};

    pub const SERVICE: &str = "shipping";

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "action", rename_all = "snake_case")]
    pub enum Command {
        /// The address is not in the command: the shipping service reads it from the order.
        CreateShipment { order_id: OrderId, lines: Vec<Line> },
        /// Cancel the shipment `shipment_id`. (Older commands name no shipment: the order's.)
        CancelShipment {
            order_id: OrderId,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            shipment_id: Option<Uuid>,
        },
        /// Ask the carrier to collect the shipment `shipment_id` (booked by the checkout). The
        /// carrier then reports, on its own schedule, that it dispatched the parcel and that it
        /// delivered it (or lost it); the shipping service publishes each as a domain event.
        RequestPickup {
            order_id: OrderId,
            shipment_id: Uuid,
        },
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    pub enum Output {
        ShipmentCreated {
            shipment_id: Uuid,
            tracking_number: String,
        },
        ShipmentCancelled,
        PickupRequested {
            shipment_id: Uuid,
            tracking_number: String,
        },
    }
}

/// The order's domain events, published on `<prefix>.events.order.<type>`.
pub mod order {
    use serde::{Deserialize, Serialize};

    use super::{CustomerRef, Line, Money, OrderId};
    use crate::wire::SagaId;

    pub const SOURCE: &str = "order";

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "type")]
    pub enum Event {
        /// All steps of a checkout succeeded: stock sold, payment taken, shipment booked.
        OrderConfirmed {
            order_id: OrderId,
            saga_id: SagaId,
            customer: CustomerRef,
            lines: Vec<Line>,
            total: Money,
        },
        /// A checkout was undone (or given up on): nothing is held or charged for it any more,
        /// unless `needs_operator` says a compensation could not complete.
        OrderCancelled {
            order_id: OrderId,
            saga_id: SagaId,
            customer: CustomerRef,
            reason: String,
            needs_operator: bool,
        },
    }

    impl Event {
        pub fn name(&self) -> &'static str {
            match self {
                Event::OrderConfirmed { .. } => "OrderConfirmed",
                Event::OrderCancelled { .. } => "OrderCancelled",
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::SagaId;

    #[test]
    fn quantities_and_skus_are_parsed() {
        assert!(Quantity::new(0).is_err());
        assert!(Quantity::new(-3).is_err());
        assert!(Quantity::new(1_001).is_err());
        assert_eq!(Quantity::new(5).unwrap().get(), 5);
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("A B").is_err());
        assert!(Sku::parse(&"x".repeat(65)).is_err());
        assert!(Sku::parse("TSHIRT-RED.M_2").is_ok());
        assert!(serde_json::from_str::<Line>(r#"{"sku":"A","quantity":0}"#).is_err());
    }

    #[test]
    fn effect_ids_are_derived_per_saga_and_step() {
        let a = SagaId::from_uuid(Uuid::from_u128(1));
        let b = SagaId::from_uuid(Uuid::from_u128(2));
        assert_eq!(
            ids::charge(a, "charge_payment"),
            ids::charge(a, "charge_payment")
        );
        assert_ne!(
            ids::charge(a, "charge_payment"),
            ids::charge(b, "charge_payment")
        );
        assert_ne!(
            ids::charge(a, "charge_payment"),
            ids::shipment(a, "charge_payment")
        );
    }
}
