//! The shipping service: books and cancels shipments with the carrier, one row per order in
//! `shipping.shipments`. Same discipline as payments, written once in [`crate::thirdparty`]: a
//! booking reads its row first, calls the carrier and writes the row once with the result
//! (`pending` first only when the call is slow); a cancel that comes first leaves a `voided`
//! tombstone and voids the key at the carrier (which returns a booking already made under it,
//! and refuses any later one); a booking that lands on a tombstone is cancelled at once. This
//! module keeps what is the shipping service's own: the shipments table and its statements, the
//! carrier's calls, the shipments' statuses and the replies.
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
use sqlx::PgPool;
use uuid::Uuid;

use std::time::Duration;

use crate::batch::{Batcher, Numbered};
use crate::bus::{self, Handler, Unavailable};
use crate::clients::{CallError, Carrier};
use crate::orders::{self, Order};
use crate::thirdparty::{self, Calls, Claim, Compensation, Recorded, Settle, Transition, refused};

#[derive(Clone)]
pub struct Shipping {
    lookups: Batcher<(SagaId, OrderId), Found>,
    calls: Calls<Shipments>,
    /// Where the carrier reports what became of a parcel it was asked to collect
    /// ([`crate::carrier_reports`]).
    callback_url: Option<String>,
}

/// The shipments table and the carrier: what [`Calls`] needs of the shipping service.
#[derive(Clone)]
struct Shipments {
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

#[derive(Clone)]
struct Shipment {
    id: Uuid,
    status: String,
    carrier_ref: Option<String>,
    tracking_number: Option<String>,
    reason: Option<String>,
}

/// What a shipment row holds besides its status and result (a tombstone: no address, no
/// lines).
#[derive(Clone)]
struct Entry {
    saga: SagaId,
    order: OrderId,
    address: String,
    lines: String,
}

impl Entry {
    fn new(saga: SagaId, order: OrderId, address: Option<&Address>, lines: &[Line]) -> Self {
        Self {
            saga,
            order,
            address: serde_json::to_string(&address).expect("addresses serialize"),
            lines: serde_json::to_string(lines).expect("lines serialize"),
        }
    }
}

/// What the carrier's answer writes into a shipment row.
#[derive(Default)]
struct ShipmentOutcome {
    carrier_ref: Option<String>,
    tracking_number: Option<String>,
    reason: Option<String>,
}

/// What a lookup finds for a command: the order's shipment row, the order of its saga, and
/// where it goes (read from the order: commands carry no personal data).
#[derive(Default)]
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
                shipment_id: Some(named),
            } if self.fulfilment_of(cmd).await?.is_some() => {
                // The fulfilment cancels the shipment its checkout booked (the order's one).
                let checkout = self.fulfilled(cmd, order_id).await?;
                let found = self.lookups.call((checkout, order_id)).await?;
                let known = found
                    .shipment
                    .as_ref()
                    .map_or(ids::shipment(checkout, BOOKING_STEP), |s| s.id);
                if named != known {
                    return Ok(refused(
                        "unknown_shipment",
                        format!(
                            "shipment {named} is not order {order_id}'s: nothing of it can be cancelled"
                        ),
                    ));
                }
                Ok(self.cancel(checkout, order_id).await?)
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
            shipping::Command::RequestPickup {
                order_id,
                shipment_id,
            } => {
                let checkout = self.fulfilled(cmd, order_id).await?;
                let found = self.lookups.call((checkout, order_id)).await?;
                Ok(self
                    .request_pickup(found.shipment, order_id, shipment_id)
                    .await?)
            }
        }
    }
}

/// The step that books an order's shipment (the checkout's): a shipment's id is derived from
/// its saga and this step ([`ids::shipment`]), one shipment per order.
const BOOKING_STEP: &str = "create_shipment";

/// A row of [`lookup_many`], by column name: the input it answers (`n`), and what the outer
/// joins found for it, NULL where they found nothing: the order's shipment, the order of the
/// saga and its address.
struct Lookup {
    n: i64,
    shipment_id: Option<Uuid>,
    shipment_status: Option<String>,
    carrier_ref: Option<String>,
    tracking_number: Option<String>,
    reason: Option<String>,
    order_saga_id: Option<Uuid>,
    order_id: Option<Uuid>,
    order_status: Option<String>,
    shipping_address: Option<serde_json::Value>,
}

impl Numbered for Lookup {
    fn n(&self) -> i64 {
        self.n
    }
}

