//! The notification service: tells customers what happened to their accounts, carts, orders,
//! payments and parcels, once per domain event it subscribes to (the brief's table: User,
//! Order, Payment, Cart and Shipping events; the event id is the idempotency key). Sending is
//! simulated: the message is recorded in `notifications.sent` and logged (without the address:
//! personal data stays out of logs).
//!
//! Events name the customer by id only; the address to write to is read from the order
//! (`orders.orders`), in the statement that records the message. An event of no order (a
//! user's, a cart's) is addressed to the customer's id, for the User service to resolve.

use chrono::{DateTime, Utc};
use sagas::events::{self, DomainEvent, order};
use sagas::shop::OrderId;
use sagas::wire::Event;
use sqlx::PgPool;
use uuid::Uuid;

use crate::batch::Batcher;
use crate::bus::Unavailable;

/// One message to record, to the customer of `order`, or to `customer` when there is none.
struct Sent {
    event_id: Uuid,
    kind: String,
    order: Option<Uuid>,
    customer: String,
    subject: String,
    body: String,
    at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Notification {
    sent: Batcher<Sent, bool>,
}

/// Record many messages in one statement (group commit); whether each was new.
async fn record_many(pool: &PgPool, sent: Vec<Sent>) -> Result<Vec<bool>, sqlx::Error> {
    // One array per column, for `unnest`.
    let n = sent.len();
    let mut events = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut orders = Vec::with_capacity(n);
    let mut customers = Vec::with_capacity(n);
    let mut subjects = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    for s in sent {
        events.push(s.event_id);
        kinds.push(s.kind);
        orders.push(s.order);
        customers.push(s.customer);
        subjects.push(s.subject);
        bodies.push(s.body);
        at.push(s.at);
    }
    let inserted: std::collections::HashSet<Uuid> = sqlx::query_scalar!(
        "INSERT INTO notifications.sent (event_id, kind, recipient, subject, body, sent_at)
         SELECT u.event_id, u.kind, coalesce(o.customer_email, 'customer:' || u.customer), u.subject, u.body, u.at
           FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[], $7::text[])
             AS u(event_id, kind, order_id, subject, body, at, customer)
           LEFT JOIN orders.orders o ON o.id = u.order_id
         ON CONFLICT (event_id) DO NOTHING
         RETURNING event_id",
        &events,
        &kinds,
        &orders as &[Option<Uuid>],
        &subjects,
        &bodies,
        &at,
        &customers,
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    // The same event twice in one batch (a redelivery racing the first delivery) is new once.
    let mut answered = std::collections::HashSet::new();
    Ok(events
        .iter()
        .map(|id| inserted.contains(id) && answered.insert(*id))
        .collect())
}

impl Notification {
    pub fn new(pool: PgPool) -> Self {
        let sent = Batcher::spawn(256, move |batch| {
            let pool = pool.clone();
            async move { record_many(&pool, batch).await }
        });
        Self { sent }
    }

