//! The inventory service (the Product aggregate's stock): reserves the lines of an order all
//! or nothing, releases them, and turns a reservation into a stock movement when the order is
//! confirmed.
//!
//! One row per order in `inventory.reservations` is both the reservation and the idempotency
//! record: a repeated reserve or release answers from it and changes nothing. A release that
//! comes before its reserve leaves a `released` tombstone, so the late reserve does nothing.
//! Variants are locked in SKU order, so concurrent orders never deadlock.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use sagas::wire::{
    Command, CommandBody, DomainEvent, Event, Line, OrderId, ReplyOutcome, SagaId, StepOutput,
};
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::bus::{Handler, Unavailable};

#[derive(Clone)]
pub struct Inventory {
    pool: PgPool,
}

fn refused(code: &str, reason: impl Into<String>) -> ReplyOutcome {
    ReplyOutcome::Failed {
        retryable: false,
        code: code.to_owned(),
        reason: reason.into(),
    }
}

impl Handler for Inventory {
    async fn handle(&self, cmd: &Command) -> Result<ReplyOutcome, Unavailable> {
        match &cmd.body {
            CommandBody::ReserveStock {
                order_id,
                lines,
                hold_seconds,
            } => {
                self.reserve(cmd.saga_id, *order_id, lines, *hold_seconds)
                    .await
            }
            CommandBody::ReleaseStock { order_id } => self.release(cmd.saga_id, *order_id).await,
            other => Ok(refused(
                "unsupported",
                format!("inventory does not {}", other.action().as_str()),
            )),
        }
    }
}

/// What a reservation row says.
struct Held {
    status: String,
    lines: Vec<Line>,
    expires_at: DateTime<Utc>,
    reason: Option<String>,
}

impl Inventory {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    async fn held(
        tx: &mut Transaction<'_, Postgres>,
        order: OrderId,
        lock: bool,
    ) -> Result<Option<Held>, sqlx::Error> {
        let sql = if lock {
            "SELECT status, lines, expires_at, reason FROM inventory.reservations WHERE order_id = $1 FOR UPDATE"
        } else {
            "SELECT status, lines, expires_at, reason FROM inventory.reservations WHERE order_id = $1"
        };
        let row = sqlx::query(sql)
            .bind(order.as_uuid())
            .fetch_optional(&mut **tx)
            .await?;
        Ok(row.map(|r| Held {
            status: r.get(0),
            lines: serde_json::from_value(r.get(1)).unwrap_or_default(),
            expires_at: r.get(2),
            reason: r.get(3),
        }))
    }

    /// The answer a reserve gets from an existing reservation.
    fn answer(held: &Held) -> ReplyOutcome {
        match held.status.as_str() {
            "active" | "consumed" => ReplyOutcome::Succeeded {
                output: StepOutput::StockReserved {
                    expires_at: held.expires_at,
                },
            },
            "rejected" => refused(
                "out_of_stock",
                held.reason.clone().unwrap_or_else(|| "out of stock".into()),
            ),
            "expired" => refused("reservation_expired", "the reservation expired"),
            _ => refused("cancelled", "the reservation was released"),
        }
    }

    pub async fn reserve(
        &self,
        saga: SagaId,
        order: OrderId,
        lines: &[Line],
        hold_seconds: u32,
    ) -> Result<ReplyOutcome, Unavailable> {
        let now = Utc::now();
        let expires_at = now + Duration::seconds(i64::from(hold_seconds));
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO inventory.reservations (order_id, saga_id, status, lines, expires_at, created_at, updated_at)
             VALUES ($1, $2, 'active', $3, $4, $5, $5)
             ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
        )
        .bind(order.as_uuid())
        .bind(saga.as_uuid())
        .bind(serde_json::to_value(lines).expect("lines serialize"))
        .bind(expires_at)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if claimed.is_none() {
            let held = Self::held(&mut tx, order, true).await?;
            match held {
                // The hold ran out before the saga was done with it and the saga asks again
                // (a renewal): take the stock again if it is still there.
                Some(h) if h.status == "expired" => {
                    sqlx::query(
                        "UPDATE inventory.reservations
                            SET status = 'active', expires_at = $2, reason = 'renewed', updated_at = $3
                          WHERE order_id = $1",
                    )
                    .bind(order.as_uuid())
                    .bind(expires_at)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                // Still held: a renewal holds it longer; a repeated reserve answers the same.
                Some(h) if h.status == "active" => {
                    let renewed = h.expires_at.max(expires_at);
                    sqlx::query(
                        "UPDATE inventory.reservations SET expires_at = $2, updated_at = $3 WHERE order_id = $1",
                    )
                    .bind(order.as_uuid())
                    .bind(renewed)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    return Ok(ReplyOutcome::Succeeded {
                        output: StepOutput::StockReserved {
                            expires_at: renewed,
                        },
                    });
                }
                other => {
                    tx.rollback().await?;
                    return Ok(other.map_or_else(
                        || refused("cancelled", "the reservation vanished"),
                        |h| Self::answer(&h),
                    ));
                }
            }
        }
        // Lock every variant of the order in SKU order, then check availability.
        let mut wanted: BTreeMap<&str, i32> = BTreeMap::new();
        for l in lines {
            *wanted.entry(l.sku.as_str()).or_default() += l.quantity.get() as i32;
        }
        let skus: Vec<String> = wanted.keys().map(|s| (*s).to_owned()).collect();
        let available = lock_variants(&mut tx, &skus).await?;
        let mut short = Vec::new();
        for (sku, qty) in &wanted {
            match available.get(*sku) {
                None => short.push(format!("{sku} is not in the catalogue")),
                Some(a) if a < qty => short.push(format!("{sku}: {a} available, {qty} asked")),
                Some(_) => {}
            }
        }
        if !short.is_empty() {
            let reason = format!("not enough stock: {}", short.join("; "));
            sqlx::query(
                "UPDATE inventory.reservations SET status = 'rejected', reason = $2, updated_at = $3 WHERE order_id = $1",
            )
            .bind(order.as_uuid())
            .bind(&reason)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(refused("out_of_stock", reason));
        }
        let qtys: Vec<i32> = wanted.values().copied().collect();
        move_stock(&mut tx, &skus, &qtys, 0, 1, "reserve", order, now).await?;
        tx.commit().await?;
        Ok(ReplyOutcome::Succeeded {
            output: StepOutput::StockReserved { expires_at },
        })
    }

