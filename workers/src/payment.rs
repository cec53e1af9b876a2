//! The payment service: charges and refunds through the card processor, recorded in
//! `payments.charges` under the saga's idempotency key (one row per saga step).
//!
//! A charge first reads its row: a redelivered command answers what was recorded. Without a
//! row it calls the processor and writes the row once, with the result. A call that takes
//! longer than `processor.record_pending_after_ms` is put on record as `pending` while it goes
//! on (an operator sees the charges in flight), and completed after. The processor is
//! idempotent per key, so calling again after a crash returns the first charge instead of
//! making another, and it is the record of a call whose answer was lost: a refund that finds
//! no row leaves a `voided` tombstone and asks the processor for a charge under the key; a
//! charge that finds a tombstone (or that comes back after the refund voided it) refunds what
//! it charged and answers "cancelled". The refund also voids the key at the processor, so that a
//! call still going on there (one that timed out here) cannot charge after it. No interleaving
//! of charge and refund, no crash between the call and the write, and no late answer leaves
//! money taken.
//!
//! Before either, [`Handler::handle`] checks the command against the order of its saga
//! ([`crate::orders::check`]: the saga is an order, the order id and the amount are the
//! order's): a stray, old or forged command charges nothing, refunds nothing and leaves no
//! tombstone; it is dead-lettered. The order is read by the same batched statement as the
//! charge row, so the check costs no round trip of its own. [`Payment::charge`] and
//! [`Payment::refund`] are the effects alone, without the check (tests drive them directly).

use chrono::Utc;
use sagas::shop::{Money, OrderId, ids, payment};
use sagas::wire::{Command, ReplyOutcome, SagaId};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use std::collections::HashMap;
use std::time::Duration;

use crate::batch::Batcher;
use crate::bus::{self, Handler, Unavailable};
use crate::clients::{CallError, Processor};
use crate::orders::{self, Order};

#[derive(Clone)]
pub struct Payment {
    pool: PgPool,
    processor: Processor,
    /// How long a call may take before its `pending` row is written.
    pending_after: Duration,
    lookups: Batcher<(SagaId, String), Found>,
    claims: Batcher<Claim, (Charge, bool)>,
    settles: Batcher<Settle, Option<Charge>>,
    transitions: Batcher<Transition, bool>,
}

