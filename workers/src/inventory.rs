//! The inventory service (the Product aggregate's stock): reserves the lines of an order all
//! or nothing, commits a reservation when the order is sold (the stock leaves the books),
//! releases it when the order is undone, and expires reservations whose hold ran out.
//!
//! One row per order in `inventory.reservations` is both the reservation and the idempotency
//! record: a repeated reserve, commit or release answers from it and changes nothing. A release
//! that comes before its reserve leaves a `released` tombstone, so the late reserve does
//! nothing.
//!
//! Stock is sold only by a commit, in the transaction that checks it is there: an active
//! reservation is consumed; an expired one (its hold ran out and the sweeper put the stock back)
//! is consumed only if the stock is still on the shelf, and the commit is refused otherwise,
//! so that its saga undoes the order rather than ship stock another order bought. A release of
//! a committed reservation (the sale's answer was lost and the saga turned around) returns the
//! stock with a `restock` movement. Hence the invariant the checkout and the fulfilment rely
//! on: the units of completed orders never exceed the stock, each consumed from its own
//! reservation (ARCHITECTURE.md, "Stock").
//!
//! Every stock movement is published as a `product.StockUpdated` event, once the writer has its
//! subjects ([`Inventory::with_events`]): written to the services' outbox
//! ([`runtime::outbox`]) in the batch's transaction, so an event is published if and only if
//! its movement committed (any process's relay publishes it). The event carries the variant's
//! levels right after its movement, in the batch's order; its id is derived from the movement's
//! row id, so each movement is one event whatever happens.
//!
//! Every change goes through one writer task per process, which applies everything queued in
//! one transaction: a popular SKU's row is locked and written once per batch instead of once
//! per order (orders of a flash sale all want the same rows), and a batch costs a handful of
//! statements whatever its size. Rows are locked reservations first, then variants in SKU
//! order, so several processes never deadlock.
//!
//! A command acts only if the orchestrator could have sent it: the writer reads the orders of the
//! batch's sagas in one statement (by saga id, the view's key), and a command whose saga is not
//! an order, or that names another order ([`crate::orders::check_order`]), is poison: it holds
//! no stock and leaves no tombstone, and is dead-lettered. A release for a known saga whose
//! reserve never came still leaves its tombstone; a release for a confirmed order is refused
//! (its sale is final).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Duration, Utc};
use sagas::events::{self, DomainEvent, product};
use sagas::shop::{Line, OrderId, Sku, ids, inventory};
use sagas::wire::{Command, EventId, ReplyOutcome, SagaId, Subjects};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::bus::{self, Handler, Unavailable};
use crate::orders::{self, Order};

/// What the writer is asked to do.
#[derive(Debug, Clone)]
enum Op {
    Reserve {
        saga: SagaId,
        order: OrderId,
        /// The reservation's id, derived from the saga and the step.
        id: Uuid,
        lines: Vec<Line>,
        hold_seconds: u32,
    },
    Release {
        saga: SagaId,
        order: OrderId,
        /// The reservation the command names (older commands name none: the order's).
        named: Option<Uuid>,
        /// The id this saga's reservation has, or will have.
        own: Uuid,
    },
    /// The sale: the reserved stock leaves the books.
    Commit { saga: SagaId, order: OrderId },
    /// The fulfilment picks the units its checkout consumed (the reservation `reservation`).
    Pick {
        saga: SagaId,
        order: OrderId,
        reservation: Uuid,
    },
    /// The fulfilment was undone before the parcel left: the consumed units go back.
    Restock {
        saga: SagaId,
        order: OrderId,
        reservation: Uuid,
    },
    /// The hold of an active reservation ran out (checked again by the writer).
    Expire { order: OrderId },
}

impl Op {
    fn order(&self) -> OrderId {
        match self {
            Op::Reserve { order, .. }
            | Op::Release { order, .. }
            | Op::Commit { order, .. }
            | Op::Pick { order, .. }
            | Op::Restock { order, .. }
            | Op::Expire { order } => *order,
        }
    }
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<ReplyOutcome, bus::Error>>,
}

#[derive(Clone)]
pub struct Inventory {
    pool: PgPool,
    jobs: mpsc::Sender<Job>,
    /// The subjects the writer's `product.StockUpdated` events go to, once
    /// [`Inventory::with_events`] set them: shared with the writer task (spawned by
    /// [`Inventory::new`]), which reads it at every batch. Unset, no event is written.
    events: Arc<OnceLock<Subjects>>,
}

/// The checkout's reservation step, for the service's own API (tests drive it directly).
const RESERVE_STEP: &str = "reserve_stock";

fn refused(code: &str, reason: impl Into<String>) -> ReplyOutcome {
    ReplyOutcome::refused(code, reason)
}

fn reserved(id: Option<Uuid>, expires_at: DateTime<Utc>) -> ReplyOutcome {
    ReplyOutcome::succeeded(&inventory::Output::StockReserved {
        reservation_id: id,
        expires_at,
    })
}

