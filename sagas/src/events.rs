//! The shop's domain events: one typed struct per event, grouped by the service that publishes
//! it, and the JSON Schema of the message that carries each.
//!
//! A service publishes an event as a [`wire::Event`] on `<prefix>.events.<source>.<type>`: the
//! envelope (`id`, `type`, `v`, `occurred_at`, `source`, and `correlation_id` when there is one)
//! with the event's fields flattened into it. A struct here is those fields; [`DomainEvent`] names its source, type and schema version.
//! [`body`] and [`envelope`] turn one into a payload or a whole message, [`decode`] reads it
//! back from a message of its source, type and version.
//!
//! [`CATALOG`] lists every event with the schema of its whole message ([`schema`]). The schemas
//! are committed at `schemas/events/<source>/<Name>.v<version>.json` for services written in
//! other languages, and a test keeps them true to the code: `UPDATE_SCHEMAS=1 cargo test -p
//! sagas events` rewrites them (`schemas/events/README.md`).
//!
//! No event carries personal data or a payment token: a customer is named by id
//! ([`crate::shop::CustomerRef`]), and a service that must reach them, ship to them or charge
//! them reads what it needs from the store it is allowed to read (`ARCHITECTURE.md`), so that
//! no stream, dead letter or log line holds it.
//!
//! Compatibility: a reader ignores fields it does not know, so a new optional field keeps the
//! version (an `Option`, absent when `None`, documented as absent in older events). A removed,
//! renamed or retyped field, or a new required one, is a new version of the event: a new
//! [`DomainEvent::VERSION`] and a new schema file beside the old one, which stays for the
//! readers of older messages.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::wire::{self, Body, EventId, Timestamp};

/// A domain event of the shop: the fields of one type of event, as its source publishes them.
pub trait DomainEvent: Serialize + DeserializeOwned + JsonSchema {
    /// The service that publishes it, e.g. `order`: the envelope's `source`.
    const SOURCE: &'static str;
    /// Its type, e.g. `OrderConfirmed`: the envelope's `type`.
    const NAME: &'static str;
    /// The version of its schema: the envelope's `v`.
    const VERSION: u32;
}

/// The payload of `event`: its fields, as a JSON object.
pub fn body<E: DomainEvent>(event: &E) -> Body {
    Body::of(event)
}

/// The message that publishes `event`, with the id and the time the caller gives it (this crate
/// derives ids and reads no clock: see [`EventId::derive`] and [`EventId::derive_from`]). Its
/// `correlation_id` is the publisher's to set.
pub fn envelope<E: DomainEvent>(event: &E, id: EventId, occurred_at: Timestamp) -> wire::Event {
    wire::Event {
        id,
        name: E::NAME.to_owned(),
        v: E::VERSION,
        occurred_at,
        source: E::SOURCE.to_owned(),
        correlation_id: None,
        body: body(event),
    }
}

/// The event `E` a message carries. A message of another type, source or version is an error,
/// not an attempt: a field of the same name may mean something else there. A message with no
/// `source` (published before envelopes named one) is read by its type and version alone.
pub fn decode<E: DomainEvent>(event: &wire::Event) -> Result<E, serde_json::Error> {
    let source_matches = event.source == E::SOURCE || event.source.is_empty();
    if event.name != E::NAME || !source_matches || event.v != E::VERSION {
        return Err(serde::de::Error::custom(format!(
            "expected the event {}/{} v{}, got {}/{} v{}",
            E::SOURCE,
            E::NAME,
            E::VERSION,
            event.source,
            event.name,
            event.v
        )));
    }
    event.body.decode()
}

/// The fields of the envelope ([`wire::Event`]) around every event, all required but
/// `correlation_id`: no event may have a field of these names.
pub const ENVELOPE_FIELDS: &[&str] =
    &["id", "type", "v", "occurred_at", "source", "correlation_id"];

