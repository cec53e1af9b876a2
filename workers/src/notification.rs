//! The notification service: tells customers what happened to their orders, once per domain
//! event (the event id is the idempotency key). Sending is simulated: the message is recorded
//! in `notifications.sent` and logged (without the address: personal data stays out of logs).
//!
//! Events name the customer by id only; the address to write to is read from the order
//! (`orders.orders`), in the statement that records the message.

use chrono::{DateTime, Utc};
use sagas::events::{self, DomainEvent, order};
use sagas::shop::OrderId;
use sagas::wire::Event;
use sqlx::PgPool;
use uuid::Uuid;

use crate::batch::Batcher;
use crate::bus::Unavailable;

/// One message to record, to the customer of `order`.
struct Sent {
    event_id: Uuid,
    kind: String,
    order: Uuid,
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
    let mut subjects = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    for s in sent {
        events.push(s.event_id);
        kinds.push(s.kind);
        orders.push(s.order);
        subjects.push(s.subject);
        bodies.push(s.body);
        at.push(s.at);
    }
    let inserted: std::collections::HashSet<Uuid> = sqlx::query_scalar!(
        "INSERT INTO notifications.sent (event_id, kind, recipient, subject, body, sent_at)
         SELECT u.event_id, u.kind, coalesce(o.customer_email, ''), u.subject, u.body, u.at
           FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[])
             AS u(event_id, kind, order_id, subject, body, at)
           LEFT JOIN orders.orders o ON o.id = u.order_id
         ON CONFLICT (event_id) DO NOTHING
         RETURNING event_id",
        &events,
        &kinds,
        &orders,
        &subjects,
        &bodies,
        &at,
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
        let Some((order, subject, body)) = words(event) else {
            // Events of a kind this build has no words for are skipped (a newer producer's).
            tracing::debug!(event = %event.name, "no notification for this event");
            return Ok(());
        };
        let new = self
            .sent
            .call(Sent {
                event_id: event.id.as_uuid(),
                kind: event.name.clone(),
                order: order.as_uuid(),
                subject: subject.clone(),
                body,
                at: Utc::now(),
            })
            .await?;
        if new {
            tracing::info!(order_id = %order, subject = %subject, "notification sent");
        }
        Ok(())
    }
}

/// What the customer is told of an order's event: the order, a subject and a body that say
/// what happened to their money and their parcel, and nothing that did not. `None` for an
/// event with no words.
fn words(event: &Event) -> Option<(OrderId, String, String)> {
    Some(match event.name.as_str() {
        order::OrderConfirmed::NAME => {
            let e: order::OrderConfirmed = events::decode(event).ok()?;
            (
                e.order_id,
                format!("Your order {} is confirmed", e.order_id),
                format!(
                    "We charged {} and your parcel is booked with the carrier.",
                    e.total
                ),
            )
        }
        order::OrderShipped::NAME => {
            let e: order::OrderShipped = events::decode(event).ok()?;
            (
                e.order_id,
                format!("Your order {} is on its way", e.order_id),
                format!(
                    "The carrier collected your parcel. Tracking number: {}.",
                    e.tracking_number
                ),
            )
        }
        order::OrderDelivered::NAME => {
            let e: order::OrderDelivered = events::decode(event).ok()?;
            (
                e.order_id,
                format!("Your order {} was delivered", e.order_id),
                "The carrier reports your parcel delivered. Enjoy!".to_owned(),
            )
        }
        order::OrderCancelled::NAME => {
            let e: order::OrderCancelled = events::decode(event).ok()?;
            let money = match e.refunded {
                Some(true) => "Your payment was refunded.",
                Some(false) if !e.needs_operator => "Nothing was charged.",
                Some(false) => "Any payment taken for it has not been refunded yet.",
                // An older event does not say.
                None => "Nothing was charged or the charge was refunded.",
            };
            if e.needs_operator {
                (
                    e.order_id,
                    format!("There is a problem with your order {}", e.order_id),
                    format!(
                        "{money} Our team is looking into it and will contact you. Reason: {}",
                        e.reason
                    ),
                )
            } else {
                (
                    e.order_id,
                    format!("Your order {} was cancelled", e.order_id),
                    format!("{money} Reason: {}", e.reason),
                )
            }
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
        let (_, subject, body) = words(&event).unwrap();
        format!("{subject}: {body}")
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