/// Read many rows, and the orders of their sagas, in one statement: one row per key (the
/// shipment is unique by order, the order by saga), found by their primary or unique keys.
async fn lookup_many(
    pool: &PgPool,
    keys: Vec<(SagaId, OrderId)>,
) -> Result<Vec<Found>, sqlx::Error> {
    let sagas: Vec<Uuid> = keys.iter().map(|k| k.0.as_uuid()).collect();
    let orders: Vec<Uuid> = keys.iter().map(|k| k.1.as_uuid()).collect();
    // Every column of an outer join may be NULL (`?`); the ordinality never is (`!`).
    let rows = sqlx::query_as!(
        Lookup,
        r#"SELECT k.n AS "n!", s.id AS "shipment_id?", s.status AS "shipment_status?",
                  s.carrier_ref AS "carrier_ref?", s.tracking_number AS "tracking_number?",
                  s.reason AS "reason?",
                  o.saga_id AS "order_saga_id?", o.id AS "order_id?", o.status AS "order_status?",
                  o.shipping_address AS "shipping_address?"
             FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS k(saga_id, order_id, n)
             LEFT JOIN shipping.shipments s ON s.order_id = k.order_id
             LEFT JOIN orders.orders o ON o.saga_id = k.saga_id"#,
        &sagas,
        &orders,
    )
    .fetch_all(pool)
    .await?;
    thirdparty::per_input(rows, keys.len(), |f: &mut Found, r| {
        if let (Some(id), Some(status)) = (r.shipment_id, r.shipment_status) {
            f.shipment = Some(Shipment {
                id,
                status,
                carrier_ref: r.carrier_ref,
                tracking_number: r.tracking_number,
                reason: r.reason,
            });
        }
        f.order = Order::found(r.order_saga_id, r.order_id, r.order_status);
        f.address = r.shipping_address;
    })
}

/// The columns of a batch of shipment rows to write, one array per column for `unnest`: the
/// statements' macros check each array against its column type, which for `text[]` is a slice
/// of owned strings.
struct Entries {
    ids: Vec<Uuid>,
    sagas: Vec<Uuid>,
    orders: Vec<Uuid>,
    statuses: Vec<String>,
    addresses: Vec<String>,
    lines: Vec<String>,
}

impl Entries {
    fn of<'a>(rows: impl ExactSizeIterator<Item = (&'a Entry, &'static str)>) -> Self {
        let mut e = Entries {
            ids: Vec::with_capacity(rows.len()),
            sagas: Vec::with_capacity(rows.len()),
            orders: Vec::with_capacity(rows.len()),
            statuses: Vec::with_capacity(rows.len()),
            addresses: Vec::with_capacity(rows.len()),
            lines: Vec::with_capacity(rows.len()),
        };
        for (entry, status) in rows {
            e.ids.push(ids::shipment(entry.saga, BOOKING_STEP));
            e.sagas.push(entry.saga.as_uuid());
            e.orders.push(entry.order.as_uuid());
            e.statuses.push(status.to_owned());
            e.addresses.push(entry.address.clone());
            e.lines.push(entry.lines.clone());
        }
        e
    }
}

/// The carrier's answers of a batch, one array per column. Their elements may be NULL, which
/// the macros' check of a `text[]` parameter (a slice of strings) does not allow for: they are
/// bound with their type said (`as &[Option<&str>]`), which skips that check.
struct Outcomes<'a> {
    carrier_refs: Vec<Option<&'a str>>,
    tracking_numbers: Vec<Option<&'a str>>,
    reasons: Vec<Option<&'a str>>,
}

impl<'a> Outcomes<'a> {
    fn of(outcomes: impl Iterator<Item = &'a ShipmentOutcome>) -> Self {
        let mut o = Outcomes {
            carrier_refs: Vec::new(),
            tracking_numbers: Vec::new(),
            reasons: Vec::new(),
        };
        for outcome in outcomes {
            o.carrier_refs.push(outcome.carrier_ref.as_deref());
            o.tracking_numbers.push(outcome.tracking_number.as_deref());
            o.reasons.push(outcome.reason.as_deref());
        }
        o
    }
}

impl thirdparty::Service for Shipments {
    type Key = OrderId;
    type Entry = Entry;
    type Outcome = ShipmentOutcome;
    type Row = Shipment;

    const ROW: &'static str = "shipment";
    const MADE: &'static str = "created";
    const REFUSED: &'static str = "rejected";

    fn key(entry: &Entry) -> OrderId {
        entry.order
    }

    fn id(row: &Shipment) -> Uuid {
        row.id
    }