    pub async fn release(&self, saga: SagaId, order: OrderId) -> Result<ReplyOutcome, Unavailable> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        // A release before its reserve leaves a tombstone: the late reserve then does nothing.
        let tombstone = sqlx::query(
            "INSERT INTO inventory.reservations (order_id, saga_id, status, lines, expires_at, reason, created_at, updated_at)
             VALUES ($1, $2, 'released', '[]', $3, 'released before it was made', $3, $3)
             ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
        )
        .bind(order.as_uuid())
        .bind(saga.as_uuid())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let released = ReplyOutcome::Succeeded {
            output: StepOutput::StockReleased,
        };
        if tombstone.is_some() {
            tx.commit().await?;
            return Ok(released);
        }
        let held = Self::held(&mut tx, order, true)
            .await?
            .expect("the row exists: the insert conflicted");
        match held.status.as_str() {
            "active" => {
                let (skus, qtys) = totals(&held.lines);
                lock_variants(&mut tx, &skus).await?;
                move_stock(&mut tx, &skus, &qtys, 0, -1, "release", order, now).await?;
                set_status(&mut tx, order, "released", "released by the saga", now).await?;
                tx.commit().await?;
                Ok(released)
            }
            "consumed" => Ok(refused(
                "already_consumed",
                "the order was confirmed and its stock consumed",
            )),
            "expired" => {
                // Nothing is held; mark it released so that a late renewal does nothing.
                set_status(&mut tx, order, "released", "released after it expired", now).await?;
                tx.commit().await?;
                Ok(released)
            }
            // Released or rejected: nothing is held.
            _ => Ok(released),
        }
    }

    /// `OrderConfirmed`: the reserved stock leaves the warehouse's books.
    pub async fn consume(&self, order: OrderId) -> Result<(), Unavailable> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let Some(held) = Self::held(&mut tx, order, true).await? else {
            tracing::error!(order_id = %order, "order confirmed without a reservation");
            return Ok(());
        };
        let (skus, qtys) = totals(&held.lines);
        lock_variants(&mut tx, &skus).await?;
        match held.status.as_str() {
            "active" => {
                move_stock(&mut tx, &skus, &qtys, -1, -1, "consume", order, now).await?;
                set_status(&mut tx, order, "consumed", "order confirmed", now).await?;
            }
            "expired" => {
                // The hold ran out before the confirmation arrived: take the stock if it is
                // still there, else say loudly that the order is oversold.
                let taken = sqlx::query(
                    "UPDATE inventory.variants v SET quantity = v.quantity - u.q, updated_at = $2
                       FROM unnest($1::text[], $3::int[]) AS u(sku, q)
                      WHERE v.sku = u.sku AND v.quantity - v.reserved >= u.q",
                )
                .bind(&skus)
                .bind(now)
                .bind(&qtys)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if taken as usize != skus.len() {
                    tracing::error!(order_id = %order, "order confirmed after its reservation expired and the stock was sold: oversold");
                    return Ok(());
                }
                record_movements(&mut tx, &skus, &qtys, -1, 0, "consume", order, now).await?;
                set_status(
                    &mut tx,
                    order,
                    "consumed",
                    "order confirmed after expiry",
                    now,
                )
                .await?;
            }
            "consumed" => return Ok(()),
            other => {
                tracing::error!(order_id = %order, status = other, "order confirmed but its reservation is not held");
                return Ok(());
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Expire the reservations whose hold ran out, until `shutdown`.
    pub async fn expire_loop(
        &self,
        every: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self.expire_due(100).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(reservations = n, "expired reservations handled"),
                Err(e) => tracing::warn!(error = %e, "reservation expiry failed"),
            }
        }
    }

    /// Release up to `limit` reservations past their expiry, with an `expire` stock movement.
    /// A reservation whose order was confirmed (its `OrderConfirmed` event not consumed yet,
    /// or lost) is consumed instead: the Order service is asked before stock is put back.
    /// Returns how many were handled. One step of the sweeper, callable on its own.
    pub async fn expire_due(&self, limit: i64) -> Result<usize, Unavailable> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT r.order_id, r.lines, coalesce(o.status, 'unknown')
               FROM inventory.reservations r
               LEFT JOIN orders.orders o ON o.id = r.order_id
              WHERE r.status = 'active' AND r.expires_at <= $1
              ORDER BY r.expires_at LIMIT $2
              FOR UPDATE OF r SKIP LOCKED",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        for row in &rows {
            let order = OrderId::from_uuid(row.get(0));
            let lines: Vec<Line> = serde_json::from_value(row.get(1)).unwrap_or_default();
            let order_status: String = row.get(2);
            let (skus, qtys) = totals(&lines);
            lock_variants(&mut tx, &skus).await?;
            if order_status == "confirmed" {
                move_stock(&mut tx, &skus, &qtys, -1, -1, "consume", order, now).await?;
                set_status(
                    &mut tx,
                    order,
                    "consumed",
                    "order confirmed (found at expiry)",
                    now,
                )
                .await?;
            } else {
                move_stock(&mut tx, &skus, &qtys, 0, -1, "expire", order, now).await?;
                set_status(&mut tx, order, "expired", "the hold ran out", now).await?;
            }
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    /// Handle a domain event from the events stream.
    pub async fn on_event(&self, event: &Event) -> Result<(), Unavailable> {
        if let DomainEvent::OrderConfirmed { order_id, .. } = &event.event {
            self.consume(*order_id).await?;
        }
        Ok(())
    }
}