/// The JSON Schema (draft 2020-12) of the whole message that publishes `E`: the envelope, with
/// `type`, `v` and `source` fixed to the event's, and the event's fields beside it.
///
/// Unknown properties are allowed, at the top and in nested objects: a reader ignores them,
/// which is what lets a new optional field keep the version. A reader that validated strictly
/// would refuse every message of a producer one field ahead of it.
///
/// # Panics
///
/// When a field of `E` has the name of an envelope field (a test checks every event of the
/// [`CATALOG`]).
pub fn schema<E: DomainEvent>() -> Schema {
    let mut schema = SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<E>();
    let root = schema.ensure_object();
    let properties = root
        .entry("properties")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("an event's schema is an object's");
    let envelope = json!({
        "id": {
            "description": "The event's id, the same for every delivery of the event: a reader \
                            deduplicates by it (it is also the message's `Nats-Msg-Id`).",
            "type": "string",
            "format": "uuid",
        },
        "type": {
            "description": "The event's type.",
            "const": E::NAME,
        },
        "v": {
            "description": "The version of the event's schema.",
            "const": E::VERSION,
        },
        "occurred_at": {
            "description": "When it happened (RFC 3339, UTC).",
            "type": "string",
            "format": "date-time",
        },
        "source": {
            "description": "The service it belongs to.",
            "const": E::SOURCE,
        },
        "correlation_id": {
            "description": "The correlation id of the request that caused it (also the \
                            message's `Correlation-Id` header); absent in older events.",
            "type": ["string", "null"],
        },
    });
    let Value::Object(envelope) = envelope else {
        unreachable!("a JSON object")
    };
    for (name, property) in envelope {
        assert!(
            properties.insert(name.clone(), property).is_none(),
            "{}/{} has a field named as the envelope's `{name}`",
            E::SOURCE,
            E::NAME
        );
    }
    let mut required: Vec<Value> = ENVELOPE_FIELDS
        .iter()
        .filter(|&&f| f != "correlation_id")
        .map(|&f| f.into())
        .collect();
    if let Some(Value::Array(fields)) = root.remove("required") {
        required.extend(fields);
    }
    root.insert("required".into(), required.into());
    root.insert("additionalProperties".into(), true.into());
    root.insert(
        "$comment".into(),
        format!(
            "Published on <prefix>.events.{}.{}. Generated from sagas::events \
             (UPDATE_SCHEMAS=1 cargo test -p sagas events): do not edit.",
            E::SOURCE,
            E::NAME
        )
        .into(),
    );
    schema
}

/// An event of the [`CATALOG`].
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// [`DomainEvent::SOURCE`].
    pub source: &'static str,
    /// [`DomainEvent::NAME`].
    pub name: &'static str,
    /// [`DomainEvent::VERSION`].
    pub version: u32,
    /// The schema of its whole message ([`schema`]).
    pub schema: fn() -> Schema,
}

impl Entry {
    /// The entry of `E`.
    pub const fn of<E: DomainEvent>() -> Self {
        Self {
            source: E::SOURCE,
            name: E::NAME,
            version: E::VERSION,
            schema: schema::<E>,
        }
    }

    /// Where its schema is committed, relative to `schemas/events/`:
    /// `<source>/<Name>.v<version>.json`.
    pub fn path(&self) -> String {
        format!("{}/{}.v{}.json", self.source, self.name, self.version)
    }
}

/// Every domain event of the shop, by source.
pub static CATALOG: &[Entry] = &[
    Entry::of::<user::UserRegistered>(),
    Entry::of::<user::EmailVerified>(),
    Entry::of::<product::StockUpdated>(),
    Entry::of::<product::PriceChanged>(),
    Entry::of::<order::OrderCreated>(),
    Entry::of::<order::OrderConfirmed>(),
    Entry::of::<order::OrderShipped>(),
    Entry::of::<order::OrderDelivered>(),
    Entry::of::<order::OrderCancelled>(),
    Entry::of::<payment::PaymentProcessed>(),
    Entry::of::<payment::PaymentFailed>(),
    Entry::of::<payment::PaymentRefunded>(),
    Entry::of::<cart::CartAbandoned>(),
    Entry::of::<cart::CheckoutInitiated>(),
    Entry::of::<shipping::ShipmentDispatched>(),
    Entry::of::<shipping::ShipmentDelivered>(),
    Entry::of::<shipping::ShipmentLost>(),
];

/// Implements [`DomainEvent`] for the events of one source: each named as its struct, with the
/// version given.
macro_rules! domain_events {
    ($source:expr; $($name:ident: $version:literal),+ $(,)?) => {
        $(
            impl $crate::events::DomainEvent for $name {
                const SOURCE: &'static str = $source;
                const NAME: &'static str = stringify!($name);
                const VERSION: u32 = $version;
            }
        )+
    };
}

/// The User service: accounts.
pub mod user {
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    pub const SOURCE: &str = "user";

    /// A user account was created.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct UserRegistered {
        /// The new account's id.
        pub user_id: String,
    }

    /// A user proved that they own the email address of their account. The address is not in
    /// the event: a service that needs it reads it from the account.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct EmailVerified {
        /// The account's id.
        pub user_id: String,
    }

    domain_events!(SOURCE; UserRegistered: 1, EmailVerified: 1);
}

/// The Product service: the catalogue and its stock.
pub mod product {
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    use crate::shop::{Money, OrderId, Sku};