    fn status(row: &Shipment) -> &str {
        &row.status
    }

    fn made(row: &Shipment) -> Option<&str> {
        row.carrier_ref.as_deref()
    }

    fn idempotency_key(order: &OrderId) -> String {
        key(*order)
    }

    fn recorded(row: &Shipment) -> Recorded {
        match row.status.as_str() {
            "created" => Recorded::Answer(created(row)),
            "rejected" => Recorded::Answer(rejected(row)),
            "voided" | "cancelled" => Recorded::Undo,
            // `pending`: a call that did not finish; make it again (same key).
            _ => Recorded::Call,
        }
    }

    fn cancelled() -> ReplyOutcome {
        refused("cancelled", "the shipment was cancelled by a compensation")
    }

    fn retryable(reason: String) -> ReplyOutcome {
        retryable(reason)
    }

    fn refusal(_code: String, message: String) -> ShipmentOutcome {
        ShipmentOutcome {
            reason: Some(message),
            ..ShipmentOutcome::default()
        }
    }

    async fn claim_rows(
        &self,
        claims: &[Claim<Self>],
    ) -> Result<Vec<(OrderId, Shipment, bool)>, sqlx::Error> {
        let entries = Entries::of(claims.iter().map(|c| (&c.entry, c.status)));
        // PostgreSQL cannot tell the nullability of a UNION's columns: the order, id, status and
        // flag are never NULL (`!`), the carrier's answer may be (`?`).
        let rows = sqlx::query!(
            r#"WITH ins AS (
                 INSERT INTO shipping.shipments (id, saga_id, order_id, status, address, lines, created_at, updated_at)
                 SELECT u.id, u.saga_id, u.order_id, u.status, u.address::jsonb, u.lines::jsonb, $7, $7
                   FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[])
                     AS u(id, saga_id, order_id, status, address, lines)
                 ON CONFLICT (order_id) DO NOTHING
                 RETURNING order_id, id, status, carrier_ref, tracking_number, reason)
             SELECT order_id AS "order_id!", id AS "id!", status AS "status!",
                    carrier_ref AS "carrier_ref?", tracking_number AS "tracking_number?",
                    reason AS "reason?", true AS "inserted!"
               FROM ins
             UNION ALL
             SELECT s.order_id, s.id, s.status, s.carrier_ref, s.tracking_number, s.reason, false
               FROM shipping.shipments s WHERE s.order_id = ANY($3)"#,
            &entries.ids,
            &entries.sagas,
            &entries.orders,
            &entries.statuses,
            &entries.addresses,
            &entries.lines,
            Utc::now(),
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let shipment = Shipment {
                    id: r.id,
                    status: r.status,
                    carrier_ref: r.carrier_ref,
                    tracking_number: r.tracking_number,
                    reason: r.reason,
                };
                (OrderId::from_uuid(r.order_id), shipment, r.inserted)
            })
            .collect())
    }

    async fn settle_rows(
        &self,
        settles: &[&Settle<Self>],
    ) -> Result<Vec<(OrderId, Shipment)>, sqlx::Error> {
        let entries = Entries::of(settles.iter().map(|s| (&s.claim.entry, s.claim.status)));
        let outcomes = Outcomes::of(settles.iter().map(|s| &s.outcome));
        let rows = sqlx::query!(
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
            &entries.ids,
            &entries.sagas,
            &entries.orders,
            &entries.statuses,
            &entries.addresses,
            &entries.lines,
            // Arrays that may hold NULLs: their type is said (see `Outcomes`).
            &outcomes.carrier_refs as &[Option<&str>],
            &outcomes.tracking_numbers as &[Option<&str>],
            &outcomes.reasons as &[Option<&str>],
            Utc::now(),
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let shipment = Shipment {
                    id: r.id,
                    status: r.status,
                    carrier_ref: r.carrier_ref,
                    tracking_number: r.tracking_number,
                    reason: r.reason,
                };
                (OrderId::from_uuid(r.order_id), shipment)
            })
            .collect())
    }

    async fn transition_rows(&self, ts: &[&Transition<Self>]) -> Result<Vec<Uuid>, sqlx::Error> {
        let ids: Vec<Uuid> = ts.iter().map(|t| t.id).collect();
        let from: Vec<String> = ts.iter().map(|t| t.from.to_owned()).collect();
        let to: Vec<String> = ts.iter().map(|t| t.to.to_owned()).collect();
        let outcomes = Outcomes::of(ts.iter().map(|t| &t.outcome));
        sqlx::query_scalar!(
            "UPDATE shipping.shipments s
                SET status = u.to_status, carrier_ref = coalesce(u.carrier_ref, s.carrier_ref),
                    tracking_number = coalesce(u.tracking_number, s.tracking_number),
                    reason = coalesce(u.reason, s.reason), updated_at = $7
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                 AS u(id, from_status, to_status, carrier_ref, tracking_number, reason)
              WHERE s.id = u.id AND s.status = u.from_status
             RETURNING s.id",
            &ids,
            &from,
            &to,
            &outcomes.carrier_refs as &[Option<&str>],
            &outcomes.tracking_numbers as &[Option<&str>],
            &outcomes.reasons as &[Option<&str>],
            Utc::now(),
        )
        .fetch_all(&self.pool)
        .await
    }

    async fn row(&self, order: &OrderId) -> Result<Option<Shipment>, sqlx::Error> {
        sqlx::query_as!(
            Shipment,
            "SELECT id, status, carrier_ref, tracking_number, reason FROM shipping.shipments WHERE order_id = $1",
            order.as_uuid(),
        )
        .fetch_optional(&self.pool)
        .await
    }

    async fn void(&self, key: &str) -> Result<Option<String>, CallError> {
        self.carrier.void_shipment(key).await
    }

    /// Cancel the shipment the carrier booked under a voided row's key.
    async fn undo(
        &self,
        _order: &OrderId,
        row: &Shipment,
        carrier_ref: &str,
    ) -> Result<Result<(), CallError>, Unavailable> {
        if let Err(e) = self.carrier.cancel(carrier_ref).await {
            return Ok(Err(e));
        }
        sqlx::query!(
            "UPDATE shipping.shipments SET status = 'cancelled', carrier_ref = $2, updated_at = $3 WHERE id = $1",
            row.id,
            carrier_ref,
            Utc::now(),
        )
        .execute(&self.pool)
        .await?;
        Ok(Ok(()))
    }
}

