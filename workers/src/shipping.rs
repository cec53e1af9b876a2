//! The shipping service: books and cancels shipments with the carrier, one row per order in
//! `shipping.shipments`. Same discipline as payments: the row is written `pending` before the
//! carrier is called, a cancel that comes first leaves a `voided` tombstone, and a booking that
//! lands on a tombstone is cancelled at once.

use chrono::Utc;
use sagas::wire::{Address, Command, CommandBody, Line, OrderId, ReplyOutcome, SagaId, StepOutput};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use std::collections::HashMap;

use crate::batch::Batcher;
use crate::bus::{Handler, Unavailable};
use crate::clients::{CallError, Carrier};

#[derive(Clone)]
pub struct Shipping {
    pool: PgPool,
    carrier: Carrier,
    claims: Batcher<Claim, (Shipment, bool)>,
    transitions: Batcher<Transition, bool>,
}

fn retryable(reason: impl Into<String>) -> ReplyOutcome {
    ReplyOutcome::Failed {
        retryable: true,
        code: "carrier_unavailable".into(),
        reason: reason.into(),
    }
}

fn refused(code: &str, reason: impl Into<String>) -> ReplyOutcome {
    ReplyOutcome::Failed {
        retryable: false,
        code: code.to_owned(),
        reason: reason.into(),
    }
}

#[derive(Clone)]
struct Shipment {
    id: Uuid,
    status: String,
    carrier_ref: Option<String>,
    tracking_number: Option<String>,
    reason: Option<String>,
}

impl Handler for Shipping {
    async fn handle(&self, cmd: &Command) -> Result<ReplyOutcome, Unavailable> {
        match &cmd.body {
            CommandBody::CreateShipment {
                order_id,
                address,
                lines,
            } => self.create(cmd.saga_id, *order_id, address, lines).await,
            CommandBody::CancelShipment { order_id } => self.cancel(cmd.saga_id, *order_id).await,
            other => Ok(refused(
                "unsupported",
                format!("shipping does not {}", other.action().as_str()),
            )),
        }
    }
}

/// A row to claim (insert unless present).
struct Claim {
    saga: SagaId,
    order: OrderId,
    status: &'static str,
    address: String,
    lines: String,
}

/// A status change of a row.
struct Transition {
    id: Uuid,
    from: &'static str,
    to: &'static str,
    carrier_ref: Option<String>,
    tracking_number: Option<String>,
    reason: Option<String>,
}

fn shipment_of(r: &sqlx::postgres::PgRow, offset: usize) -> Shipment {
    Shipment {
        id: r.get(offset),
        status: r.get(offset + 1),
        carrier_ref: r.get(offset + 2),
        tracking_number: r.get(offset + 3),
        reason: r.get(offset + 4),
    }
}

/// Claim many rows in one statement (see payment.rs).
async fn claim_many(
    pool: &PgPool,
    claims: Vec<Claim>,
) -> Result<Vec<(Shipment, bool)>, sqlx::Error> {
    let now = Utc::now();
    let rows = sqlx::query(
        "WITH ins AS (
             INSERT INTO shipping.shipments (id, saga_id, order_id, status, address, lines, created_at, updated_at)
             SELECT u.id, u.saga_id, u.order_id, u.status, u.address::jsonb, u.lines::jsonb, $7, $7
               FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[])
                 AS u(id, saga_id, order_id, status, address, lines)
             ON CONFLICT (order_id) DO NOTHING
             RETURNING order_id, id, status, carrier_ref, tracking_number, reason)
         SELECT order_id, id, status, carrier_ref, tracking_number, reason, true FROM ins
         UNION ALL
         SELECT s.order_id, s.id, s.status, s.carrier_ref, s.tracking_number, s.reason, false
           FROM shipping.shipments s WHERE s.order_id = ANY($3)",
    )
    .bind(claims.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.saga.as_uuid()).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.order.as_uuid()).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.status).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.address.as_str()).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.lines.as_str()).collect::<Vec<_>>())
    .bind(now)
    .fetch_all(pool)
    .await?;
    let mut by_order: HashMap<Uuid, (Shipment, bool)> = HashMap::new();
    for r in &rows {
        let order: Uuid = r.get(0);
        let inserted: bool = r.get(6);
        if inserted || !by_order.contains_key(&order) {
            by_order.insert(order, (shipment_of(r, 1), inserted));
        }
    }
    let mut answered = std::collections::HashSet::new();
    claims
        .iter()
        .map(|c| match by_order.get(&c.order.as_uuid()) {
            Some((s, inserted)) => Ok((s.clone(), *inserted && answered.insert(c.order))),
            None => Err(sqlx::Error::Protocol(
                "a shipment was claimed concurrently; retry".into(),
            )),
        })
        .collect()
}