    pub const SOURCE: &str = "product";

    /// The kinds of [`StockUpdated::movement`].
    pub mod movement {
        /// Units held for an order.
        pub const RESERVE: &str = "reserve";
        /// Held units put back: the order was undone.
        pub const RELEASE: &str = "release";
        /// Held units sold: a reservation consumed (the sale).
        pub const CONSUME: &str = "consume";
        /// Units added to the shelf: a delivery, or units of an order coming back.
        pub const RESTOCK: &str = "restock";
        /// A correction of the count by an operator.
        pub const ADJUST: &str = "adjust";
        /// Held units freed because their reservation ran out.
        pub const EXPIRE: &str = "expire";
        /// Every kind this build knows.
        pub const ALL: &[&str] = &[RESERVE, RELEASE, CONSUME, RESTOCK, ADJUST, EXPIRE];
    }

    /// The stock of a SKU moved: the movement, and the levels after it.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct StockUpdated {
        /// The SKU whose stock moved.
        pub sku: Sku,
        /// Units on hand after the movement, held ones included.
        pub quantity: i64,
        /// Units held by reservations after the movement.
        pub reserved: i64,
        /// Units that can still be reserved after the movement: `quantity - reserved`, never
        /// negative.
        pub available: i64,
        /// What moved the stock: `reserve`, `release`, `consume` (the sale), `restock`, `adjust` or
        /// `expire` (the names of `inventory.stock_movements.kind`).
        /// A reader ignores a kind it does not know.
        pub movement: String,
        /// The order the movement is for, when it is for one (not an operator's restock or
        /// adjustment).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub order_id: Option<OrderId>,
    }

    /// The price of a SKU changed, or was set for the first time.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct PriceChanged {
        /// The SKU.
        pub sku: Sku,
        /// The price before; absent when the SKU had none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub previous: Option<Money>,
        /// The price from now on.
        pub price: Money,
    }

    domain_events!(SOURCE; StockUpdated: 1, PriceChanged: 1);
}

/// The Order service: the orders, as their checkout sagas run them. The checkout publishes
/// `OrderConfirmed` and `OrderCancelled` when it ends ([`crate::shop::order::Event`], the same
/// fields).
pub mod order {
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use crate::shop::{CustomerRef, Line, Money, OrderId};
    use crate::wire::SagaId;

    pub use crate::shop::order::SOURCE;

    /// A checkout was accepted and its saga started: the order exists, nothing is held or
    /// charged for it yet.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct OrderCreated {
        /// The order.
        pub order_id: OrderId,
        /// The checkout saga that runs it.
        pub saga_id: SagaId,
        /// Who ordered, by id only.
        pub customer: CustomerRef,
        /// What was ordered.
        pub lines: Vec<Line>,
        /// What the order costs, all lines included.
        pub total: Money,
    }

    /// All steps of a checkout succeeded: stock sold, payment taken, shipment booked.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct OrderConfirmed {
        /// The order.
        pub order_id: OrderId,
        /// The checkout saga that ran it.
        pub saga_id: SagaId,
        /// Who ordered, by id only.
        pub customer: CustomerRef,
        /// What was ordered.
        pub lines: Vec<Line>,
        /// What the customer paid.
        pub total: Money,
        /// The charge that paid for the order; absent in older events.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub charge_id: Option<Uuid>,
        /// The shipment booked for the order; absent in older events.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub shipment_id: Option<Uuid>,
    }

    /// The carrier collected the order's parcel: it is on its way.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct OrderShipped {
        /// The order.
        pub order_id: OrderId,
        /// The checkout saga that ran it.
        pub saga_id: SagaId,
        /// Who ordered, by id only.
        pub customer: CustomerRef,
        /// The shipment the parcel travels as.
        pub shipment_id: Uuid,
        /// The carrier's tracking number, for the customer to follow the parcel.
        pub tracking_number: String,
    }

    /// The carrier delivered the order's parcel.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct OrderDelivered {
        /// The order.
        pub order_id: OrderId,
        /// The checkout saga that ran it.
        pub saga_id: SagaId,
        /// Who ordered, by id only.
        pub customer: CustomerRef,
        /// The shipment that was delivered.
        pub shipment_id: Uuid,
    }

    /// A checkout was undone (or given up on): nothing is held or charged for it any more,
    /// unless `needs_operator` says a compensation could not complete.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct OrderCancelled {
        /// The order.
        pub order_id: OrderId,
        /// The checkout saga that ran it.
        pub saga_id: SagaId,
        /// Who ordered, by id only.
        pub customer: CustomerRef,
        /// Why, for people.
        pub reason: String,
        /// Whether an operator must finish undoing it: a compensation failed for good.
        pub needs_operator: bool,
        /// Whether a charge was refunded in undoing it (`false`: none had been taken, or its
        /// refund did not complete); absent in older events.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub refunded: Option<bool>,
    }

    domain_events!(
        SOURCE;
        OrderCreated: 1,
        OrderConfirmed: 1,
        OrderShipped: 1,
        OrderDelivered: 1,
        OrderCancelled: 1,
    );
}