/// The carrier's idempotency key of an order's shipment.
fn key(order: OrderId) -> String {
    format!("shipment:{order}")
}

impl Shipping {
    pub fn new(pool: PgPool, carrier: Carrier, pending_after: Duration) -> Self {
        let p = pool.clone();
        let lookups = Batcher::spawn(256, move |o| {
            let p = p.clone();
            async move { lookup_many(&p, o).await }
        });
        Self {
            lookups,
            calls: Calls::new(Shipments { pool, carrier }, pending_after),
            callback_url: None,
        }
    }

    /// Hand the carrier `url` for its reports on the parcels it collects; without one, a
    /// pick-up request is answered as a retryable failure (this process takes no reports).
    pub fn with_callbacks(self, url: String) -> Self {
        Self {
            callback_url: Some(url),
            ..self
        }
    }

    /// The order a fulfilment's command acts for, if its saga is a fulfilment.
    async fn fulfilment_of(&self, cmd: &Command) -> Result<Option<(Uuid, Uuid)>, Unavailable> {
        Ok(sqlx::query!(
            "SELECT f.order_id, o.saga_id AS checkout FROM orders.fulfilments f
               JOIN orders.orders o ON o.id = f.order_id
              WHERE f.saga_id = $1",
            cmd.saga_id.as_uuid(),
        )
        .fetch_optional(&self.calls.service().pool)
        .await?
        .map(|r| (r.order_id, r.checkout)))
    }

    /// The checkout saga of the order a fulfilment's command names, once the command is found
    /// to come from that order's fulfilment ([`bus::Error::Poison`] if not).
    async fn fulfilled(&self, cmd: &Command, order: OrderId) -> Result<SagaId, bus::Error> {
        match self.fulfilment_of(cmd).await? {
            Some((of, checkout)) if of == order.as_uuid() => Ok(SagaId::from_uuid(checkout)),
            Some((of, _)) => Err(bus::Error::Poison(format!(
                "{} command names order {order}, but saga {} fulfils order {of}",
                cmd.action(),
                cmd.saga_id
            ))),
            None => Err(bus::Error::Poison(format!(
                "{} command for saga {}, which fulfils no order",
                cmd.action(),
                cmd.saga_id
            ))),
        }
    }

