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
//!
//! The discipline (claim, call, settle, void) is [`crate::thirdparty`]'s, shared with the
//! shipping service. What is the payment service's own is here: the charges table and its
//! statements, the processor's calls (a charge, the void of its key, a refund, recorded in
//! `payments.refunds`), the charges' statuses and the replies.

use chrono::Utc;
use sagas::events::{self, DomainEvent};
use sagas::shop::{Currency, CustomerRef, Money, OrderId, ids, payment};
use sagas::wire::{Command, EventId, ReplyOutcome, SagaId, Subjects};
use sqlx::PgPool;
use uuid::Uuid;

use std::time::Duration;

use crate::batch::{Batcher, Numbered};
use crate::bus::{self, Handler, Unavailable};
use crate::clients::{CallError, Processor};
use crate::orders::{self, Order};
use crate::thirdparty::{self, Calls, Claim, Compensation, Recorded, Settle, Transition, refused};

#[derive(Clone)]
pub struct Payment {
    lookups: Batcher<(SagaId, String), Found>,
    calls: Calls<Charges>,
}

/// The charges table and the card processor: what [`Calls`] needs of the payment service.
#[derive(Clone)]
struct Charges {
    pool: PgPool,
    processor: Processor,
    /// Where the service's domain events go (`PaymentProcessed`, `PaymentFailed`,
    /// `PaymentRefunded`), written to the outbox in the transaction of the change; none
    /// without ([`Payment::with_events`]).
    events: Option<Subjects>,
}

fn retryable(reason: impl Into<String>) -> ReplyOutcome {
    ReplyOutcome::Failed {
        retryable: true,
        code: "processor_unavailable".into(),
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

/// What a charge row holds besides its status and result.
#[derive(Clone)]
struct Entry {
    saga: SagaId,
    step: String,
    order: Uuid,
    amount_minor: i64,
    currency: String,
}

impl Entry {
    fn new(saga: SagaId, step: &str, order: Uuid, amount: &Money) -> Self {
        Self {
            saga,
            step: step.to_owned(),
            order,
            amount_minor: amount.minor,
            currency: amount.currency.as_str().to_owned(),
        }
    }
}

/// What the processor's answer writes into a charge row.
#[derive(Default)]
struct ChargeOutcome {
    processor_ref: Option<String>,
    decline_code: Option<String>,
    reason: Option<String>,
}

/// The columns of a batch of charge rows to write, one array per column for `unnest`: the
/// statements' macros check each array against its column type, which for `text[]` is a slice
/// of owned strings.
struct Entries {
    ids: Vec<Uuid>,
    sagas: Vec<Uuid>,
    steps: Vec<String>,
    orders: Vec<Uuid>,
    amounts: Vec<i64>,
    currencies: Vec<String>,
    statuses: Vec<String>,
}

impl Entries {
    fn of<'a>(rows: impl ExactSizeIterator<Item = (&'a Entry, &'static str)>) -> Self {
        let mut e = Entries {
            ids: Vec::with_capacity(rows.len()),
            sagas: Vec::with_capacity(rows.len()),
            steps: Vec::with_capacity(rows.len()),
            orders: Vec::with_capacity(rows.len()),
            amounts: Vec::with_capacity(rows.len()),
            currencies: Vec::with_capacity(rows.len()),
            statuses: Vec::with_capacity(rows.len()),
        };
        for (entry, status) in rows {
            e.ids.push(ids::charge(entry.saga, &entry.step));
            e.sagas.push(entry.saga.as_uuid());
            e.steps.push(entry.step.clone());
            e.orders.push(entry.order);
            e.amounts.push(entry.amount_minor);
            e.currencies.push(entry.currency.clone());
            e.statuses.push(status.to_owned());
        }
        e
    }
}

/// The processor's answers of a batch, one array per column. Their elements may be NULL, which
/// the macros' check of a `text[]` parameter (a slice of strings) does not allow for: they are
/// bound with their type said (`as &[Option<&str>]`), which skips that check.
struct Outcomes<'a> {
    processor_refs: Vec<Option<&'a str>>,
    decline_codes: Vec<Option<&'a str>>,
    reasons: Vec<Option<&'a str>>,
}