fn released() -> ReplyOutcome {
    ReplyOutcome::succeeded(&inventory::Output::StockReleased)
}

fn committed() -> ReplyOutcome {
    ReplyOutcome::succeeded(&inventory::Output::StockCommitted)
}

fn picked() -> ReplyOutcome {
    ReplyOutcome::succeeded(&inventory::Output::OrderPicked)
}

fn restocked(lines: &[Line]) -> ReplyOutcome {
    let units = lines.iter().map(|l| i64::from(l.quantity.get())).sum();
    ReplyOutcome::succeeded(&inventory::Output::Restocked { units })
}

fn unknown_reservation(named: Uuid, order: OrderId) -> ReplyOutcome {
    refused(
        "unknown_reservation",
        format!("reservation {named} is not order {order}'s: nothing of it can be undone"),
    )
}

impl Handler for Inventory {
    async fn handle(&self, cmd: &Command) -> Result<ReplyOutcome, bus::Error> {
        let op = match bus::payload(cmd, inventory::SERVICE)? {
            inventory::Command::ReserveStock {
                order_id,
                lines,
                hold_seconds,
            } => Op::Reserve {
                saga: cmd.saga_id,
                order: order_id,
                id: ids::reservation(cmd.saga_id, &cmd.step),
                lines,
                hold_seconds,
            },
            inventory::Command::ReleaseStock {
                order_id,
                reservation_id,
            } => Op::Release {
                saga: cmd.saga_id,
                order: order_id,
                named: reservation_id,
                own: ids::reservation(cmd.saga_id, &cmd.step),
            },
            inventory::Command::CommitStock { order_id } => Op::Commit {
                saga: cmd.saga_id,
                order: order_id,
            },
            inventory::Command::PickOrder {
                order_id,
                reservation_id,
            } => Op::Pick {
                saga: cmd.saga_id,
                order: order_id,
                reservation: reservation_id,
            },
            inventory::Command::Restock {
                order_id,
                reservation_id,
            } => Op::Restock {
                saga: cmd.saga_id,
                order: order_id,
                reservation: reservation_id,
            },
        };
        self.submit(op).await
    }
}

/// A reservation row as the writer holds it during a batch.
#[derive(Debug, Clone)]
struct Held {
    /// The saga it was taken for (none for one taken through the Product service's own API).
    saga: Option<SagaId>,
    /// Its id (reservations made before ids were derived have none).
    id: Option<Uuid>,
    status: &'static str,
    lines: Vec<Line>,
    expires_at: DateTime<Utc>,
    reason: Option<String>,
    /// Not in the table yet.
    new: bool,
    changed: bool,
}

fn status_of(s: &str) -> &'static str {
    match s {
        "active" => "active",
        "released" => "released",
        "consumed" => "consumed",
        "expired" => "expired",
        "picked" => "picked",
        "restocked" => "restocked",
        _ => "rejected",
    }
}

/// One stock movement to write.
struct Movement {
    sku: String,
    /// The database's kind (`reserve`, `release`, `consume`, `restock`, `expire`), also the
    /// event's `movement`.
    kind: &'static str,
    quantity_delta: i32,
    reserved_delta: i32,
    order: OrderId,
    /// The variant's `(quantity, reserved)` right after this movement, in the batch's order
    /// (from the levels the batch started with); `None` for a SKU the batch holds no row of.
    after: Option<(i32, i32)>,
}

/// A variant's stock during a batch.
#[derive(Debug, Clone, Copy)]
struct Stock {
    quantity: i32,
    reserved: i32,
    /// The variant and its product are active: only then is stock reserved for an order.
    for_sale: bool,
    changed: bool,
}

/// The units of each SKU `lines` name (a SKU may be on several lines).
pub(crate) fn totals(lines: &[Line]) -> BTreeMap<String, i32> {
    let mut by_sku: BTreeMap<String, i32> = BTreeMap::new();
    for l in lines {
        *by_sku.entry(l.sku.as_str().to_owned()).or_default() += l.quantity.get() as i32;
    }
    by_sku
}

impl Inventory {
    /// Start the writer; it stops when every handle is dropped. It writes no event until
    /// [`Inventory::with_events`] is called.
    pub fn new(pool: PgPool) -> Self {
        let (jobs, rx) = mpsc::channel(4096);
        let events = Arc::new(OnceLock::new());
        tokio::spawn(writer(pool.clone(), rx, events.clone()));
        Self { pool, jobs, events }
    }

    /// From now on, write a `product.StockUpdated` event for every stock movement, on
    /// `subjects`, to the services' outbox (published by any relay on the same database).
    /// Call it right after [`Inventory::new`], before the first command: batches applied
    /// before it write no events. The subjects are set once for the writer and every handle of
    /// it: a second call keeps the first subjects.
    pub fn with_events(self, subjects: Subjects) -> Self {
        if let Err(other) = self.events.set(subjects)
            && self.events.get() != Some(&other)
        {
            tracing::warn!(
                kept = ?self.events.get().map(Subjects::prefix),
                ignored = other.prefix(),
                "the inventory's event subjects are set once; other subjects ignored"
            );
        }
        self
    }