/// The Payment service: charges and refunds. No event names the card or its token.
pub mod payment {
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use crate::shop::{CustomerRef, Money, OrderId};
    use crate::wire::SagaId;

    pub use crate::shop::payment::SERVICE as SOURCE;

    /// The card processor took a payment for an order.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct PaymentProcessed {
        /// The charge, as a refund names it.
        pub charge_id: Uuid,
        /// The order paid for.
        pub order_id: OrderId,
        /// The saga that charged it.
        pub saga_id: SagaId,
        /// Who paid, by id only.
        pub customer: CustomerRef,
        /// How much was taken.
        pub amount: Money,
    }

    /// A payment for an order was refused, for good: nothing was taken.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct PaymentFailed {
        /// The order it was for.
        pub order_id: OrderId,
        /// The saga that tried to charge it.
        pub saga_id: SagaId,
        /// Who was to pay, by id only.
        pub customer: CustomerRef,
        /// How much was asked.
        pub amount: Money,
        /// A stable machine-readable code, e.g. `card_declined`.
        pub code: String,
        /// Why, for people.
        pub reason: String,
    }

    /// A charge was refunded.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct PaymentRefunded {
        /// The charge refunded.
        pub charge_id: Uuid,
        /// The order it paid for.
        pub order_id: OrderId,
        /// The saga that refunded it: the checkout that took it, or a later one.
        pub saga_id: SagaId,
        /// How much was given back.
        pub amount: Money,
    }

    domain_events!(SOURCE; PaymentProcessed: 1, PaymentFailed: 1, PaymentRefunded: 1);
}

/// The Cart service: carts and the checkouts started from them.
pub mod cart {
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use crate::shop::CustomerRef;

    pub const SOURCE: &str = "cart";

    /// A cart was left without a checkout long enough for the Cart service to give up on it.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct CartAbandoned {
        /// The cart.
        pub cart_id: Uuid,
        /// Whose cart it was, by id only.
        pub customer: CustomerRef,
    }

    /// A customer started checking out a cart.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct CheckoutInitiated {
        /// The cart checked out.
        pub cart_id: Uuid,
        /// Who checks out, by id only.
        pub customer: CustomerRef,
        /// An opaque reference by which the Order service fetches the checkout's details
        /// (contact, address, payment method) from the Cart service: the event carries none of
        /// them.
        pub checkout_ref: String,
    }

    domain_events!(SOURCE; CartAbandoned: 1, CheckoutInitiated: 1);
}

/// The Shipping service: what the carrier reports of a shipment, each report once.
pub mod shipping {
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use crate::shop::OrderId;

    pub use crate::shop::shipping::SERVICE as SOURCE;

