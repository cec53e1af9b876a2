//! The checkout saga end to end: orchestrator, workers and simulator as separate processes, on
//! the real PostgreSQL and NATS JetStream.

use std::time::Duration;

use e2e::{App, Options, order};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);

async fn stock(app: &App, sku: &str) -> (i64, i64) {
    let q = app
        .count(&format!(
            "SELECT quantity::bigint FROM inventory.variants WHERE sku = '{sku}'"
        ))
        .await;
    let r = app
        .count(&format!(
            "SELECT reserved::bigint FROM inventory.variants WHERE sku = '{sku}'"
        ))
        .await;
    (q, r)
}

fn order_id(saga: &Value) -> String {
    saga["data"]["order_id"]
        .as_str()
        .expect("order id")
        .to_owned()
}

/// The JSON of an accepted checkout. A new saga is answered 202; a replayed key's saga may
/// have ended meanwhile and is then answered 200: the code must agree with the status it
/// reports.
async fn accepted(r: reqwest::Response) -> Value {
    let code = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    let ended = matches!(
        body["status"].as_str(),
        Some("completed" | "compensated" | "failed")
    );
    assert_eq!(code, if ended { 200 } else { 202 }, "{body}");
    body
}

/// The text between `start` and the next `end` after it.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(&text[from..from + len])
}

/// A file of the repository, relative to its root.
fn repository_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[tokio::test]
async fn a_checkout_completes_with_every_effect_in_place() {
    let app = App::spawn().await;
    let id = app.place(&order(&[("A", 2), ("B", 1)], "tok_visa")).await;
    let saga = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(saga["status"], "completed", "{saga:#}");
    let order = order_id(&saga);

    // Steps, attempts and the event log are visible.
    let steps: Vec<(&str, &str, i64)> = saga["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                s["status"].as_str().unwrap(),
                s["attempts"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("reserve_stock", "succeeded", 1),
            ("charge_payment", "succeeded", 1),
            ("create_shipment", "succeeded", 1),
            ("commit_stock", "succeeded", 1)
        ]
    );
    let kinds: Vec<&str> = saga["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "step_succeeded",
            "step_succeeded",
            "step_succeeded",
            "step_succeeded"
        ]
    );

    // The order is confirmed, paid once, shipped once.
    app.wait_for(
        &format!(
            "SELECT count(*) FROM orders.orders WHERE id = '{order}' AND status = 'confirmed'"
        ),
        1,
        WITHIN,
    )
    .await;
    assert_eq!(
        app.count("SELECT total_minor FROM orders.orders").await,
        2 * 1500 + 900
    );
    assert_eq!(app.count("SELECT count(*) FROM payments.charges WHERE status = 'succeeded' AND amount_minor = 3900").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM shipping.shipments WHERE status = 'created'")
            .await,
        1
    );
    let ledger = app.ledger().await;
    assert_eq!(ledger["charges"].as_array().unwrap().len(), 1, "{ledger}");
    assert_eq!(ledger["shipments"].as_array().unwrap().len(), 1, "{ledger}");

    // The stock left the books before the order was confirmed: the commit is the last step.
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM inventory.reservations WHERE order_id = '{order}' AND status = 'consumed'"))
            .await,
        1
    );
    assert_eq!(stock(&app, "A").await, (998, 0));
    assert_eq!(stock(&app, "B").await, (999, 0));
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.stock_movements WHERE kind = 'consume'")
            .await,
        2
    );

    // The customer is told.
    app.wait_for(
        "SELECT count(*) FROM notifications.sent WHERE kind = 'OrderConfirmed'",
        1,
        WITHIN,
    )
    .await;
    // Nothing is left to publish, and no timer is armed for an ended saga.
    app.wait_for("SELECT count(*) FROM orchestrator.outbox", 0, WITHIN)
        .await;
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.timers").await,
        0
    );
    app.assert_logs_replay().await;

    // The README's example works as written: its catalogue loaded by the Product service
    // (`worker product --load`), then its curl request (body and Idempotency-Key) sent as it
    // stands.
    let catalogue = repository_file("deploy/demo-catalog.json");
    let out = app
        .worker_command(&["product", "--load", catalogue.to_str().unwrap()])
        .await;
    assert!(
        out.status.success(),
        "catalog load failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let readme = std::fs::read_to_string(repository_file("README.md")).expect("README.md");
    let example = &readme[readme
        .find("curl -s -X POST http://127.0.0.1:8080/checkout")
        .expect("the README places a checkout with curl")..];
    let key = between(example, "-H 'Idempotency-Key: ", "'").expect("the example's key");
    let body = between(example, "-d '", "'").expect("the example's body");
    let body: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("the README's checkout is not JSON ({e}): {body}"));
    let r = app.checkout(&body, Some(key)).await;
    assert_eq!(r.status(), 202);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["status"], "running", "{answer}");
    let id = answer["saga_id"].as_str().expect("saga_id");
    assert_eq!(answer["status_url"], format!("/sagas/{id}"));
    let saga = app.wait_terminal(id, WITHIN).await;
    assert_eq!(
        (&saga["status"], &saga["state"]),
        (&json!("completed"), &json!("completed")),
        "{saga:#}"
    );
}