    async fn submit(&self, op: Op) -> Result<ReplyOutcome, bus::Error> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| Unavailable("the inventory writer stopped".into()))?;
        rx.await
            .map_err(|_| Unavailable("the inventory writer stopped".into()))?
    }

    /// Submit an op of the service's own (an expiry): only commands are checked against their
    /// order, so it is never poison.
    async fn submit_own(&self, op: Op) -> Result<ReplyOutcome, Unavailable> {
        match self.submit(op).await {
            Ok(outcome) => Ok(outcome),
            Err(bus::Error::Unavailable(e)) => Err(e),
            Err(bus::Error::Poison(why)) => Err(Unavailable(why)),
        }
    }

    /// Reserve an order's lines for the checkout's `reserve_stock` step, if the saga is that
    /// order's ([`bus::Error::Poison`] if not).
    pub async fn reserve(
        &self,
        saga: SagaId,
        order: OrderId,
        lines: &[Line],
        hold_seconds: u32,
    ) -> Result<ReplyOutcome, bus::Error> {
        self.submit(Op::Reserve {
            saga,
            order,
            id: ids::reservation(saga, RESERVE_STEP),
            lines: lines.to_vec(),
            hold_seconds,
        })
        .await
    }

    /// Release the reservation `named` of an order (or leave a tombstone when there is none
    /// yet), if the saga is that order's ([`bus::Error::Poison`] if not); `None` names the
    /// order's, whatever its id.
    pub async fn release(
        &self,
        saga: SagaId,
        order: OrderId,
        named: Option<Uuid>,
    ) -> Result<ReplyOutcome, bus::Error> {
        self.submit(Op::Release {
            saga,
            order,
            named,
            own: ids::reservation(saga, RESERVE_STEP),
        })
        .await
    }

    /// Commit an order's reservation (the sale), if the saga is that order's
    /// ([`bus::Error::Poison`] if not).
    pub async fn commit(&self, saga: SagaId, order: OrderId) -> Result<ReplyOutcome, bus::Error> {
        self.submit(Op::Commit { saga, order }).await
    }

    /// Expire the reservations whose hold ran out, until `shutdown`.
    pub async fn expire_loop(
        &self,
        every: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        runtime::shutdown::every(every, &shutdown, || async {
            match self.expire_due(500).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(reservations = n, "expired reservations handled"),
                Err(e) => tracing::warn!(error = %e, "reservation expiry failed"),
            }
        })
        .await;
    }

    /// Release up to `limit` reservations past their expiry, with an `expire` stock movement.
    /// A saga that still needs its stock renews the reservation before its next step, or takes
    /// the stock again at its commit if nobody bought it meanwhile. Returns how many were due.
    /// One step of the sweeper, callable on its own.
    pub async fn expire_due(&self, limit: i64) -> Result<usize, Unavailable> {
        let due = sqlx::query_scalar!(
            "SELECT order_id FROM inventory.reservations
              WHERE status = 'active' AND expires_at <= now() ORDER BY expires_at LIMIT $1",
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        let n = due.len();
        let done = futures::future::join_all(due.into_iter().map(|o| {
            self.submit_own(Op::Expire {
                order: OrderId::from_uuid(o),
            })
        }))
        .await;
        done.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(n)
    }
}

/// The writer: apply everything queued in one transaction (with its events, once `publish_on`
/// is set).
async fn writer(pool: PgPool, mut rx: mpsc::Receiver<Job>, publish_on: Arc<OnceLock<Subjects>>) {
    let mut jobs = Vec::with_capacity(512);
    while rx.recv_many(&mut jobs, 512).await > 0 {
        let batch = std::mem::take(&mut jobs);
        let ops: Vec<Op> = batch.iter().map(|j| j.op.clone()).collect();
        match apply(&pool, &ops, publish_on.get()).await {
            Ok(outcomes) => {
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = job.reply.send(outcome.map_err(bus::Error::Poison));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, ops = batch.len(), "inventory batch failed");
                for job in batch {
                    let _ = job
                        .reply
                        .send(Err(Unavailable(format!("database: {e}")).into()));
                }
            }
        }
    }
}

/// The reason a command is poison, if it is: a checkout's command whose saga is not an order
/// (`by_saga`: the orders found, by saga id), a fulfilment's whose saga is not an order's
/// fulfilment (`fulfilling`: the orders of the fulfilments found, by saga id), or one that
/// names another order.
fn poison(
    op: &Op,
    by_saga: &HashMap<Uuid, Order>,
    fulfilling: &HashMap<Uuid, Order>,
) -> Option<String> {
    let (action, saga, order, of) = match op {
        Op::Reserve { saga, order, .. } => ("reserve_stock", saga, order, by_saga),
        Op::Release { saga, order, .. } => ("release_stock", saga, order, by_saga),
        Op::Commit { saga, order } => ("commit_stock", saga, order, by_saga),
        Op::Pick { saga, order, .. } => ("pick_order", saga, order, fulfilling),
        Op::Restock { saga, order, .. } => ("restock", saga, order, fulfilling),
        Op::Expire { .. } => return None,
    };
    orders::check_order(action, *saga, *order, of.get(&saga.as_uuid())).err()
}

