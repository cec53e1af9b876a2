//! The notification service: tells customers what happened to their orders, once per domain
//! event (the event id is the idempotency key). Sending is simulated: the message is recorded
//! in `notifications.sent` and logged (without the address: personal data stays out of logs).
//!
//! Events name the customer by id only; the address to write to is read from the order
//! (`orders.orders`), in the statement that records the message.

use chrono::{DateTime, Utc};
use sagas::shop::order;
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
        // Events of a kind this build has no words for are skipped (a newer producer's).
        let Ok(order_event) = event.decode::<order::Event>() else {
            tracing::debug!(event = %event.name, "no notification for this event");
            return Ok(());
        };
        let (order, subject, body) = match &order_event {
            order::Event::OrderConfirmed {
                order_id, total, ..
            } => (
                *order_id,
                format!("Your order {order_id} is confirmed"),
                format!("We charged {total} and your parcel is booked with the carrier."),
            ),
            order::Event::OrderCancelled {
                order_id, reason, ..
            } => (
                *order_id,
                format!("Your order {order_id} was cancelled"),
                format!("Nothing was charged or the charge was refunded. Reason: {reason}"),
            ),
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
