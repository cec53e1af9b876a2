//! The shipping service: books and cancels shipments with the carrier, one row per order in
//! `shipping.shipments`. Same discipline as payments (see payment.rs): a booking reads its row
//! first, calls the carrier and writes the row once with the result (`pending` first only
//! when the call is slow); a cancel that comes first leaves a `voided` tombstone and voids the
//! key at the carrier (which returns a booking already made under it, and refuses any later
//! one); a booking that lands on a tombstone is cancelled at once.
//!
//! Before either, [`Handler::handle`] checks the command against the order of its saga
//! ([`crate::orders::check`]: the saga is an order, and the order id is the order's): a stray,
//! old or forged command books nothing, cancels nothing and leaves no tombstone; it is
//! dead-lettered. The order is read by the same batched statement as the shipment row, so the
//! check costs no round trip of its own. [`Shipping::create`] and [`Shipping::cancel`] are the
//! effects alone, without the check (tests drive them directly).

use chrono::Utc;
use sagas::shop::{Address, Line, OrderId, ids, shipping};
use sagas::wire::{Command, ReplyOutcome, SagaId};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use std::collections::HashMap;
use std::time::Duration;

use crate::batch::Batcher;
use crate::bus::{self, Handler, Unavailable};
use crate::clients::{CallError, Carrier};
use crate::orders::{self, Order};