/// Apply `ops` in order, in one transaction; the outcome of each, or the reason it is poison
/// (then it did nothing). With `publish_on`, each movement's `product.StockUpdated` is written to
/// the outbox in the same transaction.
async fn apply(
    pool: &PgPool,
    ops: &[Op],
    publish_on: Option<&Subjects>,
) -> Result<Vec<Result<ReplyOutcome, String>>, sqlx::Error> {
    let now = Utc::now();
    let mut tx = pool.begin().await?;
    // Lock the reservations the batch touches.
    let orders: Vec<Uuid> = ops
        .iter()
        .map(|o| o.order().as_uuid())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut held: HashMap<OrderId, Held> = HashMap::new();
    for r in sqlx::query!(
        "SELECT order_id, saga_id, status, lines, expires_at, reason, id FROM inventory.reservations
          WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
        &orders,
    )
    .fetch_all(&mut *tx)
    .await?
    {
        held.insert(
            OrderId::from_uuid(r.order_id),
            Held {
                saga: r.saga_id.map(SagaId::from_uuid),
                id: r.id,
                status: status_of(&r.status),
                lines: serde_json::from_value(r.lines).unwrap_or_default(),
                expires_at: r.expires_at,
                reason: r.reason,
                new: false,
                changed: false,
            },
        );
    }
    // The orders of the commands' sagas, asked of the Order service's view by saga id (the
    // view's key, an index lookup whatever its size), in one statement: a command must be for
    // an order of its saga's, and a release must not undo a confirmed order's sale.
    let sagas: Vec<Uuid> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Reserve { saga, .. } | Op::Release { saga, .. } | Op::Commit { saga, .. } => {
                Some(saga.as_uuid())
            }
            Op::Pick { .. } | Op::Restock { .. } | Op::Expire { .. } => None,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let fulfilments: Vec<Uuid> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Pick { saga, .. } | Op::Restock { saga, .. } => Some(saga.as_uuid()),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // The fulfilments' orders, when the batch has their commands (most batches have none).
    let fulfilling: HashMap<Uuid, Order> = if fulfilments.is_empty() {
        HashMap::new()
    } else {
        sqlx::query!(
            "SELECT f.saga_id, f.order_id, o.status FROM orders.fulfilments f
               JOIN orders.orders o ON o.id = f.order_id
              WHERE f.saga_id = ANY($1)",
            &fulfilments,
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.saga_id, Order::new(r.saga_id, Some(r.order_id), r.status)))
        .collect()
    };
    let by_saga: HashMap<Uuid, Order> = if sagas.is_empty() {
        HashMap::new()
    } else {
        sqlx::query!(
            "SELECT o.saga_id, o.id, o.status FROM orders.orders o WHERE o.saga_id = ANY($1)",
            &sagas,
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.saga_id, Order::new(r.saga_id, Some(r.id), r.status)))
        .collect()
    };
    let confirmed: BTreeSet<Uuid> = by_saga
        .values()
        .filter(|o| o.status == "confirmed")
        .filter_map(|o| o.id)
        .collect();
    let poisoned: Vec<Option<String>> = ops
        .iter()
        .map(|op| poison(op, &by_saga, &fulfilling))
        .collect();
    // Lock every variant any of them touches, in SKU order (not those of a poison command).
    let mut skus: BTreeSet<String> = BTreeSet::new();
    for (op, poisoned) in ops.iter().zip(&poisoned) {
        if let Op::Reserve { lines, .. } = op
            && poisoned.is_none()
        {
            skus.extend(lines.iter().map(|l| l.sku.as_str().to_owned()));
        }
    }
    for h in held.values() {
        skus.extend(h.lines.iter().map(|l| l.sku.as_str().to_owned()));
    }
    let skus: Vec<String> = skus.into_iter().collect();
    let mut stock: HashMap<String, Stock> = HashMap::new();
    for r in sqlx::query!(
        r#"SELECT v.sku, v.quantity, v.reserved,
                  v.status = 'active' AND p.status = 'active' AS "for_sale!"
             FROM inventory.variants v JOIN inventory.products p ON p.id = v.product_id
            WHERE v.sku = ANY($1) ORDER BY v.sku FOR UPDATE OF v"#,
        &skus,
    )
    .fetch_all(&mut *tx)
    .await?
    {
        stock.insert(
            r.sku,
            Stock {
                quantity: r.quantity,
                reserved: r.reserved,
                for_sale: r.for_sale,
                changed: false,
            },
        );
    }

    let mut movements: Vec<Movement> = Vec::new();
    let mut outcomes = Vec::with_capacity(ops.len());
    for (op, poisoned) in ops.iter().zip(poisoned) {
        if let Some(why) = poisoned {
            outcomes.push(Err(why));
            continue;
        }
        let outcome = match op {
            Op::Reserve {
                saga,
                order,
                id,
                lines,
                hold_seconds,
            } => {
                let expires_at = now + Duration::seconds(i64::from(*hold_seconds));
                match held.get_mut(order) {
                    // Still held: a renewal holds it longer; a repeat answers the same.
                    Some(h) if h.status == "active" => {
                        if expires_at > h.expires_at {
                            h.expires_at = expires_at;
                            h.changed = true;
                        }
                        reserved(h.id, h.expires_at)
                    }
                    // Sold (and perhaps picked since): a late or repeated reserve answers as
                    // it did, and takes nothing.
                    Some(h) if matches!(h.status, "consumed" | "picked") => {
                        reserved(h.id, h.expires_at)
                    }
                    Some(h) if h.status == "restocked" => {
                        refused("cancelled", "the order's units were restocked")
                    }
                    Some(h) if h.status == "rejected" => refused(
                        "out_of_stock",
                        h.reason.clone().unwrap_or_else(|| "out of stock".into()),
                    ),
                    Some(h) if h.status == "released" => {
                        refused("cancelled", "the reservation was released")
                    }
                    // Expired (a renewal) or new: take the stock if it is there.
                    existing => {
                        let short = take(&mut stock, lines, &mut movements, *order);
                        let h = existing.map(|h| h.clone()).unwrap_or(Held {
                            saga: Some(*saga),
                            id: Some(*id),
                            status: "active",
                            lines: lines.clone(),
                            expires_at,
                            reason: None,
                            new: true,
                            changed: true,
                        });
                        let outcome = match &short {
                            None => reserved(h.id, expires_at),
                            Some(why) => refused("out_of_stock", why.clone()),
                        };
                        let renewal = !h.new;
                        held.insert(
                            *order,
                            Held {
                                status: match (&short, renewal) {
                                    (None, _) => "active",
                                    (Some(_), false) => "rejected",
                                    (Some(_), true) => "expired",
                                },
                                expires_at: if short.is_none() {
                                    expires_at
                                } else {
                                    h.expires_at
                                },
                                reason: match (&short, renewal) {
                                    (None, true) => Some("renewed".into()),
                                    (None, false) => None,
                                    (Some(why), _) => Some(why.clone()),
                                },
                                lines: lines.clone(),
                                changed: true,
                                ..h
                            },
                        );
                        outcome
                    }
                }
            }
            Op::Release {
                saga,
                order,
                named,
                own,
            } => match held.get_mut(order) {
                // It names another reservation than the order's: nothing of it is here.
                Some(Held { id: Some(id), .. }) if named.is_some_and(|n| n != *id) => {
                    unknown_reservation(named.unwrap_or_default(), *order)
                }
                None if named.is_some_and(|n| n != *own) => {
                    unknown_reservation(named.unwrap_or_default(), *order)
                }
                // A release before its reserve leaves a tombstone.
                None => {
                    held.insert(
                        *order,
                        Held {
                            saga: Some(*saga),
                            id: Some(*own),
                            status: "released",
                            lines: Vec::new(),
                            expires_at: now,
                            reason: Some("released before it was made".into()),
                            new: true,
                            changed: true,
                        },
                    );
                    released()
                }
                Some(h) if h.status == "active" => {
                    adjust(
                        &mut stock,
                        &h.lines,
                        0,
                        -1,
                        "release",
                        *order,
                        &mut movements,
                    );
                    h.status = "released";
                    h.reason = Some("released by the saga".into());
                    h.changed = true;
                    released()
                }
                // The order is confirmed: its sale is final (only a stray release gets here);
                // its fulfilment restocks it if it is undone.
                Some(h)
                    if matches!(h.status, "consumed" | "picked" | "restocked")
                        && confirmed.contains(&order.as_uuid()) =>
                {
                    refused(
                        "already_consumed",
                        "the order was confirmed and its stock consumed",
                    )
                }
                // Committed, but the order did not complete (the commit's answer was lost and
                // the saga turned around): the stock goes back on the shelf.
                Some(h) if h.status == "consumed" => {
                    adjust(
                        &mut stock,
                        &h.lines,
                        1,
                        0,
                        "restock",
                        *order,
                        &mut movements,
                    );
                    h.status = "released";
                    h.reason = Some("released after it was committed: the order was undone".into());
                    h.changed = true;
                    released()
                }
                // Nothing is held; an expired one becomes released, so a late renewal does
                // nothing.
                Some(h) => {
                    if h.status == "expired" {
                        h.status = "released";
                        h.reason = Some("released after it expired".into());
                        h.changed = true;
                    }
                    released()
                }
            },
            Op::Commit { order, .. } => commit(&mut held, &mut stock, &mut movements, *order),
            Op::Pick {
                order, reservation, ..
            } => match held.get_mut(order) {
                Some(h) if h.id == Some(*reservation) => match h.status {
                    "consumed" => {
                        h.status = "picked";
                        h.reason = Some("picked and packed".into());
                        h.changed = true;
                        picked()
                    }
                    "picked" => picked(),
                    "restocked" => refused("cancelled", "the order's units were restocked"),
                    other => refused(
                        "not_sold",
                        format!("the order's reservation is {other}: no stock was sold to pick"),
                    ),
                },
                _ => unknown_reservation(*reservation, *order),
            },
            Op::Restock {
                order, reservation, ..
            } => match held.get_mut(order) {
                Some(h) if h.id == Some(*reservation) => match h.status {
                    "consumed" | "picked" => {
                        adjust(
                            &mut stock,
                            &h.lines,
                            1,
                            0,
                            "restock",
                            *order,
                            &mut movements,
                        );
                        h.status = "restocked";
                        h.reason = Some("restocked: the fulfilment was undone".into());
                        h.changed = true;
                        restocked(&h.lines)
                    }
                    "restocked" => restocked(&h.lines),
                    // Nothing was sold: nothing to put back.
                    _ => ReplyOutcome::succeeded(&inventory::Output::Restocked { units: 0 }),
                },
                _ => unknown_reservation(*reservation, *order),
            },
            Op::Expire { order } => {
                if let Some(h) = held.get_mut(order)
                    && h.status == "active"
                    && h.expires_at <= now
                {
                    adjust(
                        &mut stock,
                        &h.lines,
                        0,
                        -1,
                        "expire",
                        *order,
                        &mut movements,
                    );
                    h.status = "expired";
                    h.reason = Some("the hold ran out".into());
                    h.changed = true;
                }
                released()
            }
        };
        outcomes.push(Ok(outcome));
    }
    write(&mut tx, &held, &stock, &movements, now, publish_on).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// Take the stock of `lines` (all or nothing). `Some(reason)` when some is missing.