#[tokio::test]
async fn a_declined_card_compensates_and_keeps_nothing() {
    let app = App::spawn().await;
    let id = app.place(&order(&[("A", 3)], "tok_decline")).await;
    let saga = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(saga["status"], "compensated", "{saga:#}");
    assert_eq!(saga["steps"][0]["status"], "compensated");
    assert_eq!(saga["steps"][1]["status"], "rejected");
    assert_eq!(saga["steps"][1]["last_error"]["code"], "card_declined");
    assert_eq!(saga["steps"][2]["status"], "pending");
    let order = order_id(&saga);

    assert_eq!(
        app.count(&format!("SELECT count(*) FROM inventory.reservations WHERE order_id = '{order}' AND status = 'released'")).await,
        1
    );
    assert_eq!(stock(&app, "A").await, (1000, 0));
    assert_eq!(
        app.count("SELECT count(*) FROM payments.charges WHERE status IN ('succeeded', 'pending')")
            .await,
        0
    );
    assert!(app.ledger().await["charges"].as_array().unwrap().is_empty());
    assert_eq!(
        app.count("SELECT count(*) FROM shipping.shipments").await,
        0
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM orders.orders WHERE id = '{order}' AND status = 'cancelled'"
        ))
        .await,
        1
    );
    app.wait_for(
        "SELECT count(*) FROM notifications.sent WHERE kind = 'OrderCancelled'",
        1,
        WITHIN,
    )
    .await;
    app.assert_logs_replay().await;
}

#[tokio::test]
async fn a_shipment_that_fails_for_good_refunds_then_releases_in_reverse() {
    let app = App::spawn().await;
    // The carrier refuses an address it cannot deliver to: the last step fails permanently,
    // after the stock was reserved and the card charged.
    let mut body = order(&[("A", 2)], "tok_visa");
    body["shipping_address"]["country"] = json!("XX");
    let id = app.place(&body).await;
    let saga = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(saga["status"], "compensated", "{saga:#}");
    assert_eq!(saga["steps"][2]["status"], "rejected");
    assert_eq!(saga["steps"][1]["status"], "compensated");
    assert_eq!(saga["steps"][0]["status"], "compensated");

    // Undone in reverse: the refund is dispatched before the release.
    let dispatched: Vec<String> = saga["events"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["effects"].as_array().cloned().unwrap_or_default())
        .filter(|f| f["effect"] == "dispatch")
        .map(|f| f["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        dispatched,
        [
            "reserve_stock",
            "charge_payment",
            "create_shipment",
            "refund_payment",
            "release_stock"
        ],
        "{saga:#}"
    );

    // Nothing kept: the charge refunded once, at the processor too; the stock back; no
    // shipment; the order cancelled.
    let order = order_id(&saga);
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM payments.charges WHERE order_id = '{order}' AND status = 'refunded'")).await,
        1
    );
    let ledger = app.ledger().await;
    assert_eq!(ledger["charges"].as_array().unwrap().len(), 1, "{ledger}");
    assert_eq!(ledger["refunds"].as_array().unwrap().len(), 1, "{ledger}");
    assert!(
        ledger["shipments"].as_array().unwrap().is_empty(),
        "{ledger}"
    );
    assert_eq!(stock(&app, "A").await, (1000, 0));
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM orders.orders WHERE id = '{order}' AND status = 'cancelled'"
        ))
        .await,
        1
    );
    app.assert_invariants(1, WITHIN).await;
}