impl<'a> Outcomes<'a> {
    fn of(outcomes: impl Iterator<Item = &'a ChargeOutcome>) -> Self {
        let mut o = Outcomes {
            processor_refs: Vec::new(),
            decline_codes: Vec::new(),
            reasons: Vec::new(),
        };
        for outcome in outcomes {
            o.processor_refs.push(outcome.processor_ref.as_deref());
            o.decline_codes.push(outcome.decline_code.as_deref());
            o.reasons.push(outcome.reason.as_deref());
        }
        o
    }
}

/// What a lookup finds for a command: its charge row, the order of its saga, and the saga's
/// payment token (a secret: never logged, never put in a message).
#[derive(Default)]
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
            payment::Command::VerifyCharge {
                order_id,
                amount,
                charge_id,
            } => {
                let charge = self
                    .fulfilment_charge(cmd, order_id, &amount, charge_id)
                    .await?;
                Ok(match charge {
                    Err(unknown) => unknown,
                    Ok(c) if c.status == "succeeded" => {
                        ReplyOutcome::succeeded(&payment::Output::ChargeVerified { charge_id })
                    }
                    Ok(c) if c.status == "refunded" => refused(
                        "charge_refunded",
                        format!("charge {charge_id} was refunded"),
                    ),
                    Ok(c) => refused(
                        "charge_not_taken",
                        format!("charge {charge_id} is {}: no money was taken", c.status),
                    ),
                })
            }
            payment::Command::RefundPayment {
                order_id,
                amount,
                charge_id: Some(named),
            } if self.is_fulfilment(cmd).await? => {
                // A fulfilment refunds its checkout's charge, under the checkout's key: one
                // refund, whichever saga asks and however often.
                match self
                    .fulfilment_charge(cmd, order_id, &amount, named)
                    .await?
                {
                    Err(unknown) => Ok(unknown),
                    Ok(c) => Ok(self
                        .refund(c.saga, &c.step, order_id.as_uuid(), &amount)
                        .await?),
                }
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

/// A row of [`lookup_many`], by column name: the input it answers (`n`), and what the outer
/// joins found for it, NULL where they found nothing: the charge, the order of the saga (with
/// its total), the saga's payment token.
struct Lookup {
    n: i64,
    charge_id: Option<Uuid>,
    charge_status: Option<String>,
    processor_ref: Option<String>,
    decline_code: Option<String>,
    reason: Option<String>,
    order_saga_id: Option<Uuid>,
    order_id: Option<Uuid>,
    order_status: Option<String>,
    total_minor: Option<i64>,
    currency: Option<String>,
    token: Option<String>,
}

impl Numbered for Lookup {
    fn n(&self) -> i64 {
        self.n
    }
}

/// Read many rows, and the orders of their sagas, in one statement: one row per key (the
/// charge is unique by saga and step, the order by saga), found by their primary or unique
/// keys.
async fn lookup_many(
    pool: &PgPool,
    keys: Vec<(SagaId, String)>,
) -> Result<Vec<Found>, sqlx::Error> {
    let inputs = keys.len();
    let (sagas, steps): (Vec<Uuid>, Vec<String>) = keys
        .into_iter()
        .map(|(saga, step)| (saga.as_uuid(), step))
        .unzip();
    // Every column of an outer join may be NULL (`?`); the ordinality never is (`!`).
    let rows = sqlx::query_as!(
        Lookup,
        r#"SELECT k.n AS "n!", c.id AS "charge_id?", c.status AS "charge_status?",
                  c.processor_ref AS "processor_ref?", c.decline_code AS "decline_code?",
                  c.reason AS "reason?",
                  o.saga_id AS "order_saga_id?", o.id AS "order_id?", o.status AS "order_status?",
                  o.total_minor AS "total_minor?", o.currency AS "currency?", t.value AS "token?"
             FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS k(saga_id, step, n)
             LEFT JOIN payments.charges c ON c.saga_id = k.saga_id AND c.step = k.step
             LEFT JOIN orders.orders o ON o.saga_id = k.saga_id
             LEFT JOIN orchestrator.saga_secrets t
                    ON t.saga_id = k.saga_id AND t.name = 'payment_token'"#,
        &sagas,
        &steps,
    )
    .fetch_all(pool)
    .await?;
    thirdparty::per_input(rows, inputs, |f: &mut Found, r| {
        if let (Some(id), Some(status)) = (r.charge_id, r.charge_status) {
            f.charge = Some(Charge {
                id,
                status,
                processor_ref: r.processor_ref,
                decline_code: r.decline_code,
                reason: r.reason,
            });
        }
        f.order = Order::found(r.order_saga_id, r.order_id, r.order_status)
            .map(|o| o.with_total(r.total_minor, r.currency));
        f.token = r.token;
    })
}

impl thirdparty::Service for Charges {
    type Key = (SagaId, String);
    type Entry = Entry;
    type Outcome = ChargeOutcome;
    type Row = Charge;

    const ROW: &'static str = "charge";
    const MADE: &'static str = "succeeded";
    const REFUSED: &'static str = "declined";

    fn key(entry: &Entry) -> (SagaId, String) {
        (entry.saga, entry.step.clone())
    }

    fn id(row: &Charge) -> Uuid {
        row.id
    }

    fn status(row: &Charge) -> &str {
        &row.status
    }

    fn made(row: &Charge) -> Option<&str> {
        row.processor_ref.as_deref()
    }

    fn idempotency_key((saga, step): &(SagaId, String)) -> String {
        key(*saga, step)
    }

    fn recorded(row: &Charge) -> Recorded {
        match row.status.as_str() {
            "succeeded" => Recorded::Answer(charged(row)),
            "declined" => Recorded::Answer(declined(row)),
            "refunded" => Recorded::Answer(cancelled()),
            "voided" => Recorded::Undo,
            // `pending`: a call that did not finish; make it again (same key).
            _ => Recorded::Call,
        }
    }

    fn cancelled() -> ReplyOutcome {
        cancelled()
    }

    fn retryable(reason: String) -> ReplyOutcome {
        retryable(reason)
    }

    fn refusal(code: String, message: String) -> ChargeOutcome {
        ChargeOutcome {
            processor_ref: None,
            decline_code: Some(code),
            reason: Some(message),
        }
    }

    /// Claim many rows in one statement: the inserted ones come back from the insert, the
    /// others (already there) from the table.
    async fn claim_rows(
        &self,
        claims: &[Claim<Self>],
    ) -> Result<Vec<((SagaId, String), Charge, bool)>, sqlx::Error> {
        let entries = Entries::of(claims.iter().map(|c| (&c.entry, c.status)));
        // PostgreSQL cannot tell the nullability of a UNION's columns: the key, id, status and
        // flag are never NULL (`!`), the processor's answer may be (`?`).
        let rows = sqlx::query!(
            r#"WITH ins AS (
                 INSERT INTO payments.charges
                     (id, saga_id, step, order_id, idempotency_key, amount_minor, currency, status, created_at, updated_at)
                 SELECT u.id, u.saga_id, u.step, u.order_id, u.saga_id::text || ':' || u.step, u.amount, u.currency, u.status, $8, $8
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::int8[], $6::text[], $7::text[])
                     AS u(id, saga_id, step, order_id, amount, currency, status)
                 ON CONFLICT (saga_id, step) DO NOTHING
                 RETURNING saga_id, step, id, status, processor_ref, decline_code, reason)
             SELECT saga_id AS "saga_id!", step AS "step!", id AS "id!", status AS "status!",
                    processor_ref AS "processor_ref?", decline_code AS "decline_code?",
                    reason AS "reason?", true AS "inserted!"
               FROM ins
             UNION ALL
             SELECT c.saga_id, c.step, c.id, c.status, c.processor_ref, c.decline_code, c.reason, false
               FROM payments.charges c
               JOIN unnest($2::uuid[], $3::text[]) AS k(saga_id, step) ON c.saga_id = k.saga_id AND c.step = k.step"#,
            &entries.ids,
            &entries.sagas,
            &entries.steps,
            &entries.orders,
            &entries.amounts,
            &entries.currencies,
            &entries.statuses,
            Utc::now(),
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let charge = Charge {
                    id: r.id,
                    status: r.status,
                    processor_ref: r.processor_ref,
                    decline_code: r.decline_code,
                    reason: r.reason,
                };
                ((SagaId::from_uuid(r.saga_id), r.step), charge, r.inserted)
            })
            .collect())
    }

    async fn settle_rows(
        &self,
        settles: &[&Settle<Self>],
    ) -> Result<Vec<((SagaId, String), Charge)>, sqlx::Error> {
        let entries = Entries::of(settles.iter().map(|s| (&s.claim.entry, s.claim.status)));
        let outcomes = Outcomes::of(settles.iter().map(|s| &s.outcome));
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query!(
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
             RETURNING c.saga_id, c.step, c.id, c.status, c.processor_ref, c.decline_code, c.reason,
                       c.order_id, c.amount_minor, c.currency",
            &entries.ids,
            &entries.sagas,
            &entries.steps,
            &entries.orders,
            &entries.amounts,
            &entries.currencies,
            &entries.statuses,
            // Arrays that may hold NULLs: their type is said (see `Outcomes`).
            &outcomes.processor_refs as &[Option<&str>],
            &outcomes.decline_codes as &[Option<&str>],
            &outcomes.reasons as &[Option<&str>],
            Utc::now(),
        )
        .fetch_all(&mut *tx)
        .await?;
        // The rows that got their outcome now: their events, in the same transaction.
        if let Some(subjects) = &self.events {
            let settled: Vec<Settled> = rows
                .iter()
                .map(|r| Settled {
                    charge: r.id,
                    saga: r.saga_id,
                    order: r.order_id,
                    status: r.status.clone(),
                    amount_minor: r.amount_minor,
                    currency: r.currency.clone(),
                    code: r.decline_code.clone(),
                    reason: r.reason.clone(),
                })
                .collect();
            write_events(&mut tx, subjects, &settled).await?;
        }
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let charge = Charge {
                    id: r.id,
                    status: r.status,
                    processor_ref: r.processor_ref,
                    decline_code: r.decline_code,
                    reason: r.reason,
                };
                ((SagaId::from_uuid(r.saga_id), r.step), charge)
            })
            .collect())
    }

    async fn transition_rows(&self, ts: &[&Transition<Self>]) -> Result<Vec<Uuid>, sqlx::Error> {
        let ids: Vec<Uuid> = ts.iter().map(|t| t.id).collect();
        let from: Vec<String> = ts.iter().map(|t| t.from.to_owned()).collect();
        let to: Vec<String> = ts.iter().map(|t| t.to.to_owned()).collect();
        let outcomes = Outcomes::of(ts.iter().map(|t| &t.outcome));
        sqlx::query_scalar!(
            "UPDATE payments.charges c
                SET status = u.to_status, processor_ref = coalesce(u.processor_ref, c.processor_ref),
                    decline_code = coalesce(u.decline_code, c.decline_code), reason = coalesce(u.reason, c.reason),
                    updated_at = $7
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                 AS u(id, from_status, to_status, processor_ref, decline_code, reason)
              WHERE c.id = u.id AND c.status = u.from_status
             RETURNING c.id",
            &ids,
            &from,
            &to,
            &outcomes.processor_refs as &[Option<&str>],
            &outcomes.decline_codes as &[Option<&str>],
            &outcomes.reasons as &[Option<&str>],
            Utc::now(),
        )
        .fetch_all(&self.pool)
        .await
    }

    async fn row(&self, (saga, step): &(SagaId, String)) -> Result<Option<Charge>, sqlx::Error> {
        sqlx::query_as!(
            Charge,
            "SELECT id, status, processor_ref, decline_code, reason FROM payments.charges
              WHERE saga_id = $1 AND step = $2",
            saga.as_uuid(),
            step,
        )
        .fetch_optional(&self.pool)
        .await
    }

    async fn void(&self, key: &str) -> Result<Option<String>, CallError> {
        self.processor.void_charge(key).await
    }

    /// Refund the charge the processor made under a voided row's key.
    async fn undo(
        &self,
        (saga, step): &(SagaId, String),
        row: &Charge,
        processor_ref: &str,
    ) -> Result<Result<(), CallError>, Unavailable> {
        let key = format!("{}:refund", key(*saga, step));
        match self.processor.refund(&key, processor_ref).await {
            Ok(refund_ref) => {
                self.record_refund(*saga, row.id, processor_ref, &refund_ref, "voided")
                    .await?;
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e)),
        }
    }
}