fn take(
    stock: &mut HashMap<String, Stock>,
    lines: &[Line],
    movements: &mut Vec<Movement>,
    order: OrderId,
) -> Option<String> {
    let wanted = totals(lines);
    let mut short = Vec::new();
    for (sku, qty) in &wanted {
        match stock.get(sku) {
            None => short.push(format!("{sku} is not in the catalogue")),
            Some(s) if !s.for_sale => short.push(format!("{sku} is not for sale")),
            Some(s) if s.quantity - s.reserved < *qty => short.push(format!(
                "{sku}: {} available, {qty} asked",
                s.quantity - s.reserved
            )),
            Some(_) => {}
        }
    }
    if !short.is_empty() {
        return Some(format!("cannot reserve: {}", short.join("; ")));
    }
    adjust(stock, lines, 0, 1, "reserve", order, movements);
    None
}

/// Change quantity and reserved by `sign * q` for each line, and audit it.
fn adjust(
    stock: &mut HashMap<String, Stock>,
    lines: &[Line],
    quantity_sign: i32,
    reserved_sign: i32,
    kind: &'static str,
    order: OrderId,
    movements: &mut Vec<Movement>,
) {
    for (sku, q) in totals(lines) {
        let after = stock.get_mut(&sku).map(|s| {
            s.quantity += quantity_sign * q;
            s.reserved += reserved_sign * q;
            s.changed = true;
            (s.quantity, s.reserved)
        });
        movements.push(Movement {
            sku,
            kind,
            quantity_delta: quantity_sign * q,
            reserved_delta: reserved_sign * q,
            order,
            after,
        });
    }
}