#[tokio::test]
async fn an_out_of_stock_line_fails_at_reservation_with_nothing_charged() {
    let app = App::spawn().await;
    // Two SCARCE exist; the order wants three (and some A, which must not stay reserved).
    let id = app
        .place(&order(&[("A", 1), ("SCARCE", 3)], "tok_visa"))
        .await;
    let saga = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(saga["status"], "compensated", "{saga:#}");
    assert_eq!(saga["steps"][0]["status"], "rejected");
    assert_eq!(saga["steps"][0]["last_error"]["code"], "out_of_stock");
    assert_eq!(saga["steps"][1]["attempts"], 0, "payment never attempted");
    assert_eq!(stock(&app, "SCARCE").await, (2, 0));
    assert_eq!(stock(&app, "A").await, (1000, 0));
    assert_eq!(app.count("SELECT count(*) FROM payments.charges").await, 0);
    assert!(app.ledger().await["charges"].as_array().unwrap().is_empty());
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.reservations WHERE status = 'rejected'")
            .await,
        1
    );
}

#[tokio::test]
async fn one_idempotency_key_yields_one_saga_even_when_sent_concurrently() {
    let app = App::spawn().await;
    let body = order(&[("A", 1)], "tok_visa");
    let first = app.checkout(&body, Some("order-42")).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    // The saga may have ended by the time the key comes again.
    let again = app.checkout(&body, Some("order-42")).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again = accepted(again).await;
    assert_eq!(first["saga_id"], again["saga_id"]);
    assert_eq!(first["order_id"], again["order_id"]);

    // Ten clients racing with one new key: one saga.
    let racing =
        futures::future::join_all((0..10).map(|_| app.checkout(&body, Some("order-43")))).await;
    let mut ids = Vec::new();
    for r in racing {
        ids.push(accepted(r).await["saga_id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");

    // The same key with another request is refused, without naming any saga.
    let other = app
        .checkout(&order(&[("A", 2)], "tok_visa"), Some("order-42"))
        .await;
    assert_eq!(other.status(), 422);
    let problem: Value = other.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/idempotency-key-reused");
    let text = problem.to_string();
    assert!(
        !text.contains(first["saga_id"].as_str().unwrap()),
        "{problem}"
    );

    // A key is the customer's own: another customer with the same key (and the same body,
    // but for the customer) gets a saga of their own, and learns nothing of the first.
    let mut theirs = body.clone();
    theirs["customer"]["id"] = json!("cust-2");
    let theirs = app.checkout(&theirs, Some("order-42")).await;
    assert!(theirs.headers().get("idempotent-replayed").is_none());
    let theirs = accepted(theirs).await;
    assert_ne!(theirs["saga_id"], first["saga_id"]);
    assert_ne!(theirs["order_id"], first["order_id"]);

    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.sagas").await,
        3
    );
    app.wait_terminal(first["saga_id"].as_str().unwrap(), WITHIN)
        .await;
    app.wait_terminal(ids[0].as_str().unwrap(), WITHIN).await;
    app.wait_terminal(theirs["saga_id"].as_str().unwrap(), WITHIN)
        .await;
    assert_eq!(app.ledger().await["charges"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn a_cancel_compensates_the_step_in_flight_and_a_late_cancel_is_refused() {
    // The processor stalls, so the charge is in flight when the cancel arrives.
    let app = App::spawn().await;
    app.control("processor", json!({"mode": "hang"})).await;
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    app.wait_for(
        &format!(
            "SELECT count(*) FROM payments.charges WHERE saga_id = '{id}' AND status = 'pending'"
        ),
        1,
        WITHIN,
    )
    .await;
    let r = app
        .http
        .post(format!("{}/sagas/{id}/cancel", app.base))
        .json(&json!({"reason": "customer changed their mind"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    app.control("processor", json!({"mode": "normal"})).await;
    let saga = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(saga["status"], "compensated", "{saga:#}");
    assert_eq!(saga["cancel_reason"], "customer changed their mind");
    assert_eq!(
        saga["steps"][1]["status"], "compensated",
        "the charge in flight was undone"
    );
    // Whatever the stalled charge did, no money is kept.
    app.wait_for(
        "SELECT count(*) FROM payments.charges WHERE status IN ('succeeded', 'pending')",
        0,
        WITHIN,
    )
    .await;
    let ledger = app.ledger().await;
    let charged = ledger["charges"].as_array().unwrap().len();
    assert_eq!(
        ledger["refunds"].as_array().unwrap().len(),
        charged,
        "{ledger}"
    );
    assert_eq!(stock(&app, "A").await, (1000, 0));

    let r = app
        .http
        .post(format!("{}/sagas/{id}/cancel", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<Value>().await.unwrap()["type"],
        "/problems/cannot-cancel"
    );
}

#[tokio::test]
async fn a_step_past_its_deadline_is_retried_then_compensated() {
    let app = App::spawn_with(
        Options::default()
            .orchestrator(
                "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__DEADLINE_MS",
                "400",
            )
            .orchestrator(
                "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__MAX_ATTEMPTS",
                "2",
            )
            .orchestrator(
                "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__BACKOFF_INITIAL_MS",
                "50",
            ),
    )
    .await;
    let id = app.place(&order(&[("B", 2)], "tok_hang")).await;
    let saga = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(saga["status"], "compensated", "{saga:#}");
    assert_eq!(saga["steps"][1]["attempts"], 2);
    assert_eq!(saga["steps"][1]["last_error"]["code"], "deadline_exceeded");
    let kinds: Vec<&str> = saga["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "step_succeeded",
            "timer_fired", // deadline of attempt 1: the command is sent again
            "timer_fired", // deadline again: attempt 1 failed, back off
            "timer_fired", // backoff over: attempt 2
            "timer_fired", // deadline of attempt 2: sent again
            "timer_fired", // deadline again: out of attempts, compensate
            "step_succeeded",
            "step_succeeded"
        ],
    );
    assert_eq!(stock(&app, "B").await, (1000, 0));
    assert_eq!(
        app.count("SELECT count(*) FROM payments.charges WHERE status IN ('succeeded', 'pending')")
            .await,
        0
    );
    app.assert_logs_replay().await;
}

#[tokio::test]
async fn the_correlation_id_follows_the_request_through_every_process() {
    let app = App::spawn().await;
    let r = app
        .http
        .post(format!("{}/checkout", app.base))
        .header("X-Correlation-Id", "trace-me-123")
        .json(&order(&[("A", 1)], "tok_visa"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-correlation-id"], "trace-me-123");
    let id = r.json::<Value>().await.unwrap()["saga_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let saga = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(saga["correlation_id"], "trace-me-123");
    app.wait_for(
        "SELECT count(*) FROM notifications.sent WHERE kind = 'OrderConfirmed'",
        1,
        WITHIN,
    )
    .await;
    for process in [
        "orchestrator",
        "inventory",
        "payment",
        "shipping",
        "notification",
    ] {
        let log = std::fs::read_to_string(app.logs.join(format!("{process}.log"))).unwrap();
        let tagged = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["span"]["correlation_id"] == "trace-me-123")
            .count();
        assert!(
            tagged > 0,
            "{process} logged nothing with the correlation id"
        );
    }
}

#[tokio::test]
async fn readiness_reports_its_dependencies() {
    let app = App::spawn_with(Options::without_workers()).await;
    let r = app
        .http
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["postgres"], "ok");
    assert_eq!(body["jetstream"], "ok");
    let r = app
        .http
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_saga_list_pages_through_every_saga_exactly_once() {
    // No workers: the sagas stay running. Placed at once, several share a batch and hence
    // their creation time, which paging must not trip over.
    let app = App::spawn_with(Options::without_workers()).await;
    let body = order(&[("A", 1)], "tok_visa");
    let placed: std::collections::BTreeSet<String> =
        futures::future::join_all((0..9).map(|_| app.place(&body)))
            .await
            .into_iter()
            .collect();
    // All sagas, the running ones (an index of the sagas in flight), the completed ones (none).
    for (first, expected) in [
        ("/sagas?limit=2", placed.clone()),
        ("/sagas?status=running&limit=2", placed.clone()),
        ("/sagas?status=completed&limit=2", Default::default()),
    ] {
        let mut seen = Vec::new();
        let mut next = Some(first.to_owned());
        while let Some(path) = next {
            let page = app.get_json(&path).await;
            let ids: Vec<String> = page["sagas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_owned())
                .collect();
            assert!(ids.len() <= 2, "{page}");
            seen.extend(ids);
            next = page["next"].as_str().map(str::to_owned);
            assert!(
                seen.len() <= placed.len() + 2,
                "paging does not end: {seen:?}"
            );
        }
        let distinct: std::collections::BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(
            distinct.len(),
            seen.len(),
            "{first}: a saga listed twice: {seen:?}"
        );
        assert_eq!(distinct, expected, "{first}");
    }
}

#[tokio::test]
async fn a_catalogue_with_a_variant_out_of_range_loads_nothing() {
    let app = App::spawn_with(Options::without_workers()).await;
    let variant = |sku: &str, available: u64| json!({"sku": sku, "name": sku, "price": {"minor": 100, "currency": "EUR"}, "available": available});
    let file: workers::product::seed::CatalogueFile = serde_json::from_value(json!({
        "products": [{
            "id": "0192a000-0000-7000-8000-0000000000bb",
            "name": "New product",
            "variants": [variant("NEW-1", 5), variant("NEW-2", 4_000_000_000)]
        }]
    }))
    .unwrap();
    let e = workers::product::seed::load(
        &app.pool,
        &file,
        &sagas::wire::Subjects::new(&app.name).unwrap(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("NEW-2") && e.contains("at most"), "{e}");
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.variants WHERE sku LIKE 'NEW-%'")
            .await,
        0
    );
    // Reloading the test catalogue audits exactly what it changes.
    let before = app
        .count("SELECT count(*) FROM inventory.stock_movements")
        .await;
    let same: workers::product::seed::CatalogueFile = serde_json::from_value(json!({
        "products": [{
            "id": "0192a000-0000-7000-8000-0000000000aa",
            "name": "Test product",
            "variants": [variant("A", 1000), variant("B", 1001)]
        }]
    }))
    .unwrap();
    workers::product::seed::load(
        &app.pool,
        &same,
        &sagas::wire::Subjects::new(&app.name).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.stock_movements")
            .await,
        before + 1,
        "only B changed"
    );
    assert_eq!(
        app.count(
            "SELECT sum(quantity_delta)::bigint FROM inventory.stock_movements WHERE sku = 'B'"
        )
        .await,
        1001
    );
}
