//! The carrier's reports on the parcels it was asked to collect, received by the shipping
//! service over HTTP (`POST /carrier/reports`, a webhook the carrier calls at least once per
//! report) and published as the Shipping service's domain events: `ShipmentDispatched`,
//! `ShipmentDelivered`, `ShipmentLost`.
//!
//! A report is recorded and its event written to the outbox ([`runtime::outbox`]) in one
//! transaction, keyed by the carrier's event id: a report sent twice is recorded once, and its
//! event is published once (its id is derived from the shipment and the carrier's event id).
//! Only then is the carrier answered 200, so a report the service did not keep is sent again.
//! A report on a shipment the service does not know is answered 404 (the carrier gives up).
//!
//! Must never: answer 2xx before the report and its event committed.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Json, State, rejection::JsonRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, Utc};
use sagas::events::{self, DomainEvent, shipping};
use sagas::shop::OrderId;
use sagas::wire::{EventId, Subjects};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;

/// What the carrier reports, as it sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The carrier's id of this report: the same report sent again has the same.
    pub event_id: String,
    /// The carrier's id of the shipment.
    pub shipment_id: String,
    pub tracking_number: String,
    pub kind: Kind,
    #[serde(default)]
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Dispatched,
    Delivered,
    Lost,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Dispatched => "dispatched",
            Kind::Delivered => "delivered",
            Kind::Lost => "lost",
        }
    }
}

#[derive(Clone)]
pub struct Reports {
    pool: PgPool,
    subjects: Subjects,
    /// Wakes the outbox relay after a commit that wrote an event.
    relay: Arc<Notify>,
}

impl Reports {
    pub fn new(pool: PgPool, subjects: Subjects, relay: Arc<Notify>) -> Self {
        Self {
            pool,
            subjects,
            relay,
        }
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/carrier/reports", post(receive))
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .with_state(self)
    }

    /// Record a report and write its event, once. `Ok(false)` when it was recorded before;
    /// `Err(None)` when its shipment is unknown.
    pub async fn record(&self, report: &Report) -> Result<bool, Option<sqlx::Error>> {
        let mut tx = self.pool.begin().await.map_err(Some)?;
        let Some(shipment) = sqlx::query!(
            "SELECT id, order_id FROM shipping.shipments WHERE carrier_ref = $1 FOR UPDATE",
            report.shipment_id,
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(Some)?
        else {
            return Err(None);
        };
        let new = sqlx::query_scalar!(
            "INSERT INTO shipping.carrier_reports (event_id, shipment_id, kind, at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            report.event_id,
            shipment.id,
            report.kind.as_str(),
            report.at,
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(Some)?
        .is_some();
        if !new {
            return Ok(false);
        }
        sqlx::query!(
            "UPDATE shipping.shipments
                SET dispatched_at = CASE WHEN $2 = 'dispatched' THEN coalesce(dispatched_at, $3) ELSE dispatched_at END,
                    delivered_at  = CASE WHEN $2 = 'delivered'  THEN coalesce(delivered_at, $3)  ELSE delivered_at END,
                    lost_reason   = CASE WHEN $2 = 'lost' THEN coalesce(lost_reason, $4) ELSE lost_reason END,
                    updated_at = now()
              WHERE id = $1",
            shipment.id,
            report.kind.as_str(),
            report.at,
            report.reason.clone().unwrap_or_else(|| "lost by the carrier".into()),
        )
        .execute(&mut *tx)
        .await
        .map_err(Some)?;
        let order_id = OrderId::from_uuid(shipment.order_id);
        let carrier_event_id = report.event_id.clone();
        let event = match report.kind {
            Kind::Dispatched => envelope(
                &shipping::ShipmentDispatched {
                    shipment_id: shipment.id,
                    order_id,
                    tracking_number: report.tracking_number.clone(),
                    carrier_event_id,
                },
                shipment.id,
                report,
            ),
            Kind::Delivered => envelope(
                &shipping::ShipmentDelivered {
                    shipment_id: shipment.id,
                    order_id,
                    carrier_event_id,
                },
                shipment.id,
                report,
            ),
            Kind::Lost => envelope(
                &shipping::ShipmentLost {
                    shipment_id: shipment.id,
                    order_id,
                    carrier_event_id,
                    reason: report
                        .reason
                        .clone()
                        .unwrap_or_else(|| "lost by the carrier".into()),
                },
                shipment.id,
                report,
            ),
        };
        let correlation_id = format!("carrier-{}", report.event_id);
        runtime::outbox::write(&mut tx, &self.subjects, &event, &correlation_id)
            .await
            .map_err(Some)?;
        tx.commit().await.map_err(Some)?;
        self.relay.notify_one();
        Ok(true)
    }
}

/// The event of a report: its id derived from the shipment and the carrier's event id (the
/// same report is the same event), at the time the carrier says it happened.
fn envelope<E: DomainEvent>(e: &E, shipment: uuid::Uuid, report: &Report) -> sagas::wire::Event {
    let id = EventId::derive_from(shipment, &format!("{}/{}", E::NAME, report.event_id));
    events::envelope(e, id, report.at)
}

fn problem(status: StatusCode, title: &str, detail: String) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
        Json(json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail})),
    )
        .into_response()
}

async fn receive(
    State(reports): State<Reports>,
    body: Result<Json<Report>, JsonRejection>,
) -> Response {
    let report = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid report",
                e.body_text(),
            );
        }
    };
    let text_ok = |s: &str| (1..=128).contains(&s.len()) && !s.chars().any(char::is_control);
    if !text_ok(&report.event_id)
        || !text_ok(&report.shipment_id)
        || !text_ok(&report.tracking_number)
    {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid report",
            "event_id, shipment_id and tracking_number must be 1 to 128 characters, none a control character".into(),
        );
    }
    match reports.record(&report).await {
        Ok(new) => {
            tracing::info!(event_id = %report.event_id, kind = report.kind.as_str(), new, "carrier report");
            (
                StatusCode::OK,
                Json(json!({"recorded": true, "duplicate": !new})),
            )
                .into_response()
        }
        Err(None) => problem(
            StatusCode::NOT_FOUND,
            "Unknown shipment",
            format!("no shipment {} here", report.shipment_id),
        ),
        Err(Some(e)) => {
            tracing::warn!(error = %e, "a carrier report could not be recorded; the carrier sends it again");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again",
                "the report could not be recorded now".into(),
            )
        }
    }
}