/// The sale of `order`'s reservation: consume it, if its stock is still the order's. The
/// answer for the saga: committed, or refused (permanently) when the stock is gone.
fn commit(
    held: &mut HashMap<OrderId, Held>,
    stock: &mut HashMap<String, Stock>,
    movements: &mut Vec<Movement>,
    order: OrderId,
) -> ReplyOutcome {
    let Some(h) = held.get_mut(&order) else {
        return refused("no_reservation", "the order holds no reservation");
    };
    match h.status {
        "active" => {
            adjust(stock, &h.lines, -1, -1, "consume", order, movements);
            h.reason = Some("sold".into());
        }
        "expired" => {
            // The hold ran out and the sweeper put the stock back on the shelf: take it if it
            // is still there, all or nothing, else another order bought it.
            let wanted = totals(&h.lines);
            let short: Vec<String> = wanted
                .iter()
                .filter_map(|(sku, q)| {
                    let available = stock.get(sku).map_or(0, |s| s.quantity - s.reserved);
                    (available < *q).then(|| format!("{sku}: {available} available, {q} needed"))
                })
                .collect();
            if !short.is_empty() {
                return refused(
                    "stock_gone",
                    format!(
                        "the reservation ran out and its stock was sold meanwhile ({})",
                        short.join("; ")
                    ),
                );
            }
            adjust(stock, &h.lines, -1, 0, "consume", order, movements);
            h.reason = Some("sold after its hold ran out; the stock was still there".into());
        }
        "consumed" | "picked" => return committed(),
        "released" | "restocked" => {
            return refused("cancelled", "the reservation was released");
        }
        _ => {
            return refused(
                "out_of_stock",
                h.reason.clone().unwrap_or_else(|| "out of stock".into()),
            );
        }
    }
    h.status = "consumed";
    h.changed = true;
    committed()
}