fn retryable(reason: impl Into<String>) -> ReplyOutcome {
    ReplyOutcome::Failed {
        retryable: true,
        code: "processor_unavailable".into(),
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

fn cancelled() -> ReplyOutcome {
    refused(
        "cancelled",
        "the payment was refunded or voided by a compensation",
    )
}

/// A charge row.
#[derive(Clone)]
struct Charge {
    id: Uuid,
    status: String,
    processor_ref: Option<String>,
    decline_code: Option<String>,
    reason: Option<String>,
}

/// What a lookup finds for a command: its charge row, the order of its saga, and the saga's
/// payment token (a secret: never logged, never put in a message).
struct Found {
    charge: Option<Charge>,
    order: Option<Order>,
    token: Option<String>,
}

impl Handler for Payment {
    async fn handle(&self, cmd: &Command) -> Result<ReplyOutcome, bus::Error> {
        match bus::payload(cmd, payment::SERVICE)? {
            payment::Command::ChargePayment {
                order_id, amount, ..
            } => {
                let found = self.checked(cmd, order_id, &amount).await?;
                // The token is deleted when the saga ends: a charge command that comes after
                // that is stale, and its saga no longer waits for it.
                let Some(token) = found.token else {
                    return Ok(refused(
                        "payment_token_unavailable",
                        "the saga holds no payment token (it has ended)",
                    ));
                };
                Ok(self
                    .charge_from(
                        found.charge,
                        cmd.saga_id,
                        &cmd.step,
                        order_id.as_uuid(),
                        &amount,
                        &token,
                    )
                    .await?)
            }
            payment::Command::RefundPayment {
                order_id,
                amount,
                charge_id,
            } => {
                let found = self.checked(cmd, order_id, &amount).await?;
                // It names a charge that is not this step's: nothing of it is here to undo.
                let own = ids::charge(cmd.saga_id, &cmd.step);
                let known = found.charge.as_ref().map_or(own, |c| c.id);
                if let Some(named) = charge_id
                    && named != known
                {
                    return Ok(refused(
                        "unknown_charge",
                        format!(
                            "charge {named} is not saga {}'s: nothing of it can be refunded",
                            cmd.saga_id
                        ),
                    ));
                }
                Ok(self
                    .refund(cmd.saga_id, &cmd.step, order_id.as_uuid(), &amount)
                    .await?)
            }
        }
    }
}

/// A row to claim (insert unless present).
struct Claim {
    saga: SagaId,
    step: String,
    order: Uuid,
    amount_minor: i64,
    currency: String,
    status: &'static str,
}

/// A call's result to record: insert the row with it, or complete the row's `pending`.
struct Settle {
    claim: Claim,
    processor_ref: Option<String>,
    decline_code: Option<String>,
    reason: Option<String>,
}

/// A status change of a row.
struct Transition {
    id: Uuid,
    from: &'static str,
    to: &'static str,
    processor_ref: Option<String>,
    decline_code: Option<String>,
    reason: Option<String>,
}

fn charge_of(r: &sqlx::postgres::PgRow, offset: usize) -> Charge {
    Charge {
        id: r.get(offset),
        status: r.get(offset + 1),
        processor_ref: r.get(offset + 2),
        decline_code: r.get(offset + 3),
        reason: r.get(offset + 4),
    }
}

/// Claim many rows in one statement: the inserted ones come back from the insert, the others
/// (already there) from the table.
async fn claim_many(pool: &PgPool, claims: Vec<Claim>) -> Result<Vec<(Charge, bool)>, sqlx::Error> {
    let now = Utc::now();
    let rows = sqlx::query(
        "WITH ins AS (
             INSERT INTO payments.charges
                 (id, saga_id, step, order_id, idempotency_key, amount_minor, currency, status, created_at, updated_at)
             SELECT u.id, u.saga_id, u.step, u.order_id, u.saga_id::text || ':' || u.step, u.amount, u.currency, u.status, $8, $8
               FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::int8[], $6::text[], $7::text[])
                 AS u(id, saga_id, step, order_id, amount, currency, status)
             ON CONFLICT (saga_id, step) DO NOTHING
             RETURNING saga_id, step, id, status, processor_ref, decline_code, reason)
         SELECT saga_id, step, id, status, processor_ref, decline_code, reason, true FROM ins
         UNION ALL
         SELECT c.saga_id, c.step, c.id, c.status, c.processor_ref, c.decline_code, c.reason, false
           FROM payments.charges c
           JOIN unnest($2::uuid[], $3::text[]) AS k(saga_id, step) ON c.saga_id = k.saga_id AND c.step = k.step",
    )
    .bind(claims.iter().map(|c| ids::charge(c.saga, &c.step)).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.saga.as_uuid()).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.step.as_str()).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.order).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.amount_minor).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.currency.as_str()).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.status).collect::<Vec<_>>())
    .bind(now)
    .fetch_all(pool)
    .await?;
    let mut by_key: HashMap<(Uuid, String), (Charge, bool)> = HashMap::new();
    for r in &rows {
        let key = (r.get::<Uuid, _>(0), r.get::<String, _>(1));
        let inserted: bool = r.get(7);
        // A row inserted now is also seen by the join only in later statements; prefer the
        // insert's answer.
        if inserted || !by_key.contains_key(&key) {
            by_key.insert(key, (charge_of(r, 2), inserted));
        }
    }
    let mut out = Vec::with_capacity(claims.len());
    let mut answered = std::collections::HashSet::new();
    for c in &claims {
        let key = (c.saga.as_uuid(), c.step.clone());
        match by_key.get(&key) {
            // The same row claimed twice in one batch: only the first claimed it.
            Some((charge, inserted)) => {
                out.push((charge.clone(), *inserted && answered.insert(key)))
            }
            // Inserted by another transaction that committed after this one looked.
            None => {
                return Err(sqlx::Error::Protocol(
                    "a charge was claimed concurrently; retry".into(),
                ));
            }
        }
    }
    Ok(out)
}