/// The processor's idempotency key of a saga's step.
fn key(saga: SagaId, step: &str) -> String {
    format!("{saga}:{step}")
}

impl Charges {
    /// Record the refund of a charge and move the charge from `from` to `refunded`, in one
    /// transaction; the refund's id.
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
        let id = sqlx::query_scalar!(
            "INSERT INTO payments.refunds (id, charge_id, saga_id, amount_minor, currency, processor_ref, created_at)
             SELECT $1, c.id, $3, c.amount_minor, c.currency, $4, $5 FROM payments.charges c WHERE c.id = $2
             ON CONFLICT (charge_id) DO UPDATE SET processor_ref = excluded.processor_ref
             RETURNING id",
            Uuid::now_v7(),
            charge,
            saga.as_uuid(),
            refund_ref,
            now,
        )
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query!(
            "UPDATE payments.charges SET status = 'refunded', processor_ref = $3, updated_at = $4
              WHERE id = $1 AND status = $2",
            charge,
            from,
            processor_ref,
            now,
        )
        .execute(&mut *tx)
        .await?;
        if let Some(subjects) = &self.events {
            let c = sqlx::query!(
                "SELECT order_id, amount_minor, currency FROM payments.charges WHERE id = $1",
                charge,
            )
            .fetch_one(&mut *tx)
            .await?;
            let refunded = events::payment::PaymentRefunded {
                charge_id: charge,
                order_id: OrderId::from_uuid(c.order_id),
                saga_id: saga,
                amount: money(c.amount_minor, &c.currency),
            };
            let event = events::envelope(
                &refunded,
                EventId::derive_from(charge, events::payment::PaymentRefunded::NAME),
                now,
            );
            let correlation_id = correlation_of(&mut tx, saga).await?;
            runtime::outbox::write(&mut tx, subjects, &event, &correlation_id).await?;
        }
        tx.commit().await?;
        Ok(id)
    }
}

