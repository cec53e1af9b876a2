//! The Order service's subscriber (the brief's table: it subscribes to Payment, Shipping and
//! Cart events, and keeps what it knows of an order in step with them):
//!
//! - every event of an order (the Order, Payment and Shipping services', by their `order_id`)
//!   goes into the order's history (`orders.history`, one row per event id, so a redelivered
//!   event is recorded once), which `GET /orders/{id}` shows;
//! - a Cart service's `CheckoutInitiated` starts the checkout exactly as `POST /checkout` does:
//!   the service reads the checkout's details from the Cart service by the event's
//!   `checkout_ref` (the event itself carries no personal data and no payment token), and
//!   posts them to the orchestrator's `POST /checkout` with the cart as its `Idempotency-Key`
//!   and the event's correlation id. The same cart initiated twice starts one checkout.
//!
//! A `CheckoutInitiated` whose details the Cart service does not have, or that the
//! orchestrator refuses (an unknown SKU, an invalid address: a 4xx), is dead-lettered with the
//! reason; one the Cart service or the orchestrator cannot answer now comes back later.
//! (`StockUpdated` and `PriceChanged`, also in its row of the brief, need nothing here: a
//! checkout is priced and its stock reserved by the Product service's own tables, at the time.)

use std::time::Duration;

use chrono::{DateTime, Utc};
use sagas::events::{DomainEvent, cart};
use sagas::wire::Event;
use sqlx::PgPool;
use uuid::Uuid;

use crate::bus::{Error, Unavailable};

#[derive(Clone)]
pub struct Orders {
    pool: PgPool,
    http: reqwest::Client,
    /// The orchestrator's API (`POST /checkout`).
    api_url: String,
    /// The Cart service's API (the checkouts it initiated).
    cart_url: String,
}

/// The sources whose events are an order's history.
const HISTORY: &[&str] = &["order", "payment", "shipping"];

impl Orders {
    pub fn new(pool: PgPool, api_url: String, cart_url: String, timeout: Duration) -> Self {
        Self {
            pool,
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("an HTTP client"),
            api_url: api_url.trim_end_matches('/').to_owned(),
            cart_url: cart_url.trim_end_matches('/').to_owned(),
        }
    }

    pub async fn on_event(&self, event: &Event) -> Result<(), Error> {
        if event.source == cart::CheckoutInitiated::SOURCE
            && event.name == cart::CheckoutInitiated::NAME
        {
            return self.checkout_initiated(event).await;
        }
        if HISTORY.contains(&event.source.as_str()) {
            self.record(event).await?;
        }
        Ok(())
    }

    /// Put an order's event in its history, once.
    async fn record(&self, event: &Event) -> Result<(), Unavailable> {
        let Some(order_id) = event
            .body
            .str("order_id")
            .and_then(|s| s.parse::<Uuid>().ok())
        else {
            return Ok(());
        };
        let at: DateTime<Utc> = event.occurred_at;
        sqlx::query!(
            "INSERT INTO orders.history (event_id, order_id, source, type, occurred_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
            event.id.as_uuid(),
            order_id,
            event.source,
            event.name,
            at,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn checkout_initiated(&self, event: &Event) -> Result<(), Error> {
        let e: cart::CheckoutInitiated = sagas::events::decode(event)
            .map_err(|e| Error::Poison(format!("an unreadable CheckoutInitiated: {e}")))?;
        let details = self
            .http
            .get(format!(
                "{}/cart/v1/checkouts/{}",
                self.cart_url, e.checkout_ref
            ))
            .send()
            .await
            .map_err(|err| Unavailable(format!("the Cart service: {err}")))?;
        let status = details.status();
        if status.is_server_error() {
            return Err(Unavailable(format!("the Cart service answered {status}")).into());
        }
        if !status.is_success() {
            return Err(Error::Poison(format!(
                "the Cart service has no checkout {} for cart {} ({status})",
                e.checkout_ref, e.cart_id
            )));
        }
        let body = details
            .bytes()
            .await
            .map_err(|err| Unavailable(format!("the Cart service: {err}")))?;
        let correlation_id = event.correlation_id.clone().unwrap_or_default();
        let placed = self
            .http
            .post(format!("{}/checkout", self.api_url))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("cart-{}", e.cart_id))
            .header("x-correlation-id", correlation_id)
            .body(body)
            .send()
            .await
            .map_err(|err| Unavailable(format!("the orchestrator: {err}")))?;
        let status = placed.status();
        if status.is_success() {
            tracing::info!(cart_id = %e.cart_id, %status, "checkout started for a cart");
            return Ok(());
        }
        // Why, by the problem's title and the fields it names: its details may quote what the
        // customer typed, which stays out of dead letters.
        let problem: serde_json::Value = placed.json().await.unwrap_or_default();
        let fields: Vec<&str> = problem["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .filter_map(|e| e["pointer"].as_str().or(e["parameter"].as_str()))
                    .collect()
            })
            .unwrap_or_default();
        let why = format!(
            "the orchestrator refused the checkout of cart {} ({status}): {} {}",
            e.cart_id,
            problem["title"].as_str().unwrap_or("no title"),
            if fields.is_empty() {
                String::new()
            } else {
                format!("(fields {})", fields.join(", "))
            }
        );
        if status.is_client_error() && status.as_u16() != 429 && status.as_u16() != 408 {
            Err(Error::Poison(why))
        } else {
            Err(Unavailable(why).into())
        }
    }
}