    /// Ask the carrier to collect the order's shipment `named` (booked by its checkout), once
    /// per shipment at the carrier; it reports back on [`Shipping::with_callbacks`]'s URL.
    async fn request_pickup(
        &self,
        shipment: Option<Shipment>,
        order: OrderId,
        named: Uuid,
    ) -> Result<ReplyOutcome, Unavailable> {
        let Some(shipment) = shipment.filter(|s| s.id == named) else {
            return Ok(refused(
                "unknown_shipment",
                format!("shipment {named} is not order {order}'s"),
            ));
        };
        let (Some(carrier_ref), "created") = (&shipment.carrier_ref, shipment.status.as_str())
        else {
            return Ok(refused(
                "shipment_not_booked",
                format!(
                    "shipment {named} is {}: there is nothing to collect",
                    shipment.status
                ),
            ));
        };
        let Some(url) = &self.callback_url else {
            return Ok(retryable(
                "this shipping process takes no carrier reports (callbacks.public_url)",
            ));
        };
        match self
            .calls
            .service()
            .carrier
            .request_pickup(carrier_ref, url)
            .await
        {
            Ok(tracking_number) => {
                sqlx::query!(
                    "UPDATE shipping.shipments SET pickup_requested_at = coalesce(pickup_requested_at, now())
                      WHERE id = $1",
                    shipment.id,
                )
                .execute(&self.calls.service().pool)
                .await?;
                Ok(ReplyOutcome::succeeded(
                    &shipping::Output::PickupRequested {
                        shipment_id: shipment.id,
                        tracking_number,
                    },
                ))
            }
            Err(CallError::Unavailable(why)) => Ok(retryable(why)),
            Err(CallError::Refused { code, message }) => Ok(refused(&code, message)),
        }
    }

    /// The order's shipment row, once the command is found to match the order of its saga;
    /// [`bus::Error::Poison`] when it does not.
    async fn checked(&self, cmd: &Command, order: OrderId) -> Result<Found, bus::Error> {
        let found = self.lookups.call((cmd.saga_id, order)).await?;
        orders::check(cmd.action(), cmd.saga_id, order, None, found.order.as_ref())
            .map_err(bus::Error::Poison)?;
        Ok(found)
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
        let key = key(order);
        let carrier = &self.calls.service().carrier;
        let call = async {
            let booked = carrier.ship(&key, &address.country);
            booked.await.map(|(carrier_ref, tracking)| ShipmentOutcome {
                carrier_ref: Some(carrier_ref),
                tracking_number: Some(tracking),
                reason: None,
            })
        };
        let entry = Entry::new(saga, order, Some(address), lines);
        self.calls.make(recorded, entry, call).await
    }

    /// Cancel the order's shipment (or leave a tombstone when there is none yet): the effect
    /// alone, without the check that the command matches its order ([`Handler::handle`] checks
    /// first).
    pub async fn cancel(&self, saga: SagaId, order: OrderId) -> Result<ReplyOutcome, Unavailable> {
        let done = ReplyOutcome::succeeded(&shipping::Output::ShipmentCancelled);
        let tombstone = Entry::new(saga, order, None, &[]);
        match self.calls.compensate(tombstone).await? {
            Compensation::Made(row) => {
                let carrier_ref = row.carrier_ref.clone().unwrap_or_default();
                match self.calls.service().carrier.cancel(&carrier_ref).await {
                    Ok(()) => {
                        let outcome = ShipmentOutcome {
                            reason: Some("cancelled by the saga".into()),
                            ..ShipmentOutcome::default()
                        };
                        self.calls
                            .transition(row.id, "created", "cancelled", outcome)
                            .await?;
                        Ok(done)
                    }
                    Err(CallError::Unavailable(why)) => Ok(retryable(why)),
                    // The carrier has it cancelled already.
                    Err(CallError::Refused { code, .. }) if code == "cancelled" => Ok(done),
                    Err(CallError::Refused { code, message }) => Ok(refused(&code, message)),
                }
            }
            Compensation::Changed => Ok(retryable(
                "the shipment changed while cancelling; try again",
            )),
            Compensation::Retry(why) => Ok(retryable(why)),
            // Nothing is booked: rejected, cancelled before, or voided (and what the carrier
            // had booked under the key is cancelled now).
            Compensation::Done => Ok(done),
        }
    }
}

fn rejected(row: &Shipment) -> ReplyOutcome {
    refused(
        "address_undeliverable",
        row.reason
            .clone()
            .unwrap_or_else(|| "the carrier refused the shipment".into()),
    )
}

fn created(row: &Shipment) -> ReplyOutcome {
    ReplyOutcome::succeeded(&shipping::Output::ShipmentCreated {
        shipment_id: row.id,
        tracking_number: row.tracking_number.clone().unwrap_or_default(),
    })
}