/// Read many rows, and the orders of their sagas, in one statement: one row per key (the
/// charge is unique by saga and step, the order by saga), found by their primary or unique
/// keys.
async fn lookup_many(
    pool: &PgPool,
    keys: Vec<(SagaId, String)>,
) -> Result<Vec<Found>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT k.n, c.id, c.status, c.processor_ref, c.decline_code, c.reason,
                o.saga_id, o.id, o.status, o.total_minor, o.currency, t.value
           FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS k(saga_id, step, n)
           LEFT JOIN payments.charges c ON c.saga_id = k.saga_id AND c.step = k.step
           LEFT JOIN orders.orders o ON o.saga_id = k.saga_id
           LEFT JOIN orchestrator.saga_secrets t
                  ON t.saga_id = k.saga_id AND t.name = 'payment_token'",
    )
    .bind(keys.iter().map(|k| k.0.as_uuid()).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1.as_str()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    let mut found: Vec<Found> = keys
        .iter()
        .map(|_| Found {
            charge: None,
            order: None,
            token: None,
        })
        .collect();
    for r in &rows {
        let f = &mut found[crate::batch::input_of(r, 0, keys.len())?];
        if r.get::<Option<Uuid>, _>(1).is_some() {
            f.charge = Some(charge_of(r, 1));
        }
        f.order = Order::with_total_at(r, 6);
        f.token = r.get(11);
    }
    Ok(found)
}

/// Record many calls' results in one statement: insert each row with its final status, or
/// complete it when it is `pending`. `None` for a row that is in another status (a refund
/// voided it, or another delivery recorded it first): the caller reads it.
async fn settle_many(pool: &PgPool, ss: Vec<Settle>) -> Result<Vec<Option<Charge>>, sqlx::Error> {
    // One row once per statement (ON CONFLICT DO UPDATE cannot touch a row twice); a second
    // result for the same row reads the row instead.
    let mut seen = std::collections::HashSet::new();
    let first: Vec<bool> = ss
        .iter()
        .map(|s| seen.insert((s.claim.saga, s.claim.step.clone())))
        .collect();
    let apply: Vec<&Settle> = ss
        .iter()
        .zip(&first)
        .filter(|(_, f)| **f)
        .map(|(s, _)| s)
        .collect();
    let rows = sqlx::query(
        "INSERT INTO payments.charges AS c
             (id, saga_id, step, order_id, idempotency_key, amount_minor, currency, status,
              processor_ref, decline_code, reason, created_at, updated_at)
         SELECT u.id, u.saga_id, u.step, u.order_id, u.saga_id::text || ':' || u.step, u.amount, u.currency, u.status,
                u.processor_ref, u.decline_code, u.reason, $11, $11
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::int8[], $6::text[], $7::text[],
                       $8::text[], $9::text[], $10::text[])
             AS u(id, saga_id, step, order_id, amount, currency, status, processor_ref, decline_code, reason)
         ON CONFLICT (saga_id, step) DO UPDATE
            SET status = excluded.status, processor_ref = coalesce(excluded.processor_ref, c.processor_ref),
                decline_code = coalesce(excluded.decline_code, c.decline_code),
                reason = coalesce(excluded.reason, c.reason), updated_at = excluded.updated_at
          WHERE c.status = 'pending'
         RETURNING c.saga_id, c.step, c.id, c.status, c.processor_ref, c.decline_code, c.reason",
    )
    .bind(apply.iter().map(|s| ids::charge(s.claim.saga, &s.claim.step)).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.saga.as_uuid()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.step.as_str()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.order).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.amount_minor).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.currency.as_str()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.claim.status).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.processor_ref.as_deref()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.decline_code.as_deref()).collect::<Vec<_>>())
    .bind(apply.iter().map(|s| s.reason.as_deref()).collect::<Vec<_>>())
    .bind(Utc::now())
    .fetch_all(pool)
    .await?;
    let mut by_key: HashMap<(Uuid, String), Charge> = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), charge_of(r, 2)))
        .collect();
    Ok(ss
        .iter()
        .zip(first)
        .map(|(s, f)| {
            f.then(|| by_key.remove(&(s.claim.saga.as_uuid(), s.claim.step.clone())))
                .flatten()
        })
        .collect())
}