    /// Send the message an event calls for, unless it was sent already.
    pub async fn on_event(&self, event: &Event) -> Result<(), Unavailable> {
        let Some(Words {
            order,
            customer,
            subject,
            body,
        }) = words(event)
        else {
            // Events of a kind this build has no words for are skipped (a newer producer's).
            tracing::debug!(event = %event.name, "no notification for this event");
            return Ok(());
        };
        let new = self
            .sent
            .call(Sent {
                event_id: event.id.as_uuid(),
                kind: event.name.clone(),
                order: order.map(|o| o.as_uuid()),
                customer,
                subject: subject.clone(),
                body,
                at: Utc::now(),
            })
            .await?;
        if new {
            tracing::info!(event = %event.name, event_id = %event.id, "notification sent");
        }
        Ok(())
    }
}

/// A message: to the customer of `order`, or else to `customer`.
struct Words {
    order: Option<OrderId>,
    customer: String,
    subject: String,
    body: String,
}

fn about(order: OrderId, customer: &str, subject: String, body: String) -> Words {
    Words {
        order: Some(order),
        customer: customer.to_owned(),
        subject,
        body,
    }
}

fn to(customer: &str, subject: &str, body: &str) -> Words {
    Words {
        order: None,
        customer: customer.to_owned(),
        subject: subject.to_owned(),
        body: body.to_owned(),
    }
}

/// What the customer is told of an event they are subscribed to: what happened to their
/// account, order, money or parcel, and nothing that did not. `None` for an event with no
/// words (one the service does not subscribe to, or a newer producer's).
fn words(event: &Event) -> Option<Words> {
    use sagas::events::{cart, payment, shipping, user};
    fn get<E: DomainEvent>(event: &Event) -> Option<E> {
        events::decode(event).ok()
    }
    Some(match event.name.as_str() {
        user::UserRegistered::NAME => {
            let e: user::UserRegistered = get(event)?;
            to(
                &e.user_id,
                "Welcome to the shop",
                "Your account is ready. Please confirm your email address.",
            )
        }
        user::EmailVerified::NAME => {
            let e: user::EmailVerified = get(event)?;
            to(&e.user_id, "Your email address is confirmed", "Thank you.")
        }
        cart::CartAbandoned::NAME => {
            let e: cart::CartAbandoned = get(event)?;
            to(
                &e.customer.id,
                "You left items in your cart",
                "They are still there if you want them.",
            )
        }
        cart::CheckoutInitiated::NAME => {
            let e: cart::CheckoutInitiated = get(event)?;
            to(
                &e.customer.id,
                "We are placing your order",
                "You will hear from us as soon as it is confirmed.",
            )
        }
        order::OrderCreated::NAME => {
            let e: order::OrderCreated = get(event)?;
            about(
                e.order_id,
                &e.customer.id,
                format!("We received your order {}", e.order_id),
                format!(
                    "We are setting your items aside and taking the payment of {}.",
                    e.total
                ),
            )
        }
        order::OrderConfirmed::NAME => {
            let e: order::OrderConfirmed = get(event)?;
            about(
                e.order_id,
                &e.customer.id,
                format!("Your order {} is confirmed", e.order_id),
                format!(
                    "We charged {} and your parcel is booked with the carrier.",
                    e.total
                ),
            )
        }
        order::OrderShipped::NAME => {
            let e: order::OrderShipped = get(event)?;
            about(
                e.order_id,
                &e.customer.id,
                format!("Your order {} is on its way", e.order_id),
                format!(
                    "The carrier collected your parcel. Tracking number: {}.",
                    e.tracking_number
                ),
            )
        }
        order::OrderDelivered::NAME => {
            let e: order::OrderDelivered = get(event)?;
            about(
                e.order_id,
                &e.customer.id,
                format!("Your order {} was delivered", e.order_id),
                "The carrier reports your parcel delivered. Enjoy!".to_owned(),
            )
        }
        order::OrderCancelled::NAME => {
            let e: order::OrderCancelled = get(event)?;
            let money = match e.refunded {
                Some(true) => "Your payment was refunded.",
                Some(false) if !e.needs_operator => "Nothing was charged.",
                Some(false) => "Any payment taken for it has not been refunded yet.",
                // An older event does not say.
                None => "Nothing was charged or the charge was refunded.",
            };
            if e.needs_operator {
                about(
                    e.order_id,
                    &e.customer.id,
                    format!("There is a problem with your order {}", e.order_id),
                    format!(
                        "{money} Our team is looking into it and will contact you. Reason: {}",
                        e.reason
                    ),
                )
            } else {
                about(
                    e.order_id,
                    &e.customer.id,
                    format!("Your order {} was cancelled", e.order_id),
                    format!("{money} Reason: {}", e.reason),
                )
            }
        }
        payment::PaymentProcessed::NAME => {
            let e: payment::PaymentProcessed = get(event)?;
            about(
                e.order_id,
                &e.customer.id,
                format!("Payment received for order {}", e.order_id),
                format!("We charged {}.", e.amount),
            )
        }
        payment::PaymentFailed::NAME => {
            let e: payment::PaymentFailed = get(event)?;
            about(
                e.order_id,
                &e.customer.id,
                format!("Your payment for order {} did not go through", e.order_id),
                format!("Nothing was charged: {}.", e.reason),
            )
        }
        shipping::ShipmentDispatched::NAME => {
            let e: shipping::ShipmentDispatched = get(event)?;
            about(
                e.order_id,
                "",
                format!("Your parcel for order {} left our warehouse", e.order_id),
                format!("Tracking number: {}.", e.tracking_number),
            )
        }
        shipping::ShipmentDelivered::NAME => {
            let e: shipping::ShipmentDelivered = get(event)?;
            about(
                e.order_id,
                "",
                format!("Your parcel for order {} arrived", e.order_id),
                "The carrier confirms the delivery.".to_owned(),
            )
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagas::shop::CustomerRef;
    use sagas::wire::{EventId, SagaId};
    use uuid::Uuid;

    fn cancelled(needs_operator: bool, refunded: Option<bool>) -> String {
        let e = order::OrderCancelled {
            order_id: OrderId::from_uuid(Uuid::from_u128(1)),
            saga_id: SagaId::from_uuid(Uuid::from_u128(2)),
            customer: CustomerRef { id: "c".into() },
            reason: "card declined".into(),
            needs_operator,
            refunded,
        };
        let event = events::envelope(
            &e,
            EventId::from_uuid(Uuid::from_u128(3)),
            chrono::Utc::now(),
        );
        let w = words(&event).unwrap();
        format!("{}: {}", w.subject, w.body)
    }

    #[test]
    fn a_cancel_says_what_became_of_the_money_and_nothing_else() {
        assert!(cancelled(false, Some(true)).contains("was refunded"));
        assert!(cancelled(false, Some(false)).contains("Nothing was charged"));
        let stuck = cancelled(true, Some(false));
        assert!(
            stuck.contains("problem") && stuck.contains("not been refunded"),
            "{stuck}"
        );
        assert!(!stuck.contains("Nothing was charged"));
        assert!(!stuck.contains("was refunded."));
        let case = cancelled(true, Some(true));
        assert!(
            case.contains("was refunded") && case.contains("Our team"),
            "{case}"
        );
    }
}
