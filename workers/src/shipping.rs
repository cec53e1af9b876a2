//! The shipping service: books and cancels shipments with the carrier, one row per order in
//! `shipping.shipments`. Same discipline as payments: the row is written `pending` before the
//! carrier is called, a cancel that comes first leaves a `voided` tombstone, and a booking that
//! lands on a tombstone is cancelled at once.

use chrono::Utc;
use sagas::wire::{Address, Command, CommandBody, Line, OrderId, ReplyOutcome, SagaId, StepOutput};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::bus::{Handler, Unavailable};
use crate::clients::{CallError, Carrier};

#[derive(Clone)]
pub struct Shipping {
    pool: PgPool,
    carrier: Carrier,
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

impl Shipping {
    pub fn new(pool: PgPool, carrier: Carrier) -> Self {
        Self { pool, carrier }
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

    async fn claim(
        &self,
        saga: SagaId,
        order: OrderId,
        status: &str,
        address: Option<&Address>,
        lines: &[Line],
    ) -> Result<(Shipment, bool), sqlx::Error> {
        let now = Utc::now();
        let inserted = sqlx::query(
            "INSERT INTO shipping.shipments (id, saga_id, order_id, status, address, lines, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
             ON CONFLICT (order_id) DO NOTHING RETURNING id",
        )
        .bind(Uuid::now_v7())
        .bind(saga.as_uuid())
        .bind(order.as_uuid())
        .bind(status)
        .bind(serde_json::to_value(address).expect("addresses serialize"))
        .bind(serde_json::to_value(lines).expect("lines serialize"))
        .bind(now)
        .fetch_optional(&self.pool)
        .await?
        .is_some();
        let row = self
            .row(order)
            .await?
            .expect("the row exists after the insert");
        Ok((row, inserted))
    }

    async fn transition(
        &self,
        id: Uuid,
        from: &str,
        to: &str,
        booked: Option<(&str, &str)>,
        reason: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        let n = sqlx::query(
            "UPDATE shipping.shipments
                SET status = $3, carrier_ref = coalesce($4, carrier_ref),
                    tracking_number = coalesce($5, tracking_number), reason = coalesce($6, reason), updated_at = $7
              WHERE id = $1 AND status = $2",
        )
        .bind(id)
        .bind(from)
        .bind(to)
        .bind(booked.map(|b| b.0))
        .bind(booked.map(|b| b.1))
        .bind(reason)
        .bind(Utc::now())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
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