/// A charge that got its outcome, for its event.
struct Settled {
    charge: Uuid,
    saga: Uuid,
    order: Uuid,
    status: String,
    amount_minor: i64,
    currency: String,
    code: Option<String>,
    reason: Option<String>,
}

fn money(minor: i64, currency: &str) -> Money {
    Money {
        minor,
        // The table only ever holds the currency of a parsed `Money`.
        currency: Currency::parse(currency).expect("a stored currency is valid"),
    }
}

/// The correlation id of a saga's requests, for the events its commands cause (the saga's own
/// when it is known here, else one derived from it).
async fn correlation_of(tx: &mut sqlx::PgConnection, saga: SagaId) -> Result<String, sqlx::Error> {
    let known = sqlx::query_scalar!(
        "SELECT correlation_id FROM orchestrator.sagas WHERE id = $1",
        saga.as_uuid(),
    )
    .fetch_optional(tx)
    .await?;
    Ok(known.unwrap_or_else(|| format!("saga-{saga}")))
}

/// `PaymentProcessed` for each charge taken, `PaymentFailed` for each declined, into the
/// outbox of `tx`: the customer and the correlation id read from the order and its saga.
async fn write_events(
    tx: &mut sqlx::PgConnection,
    subjects: &Subjects,
    settled: &[Settled],
) -> Result<(), sqlx::Error> {
    let settled: Vec<&Settled> = settled
        .iter()
        .filter(|s| matches!(s.status.as_str(), "succeeded" | "declined"))
        .collect();
    if settled.is_empty() {
        return Ok(());
    }
    let orders: Vec<Uuid> = settled.iter().map(|s| s.order).collect();
    let known: std::collections::HashMap<Uuid, (String, Option<String>)> = sqlx::query!(
        r#"SELECT o.id AS "id!", o.customer_id AS "customer_id!", s.correlation_id AS "correlation_id?"
             FROM orders.orders o LEFT JOIN orchestrator.sagas s ON s.id = o.saga_id
            WHERE o.id = ANY($1)"#,
        &orders,
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| (r.id, (r.customer_id, r.correlation_id)))
    .collect();
    let now = Utc::now();
    for s in settled {
        let (customer, correlation) = known.get(&s.order).cloned().unwrap_or_default();
        let correlation = correlation.unwrap_or_else(|| format!("saga-{}", s.saga));
        let (order_id, saga_id) = (OrderId::from_uuid(s.order), SagaId::from_uuid(s.saga));
        let customer = CustomerRef { id: customer };
        let amount = money(s.amount_minor, &s.currency);
        let event = if s.status == "succeeded" {
            let e = events::payment::PaymentProcessed {
                charge_id: s.charge,
                order_id,
                saga_id,
                customer,
                amount,
            };
            events::envelope(
                &e,
                EventId::derive_from(s.charge, events::payment::PaymentProcessed::NAME),
                now,
            )
        } else {
            let e = events::payment::PaymentFailed {
                order_id,
                saga_id,
                customer,
                amount,
                code: s.code.clone().unwrap_or_else(|| "card_declined".into()),
                reason: s
                    .reason
                    .clone()
                    .unwrap_or_else(|| "the card was declined".into()),
            };
            events::envelope(
                &e,
                EventId::derive_from(s.charge, events::payment::PaymentFailed::NAME),
                now,
            )
        };
        runtime::outbox::write(&mut *tx, subjects, &event, &correlation).await?;
    }
    Ok(())
}

