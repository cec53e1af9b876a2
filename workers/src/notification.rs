//! The notification service: tells customers what happened to their orders, once per domain
//! event (the event id is the idempotency key). Sending is simulated: the message is recorded
//! in `notifications.sent` and logged.

use chrono::Utc;
use sagas::wire::{DomainEvent, Event};
use sqlx::PgPool;

use crate::bus::Unavailable;

#[derive(Clone)]
pub struct Notification {
    pool: PgPool,
}

impl Notification {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Send the message an event calls for, unless it was sent already.
    pub async fn on_event(&self, event: &Event) -> Result<(), Unavailable> {
        let (recipient, subject, body) = match &event.event {
            DomainEvent::OrderConfirmed {
                order_id,
                customer,
                total,
                ..
            } => (
                customer.email.clone(),
                format!("Your order {order_id} is confirmed"),
                format!("We charged {total} and your parcel is booked with the carrier."),
            ),
            DomainEvent::OrderCancelled {
                order_id,
                customer,
                reason,
                ..
            } => (
                customer.email.clone(),
                format!("Your order {order_id} was cancelled"),
                format!("Nothing was charged or the charge was refunded. Reason: {reason}"),
            ),
        };
        let sent = sqlx::query(
            "INSERT INTO notifications.sent (event_id, kind, recipient, subject, body, sent_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event.id.as_uuid())
        .bind(event.event.name())
        .bind(&recipient)
        .bind(&subject)
        .bind(&body)
        .bind(Utc::now())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if sent == 1 {
            tracing::info!(to = %recipient, subject = %subject, "notification sent");
        }
        Ok(())
    }
}