/// Lock the variants in SKU order (so that concurrent orders never deadlock) and return what
/// each has available.
async fn lock_variants(
    tx: &mut Transaction<'_, Postgres>,
    skus: &[String],
) -> Result<BTreeMap<String, i32>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT sku, quantity - reserved FROM inventory.variants
          WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
    )
    .bind(skus)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn totals(lines: &[Line]) -> (Vec<String>, Vec<i32>) {
    let mut by_sku: BTreeMap<String, i32> = BTreeMap::new();
    for l in lines {
        *by_sku.entry(l.sku.as_str().to_owned()).or_default() += l.quantity.get() as i32;
    }
    by_sku.into_iter().unzip()
}

async fn set_status(
    tx: &mut Transaction<'_, Postgres>,
    order: OrderId,
    status: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE inventory.reservations SET status = $2, reason = $3, updated_at = $4 WHERE order_id = $1")
        .bind(order.as_uuid())
        .bind(status)
        .bind(reason)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Change quantity and reserved by `sign * q` for each SKU (already locked), and audit it.
#[allow(clippy::too_many_arguments)]
async fn move_stock(
    tx: &mut Transaction<'_, Postgres>,
    skus: &[String],
    qtys: &[i32],
    quantity_sign: i32,
    reserved_sign: i32,
    kind: &str,
    order: OrderId,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE inventory.variants v
            SET quantity = v.quantity + $3 * u.q, reserved = v.reserved + $4 * u.q, updated_at = $5
           FROM unnest($1::text[], $2::int[]) AS u(sku, q)
          WHERE v.sku = u.sku",
    )
    .bind(skus)
    .bind(qtys)
    .bind(quantity_sign)
    .bind(reserved_sign)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    record_movements(
        tx,
        skus,
        qtys,
        quantity_sign,
        reserved_sign,
        kind,
        order,
        now,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn record_movements(
    tx: &mut Transaction<'_, Postgres>,
    skus: &[String],
    qtys: &[i32],
    quantity_sign: i32,
    reserved_sign: i32,
    kind: &str,
    order: OrderId,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO inventory.stock_movements (sku, kind, quantity_delta, reserved_delta, order_id, at)
         SELECT u.sku, $5, $3 * u.q, $4 * u.q, $6, $7 FROM unnest($1::text[], $2::int[]) AS u(sku, q)",
    )
    .bind(skus)
    .bind(qtys)
    .bind(quantity_sign)
    .bind(reserved_sign)
    .bind(kind)
    .bind(order.as_uuid())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
