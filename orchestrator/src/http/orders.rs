//! The order as the shop's customers and its front end see it: `GET /orders/{id}` (its status,
//! lines, total and delivery, from the checkout's and the fulfilment's read models, and its
//! history of events from the Order service's subscriber; no personal data), `GET /orders?customer=` (a customer's orders, newest first), and
//! `POST /orders/{id}/cancel` (a customer's cancel: the checkout while it runs, then the
//! fulfilment until the parcel leaves; after that, 409 with the reason).
//!
//! An order's status: `created` (its checkout runs), `confirmed` (paid, being prepared),
//! `shipped`, `delivered`, `cancelled`, or `needs_attention` (a case for an operator, with
//! what is needed).

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sagas::api::Input;
use sagas::wire::SignalTarget;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::input;
use super::problem::{OptionalJsonBody, PathParam, Problem, parse_query};
use super::sagas::CancelRequest;
use super::{AppState, CorrelationId};
use crate::engine::{Applied, Origin};

fn parse_order_id(raw: &str) -> Result<Uuid, Problem> {
    raw.parse().map_err(|_| {
        Problem::bad_request(
            "invalid-order-id",
            "Invalid order id",
            format!("{raw:?} is not a UUID"),
        )
    })
}

/// The status of an order, from its checkout's (`orders.orders`) and its fulfilment's
/// (`orders.fulfilments`, none before it starts).
fn status(checkout: &str, fulfilment: Option<&str>) -> &'static str {
    match (checkout, fulfilment) {
        ("pending", _) => "created",
        ("cancelled", _) => "cancelled",
        ("needs_attention", _) => "needs_attention",
        (_, None | Some("preparing")) => "confirmed",
        (_, Some("shipped")) => "shipped",
        (_, Some("delivered")) => "delivered",
        (_, Some("cancelling" | "cancelled")) => "cancelled",
        (_, Some(_)) => "needs_attention",
    }
}

pub async fn get(
    State(state): State<AppState>,
    PathParam(raw): PathParam,
) -> Result<Response, Problem> {
    let id = parse_order_id(&raw)?;
    let Some(o) = sqlx::query!(
        r#"SELECT o.id, o.customer_id, o.status, o.total_minor, o.currency, o.created_at,
                  f.status AS "fulfilment?", f.tracking_number, f.dispatched_at, f.delivered_at,
                  f.case_reason, f.refunded AS "refunded?", f.restocked AS "restocked?",
                  coalesce((SELECT json_agg(json_build_object('sku', l.sku, 'quantity', l.quantity,
                                                              'unit_price_minor', l.unit_price_minor)
                                            ORDER BY l.line_no)
                              FROM orders.order_lines l WHERE l.order_id = o.id), '[]'::json) AS "lines!"
             FROM orders.orders o
             LEFT JOIN orders.fulfilments f ON f.order_id = o.id
            WHERE o.id = $1"#,
        id,
    )
    .fetch_optional(&state.pool)
    .await?
    else {
        return Err(Problem::not_found(format!("no order {id}")));
    };
    // What the Order service's subscriber recorded of it so far (eventually consistent).
    let history: Vec<_> = sqlx::query!(
        "SELECT type, source, occurred_at FROM orders.history WHERE order_id = $1
          ORDER BY occurred_at, received_at",
        id,
    )
    .fetch_all(&state.pool)
    .await?
    .into_iter()
    .map(|h| json!({"event": h.r#type, "source": h.source, "at": h.occurred_at}))
    .collect();
    Ok(axum::Json(json!({
        "history": history,
        "order_id": o.id,
        "customer_id": o.customer_id,
        "status": status(&o.status, o.fulfilment.as_deref()),
        "total": {"minor": o.total_minor, "currency": o.currency},
        "lines": o.lines,
        "created_at": o.created_at,
        "tracking_number": o.tracking_number,
        "dispatched_at": o.dispatched_at,
        "delivered_at": o.delivered_at,
        "case": o.case_reason,
        "refunded": o.refunded,
        "restocked": o.restocked,
    }))
    .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    customer: String,
}

pub async fn list(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let q: ListQuery = parse_query(raw.as_deref())?;
    let customer = q.customer.trim();
    if customer.is_empty() || customer.len() > 200 || customer.chars().any(char::is_control) {
        return Err(Problem::bad_query(
            "customer",
            "a customer id is 1 to 200 characters, none a control character",
        ));
    }
    let rows = sqlx::query!(
        r#"SELECT o.id, o.status, o.total_minor, o.currency, o.created_at, f.status AS "fulfilment?"
             FROM orders.orders o
             LEFT JOIN orders.fulfilments f ON f.order_id = o.id
            WHERE o.customer_id = $1
            ORDER BY o.created_at DESC
            LIMIT 100"#,
        customer,
    )
    .fetch_all(&state.pool)
    .await?;
    let orders: Vec<_> = rows
        .iter()
        .map(|o| {
            json!({
                "order_id": o.id,
                "status": status(&o.status, o.fulfilment.as_deref()),
                "total": {"minor": o.total_minor, "currency": o.currency},
                "created_at": o.created_at,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "orders": orders })).into_response())
}

pub async fn cancel(
    State(state): State<AppState>,
    Extension(CorrelationId(correlation_id)): Extension<CorrelationId>,
    PathParam(raw): PathParam,
    OptionalJsonBody(request): OptionalJsonBody<CancelRequest>,
) -> Result<Response, Problem> {
    let id = parse_order_id(&raw)?;
    let mut errors = Vec::new();
    let reason = input::optional_text(&mut errors, "/reason", request.reason.as_deref(), 500)
        .unwrap_or_else(|| "cancelled by the customer".to_owned());
    if !errors.is_empty() {
        return Err(Problem::invalid(errors));
    }
    // The fulfilment once it runs, else the checkout.
    let mut saga = None;
    for saga_type in [sagas::fulfilment::NAME, sagas::checkout::NAME] {
        if state.registry.get(saga_type).is_none() {
            continue;
        }
        let target = SignalTarget::Subject {
            saga_type: saga_type.to_owned(),
            subject: id.to_string(),
        };
        if let Some(found) = crate::signals::resolve(&state.pool, &target).await? {
            saga = Some(found);
            break;
        }
    }
    let Some(saga) = saga else {
        return Err(Problem::not_found(format!("no order {id}")));
    };
    let origin = Origin {
        correlation_id: Some(correlation_id),
        ..Default::default()
    };
    match state
        .engine
        .apply(saga, Input::Cancel { reason }, origin)
        .await?
    {
        Applied::Applied { status, state } => Ok((
            StatusCode::ACCEPTED,
            axum::Json(
                json!({ "order_id": id, "saga_id": saga, "status": status, "state": state }),
            ),
        )
            .into_response()),
        Applied::Ignored(why) => Err(Problem::new(
            StatusCode::CONFLICT,
            "order-not-cancellable",
            "The order can no longer be cancelled",
            format!("{why} (saga {saga})"),
        )),
        Applied::NotFound => Err(Problem::not_found(format!("no order {id}"))),
    }
}