impl Payment {
    pub fn new(pool: PgPool, processor: Processor, pending_after: Duration) -> Self {
        Self::publishing(pool, processor, pending_after, None)
    }

    /// The service, publishing its domain events (through the outbox) on `events`.
    pub fn publishing(
        pool: PgPool,
        processor: Processor,
        pending_after: Duration,
        events: Option<Subjects>,
    ) -> Self {
        let p = pool.clone();
        let lookups = Batcher::spawn(256, move |k| {
            let p = p.clone();
            async move { lookup_many(&p, k).await }
        });
        Self {
            lookups,
            calls: Calls::new(
                Charges {
                    pool,
                    processor,
                    events,
                },
                pending_after,
            ),
        }
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

    /// Whether the command's saga is a fulfilment (not a checkout's order).
    async fn is_fulfilment(&self, cmd: &Command) -> Result<bool, Unavailable> {
        let found = self.lookups.call((cmd.saga_id, cmd.step.clone())).await?;
        if found.order.is_some() {
            return Ok(false);
        }
        Ok(sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM orders.fulfilments WHERE saga_id = $1) AS "found!""#,
            cmd.saga_id.as_uuid(),
        )
        .fetch_one(&self.calls.service().pool)
        .await?)
    }

    /// The checkout's charge `charge` that a fulfilment's command names, once the command is
    /// found to come from the fulfilment of the order it names, for the order's total
    /// ([`bus::Error::Poison`] if not); `Err` (the refusal to answer) when the order has no
    /// such charge.
    async fn fulfilment_charge(
        &self,
        cmd: &Command,
        order: OrderId,
        amount: &Money,
        charge: Uuid,
    ) -> Result<Result<OwnedCharge, ReplyOutcome>, bus::Error> {
        let row = sqlx::query!(
            r#"SELECT f.order_id, o.status, o.total_minor, o.currency,
                      c.saga_id AS "charge_saga?", c.step AS "charge_step?",
                      c.status AS "charge_status?"
                 FROM orders.fulfilments f
                 JOIN orders.orders o ON o.id = f.order_id
                 LEFT JOIN payments.charges c ON c.id = $2 AND c.order_id = f.order_id
                WHERE f.saga_id = $1"#,
            cmd.saga_id.as_uuid(),
            charge,
        )
        .fetch_optional(&self.calls.service().pool)
        .await
        .map_err(Unavailable::from)?;
        let found = row.as_ref().map(|r| {
            Order::new(cmd.saga_id.as_uuid(), Some(r.order_id), r.status.clone())
                .with_total(Some(r.total_minor), Some(r.currency.clone()))
        });
        orders::check(
            cmd.action(),
            cmd.saga_id,
            order,
            Some(amount),
            found.as_ref(),
        )
        .map_err(bus::Error::Poison)?;
        let row = row.expect("checked: the fulfilment was found");
        Ok(
            match (row.charge_saga, row.charge_step, row.charge_status) {
                (Some(saga), Some(step), Some(status)) => Ok(OwnedCharge {
                    saga: SagaId::from_uuid(saga),
                    step,
                    status,
                }),
                _ => Err(refused(
                    "unknown_charge",
                    format!("charge {charge} is not order {order}'s: nothing of it can be used"),
                )),
            },
        )
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
        let key = key(saga, step);
        let processor = &self.calls.service().processor;
        let call = async {
            let charged = processor.charge(&key, amount.minor, amount.currency.as_str(), token);
            charged.await.map(|processor_ref| ChargeOutcome {
                processor_ref: Some(processor_ref),
                ..ChargeOutcome::default()
            })
        };
        self.calls
            .make(recorded, Entry::new(saga, step, order, amount), call)
            .await
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
        let tombstone = Entry::new(saga, step, order, amount);
        match self.calls.compensate(tombstone).await? {
            Compensation::Made(row) => {
                let charges = self.calls.service();
                let processor_ref = row.processor_ref.clone().unwrap_or_default();
                let key = format!("{}:refund", key(saga, step));
                match charges.processor.refund(&key, &processor_ref).await {
                    Ok(refund_ref) => {
                        let id = charges
                            .record_refund(saga, row.id, &processor_ref, &refund_ref, "succeeded")
                            .await?;
                        Ok(refunded(Some(id)))
                    }
                    Err(CallError::Unavailable(why)) => Ok(retryable(why)),
                    Err(CallError::Refused { code, message }) => Ok(refused(&code, message)),
                }
            }
            Compensation::Changed => Ok(retryable("the charge changed while refunding; try again")),
            Compensation::Retry(why) => Ok(retryable(why)),
            // Nothing is held: declined, refunded before, or voided (and what the processor
            // had charged under the key is refunded now).
            Compensation::Done => Ok(refunded(None)),
        }
    }
}

/// A charge as a fulfilment names it: whose it is (the checkout saga and step that made it).
struct OwnedCharge {
    saga: SagaId,
    step: String,
    status: String,
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