#[derive(Clone)]
pub struct Shipping {
    pool: PgPool,
    carrier: Carrier,
    /// How long a call may take before its `pending` row is written.
    pending_after: Duration,
    lookups: Batcher<(SagaId, OrderId), Found>,
    claims: Batcher<Claim, (Shipment, bool)>,
    settles: Batcher<Settle, Option<Shipment>>,
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

/// What a lookup finds for a command: the order's shipment row, the order of its saga, and
/// where it goes (read from the order: commands carry no personal data).
struct Found {
    shipment: Option<Shipment>,
    order: Option<Order>,
    address: Option<serde_json::Value>,
}

impl Handler for Shipping {
    async fn handle(&self, cmd: &Command) -> Result<ReplyOutcome, bus::Error> {
        match bus::payload(cmd, shipping::SERVICE)? {
            shipping::Command::CreateShipment { order_id, lines } => {
                let found = self.checked(cmd, order_id).await?;
                let address: Address = found
                    .address
                    .and_then(|a| serde_json::from_value(a).ok())
                    .ok_or_else(|| {
                    bus::Error::Poison(format!(
                        "order {order_id} has no shipping address that can be read"
                    ))
                })?;
                Ok(self
                    .create_from(found.shipment, cmd.saga_id, order_id, &address, &lines)
                    .await?)
            }
            shipping::Command::CancelShipment {
                order_id,
                shipment_id,
            } => {
                let found = self.checked(cmd, order_id).await?;
                // It names a shipment that is not this order's: nothing of it is here to undo.
                let own = ids::shipment(cmd.saga_id, BOOKING_STEP);
                let known = found.shipment.as_ref().map_or(own, |s| s.id);
                if let Some(named) = shipment_id
                    && named != known
                {
                    return Ok(refused(
                        "unknown_shipment",
                        format!(
                            "shipment {named} is not order {order_id}'s: nothing of it can be cancelled"
                        ),
                    ));
                }
                Ok(self.cancel(cmd.saga_id, order_id).await?)
            }
        }
    }
}

/// A row to claim (insert unless present).
/// The step that books an order's shipment (the checkout's): a shipment's id is derived from
/// its saga and this step ([`ids::shipment`]), one shipment per order.
const BOOKING_STEP: &str = "create_shipment";

struct Claim {
    saga: SagaId,
    order: OrderId,
    status: &'static str,
    address: String,
    lines: String,
}

/// A call's result to record: insert the row with it, or complete the row's `pending`.
struct Settle {
    claim: Claim,
    carrier_ref: Option<String>,
    tracking_number: Option<String>,
    reason: Option<String>,
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
    .bind(claims.iter().map(|c| ids::shipment(c.saga, BOOKING_STEP)).collect::<Vec<_>>())
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

/// Read many rows, and the orders of their sagas, in one statement: one row per key (the
/// shipment is unique by order, the order by saga), found by their primary or unique keys.
async fn lookup_many(
    pool: &PgPool,
    keys: Vec<(SagaId, OrderId)>,
) -> Result<Vec<Found>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT k.n, s.id, s.status, s.carrier_ref, s.tracking_number, s.reason,
                o.saga_id, o.id, o.status, o.shipping_address
           FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS k(saga_id, order_id, n)
           LEFT JOIN shipping.shipments s ON s.order_id = k.order_id
           LEFT JOIN orders.orders o ON o.saga_id = k.saga_id",
    )
    .bind(keys.iter().map(|k| k.0.as_uuid()).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1.as_uuid()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    let mut found: Vec<Found> = keys
        .iter()
        .map(|_| Found {
            shipment: None,
            order: None,
            address: None,
        })
        .collect();
    for r in &rows {
        let f = &mut found[crate::batch::input_of(r, 0, keys.len())?];
        if r.get::<Option<Uuid>, _>(1).is_some() {
            f.shipment = Some(shipment_of(r, 1));
        }
        f.order = Order::at(r, 6);
        f.address = r.get(9);
    }
    Ok(found)
}

/// Record many calls' results in one statement (see payment.rs): insert each row with its
/// final status, or complete it when it is `pending`; `None` for a row in another status.
async fn settle_many(pool: &PgPool, ss: Vec<Settle>) -> Result<Vec<Option<Shipment>>, sqlx::Error> {
    let mut seen = std::collections::HashSet::new();
    let first: Vec<bool> = ss.iter().map(|s| seen.insert(s.claim.order)).collect();
    let apply: Vec<&Settle> = ss
        .iter()
        .zip(&first)
        .filter(|(_, f)| **f)
        .map(|(s, _)| s)
        .collect();
    let rows = sqlx::query(
        "INSERT INTO shipping.shipments AS s
             (id, saga_id, order_id, status, address, lines, carrier_ref, tracking_number, reason, created_at, updated_at)
         SELECT u.id, u.saga_id, u.order_id, u.status, u.address::jsonb, u.lines::jsonb,
                u.carrier_ref, u.tracking_number, u.reason, $10, $10
           FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                       $7::text[], $8::text[], $9::text[])
             AS u(id, saga_id, order_id, status, address, lines, carrier_ref, tracking_number, reason)
         ON CONFLICT (order_id) DO UPDATE
            SET status = excluded.status, carrier_ref = coalesce(excluded.carrier_ref, s.carrier_ref),
                tracking_number = coalesce(excluded.tracking_number, s.tracking_number),
                reason = coalesce(excluded.reason, s.reason), updated_at = excluded.updated_at
          WHERE s.status = 'pending'
         RETURNING s.order_id, s.id, s.status, s.carrier_ref, s.tracking_number, s.reason",
    )
    .bind(apply.iter().map(|s| ids::shipment(s.claim.saga, BOOKING_STEP)).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.saga.as_uuid()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.order.as_uuid()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.status).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.address.as_str()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.lines.as_str()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.carrier_ref.as_deref()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.tracking_number.as_deref()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.reason.as_deref()).collect::<Vec<_>>())
    .bind(Utc::now())
    .fetch_all(pool)
    .await?;
    let mut by_order: HashMap<Uuid, Shipment> =
        rows.iter().map(|r| (r.get(0), shipment_of(r, 1))).collect();
    Ok(ss
        .iter()
        .zip(first)
        .map(|(s, f)| {
            f.then(|| by_order.remove(&s.claim.order.as_uuid()))
                .flatten()
        })
        .collect())
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
    pub fn new(pool: PgPool, carrier: Carrier, pending_after: Duration) -> Self {
        let p = pool.clone();
        let lookups = Batcher::spawn(256, move |o| {
            let p = p.clone();
            async move { lookup_many(&p, o).await }
        });
        let p = pool.clone();
        let claims = Batcher::spawn(256, move |c| {
            let p = p.clone();
            async move { claim_many(&p, c).await }
        });
        let p = pool.clone();
        let settles = Batcher::spawn(256, move |s| {
            let p = p.clone();
            async move { settle_many(&p, s).await }
        });
        let p = pool.clone();
        let transitions = Batcher::spawn(256, move |t| {
            let p = p.clone();
            async move { transition_many(&p, t).await }
        });
        Self {
            pool,
            carrier,
            pending_after,
            lookups,
            claims,
            settles,
            transitions,
        }
    }

    fn key(order: OrderId) -> String {
        format!("shipment:{order}")
    }

    /// The order's shipment row, once the command is found to match the order of its saga;
    /// [`bus::Error::Poison`] when it does not.
    async fn checked(&self, cmd: &Command, order: OrderId) -> Result<Found, bus::Error> {
        let found = self.lookups.call((cmd.saga_id, order)).await?;
        orders::check(cmd.action(), cmd.saga_id, order, None, found.order.as_ref())
            .map_err(bus::Error::Poison)?;
        Ok(found)
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
            .call(Self::claim_of(saga, order, status, address, lines))
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

    fn claim_of(
        saga: SagaId,
        order: OrderId,
        status: &'static str,
        address: Option<&Address>,
        lines: &[Line],
    ) -> Claim {
        Claim {
            saga,
            order,
            status,
            address: serde_json::to_string(&address).expect("addresses serialize"),
            lines: serde_json::to_string(lines).expect("lines serialize"),
        }
    }

    /// Book the order's shipment, once: the effect alone, without the check that the command
    /// matches its order ([`Handler::handle`] checks first).
    pub async fn create(
        &self,
        saga: SagaId,
        order: OrderId,
        address: &Address,
        lines: &[Line],
    ) -> Result<ReplyOutcome, Unavailable> {
        let recorded = self.lookups.call((saga, order)).await?.shipment;
        self.create_from(recorded, saga, order, address, lines)
            .await
    }

    /// [`Shipping::create`], given the shipment row the lookup found (`recorded`).
    async fn create_from(
        &self,
        recorded: Option<Shipment>,
        saga: SagaId,
        order: OrderId,
        address: &Address,
        lines: &[Line],
    ) -> Result<ReplyOutcome, Unavailable> {
        if let Some(row) = recorded.clone() {
            match row.status.as_str() {
                "created" => return Ok(created(&row)),
                "rejected" => return Ok(rejected(row)),
                "voided" | "cancelled" => return self.undo_voided(order, &row).await,
                // `pending`: a call that did not finish; make it again (same key).
                _ => {}
            }
        } else if self.pending_after.is_zero() {
            let (row, _) = self
                .claim(saga, order, "pending", Some(address), lines)
                .await?;
            if matches!(row.status.as_str(), "voided" | "cancelled") {
                return self.undo_voided(order, &row).await;
            }
        }
        let key = Self::key(order);
        let call = self.carrier.ship(&key, &address.country);
        let result = if recorded.is_some() || self.pending_after.is_zero() {
            call.await
        } else {
            tokio::pin!(call);
            tokio::select! {
                biased;
                r = &mut call => r,
                () = tokio::time::sleep(self.pending_after) => {
                    // Slow: put the call on record while it goes on; the result settles it.
                    self.claim(saga, order, "pending", Some(address), lines).await?;
                    call.await
                }
            }
        };
        let (settle, answer) = match result {
            Ok((carrier_ref, tracking)) => (
                Settle {
                    claim: Self::claim_of(saga, order, "created", Some(address), lines),
                    carrier_ref: Some(carrier_ref),
                    tracking_number: Some(tracking),
                    reason: None,
                },
                None,
            ),
            Err(CallError::Refused { code, message }) => {
                let answer = refused(&code, message.clone());
                (
                    Settle {
                        claim: Self::claim_of(saga, order, "rejected", Some(address), lines),
                        carrier_ref: None,
                        tracking_number: None,
                        reason: Some(message),
                    },
                    Some(answer),
                )
            }
            Err(CallError::Unavailable(why)) => return Ok(retryable(why)),
        };
        if let Some(row) = self.settles.call(settle).await? {
            return Ok(answer.unwrap_or_else(|| created(&row)));
        }
        // The row is in another status: a cancel voided it while the carrier was being
        // called, or another delivery of the command recorded it first.
        let row = self.row(order).await?.expect("a settled row exists");
        match row.status.as_str() {
            "created" => Ok(created(&row)),
            "rejected" => Ok(rejected(row)),
            _ => self.undo_voided(order, &row).await,
        }
    }

    /// A voided shipment may still have been booked by a call that raced the cancel (or one
    /// that timed out here and is still going on there): void its key at the carrier, which
    /// returns a booking already made (cancelled here) and refuses any later one.
    async fn undo_voided(
        &self,
        order: OrderId,
        row: &Shipment,
    ) -> Result<ReplyOutcome, Unavailable> {
        let found = match &row.carrier_ref {
            Some(r) => Some(r.clone()),
            None => match self.carrier.void_shipment(&Self::key(order)).await {
                Ok(found) => found,
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

    /// Cancel the order's shipment (or leave a tombstone when there is none yet): the effect
    /// alone, without the check that the command matches its order ([`Handler::handle`] checks
    /// first).
    pub async fn cancel(&self, saga: SagaId, order: OrderId) -> Result<ReplyOutcome, Unavailable> {
        let done = ReplyOutcome::succeeded(&shipping::Output::ShipmentCancelled);
        let (row, _) = self.claim(saga, order, "voided", None, &[]).await?;
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
            // A tombstone, written now or by an earlier delivery: a booking whose answer was
            // never recorded may still have gone through, so the carrier is asked.
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

fn rejected(row: Shipment) -> ReplyOutcome {
    refused(
        "address_undeliverable",
        row.reason
            .unwrap_or_else(|| "the carrier refused the shipment".into()),
    )
}

fn created(row: &Shipment) -> ReplyOutcome {
    ReplyOutcome::succeeded(&shipping::Output::ShipmentCreated {
        shipment_id: row.id,
        tracking_number: row.tracking_number.clone().unwrap_or_default(),
    })
}
