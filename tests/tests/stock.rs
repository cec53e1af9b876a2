//! Stock is never sold twice. A reservation is a hold with an expiry; whatever holds a saga up
//! (a stalled step, a worker or an orchestrator paused, a breaker open past the hold), the
//! units of completed orders never exceed the stock, each completed order's units leave the
//! stock through its own reservation, and an order whose stock went to another is undone,
//! its charge refunded and its shipment cancelled (`App::assert_invariants` checks all of it).

use std::time::{Duration, Instant};

use e2e::{App, Options, order, place_many};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sagas::shop::{Line, OrderId, Quantity, Sku};
use sagas::wire::{ReplyOutcome, SagaId};
use serde_json::{Value, json};
use workers::inventory::Inventory;

const WITHIN: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(240);

/// `PUT /breakers/{step}`.
async fn force(app: &App, step: &str, force: Value) {
    let r = app
        .http
        .put(format!("{}/breakers/{step}", app.base))
        .json(&json!({"force": force, "reason": "test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "force {step} {force}");
}

/// Wait until `sql` (one bigint column) is at least `n`.
async fn at_least(app: &App, sql: &str, n: i64) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let got = app.count(sql).await;
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{sql}` is {got}, expected at least {n}; logs in {}",
            app.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn order_of(saga: &Value) -> String {
    saga["data"]["order_id"].as_str().unwrap().to_owned()
}

/// The short hold of these tests, and policies short enough for it (the orchestrator refuses a
/// hold its steps could outlast).
fn short_hold(hold_seconds: u32, step_deadline_ms: u32) -> Options {
    let mut o = Options::default().orchestrator(
        "SAGA_CHECKOUT__RESERVATION_HOLD_SECONDS",
        &hold_seconds.to_string(),
    );
    for step in [
        "RESERVE_STOCK",
        "CHARGE_PAYMENT",
        "CREATE_SHIPMENT",
        "COMMIT_STOCK",
    ] {
        for phase in ["FORWARD", "COMPENSATION"] {
            o = o
                .orchestrator(
                    &format!("SAGA_CHECKOUT__POLICIES__{step}__{phase}__DEADLINE_MS"),
                    &step_deadline_ms.to_string(),
                )
                .orchestrator(
                    &format!("SAGA_CHECKOUT__POLICIES__{step}__{phase}__BACKOFF_MAX_MS"),
                    "1000",
                );
        }
    }
    o.worker_env.push((
        "SAGA_INVENTORY__EXPIRY_SWEEP_INTERVAL_MS".into(),
        "100".into(),
    ));
    o
}

#[tokio::test]
async fn the_unit_of_an_order_held_up_past_its_hold_goes_to_one_order_only() {
    // One unit (SCARCE holds two; each order takes both), an 8 s hold, and the shipping
    // worker down. Order A reserves and pays; its booking waits in the queue. A keeps renewing
    // its hold before each retry, so to let the hold run out the operator opens the shipment's
    // breaker (a carrier outage would, after a few failures from several sagas): A parks, its
    // hold runs out and the sweeper puts the stock back. Order B reserves it, pays, and parks
    // too. The worker comes back and books A's waiting shipment; the breaker is handed back.
    let mut options = short_hold(8, 2500)
        .orchestrator(
            "SAGA_CHECKOUT__POLICIES__CREATE_SHIPMENT__FORWARD__DEADLINE_MS",
            "500",
        )
        .orchestrator(
            "SAGA_CHECKOUT__POLICIES__CREATE_SHIPMENT__FORWARD__BACKOFF_INITIAL_MS",
            "2500",
        )
        .orchestrator(
            "SAGA_CHECKOUT__POLICIES__CREATE_SHIPMENT__FORWARD__BACKOFF_MAX_MS",
            "3000",
        );
    options.workers.retain(|w| *w != "shipping");
    let mut app = App::spawn_with(options).await;
    let a = app.place(&order(&[("SCARCE", 2)], "tok_visa")).await;
    at_least(
        &app,
        &format!(
            "SELECT count(*) FROM orchestrator.sagas WHERE id = '{a}'
                AND snapshot -> 'steps' -> 2 ->> 'status' IN ('running', 'retrying')"
        ),
        1,
    )
    .await;
    force(&app, "create_shipment", json!("open")).await;
    app.wait_for(
        &format!("SELECT count(*) FROM orchestrator.sagas WHERE id = '{a}' AND parked_on = 'create_shipment'"),
        1,
        WITHIN,
    )
    .await;
    let order_a = order_of(&app.saga(&a).await);
    app.wait_for(
        &format!("SELECT count(*) FROM inventory.reservations WHERE order_id = '{order_a}' AND status = 'expired'"),
        1,
        WITHIN,
    )
    .await;
    let b = app.place(&order(&[("SCARCE", 2)], "tok_visa")).await;
    app.wait_for(
        &format!("SELECT count(*) FROM orchestrator.sagas WHERE id = '{b}' AND parked_on = 'create_shipment'"),
        1,
        WITHIN,
    )
    .await;
    app.start("shipping");
    // A's booking, sent before the outage, goes through now (its answer comes too late).
    app.wait_for(
        &format!("SELECT count(*) FROM shipping.shipments WHERE order_id = '{order_a}' AND status = 'created'"),
        1,
        WITHIN,
    )
    .await;
    force(&app, "create_shipment", Value::Null).await;

    // At most one of the two completes: B, which holds the stock; A's renewal finds none and
    // A is undone: its shipment cancelled, its charge refunded.
    let saga_a = app.wait_terminal(&a, WITHIN).await;
    let saga_b = app.wait_terminal(&b, WITHIN).await;
    assert_eq!(saga_b["status"], "completed", "{saga_b:#}");
    assert_eq!(saga_a["status"], "compensated", "{saga_a:#}");
    let steps_a: Vec<(&str, &str)> = saga_a["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps_a,
        [
            ("reserve_stock", "rejected"),
            ("charge_payment", "compensated"),
            ("create_shipment", "compensated"),
            ("commit_stock", "pending")
        ],
        "{saga_a:#}"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM shipping.shipments WHERE order_id = '{order_a}' AND status = 'cancelled'"
        ))
        .await,
        1,
        "A's shipment was booked, then cancelled"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM payments.charges WHERE saga_id = '{a}' AND status = 'refunded'"
        ))
        .await,
        1,
        "A's charge was refunded"
    );
    let ledger = app.ledger().await;
    let cancelled: Vec<&Value> = ledger["shipments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["idempotency_key"] == format!("shipment:{order_a}"))
        .collect();
    assert_eq!(cancelled.len(), 1, "{ledger}");
    assert_eq!(cancelled[0]["cancelled"], true, "{ledger}");
    let order_b = order_of(&saga_b);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM inventory.reservations WHERE order_id = '{order_b}' AND status = 'consumed'"
        ))
        .await,
        1
    );
    // Stock, reservations, movements, payments and the simulator's ledger agree.
    app.assert_invariants(2, SETTLE).await;
}

#[tokio::test]
async fn a_saga_parked_past_its_hold_renews_its_reservation_when_it_resumes() {
    let app = App::spawn_with(short_hold(6, 2000)).await;
    force(&app, "create_shipment", json!("open")).await;
    let id = app.place(&order(&[("SCARCE", 2)], "tok_visa")).await;
    app.wait_for(
        "SELECT count(*) FROM inventory.reservations WHERE status = 'expired'",
        1,
        WITHIN,
    )
    .await;
    // The sweeper put the stock back, with an audited movement.
    assert_eq!(
        app.count("SELECT reserved::bigint FROM inventory.variants WHERE sku = 'SCARCE'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.stock_movements WHERE kind = 'expire'")
            .await,
        1
    );
    // Nobody took it: when the saga resumes it reserves it again, then ships and sells it.
    force(&app, "create_shipment", Value::Null).await;
    let saga = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(saga["status"], "completed", "{saga:#}");
    assert_eq!(saga["steps"][0]["renewals"], 1);
    app.assert_invariants(1, SETTLE).await;
    assert_eq!(
        app.count("SELECT quantity::bigint FROM inventory.variants WHERE sku = 'SCARCE'")
            .await,
        0
    );
}

fn lines(sku: &str, n: i64) -> Vec<Line> {
    vec![Line {
        sku: Sku::parse(sku).unwrap(),
        quantity: Quantity::new(n).unwrap(),
    }]
}

/// The sagas (orders) of `n` checkouts that stay at their first step (no workers run).
async fn orders(app: &App, n: usize) -> Vec<(SagaId, OrderId)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let id = app.place(&order(&[("SCARCE", 2)], "tok_visa")).await;
        let saga = app.saga(&id).await;
        out.push((id.parse().unwrap(), order_of(&saga).parse().unwrap()));
    }
    out
}

fn code(outcome: &ReplyOutcome) -> &str {
    match outcome {
        ReplyOutcome::Succeeded { output } => match output.str("kind") {
            Some("stock_reserved") => "reserved",
            Some("stock_committed") => "committed",
            Some("stock_released") => "released",
            _ => "other",
        },
        ReplyOutcome::Failed {
            retryable: false,
            code,
            ..
        } => code,
        ReplyOutcome::Failed { .. } => "retryable",
    }
}

async fn stock(app: &App, sku: &str) -> (i64, i64) {
    (
        app.count(&format!(
            "SELECT quantity::bigint FROM inventory.variants WHERE sku = '{sku}'"
        ))
        .await,
        app.count(&format!(
            "SELECT reserved::bigint FROM inventory.variants WHERE sku = '{sku}'"
        ))
        .await,
    )
}

#[tokio::test]
async fn a_commit_sells_only_stock_that_is_still_the_orders() {
    // The inventory service driven directly, for orders whose sagas exist (and stay at their
    // first step: no worker runs).
    let app = App::spawn_with(Options::without_workers()).await;
    let inventory = Inventory::new(app.pool.clone());
    let o = orders(&app, 4).await;
    let (a, b, c, d) = (o[0], o[1], o[2], o[3]);
    let expire = async |order: OrderId| {
        sqlx::query("UPDATE inventory.reservations SET expires_at = now() - interval '1 second' WHERE order_id = $1")
            .bind(order.as_uuid())
            .execute(&app.pool)
            .await
            .unwrap();
        assert_eq!(inventory.expire_due(10).await.unwrap(), 1);
    };
    let reserve = async |(saga, order): (SagaId, OrderId), sku: &str, n: i64| {
        code(
            &inventory
                .reserve(saga, order, &lines(sku, n), 60)
                .await
                .unwrap(),
        )
        .to_owned()
    };
    let commit = async |(saga, order): (SagaId, OrderId)| {
        code(&inventory.commit(saga, order).await.unwrap()).to_owned()
    };
    let release = async |(saga, order): (SagaId, OrderId)| {
        code(&inventory.release(saga, order, None).await.unwrap()).to_owned()
    };

    // A's hold runs out; B takes the stock; A's commit finds it gone.
    assert_eq!(reserve(a, "SCARCE", 2).await, "reserved");
    expire(a.1).await;
    assert_eq!(stock(&app, "SCARCE").await, (2, 0));
    assert_eq!(reserve(b, "SCARCE", 2).await, "reserved");
    assert_eq!(commit(a).await, "stock_gone");
    assert_eq!(commit(b).await, "committed");
    assert_eq!(
        commit(b).await,
        "committed",
        "a repeated commit answers the same"
    );
    assert_eq!(stock(&app, "SCARCE").await, (0, 0));
    // A is undone: its release of an expired hold changes no stock, and a late commit of A
    // finds it released.
    assert_eq!(release(a).await, "released");
    assert_eq!(commit(a).await, "cancelled");
    assert_eq!(stock(&app, "SCARCE").await, (0, 0));

    // C's hold runs out but nobody buys the stock: its commit takes it after all.
    assert_eq!(reserve(c, "A", 3).await, "reserved");
    expire(c.1).await;
    assert_eq!(commit(c).await, "committed");
    assert_eq!(stock(&app, "A").await, (997, 0));

    // D commits, then its saga turns around (the commit's answer was lost): the release puts
    // the stock back on the shelf.
    assert_eq!(reserve(d, "B", 4).await, "reserved");
    assert_eq!(commit(d).await, "committed");
    assert_eq!(stock(&app, "B").await, (996, 0));
    assert_eq!(release(d).await, "released");
    assert_eq!(stock(&app, "B").await, (1000, 0));
    assert_eq!(
        release(d).await,
        "released",
        "a repeated release answers the same"
    );
    assert_eq!(stock(&app, "B").await, (1000, 0));

    // Every change of stock is audited, per order: (kind, quantity, reserved) deltas.
    let movements = async |order: OrderId| -> Vec<(String, i32, i32)> {
        sqlx::query_as(
            "SELECT kind, quantity_delta, reserved_delta FROM inventory.stock_movements
              WHERE order_id = $1 ORDER BY id",
        )
        .bind(order.as_uuid())
        .fetch_all(&app.pool)
        .await
        .unwrap()
    };
    let m = |k: &str, q: i32, r: i32| (k.to_owned(), q, r);
    assert_eq!(
        movements(a.1).await,
        [m("reserve", 0, 2), m("expire", 0, -2)]
    );
    assert_eq!(
        movements(b.1).await,
        [m("reserve", 0, 2), m("consume", -2, -2)]
    );
    assert_eq!(
        movements(c.1).await,
        [m("reserve", 0, 3), m("expire", 0, -3), m("consume", -3, 0)]
    );
    assert_eq!(
        movements(d.1).await,
        [m("reserve", 0, 4), m("consume", -4, -4), m("restock", 4, 0)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scarce_stock_is_never_sold_twice_under_random_stalls_and_short_holds() {
    // 300 checkouts for 20 units of RARE (one or two each; a third also take some A; most
    // cards are declined, so held stock keeps coming back), with a 5 s hold, while the
    // workers and the orchestrator are paused (SIGSTOP) at random and the breakers of the
    // payment and the shipment forced open, for up to eight seconds: longer than the hold, so
    // reservations run out under sagas held up, are sold to others, and renewals and commits
    // find their stock gone. Every invariant holds.
    let seed = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("stall schedule: FAULT_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let options = short_hold(5, 1500)
        .orchestrator("SAGA_BREAKERS__FAILURE_THRESHOLD", "3")
        .orchestrator("SAGA_BREAKERS__OPEN_INITIAL_MS", "500")
        .orchestrator("SAGA_BREAKERS__OPEN_MAX_MS", "3000")
        .orchestrator("SAGA_BREAKERS__PROBE_TIMEOUT_MS", "2000")
        .orchestrator("SAGA_TIMERS__POLL_INTERVAL_MS", "50")
        .orchestrator("SAGA_REPLIES__ACK_WAIT_MS", "5000")
        .orchestrator("SAGA_RELAY__SCAN_INTERVAL_MS", "300")
        .orchestrator("SAGA_RELAY__SCAN_GRACE_MS", "500");
    let mut app = App::spawn_with(options).await;
    // Ten checkouts every 300 ms, so that the stalls meet sagas at every step.
    let (n, chunk) = (300, 10);
    let base = app.base.clone();
    let load = tokio::spawn(async move {
        let mut placed = Vec::new();
        for c in 0..n / chunk {
            let body = move |i: usize| {
                let i = c * chunk + i;
                let rare = 1 + (i % 2) as i64;
                // One in eight pays: the others hold stock until their card is declined, and
                // give it back.
                let token = if i.is_multiple_of(8) {
                    "tok_visa"
                } else {
                    "tok_decline"
                };
                if i.is_multiple_of(3) {
                    order(&[("RARE", rare), ("A", 1)], token)
                } else {
                    order(&[("RARE", rare)], token)
                }
            };
            placed.extend(place_many(base.clone(), chunk, 4, body, Duration::from_secs(120)).await);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        placed
    });
    // First, one step's breaker held open for longer than the hold while the load arrives:
    // sagas park on it holding stock, their holds run out, others take the stock.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let step = ["charge_payment", "create_shipment", "commit_stock"][rng.random_range(0..3)];
    eprintln!("{step} held open for 7 s");
    force(&app, step, json!("open")).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    force(&app, step, Value::Null).await;
    let mut stalls = 1;
    while !load.is_finished() || stalls < 8 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        let victim = [
            "inventory",
            "payment",
            "shipping",
            "orchestrator",
            "charge_payment",
            "create_shipment",
            "commit_stock",
        ][rng.random_range(0..7)];
        let pause = Duration::from_millis(rng.random_range(500..8000));
        let breaker = victim.contains('_');
        if breaker {
            force(&app, victim, json!("open")).await;
        } else {
            app.pause(victim);
        }
        tokio::time::sleep(pause).await;
        if breaker {
            force(&app, victim, Value::Null).await;
        } else {
            app.resume(victim);
        }
        stalls += 1;
    }
    let placed = load.await.expect("load");
    assert_eq!(placed.len(), n);

    app.assert_invariants(n, SETTLE).await;
    // The stock was short (orders were refused for it), and holds ran out under held-up
    // sagas (at least under the breaker held open).
    let refused = app
        .count("SELECT count(*) FROM inventory.reservations WHERE status = 'rejected'")
        .await;
    let expired = app
        .count("SELECT count(*) FROM inventory.stock_movements WHERE kind = 'expire'")
        .await;
    let sold = app
        .count(
            "SELECT coalesce(sum(l.quantity), 0)::bigint FROM orders.order_lines l
               JOIN orders.orders o ON o.id = l.order_id WHERE o.status = 'confirmed' AND l.sku = 'RARE'",
        )
        .await;
    eprintln!(
        "RARE sold: {sold}; orders refused for stock: {refused}; expired holds: {expired}; renewals: {}; commits refused: {}",
        app.count("SELECT coalesce(sum((snapshot -> 'steps' -> 0 ->> 'renewals')::int), 0)::bigint FROM orchestrator.sagas")
            .await,
        app.count("SELECT count(*) FROM orchestrator.saga_events WHERE input::text LIKE '%stock_gone%'")
            .await,
    );
    assert!(refused > 0, "the stock was never short");
    assert!(expired > 0, "no hold ran out");
}