    /// The carrier collected the parcel of a shipment.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct ShipmentDispatched {
        /// The shipment.
        pub shipment_id: Uuid,
        /// The order it carries.
        pub order_id: OrderId,
        /// The carrier's tracking number.
        pub tracking_number: String,
        /// The carrier's id of its report: the same report delivered twice has the same id.
        pub carrier_event_id: String,
    }

    /// The carrier delivered the parcel of a shipment.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct ShipmentDelivered {
        /// The shipment.
        pub shipment_id: Uuid,
        /// The order it carries.
        pub order_id: OrderId,
        /// The carrier's id of its report: the same report delivered twice has the same id.
        pub carrier_event_id: String,
    }

    /// The carrier lost the parcel of a shipment.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    pub struct ShipmentLost {
        /// The shipment.
        pub shipment_id: Uuid,
        /// The order it carried.
        pub order_id: OrderId,
        /// The carrier's id of its report: the same report delivered twice has the same id.
        pub carrier_event_id: String,
        /// What the carrier said happened.
        pub reason: String,
    }

    domain_events!(SOURCE; ShipmentDispatched: 1, ShipmentDelivered: 1, ShipmentLost: 1);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fmt::Debug;
    use std::path::{Path, PathBuf};

    use serde_json::{Value, json};
    use uuid::Uuid;

    use super::*;
    use crate::shop::{self, Currency, CustomerRef, Line, Money, OrderId, Quantity, Sku};
    use crate::wire::{SagaId, Subjects};

    fn at() -> Timestamp {
        chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn eur(minor: i64) -> Money {
        Money {
            minor,
            currency: Currency::parse("EUR").unwrap(),
        }
    }

    fn order_id() -> OrderId {
        OrderId::from_uuid(Uuid::from_u128(1))
    }

    fn saga_id() -> SagaId {
        SagaId::from_uuid(Uuid::from_u128(2))
    }

    fn customer() -> CustomerRef {
        CustomerRef {
            id: "cust-1".into(),
        }
    }

    fn lines() -> Vec<Line> {
        vec![Line {
            sku: Sku::parse("TSHIRT-RED.M").unwrap(),
            quantity: Quantity::new(2).unwrap(),
        }]
    }

    /// A message of an event, and how the code reads one of its type.
    struct Sample {
        message: wire::Event,
        /// Whether [`decode`] reads a message (as JSON) as an event of this type.
        reads: fn(&Value) -> bool,
    }

    /// The sample message of `event`, checked to read back as `event`.
    fn message<E: DomainEvent + PartialEq + Debug>(event: E) -> Sample {
        fn reads<E: DomainEvent>(message: &Value) -> bool {
            serde_json::from_value::<wire::Event>(message.clone())
                .is_ok_and(|m| decode::<E>(&m).is_ok())
        }
        let mut message = envelope(
            &event,
            EventId::derive_from(Uuid::from_u128(9), E::NAME),
            at(),
        );
        message.correlation_id = Some("req-1".into());
        assert_eq!(decode::<E>(&message).unwrap(), event, "{}", E::NAME);
        Sample {
            message,
            reads: reads::<E>,
        }
    }

    /// A message of every event of the catalogue, with every field set.
    fn samples() -> Vec<Sample> {
        let shipment = Uuid::from_u128(3);
        let charge = Uuid::from_u128(4);
        let cart = Uuid::from_u128(5);
        vec![
            message(user::UserRegistered {
                user_id: "cust-1".into(),
            }),
            message(user::EmailVerified {
                user_id: "cust-1".into(),
            }),
            message(product::StockUpdated {
                sku: Sku::parse("TSHIRT-RED.M").unwrap(),
                quantity: 10,
                reserved: 2,
                available: 8,
                movement: product::movement::RESERVE.into(),
                order_id: Some(order_id()),
            }),
            message(product::PriceChanged {
                sku: Sku::parse("TSHIRT-RED.M").unwrap(),
                previous: Some(eur(1_900)),
                price: eur(2_100),
            }),
            message(order::OrderCreated {
                order_id: order_id(),
                saga_id: saga_id(),
                customer: customer(),
                lines: lines(),
                total: eur(3_800),
            }),
            message(order::OrderConfirmed {
                order_id: order_id(),
                saga_id: saga_id(),
                customer: customer(),
                lines: lines(),
                total: eur(3_800),
                charge_id: Some(charge),
                shipment_id: Some(shipment),
            }),
            message(order::OrderShipped {
                order_id: order_id(),
                saga_id: saga_id(),
                customer: customer(),
                shipment_id: shipment,
                tracking_number: "TRK-1".into(),
            }),
            message(order::OrderDelivered {
                order_id: order_id(),
                saga_id: saga_id(),
                customer: customer(),
                shipment_id: shipment,
            }),
            message(order::OrderCancelled {
                order_id: order_id(),
                saga_id: saga_id(),
                customer: customer(),
                reason: "charge_payment failed: the card was declined".into(),
                needs_operator: false,
                refunded: Some(false),
            }),
            message(payment::PaymentProcessed {
                charge_id: charge,
                order_id: order_id(),
                saga_id: saga_id(),
                customer: customer(),
                amount: eur(3_800),
            }),
            message(payment::PaymentFailed {
                order_id: order_id(),
                saga_id: saga_id(),
                customer: customer(),
                amount: eur(3_800),
                code: "card_declined".into(),
                reason: "the card was declined".into(),
            }),
            message(payment::PaymentRefunded {
                charge_id: charge,
                order_id: order_id(),
                saga_id: saga_id(),
                amount: eur(3_800),
            }),
            message(cart::CartAbandoned {
                cart_id: cart,
                customer: customer(),
            }),
            message(cart::CheckoutInitiated {
                cart_id: cart,
                customer: customer(),
                checkout_ref: "chk_8f3a".into(),
            }),
            message(shipping::ShipmentDispatched {
                shipment_id: shipment,
                order_id: order_id(),
                tracking_number: "TRK-1".into(),
                carrier_event_id: "carrier-evt-1".into(),
            }),
            message(shipping::ShipmentDelivered {
                shipment_id: shipment,
                order_id: order_id(),
                carrier_event_id: "carrier-evt-2".into(),
            }),
            message(shipping::ShipmentLost {
                shipment_id: shipment,
                order_id: order_id(),
                carrier_event_id: "carrier-evt-3".into(),
                reason: "parcel damaged beyond repair".into(),
            }),
        ]
    }

    fn sample(entry: &Entry) -> Sample {
        samples()
            .into_iter()
            .find(|s| s.message.source == entry.source && s.message.name == entry.name)
            .unwrap_or_else(|| panic!("no sample of {}", entry.path()))
    }

    /// A validator of the messages of `entry`, formats (uuid, date-time) checked too.
    fn validator(entry: &Entry) -> jsonschema::Validator {
        let schema = (entry.schema)().to_value();
        if let Err(e) = jsonschema::meta::validate(&schema) {
            panic!("{} is not a valid JSON Schema: {e}", entry.path());
        }
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap()
    }

    fn assert_valid(validator: &jsonschema::Validator, message: &Value, what: &str) {
        let errors: Vec<String> = validator
            .iter_errors(message)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{what}: {errors:?}");
    }

    fn strings(value: &Value) -> Vec<&str> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    }

    /// The names of the properties of every object a schema describes, nested ones included.
    fn property_names(value: &Value, names: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::Object(properties)) = map.get("properties") {
                    names.extend(properties.keys().cloned());
                }
                map.values().for_each(|v| property_names(v, names));
            }
            Value::Array(items) => items.iter().for_each(|v| property_names(v, names)),
            _ => {}
        }
    }

    fn schemas_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/events")
    }

    /// A schema as it is committed: pretty JSON, the keys of every object sorted (whatever
    /// serde_json's map keeps), and a final newline.
    fn committed_text(schema: &Schema) -> String {
        fn sorted(value: Value) -> Value {
            match value {
                Value::Object(map) => {
                    let mut entries: Vec<_> = map.into_iter().collect();
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                    Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
                }
                Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
                other => other,
            }
        }
        let mut text = serde_json::to_string_pretty(&sorted(schema.as_value().clone())).unwrap();
        text.push('\n');
        text
    }

    #[test]
    fn committed_schemas_are_the_generated_ones() {
        let update = std::env::var_os("UPDATE_SCHEMAS").is_some_and(|v| v == "1");
        let mut differ = Vec::new();
        for entry in CATALOG {
            let path = schemas_dir().join(entry.path());
            let generated = committed_text(&(entry.schema)());
            if std::fs::read_to_string(&path).ok().as_deref() == Some(generated.as_str()) {
                continue;
            }
            if update {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, generated).unwrap();
            } else {
                differ.push(format!("schemas/events/{}", entry.path()));
            }
        }
        assert!(
            differ.is_empty(),
            "the committed schemas differ from the events' code (or are missing): {}\n\
             regenerate them with `UPDATE_SCHEMAS=1 cargo test -p sagas events` and commit them",
            differ.join(", ")
        );
    }

    #[test]
    fn every_schema_file_is_of_an_event_of_the_catalog() {
        let mut strays = Vec::new();
        let Ok(sources) = std::fs::read_dir(schemas_dir()) else {
            return; // none yet: `committed_schemas_are_the_generated_ones` says so
        };
        for source in sources {
            let source = source.unwrap();
            if !source.file_type().unwrap().is_dir() {
                continue;
            }
            let source_name = source.file_name().into_string().unwrap();
            for file in std::fs::read_dir(source.path()).unwrap() {
                let file = file.unwrap().file_name().into_string().unwrap();
                // `<Name>.v<version>.json`; an earlier version of an event stays, for the
                // readers of older messages.
                let known = file
                    .strip_suffix(".json")
                    .and_then(|f| f.rsplit_once(".v"))
                    .and_then(|(name, v)| Some((name, v.parse::<u32>().ok()?)))
                    .is_some_and(|(name, version)| {
                        CATALOG.iter().any(|e| {
                            e.source == source_name && e.name == name && version <= e.version
                        })
                    });
                if !known {
                    strays.push(format!("schemas/events/{source_name}/{file}"));
                }
            }
        }
        assert!(
            strays.is_empty(),
            "schema files of no event of sagas::events::CATALOG (renamed or removed?): {strays:?}"
        );
    }

    #[test]
    fn every_schema_accepts_its_event_and_refuses_one_without_a_required_field() {
        for entry in CATALOG {
            let what = entry.path();
            let schema = (entry.schema)().to_value();
            let validator = validator(entry);
            let sample = sample(entry);
            let message = serde_json::to_value(&sample.message).unwrap();
            assert_valid(&validator, &message, &what);

            // The sample sets every field, optional ones included.
            let properties = schema["properties"].as_object().unwrap();
            for name in properties.keys() {
                assert!(message.get(name).is_some(), "{what}: sample lacks {name}");
            }
            let required = strings(&schema["required"]);
            let envelope = &ENVELOPE_FIELDS[..ENVELOPE_FIELDS.len() - 1];
            assert_eq!(&required[..envelope.len()], envelope, "{what}");
            assert!(
                required.len() > envelope.len(),
                "{what}: no field of its own"
            );
            for name in properties.keys() {
                let mut without = message.clone();
                without.as_object_mut().unwrap().remove(name);
                if required.contains(&name.as_str()) {
                    assert!(!validator.is_valid(&without), "{what}: {name} is required");
                } else {
                    assert_valid(&validator, &without, &format!("{what} without {name}"));
                }
                // The code reads what the schema accepts, and refuses a message without a
                // field the event needs. (It reads one without `v` or `source` too: messages
                // of before the envelope named them.)
                let needed = required.contains(&name.as_str()) && name != "v" && name != "source";
                assert_eq!(
                    (sample.reads)(&without),
                    !needed,
                    "{what}: the code and the schema disagree on {name}"
                );
            }

            // A field of a newer producer is fine; another type, source or version is not.
            let mut newer = message.clone();
            newer["added_later"] = json!({"any": "thing"});
            assert_valid(&validator, &newer, &format!("{what} with a new field"));
            for (field, wrong) in [
                ("type", json!("SomethingElse")),
                ("source", json!("elsewhere")),
                ("v", json!(entry.version + 1)),
                ("id", json!("not-a-uuid")),
                ("occurred_at", json!("yesterday")),
            ] {
                let mut other = message.clone();
                other[field] = wrong;
                assert!(!validator.is_valid(&other), "{what}: {field} is checked");
            }
        }
    }

    #[test]
    fn the_shared_types_are_constrained_as_their_parsers() {
        let entry = Entry::of::<order::OrderCreated>();
        let validator = validator(&entry);
        let message = serde_json::to_value(&sample(&entry).message).unwrap();
        let with = |pointer: &str, value: Value| {
            let mut m = message.clone();
            *m.pointer_mut(pointer).unwrap() = value;
            m
        };
        for (pointer, value, parses) in [
            ("/lines/0/sku", json!("A"), true),
            ("/lines/0/sku", json!("x".repeat(Sku::MAX_LEN)), true),
            ("/lines/0/sku", json!("x".repeat(Sku::MAX_LEN + 1)), false),
            ("/lines/0/sku", json!("A B"), false),
            ("/lines/0/sku", json!(""), false),
            ("/lines/0/quantity", json!(1), true),
            ("/lines/0/quantity", json!(Quantity::MAX), true),
            ("/lines/0/quantity", json!(0), false),
            ("/lines/0/quantity", json!(Quantity::MAX + 1), false),
            ("/total/currency", json!("EUR"), true),
            ("/total/currency", json!("eur"), false),
            ("/total/currency", json!("EURO"), false),
            ("/order_id", json!("not-a-uuid"), false),
            ("/customer", json!({"name": "Ada"}), false),
        ] {
            let m = with(pointer, value.clone());
            assert_eq!(validator.is_valid(&m), parses, "{pointer} = {value}");
            let event: wire::Event = serde_json::from_value(m).unwrap();
            assert_eq!(
                decode::<order::OrderCreated>(&event).is_ok(),
                parses,
                "{pointer} = {value}"
            );
        }
    }

    #[test]
    fn no_event_carries_personal_data_or_a_payment_token() {
        const FORBIDDEN: &[&str] = &[
            "email",
            "name",
            "first_name",
            "last_name",
            "phone",
            "address",
            "line1",
            "line2",
            "city",
            "postal_code",
            "country",
            "payment_token",
            "token",
            "card",
            "card_number",
            "iban",
        ];
        for entry in CATALOG {
            let mut names = BTreeSet::new();
            property_names((entry.schema)().as_value(), &mut names);
            let found: Vec<_> = names
                .iter()
                .filter(|n| FORBIDDEN.contains(&n.as_str()) || n.contains("email"))
                .collect();
            assert!(found.is_empty(), "{}: {found:?}", entry.path());
        }
    }

    #[test]
    fn events_are_named_once_and_published_on_their_subject() {
        let subjects = Subjects::new("shop").unwrap();
        let mut names = BTreeSet::new();
        for sample in samples() {
            let m = &sample.message;
            assert!(names.insert(m.name.clone()), "{} twice", m.name);
            assert!(
                m.source.bytes().all(|b| b.is_ascii_lowercase()),
                "{}",
                m.source
            );
            assert_eq!(
                subjects.event(m),
                format!("shop.events.{}.{}", m.source, m.name)
            );
            let json = serde_json::to_value(m).unwrap();
            let entry = CATALOG.iter().find(|e| e.name == m.name).unwrap();
            let schema = (entry.schema)().to_value();
            for field in ENVELOPE_FIELDS {
                assert!(json.get(field).is_some(), "{}: {field}", m.name);
                assert!(
                    schema["properties"].get(field).is_some(),
                    "{}: {field}",
                    m.name
                );
            }
        }
        assert_eq!(names.len(), CATALOG.len(), "a sample per event");
    }

    #[test]
    fn decode_reads_only_its_type_source_and_version() {
        let entry = Entry::of::<order::OrderDelivered>();
        let good = sample(&entry).message;
        assert!(decode::<order::OrderDelivered>(&good).is_ok());
        assert!(
            decode::<order::OrderShipped>(&good).is_err(),
            "another type"
        );
        let mut other = good.clone();
        other.source = "shipping".into();
        assert!(
            decode::<order::OrderDelivered>(&other).is_err(),
            "another source"
        );
        other.source = String::new();
        assert!(decode::<order::OrderDelivered>(&other).is_ok(), "no source");
        let mut newer = good;
        newer.v = 2;
        let e = decode::<order::OrderDelivered>(&newer).unwrap_err();
        assert_eq!(
            e.to_string(),
            "expected the event order/OrderDelivered v1, got order/OrderDelivered v2"
        );
    }

    /// The order's events as the checkout publishes them ([`shop::order::Event`]) are these
    /// structs' messages, and their schemas accept them.
    #[test]
    fn the_checkouts_events_are_these() {
        let published = [
            shop::order::Event::OrderConfirmed {
                order_id: order_id(),
                saga_id: saga_id(),
                customer: customer(),
                lines: lines(),
                total: eur(3_800),
            },
            shop::order::Event::OrderCancelled {
                order_id: order_id(),
                saga_id: saga_id(),
                customer: customer(),
                reason: "cancelled: by the customer".into(),
                needs_operator: false,
            },
        ];
        for event in published {
            let mut body = Body::of(&event);
            body.0.remove("type");
            let message = wire::Event {
                id: EventId::derive(saga_id(), event.name()),
                name: event.name().to_owned(),
                v: wire::SCHEMA_VERSION,
                occurred_at: at(),
                source: shop::order::SOURCE.to_owned(),
                correlation_id: Some("req-1".into()),
                body,
            };
            let entry = CATALOG.iter().find(|e| e.name == event.name()).unwrap();
            assert_eq!(entry.source, shop::order::SOURCE);
            let json = serde_json::to_value(&message).unwrap();
            assert_valid(&validator(entry), &json, event.name());
            match event {
                shop::order::Event::OrderConfirmed { total, .. } => {
                    let typed = decode::<order::OrderConfirmed>(&message).unwrap();
                    assert_eq!((typed.total, typed.charge_id), (total, None));
                }
                shop::order::Event::OrderCancelled { reason, .. } => {
                    let typed = decode::<order::OrderCancelled>(&message).unwrap();
                    assert_eq!((typed.reason, typed.refunded), (reason, None));
                }
            }
        }
    }

    /// An `OrderConfirmed` of before the envelope named its source and version, whose customer
    /// had an email (`tests/compatibility.rs`), is read, and the email dropped.
    #[test]
    fn an_order_event_of_before_reads() {
        let legacy = json!({
            "id": "0a8c1e2d-3b4f-5a6b-8c9d-0e1f2a3b4c5d",
            "occurred_at": "2026-12-02T20:00:01.123456Z",
            "type": "OrderConfirmed",
            "order_id": "01a23838-086f-7273-a968-b5965dc84400",
            "saga_id": "01a23838-086f-7273-a968-b5965dc8446d",
            "customer": {"id": "cust-1", "email": "ada@example.com"},
            "lines": [{"sku": "A", "quantity": 2}],
            "total": {"minor": 3900, "currency": "EUR"}
        });
        let message: wire::Event = serde_json::from_value(legacy).unwrap();
        let typed = decode::<order::OrderConfirmed>(&message).unwrap();
        assert_eq!(typed.customer, customer());
        assert_eq!((typed.charge_id, typed.shipment_id), (None, None));
        assert!(!serde_json::to_string(&typed).unwrap().contains("ada@"));
    }
}