/// Write what the batch changed: a statement per table (and one for the events, with
/// `publish_on`).
async fn write(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    held: &HashMap<OrderId, Held>,
    stock: &HashMap<String, Stock>,
    movements: &[Movement],
    now: DateTime<Utc>,
    publish_on: Option<&Subjects>,
) -> Result<(), sqlx::Error> {
    // New rows: another process may have inserted the same order since we looked (a command
    // delivered twice at once); then the batch is rolled back and retried.
    let fresh: Vec<(&OrderId, &Held)> = held.iter().filter(|(_, h)| h.new).collect();
    if !fresh.is_empty() {
        let orders: Vec<Uuid> = fresh.iter().map(|(o, _)| o.as_uuid()).collect();
        let sagas: Vec<Option<Uuid>> = fresh
            .iter()
            .map(|(_, h)| h.saga.map(|s| s.as_uuid()))
            .collect();
        let statuses: Vec<String> = fresh.iter().map(|(_, h)| h.status.to_owned()).collect();
        let lines: Vec<String> = fresh
            .iter()
            .map(|(_, h)| serde_json::to_string(&h.lines).expect("lines serialize"))
            .collect();
        let expires: Vec<DateTime<Utc>> = fresh.iter().map(|(_, h)| h.expires_at).collect();
        let reasons: Vec<Option<&str>> = fresh.iter().map(|(_, h)| h.reason.as_deref()).collect();
        let ids: Vec<Option<Uuid>> = fresh.iter().map(|(_, h)| h.id).collect();
        let inserted = sqlx::query!(
            "INSERT INTO inventory.reservations (order_id, saga_id, status, lines, expires_at, reason, created_at, updated_at, id)
             SELECT u.order_id, u.saga_id, u.status, u.lines::jsonb, u.expires_at, u.reason, $7, $7, u.id
               FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $8::uuid[])
                 AS u(order_id, saga_id, status, lines, expires_at, reason, id)
             ON CONFLICT (order_id) DO NOTHING",
            &orders,
            &sagas as &[Option<Uuid>],
            &statuses,
            &lines,
            &expires,
            // Arrays that may hold NULLs: the macros check an array parameter against a slice
            // of non-null values (`&[String]`, `&[Uuid]`), so these are bound with their type
            // said (`as`), which skips that check; PostgreSQL takes the NULLs as they are.
            &reasons as &[Option<&str>],
            now,
            &ids as &[Option<Uuid>],
        )
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if inserted as usize != fresh.len() {
            return Err(sqlx::Error::Protocol(
                "a reservation was created concurrently; the batch is retried".into(),
            ));
        }
    }
    let changed: Vec<(&OrderId, &Held)> =
        held.iter().filter(|(_, h)| h.changed && !h.new).collect();
    if !changed.is_empty() {
        let orders: Vec<Uuid> = changed.iter().map(|(o, _)| o.as_uuid()).collect();
        let statuses: Vec<String> = changed.iter().map(|(_, h)| h.status.to_owned()).collect();
        let expires: Vec<DateTime<Utc>> = changed.iter().map(|(_, h)| h.expires_at).collect();
        let reasons: Vec<Option<&str>> = changed.iter().map(|(_, h)| h.reason.as_deref()).collect();
        sqlx::query!(
            "UPDATE inventory.reservations r
                SET status = u.status, expires_at = u.expires_at, reason = u.reason, updated_at = $5
               FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::text[]) AS u(order_id, status, expires_at, reason)
              WHERE r.order_id = u.order_id",
            &orders,
            &statuses,
            &expires,
            &reasons as &[Option<&str>],
            now,
        )
        .execute(&mut **tx)
        .await?;
    }
    let variants: Vec<(&String, &Stock)> = stock.iter().filter(|(_, s)| s.changed).collect();
    if !variants.is_empty() {
        let skus: Vec<String> = variants.iter().map(|(k, _)| (*k).clone()).collect();
        let quantities: Vec<i32> = variants.iter().map(|(_, s)| s.quantity).collect();
        let reserved: Vec<i32> = variants.iter().map(|(_, s)| s.reserved).collect();
        sqlx::query!(
            "UPDATE inventory.variants v SET quantity = u.quantity, reserved = u.reserved, updated_at = $4
               FROM unnest($1::text[], $2::int4[], $3::int4[]) AS u(sku, quantity, reserved)
              WHERE v.sku = u.sku",
            &skus,
            &quantities,
            &reserved,
            now,
        )
        .execute(&mut **tx)
        .await?;
    }
    if !movements.is_empty() {
        let skus: Vec<String> = movements.iter().map(|m| m.sku.clone()).collect();
        let kinds: Vec<String> = movements.iter().map(|m| m.kind.to_owned()).collect();
        let quantities: Vec<i32> = movements.iter().map(|m| m.quantity_delta).collect();
        let reserved: Vec<i32> = movements.iter().map(|m| m.reserved_delta).collect();
        let orders: Vec<Uuid> = movements.iter().map(|m| m.order.as_uuid()).collect();
        // The rows are inserted in the order of `movements` (the subquery's ORDER BY keeps the
        // subquery from being flattened, so the identity is drawn row by row in that order),
        // and the identity only grows: the ids sorted are the ids of `movements`, in order.
        let mut ids: Vec<i64> = sqlx::query_scalar!(
            "INSERT INTO inventory.stock_movements (sku, kind, quantity_delta, reserved_delta, order_id, at)
             SELECT u.sku, u.kind, u.qd, u.rd, u.order_id, $6
               FROM unnest($1::text[], $2::text[], $3::int4[], $4::int4[], $5::uuid[])
                    WITH ORDINALITY AS u(sku, kind, qd, rd, order_id, n)
              ORDER BY u.n
             RETURNING id",
            &skus,
            &kinds,
            &quantities,
            &reserved,
            &orders,
            now,
        )
        .fetch_all(&mut **tx)
        .await?;
        ids.sort_unstable();
        if ids.len() != movements.len() {
            return Err(sqlx::Error::Protocol(format!(
                "{} stock movements written, {} ids returned",
                movements.len(),
                ids.len()
            )));
        }
        if let Some(subjects) = publish_on {
            write_events(tx, subjects, movements, &ids, now).await?;
        }
    }
    Ok(())
}