/// Apply many status changes in one statement; whether each went through.
async fn transition_many(pool: &PgPool, ts: Vec<Transition>) -> Result<Vec<bool>, sqlx::Error> {
    let mut seen = std::collections::HashSet::new();
    let first: Vec<bool> = ts.iter().map(|t| seen.insert(t.id)).collect();
    let apply: Vec<&Transition> = ts
        .iter()
        .zip(&first)
        .filter(|(_, f)| **f)
        .map(|(t, _)| t)
        .collect();
    let done: std::collections::HashSet<Uuid> = sqlx::query_scalar(
        "UPDATE shipping.shipments s
            SET status = u.to_status, carrier_ref = coalesce(u.carrier_ref, s.carrier_ref),
                tracking_number = coalesce(u.tracking_number, s.tracking_number),
                reason = coalesce(u.reason, s.reason), updated_at = $7
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
             AS u(id, from_status, to_status, carrier_ref, tracking_number, reason)
          WHERE s.id = u.id AND s.status = u.from_status
         RETURNING s.id",
    )
    .bind(apply.iter().map(|t| t.id).collect::<Vec<_>>())
    .bind(apply.iter().map(|t| t.from).collect::<Vec<_>>())
    .bind(apply.iter().map(|t| t.to).collect::<Vec<_>>())
    .bind(
        apply
            .iter()
            .map(|t| t.carrier_ref.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        apply
            .iter()
            .map(|t| t.tracking_number.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        apply
            .iter()
            .map(|t| t.reason.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(Utc::now())
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    Ok(ts
        .iter()
        .zip(first)
        .map(|(t, f)| f && done.contains(&t.id))
        .collect())
}

impl Shipping {
    pub fn new(pool: PgPool, carrier: Carrier) -> Self {
        let p = pool.clone();
        let claims = Batcher::spawn(256, move |c| {
            let p = p.clone();
            async move { claim_many(&p, c).await }
        });
        let p = pool.clone();
        let transitions = Batcher::spawn(256, move |t| {
            let p = p.clone();
            async move { transition_many(&p, t).await }
        });
        Self {
            pool,
            carrier,
            claims,
            transitions,
        }
    }

    fn key(order: OrderId) -> String {
        format!("shipment:{order}")
    }

    async fn row(&self, order: OrderId) -> Result<Option<Shipment>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT id, status, carrier_ref, tracking_number, reason FROM shipping.shipments WHERE order_id = $1",
        )
        .bind(order.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Shipment {
            id: r.get(0),
            status: r.get(1),
            carrier_ref: r.get(2),
            tracking_number: r.get(3),
            reason: r.get(4),
        }))
    }

    /// Insert a row in `status` unless one exists; return the row either way, and whether it
    /// was inserted now. Batched with the other commands in flight.
    async fn claim(
        &self,
        saga: SagaId,
        order: OrderId,
        status: &'static str,
        address: Option<&Address>,
        lines: &[Line],
    ) -> Result<(Shipment, bool), Unavailable> {
        self.claims
            .call(Claim {
                saga,
                order,
                status,
                address: serde_json::to_string(&address).expect("addresses serialize"),
                lines: serde_json::to_string(lines).expect("lines serialize"),
            })
            .await
    }

    async fn transition(
        &self,
        id: Uuid,
        from: &'static str,
        to: &'static str,
        booked: Option<(&str, &str)>,
        reason: Option<&str>,
    ) -> Result<bool, Unavailable> {
        self.transitions
            .call(Transition {
                id,
                from,
                to,
                carrier_ref: booked.map(|b| b.0.to_owned()),
                tracking_number: booked.map(|b| b.1.to_owned()),
                reason: reason.map(str::to_owned),
            })
            .await
    }

    pub async fn create(
        &self,
        saga: SagaId,
        order: OrderId,
        address: &Address,
        lines: &[Line],
    ) -> Result<ReplyOutcome, Unavailable> {
        let (row, _) = self
            .claim(saga, order, "pending", Some(address), lines)
            .await?;
        match row.status.as_str() {
            "created" => return Ok(created(&row)),
            "rejected" => {
                return Ok(refused(
                    "address_undeliverable",
                    row.reason
                        .unwrap_or_else(|| "the carrier refused the shipment".into()),
                ));
            }
            "voided" | "cancelled" => return self.undo_voided(order, &row).await,
            _ => {}
        }
        match self.carrier.ship(&Self::key(order), &address.country).await {
            Ok((carrier_ref, tracking)) => {
                if self
                    .transition(
                        row.id,
                        "pending",
                        "created",
                        Some((&carrier_ref, &tracking)),
                        None,
                    )
                    .await?
                {
                    let row = Shipment {
                        status: "created".into(),
                        carrier_ref: Some(carrier_ref),
                        tracking_number: Some(tracking),
                        ..row
                    };
                    return Ok(created(&row));
                }
                let row = self.row(order).await?.expect("rows are never deleted");
                if row.status == "created" {
                    return Ok(created(&row));
                }
                self.undo_voided(order, &row).await
            }
            Err(CallError::Refused { code, message }) => {
                self.transition(row.id, "pending", "rejected", None, Some(&message))
                    .await?;
                Ok(refused(&code, message))
            }
            Err(CallError::Unavailable(why)) => Ok(retryable(why)),
        }
    }

    /// A voided shipment may still have been booked by a call that raced the cancel: find it
    /// and cancel it at the carrier.
    async fn undo_voided(
        &self,
        order: OrderId,
        row: &Shipment,
    ) -> Result<ReplyOutcome, Unavailable> {
        let found = match &row.carrier_ref {
            Some(r) => Some(r.clone()),
            None => match self.carrier.find_shipment(&Self::key(order)).await {
                Ok(found) => found.map(|(id, _)| id),
                Err(e) => return Ok(retryable(e.to_string())),
            },
        };
        if let Some(carrier_ref) = found {
            if let Err(e) = self.carrier.cancel(&carrier_ref).await {
                return Ok(retryable(e.to_string()));
            }
            sqlx::query(
                "UPDATE shipping.shipments SET status = 'cancelled', carrier_ref = $2, updated_at = $3 WHERE id = $1",
            )
            .bind(row.id)
            .bind(&carrier_ref)
            .bind(Utc::now())
            .execute(&self.pool)
            .await?;
        }
        Ok(refused(
            "cancelled",
            "the shipment was cancelled by a compensation",
        ))
    }

    pub async fn cancel(&self, saga: SagaId, order: OrderId) -> Result<ReplyOutcome, Unavailable> {
        let done = ReplyOutcome::Succeeded {
            output: StepOutput::ShipmentCancelled,
        };
        let (row, tombstone) = self.claim(saga, order, "voided", None, &[]).await?;
        if tombstone {
            return Ok(done);
        }
        let outcome = match row.status.as_str() {
            "created" => {
                let carrier_ref = row.carrier_ref.clone().unwrap_or_default();
                match self.carrier.cancel(&carrier_ref).await {
                    Ok(()) => {
                        self.transition(
                            row.id,
                            "created",
                            "cancelled",
                            None,
                            Some("cancelled by the saga"),
                        )
                        .await?;
                        done.clone()
                    }
                    Err(CallError::Unavailable(why)) => retryable(why),
                    Err(CallError::Refused { code, message }) => refused(&code, message),
                }
            }
            "pending" => {
                if !self
                    .transition(row.id, "pending", "voided", None, None)
                    .await?
                {
                    return Ok(retryable(
                        "the shipment changed while cancelling; try again",
                    ));
                }
                self.undo_voided(order, &row).await?
            }
            "voided" => self.undo_voided(order, &row).await?,
            // Rejected or cancelled: nothing is booked.
            _ => done.clone(),
        };
        Ok(match outcome {
            ReplyOutcome::Failed {
                retryable: false,
                ref code,
                ..
            } if code == "cancelled" => done,
            other => other,
        })
    }
}

fn created(row: &Shipment) -> ReplyOutcome {
    ReplyOutcome::Succeeded {
        output: StepOutput::ShipmentCreated {
            shipment_id: row.id,
            tracking_number: row.tracking_number.clone().unwrap_or_default(),
        },
    }
}