/// Apply many status changes in one statement; whether each went through.
async fn transition_many(pool: &PgPool, ts: Vec<Transition>) -> Result<Vec<bool>, sqlx::Error> {
    // One change per row per statement; a second change of the same row reports false, and its
    // caller reads the row again.
    let mut seen = std::collections::HashSet::new();
    let first: Vec<bool> = ts.iter().map(|t| seen.insert(t.id)).collect();
    let apply: Vec<&Transition> = ts
        .iter()
        .zip(&first)
        .filter(|(_, f)| **f)
        .map(|(t, _)| t)
        .collect();
    let done: std::collections::HashSet<Uuid> = sqlx::query_scalar(
        "UPDATE payments.charges c
            SET status = u.to_status, processor_ref = coalesce(u.processor_ref, c.processor_ref),
                decline_code = coalesce(u.decline_code, c.decline_code), reason = coalesce(u.reason, c.reason),
                updated_at = $7
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
             AS u(id, from_status, to_status, processor_ref, decline_code, reason)
          WHERE c.id = u.id AND c.status = u.from_status
         RETURNING c.id",
    )
    .bind(apply.iter().map(|t| t.id).collect::<Vec<_>>())
    .bind(apply.iter().map(|t| t.from).collect::<Vec<_>>())
    .bind(apply.iter().map(|t| t.to).collect::<Vec<_>>())
    .bind(apply.iter().map(|t| t.processor_ref.as_deref()).collect::<Vec<_>>())
    .bind(apply.iter().map(|t| t.decline_code.as_deref()).collect::<Vec<_>>())
    .bind(apply.iter().map(|t| t.reason.as_deref()).collect::<Vec<_>>())
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

impl Payment {
    pub fn new(pool: PgPool, processor: Processor, pending_after: Duration) -> Self {
        let p = pool.clone();
        let lookups = Batcher::spawn(256, move |k| {
            let p = p.clone();
            async move { lookup_many(&p, k).await }
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
            processor,
            pending_after,
            lookups,
            claims,
            settles,
            transitions,
        }
    }

    fn key(saga: SagaId, step: &str) -> String {
        format!("{saga}:{step}")
    }

    /// The command's charge row, once the command is found to match the order of its saga;
    /// [`bus::Error::Poison`] when it does not.
    async fn checked(
        &self,
        cmd: &Command,
        order: OrderId,
        amount: &Money,
    ) -> Result<Found, bus::Error> {
        let found = self.lookups.call((cmd.saga_id, cmd.step.clone())).await?;
        orders::check(
            cmd.action(),
            cmd.saga_id,
            order,
            Some(amount),
            found.order.as_ref(),
        )
        .map_err(bus::Error::Poison)?;
        Ok(found)
    }

    async fn row(&self, saga: SagaId, step: &str) -> Result<Option<Charge>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT id, status, processor_ref, decline_code, reason FROM payments.charges
              WHERE saga_id = $1 AND step = $2",
        )
        .bind(saga.as_uuid())
        .bind(step)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Charge {
            id: r.get(0),
            status: r.get(1),
            processor_ref: r.get(2),
            decline_code: r.get(3),
            reason: r.get(4),
        }))
    }

    /// Insert a row in `status` unless one exists; return the row either way, and whether it
    /// was inserted now. Batched with the other commands in flight.
    async fn claim(
        &self,
        saga: SagaId,
        step: &str,
        order: Uuid,
        amount: &Money,
        status: &'static str,
    ) -> Result<(Charge, bool), Unavailable> {
        self.claims
            .call(Self::claim_of(saga, step, order, amount, status))
            .await
    }

    /// Move a row from one status to another; false when it was no longer in `from`.
    async fn transition(
        &self,
        id: Uuid,
        from: &'static str,
        to: &'static str,
        processor_ref: Option<&str>,
        decline: Option<(&str, &str)>,
    ) -> Result<bool, Unavailable> {
        self.transitions
            .call(Transition {
                id,
                from,
                to,
                processor_ref: processor_ref.map(str::to_owned),
                decline_code: decline.map(|d| d.0.to_owned()),
                reason: decline.map(|d| d.1.to_owned()),
            })
            .await
    }

    fn claim_of(
        saga: SagaId,
        step: &str,
        order: Uuid,
        amount: &Money,
        status: &'static str,
    ) -> Claim {
        Claim {
            saga,
            step: step.to_owned(),
            order,
            amount_minor: amount.minor,
            currency: amount.currency.as_str().to_owned(),
            status,
        }
    }

    /// Charge `amount` for a saga's step, once: the effect alone, without the check that the
    /// command matches its order ([`Handler::handle`] checks first).
    pub async fn charge(
        &self,
        saga: SagaId,
        step: &str,
        order: Uuid,
        amount: &Money,
        token: &str,
    ) -> Result<ReplyOutcome, Unavailable> {
        let recorded = self.lookups.call((saga, step.to_owned())).await?.charge;
        self.charge_from(recorded, saga, step, order, amount, token)
            .await
    }

    /// [`Payment::charge`], given the charge row the lookup found (`recorded`).
    async fn charge_from(
        &self,
        recorded: Option<Charge>,
        saga: SagaId,
        step: &str,
        order: Uuid,
        amount: &Money,
        token: &str,
    ) -> Result<ReplyOutcome, Unavailable> {
        if let Some(row) = &recorded {
            match row.status.as_str() {
                "succeeded" => return Ok(charged(row)),
                "declined" => return Ok(declined(row)),
                "refunded" => return Ok(cancelled()),
                "voided" => return self.undo_voided(saga, step, row).await,
                // `pending`: a call that did not finish; make it again (same key).
                _ => {}
            }
        } else if self.pending_after.is_zero() {
            let (row, _) = self.claim(saga, step, order, amount, "pending").await?;
            if row.status == "voided" {
                return self.undo_voided(saga, step, &row).await;
            }
        }
        let key = Self::key(saga, step);
        let call = self
            .processor
            .charge(&key, amount.minor, amount.currency.as_str(), token);
        let result = if recorded.is_some() || self.pending_after.is_zero() {
            call.await
        } else {
            tokio::pin!(call);
            tokio::select! {
                biased;
                r = &mut call => r,
                () = tokio::time::sleep(self.pending_after) => {
                    // Slow: put the call on record while it goes on. Whatever the row turns
                    // out to be (a refund may have voided it), the result settles it below.
                    self.claim(saga, step, order, amount, "pending").await?;
                    call.await
                }
            }
        };
        let (settle, answer) = match result {
            Ok(processor_ref) => (
                Settle {
                    claim: Self::claim_of(saga, step, order, amount, "succeeded"),
                    processor_ref: Some(processor_ref),
                    decline_code: None,
                    reason: None,
                },
                None,
            ),
            Err(CallError::Refused { code, message }) => {
                let answer = refused(&code, message.clone());
                (
                    Settle {
                        claim: Self::claim_of(saga, step, order, amount, "declined"),
                        processor_ref: None,
                        decline_code: Some(code),
                        reason: Some(message),
                    },
                    Some(answer),
                )
            }
            Err(CallError::Unavailable(why)) => return Ok(retryable(why)),
        };
        if let Some(row) = self.settles.call(settle).await? {
            return Ok(answer.unwrap_or_else(|| charged(&row)));
        }
        // The row is in another status: a refund voided it while the processor was being
        // called, or another delivery of the command recorded it first.
        let row = self.row(saga, step).await?.expect("a settled row exists");
        match row.status.as_str() {
            "voided" => self.undo_voided(saga, step, &row).await,
            "succeeded" => Ok(charged(&row)),
            "declined" => Ok(declined(&row)),
            _ => Ok(cancelled()),
        }
    }

    /// A voided charge may still have been taken by the processor (a call that raced the
    /// refund, one from a process that crashed, or one that timed out here and is still going
    /// on there): void its key at the processor, which returns a charge already made (given
    /// back here) and refuses any later one.
    async fn undo_voided(
        &self,
        saga: SagaId,
        step: &str,
        row: &Charge,
    ) -> Result<ReplyOutcome, Unavailable> {
        let key = Self::key(saga, step);
        let found = match &row.processor_ref {
            Some(r) => Some(r.clone()),
            None => match self.processor.void_charge(&key).await {
                Ok(found) => found,
                Err(e) => return Ok(retryable(e.to_string())),
            },
        };
        if let Some(processor_ref) = found {
            match self
                .processor
                .refund(&format!("{key}:refund"), &processor_ref)
                .await
            {
                Ok(refund_ref) => {
                    self.record_refund(saga, row.id, &processor_ref, &refund_ref, "voided")
                        .await?;
                }
                Err(e) => return Ok(retryable(e.to_string())),
            }
        }
        Ok(cancelled())
    }

    async fn record_refund(
        &self,
        saga: SagaId,
        charge: Uuid,
        processor_ref: &str,
        refund_ref: &str,
        from: &str,
    ) -> Result<Uuid, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let now = Utc::now();
        let id: Uuid = sqlx::query(
            "INSERT INTO payments.refunds (id, charge_id, saga_id, amount_minor, currency, processor_ref, created_at)
             SELECT $1, c.id, $3, c.amount_minor, c.currency, $4, $5 FROM payments.charges c WHERE c.id = $2
             ON CONFLICT (charge_id) DO UPDATE SET processor_ref = excluded.processor_ref
             RETURNING id",
        )
        .bind(Uuid::now_v7())
        .bind(charge)
        .bind(saga.as_uuid())
        .bind(refund_ref)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?
        .get(0);
        sqlx::query(
            "UPDATE payments.charges SET status = 'refunded', processor_ref = $3, updated_at = $4
              WHERE id = $1 AND status = $2",
        )
        .bind(charge)
        .bind(from)
        .bind(processor_ref)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Refund a saga's charge (or leave a tombstone when there is none yet): the effect alone,
    /// without the check that the command matches its order ([`Handler::handle`] checks first).
    pub async fn refund(
        &self,
        saga: SagaId,
        step: &str,
        order: Uuid,
        amount: &Money,
    ) -> Result<ReplyOutcome, Unavailable> {
        let refunded =
            |id| ReplyOutcome::succeeded(&payment::Output::PaymentRefunded { refund_id: id });
        let (row, _) = self.claim(saga, step, order, amount, "voided").await?;
        match row.status.as_str() {
            "succeeded" => {
                let processor_ref = row.processor_ref.clone().unwrap_or_default();
                let key = format!("{}:refund", Self::key(saga, step));
                match self.processor.refund(&key, &processor_ref).await {
                    Ok(refund_ref) => {
                        let id = self
                            .record_refund(saga, row.id, &processor_ref, &refund_ref, "succeeded")
                            .await?;
                        Ok(refunded(Some(id)))
                    }
                    Err(CallError::Unavailable(why)) => Ok(retryable(why)),
                    Err(CallError::Refused { code, message }) => Ok(refused(&code, message)),
                }
            }
            "pending" => {
                // A charge is in flight, or its process died: void it. A charge that returns
                // later refunds itself; one that went through unseen is found here.
                if !self
                    .transition(row.id, "pending", "voided", None, None)
                    .await?
                {
                    return Ok(retryable("the charge changed while refunding; try again"));
                }
                match self.undo_voided(saga, step, &row).await? {
                    ReplyOutcome::Failed {
                        retryable: true,
                        reason,
                        ..
                    } => Ok(retryable(reason)),
                    _ => Ok(refunded(None)),
                }
            }
            // A tombstone, written now or by an earlier delivery: a charge whose answer was
            // never recorded may still have gone through, so the processor is asked.
            "voided" => match self.undo_voided(saga, step, &row).await? {
                ReplyOutcome::Failed {
                    retryable: true,
                    reason,
                    ..
                } => Ok(retryable(reason)),
                _ => Ok(refunded(None)),
            },
            // Declined or already refunded: nothing is held.
            _ => Ok(refunded(None)),
        }
    }
}

fn charged(row: &Charge) -> ReplyOutcome {
    ReplyOutcome::succeeded(&payment::Output::PaymentCharged {
        charge_id: row.id,
        processor_ref: row.processor_ref.clone().unwrap_or_default(),
    })
}

fn declined(row: &Charge) -> ReplyOutcome {
    refused(
        row.decline_code.as_deref().unwrap_or("card_declined"),
        row.reason
            .clone()
            .unwrap_or_else(|| "the card was declined".into()),
    )
}