/// The `product.StockUpdated` event of each movement (`ids`: their row ids, in the same
/// order), written to the services' outbox and to the product's history
/// (`inventory.domain_events`), a statement each: a batch costs a handful of
/// statements whatever its size, events included. The rows are those
/// [`runtime::outbox::write`] writes, one by one (the same subject, payload and correlation id;
/// an id written before changes nothing), and are inserted in the order of the movements, which
/// the relay publishes them in.
///
/// An event's id is derived from its movement's row id: one event per movement. Its correlation
/// id is `inventory-<order id>`, the order the movement is for: the commands the writer batches
/// carry no correlation id of their callers. It happened at the batch's time (`now`, also the
/// movement's `at`).
async fn write_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    subjects: &Subjects,
    movements: &[Movement],
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let n = movements.len();
    let (mut msg_ids, mut subject, mut correlation, mut payloads) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut skus, mut bodies) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (m, id) in movements.iter().zip(ids) {
        // A SKU the batch holds no row of (not in the catalogue any more): no levels to tell.
        let (Some((quantity, reserved)), Ok(sku)) = (m.after, Sku::parse(&m.sku)) else {
            tracing::warn!(sku = %m.sku, movement = id, "a stock movement of an unknown variant: no event");
            continue;
        };
        let event = product::StockUpdated {
            sku,
            quantity: quantity.into(),
            reserved: reserved.into(),
            available: (quantity - reserved).into(),
            movement: m.kind.to_owned(),
            order_id: Some(m.order),
        };
        let cause = Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("stock-movement/{id}").as_bytes(),
        );
        let correlation_id = format!("inventory-{}", m.order);
        let event = sagas::wire::Event {
            correlation_id: Some(correlation_id.clone()),
            ..events::envelope(
                &event,
                EventId::derive_from(cause, product::StockUpdated::NAME),
                now,
            )
        };
        msg_ids.push(event.id.to_string());
        skus.push(m.sku.clone());
        bodies.push(serde_json::to_string(&event.body).expect("events serialize"));
        subject.push(subjects.event(&event));
        payloads.push(serde_json::to_string(&event).expect("events serialize"));
        correlation.push(correlation_id);
    }
    if msg_ids.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "INSERT INTO events.outbox (msg_id, subject, correlation_id, payload)
         SELECT u.msg_id, u.subject, u.correlation_id, u.payload::json
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                WITH ORDINALITY AS u(msg_id, subject, correlation_id, payload, n)
          ORDER BY u.n
         ON CONFLICT (msg_id) DO NOTHING",
        &msg_ids,
        &subject,
        &correlation,
        &payloads,
    )
    .execute(&mut **tx)
    .await?;
    // And in the product's history, as every change of the aggregate records its events (at
    // the product's version: reservations do not move it).
    sqlx::query!(
        "INSERT INTO inventory.domain_events
                (id, aggregate, aggregate_id, version, event_type, payload, correlation_id, at)
         SELECT u.msg_id::uuid, 'product', v.product_id, p.version, 'StockUpdated',
                u.body::jsonb, u.correlation_id, $5
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                AS u(msg_id, sku, correlation_id, body)
           JOIN inventory.variants v ON v.sku = u.sku
           JOIN inventory.products p ON p.id = v.product_id
         ON CONFLICT (id) DO NOTHING",
        &msg_ids,
        &skus,
        &correlation,
        &bodies,
        now,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}
