//! The fulfilment saga end to end, over the real stack: a checkout completes, `OrderConfirmed`
//! starts the fulfilment, the warehouse picks, the simulated carrier collects and reports back
//! to the shipping service (its webhook), whose domain events reach the saga as signals.
//! Every way it ends: delivered; cancelled by the customer before dispatch; a cancel refused
//! after; a lost parcel; a carrier that never comes (an SLA of seconds). Every event published
//! is checked against its committed JSON Schema.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::{App, Options, order};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(40);

/// A checkout placed and its order id.
async fn place(app: &App, sku: &str) -> (String, String) {
    let id = app.place(&order(&[(sku, 1)], "tok_visa")).await;
    let saga = app.saga(&id).await;
    let order_id = saga["data"]["order_id"].as_str().unwrap().to_owned();
    (id, order_id)
}

async fn wait_order_status(app: &App, order_id: &str, status: &str) -> Value {
    let deadline = Instant::now() + WITHIN;
    loop {
        let o = app.get_json(&format!("/orders/{order_id}")).await;
        if o["status"] == status {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "order {order_id} never {status}: {o:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// How many events of each type were published for the order.
async fn events_of(app: &App, order_id: &str) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for e in app.published_events().await {
        // The Product service's stock movements are checked in stock_events.rs.
        if e["order_id"] == order_id && e["source"] != "product" {
            *n.entry(e["type"].as_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    n
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

async fn refunds(app: &App, checkout: &str) -> i64 {
    app.count(&format!(
        "SELECT count(*) FROM payments.refunds f JOIN payments.charges c ON c.id = f.charge_id
          WHERE c.saga_id = '{checkout}'"
    ))
    .await
}

async fn restocks(app: &App, order_id: &str) -> i64 {
    app.count(&format!(
        "SELECT count(*) FROM inventory.stock_movements WHERE order_id = '{order_id}' AND kind = 'restock'"
    ))
    .await
}

#[tokio::test]
async fn a_confirmed_order_is_picked_shipped_and_delivered_with_each_event_once() {
    let app = App::spawn_with(Options::with_fulfilment()).await;
    let (checkout, order_id) = place(&app, "A").await;
    // The carrier sends each report twice: the service records each once.
    app.plan_shipment(&order_id, &json!({"duplicate": true}))
        .await;
    let done = app.wait_terminal(&checkout, WITHIN).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let fulfilment = app.fulfilment_of(&order_id, WITHIN).await;
    let f = app.wait_terminal(&fulfilment, WITHIN).await;
    assert_eq!(f["status"], "completed", "{f:#}");
    let o = wait_order_status(&app, &order_id, "delivered").await;
    assert!(o["tracking_number"].is_string(), "{o:#}");
    assert!(o["delivered_at"].is_string(), "{o:#}");
    assert_eq!(o["refunded"], false);
    // What the order's customer sees holds no personal data.
    let text = o.to_string();
    assert!(
        !text.contains("ada@example.com") && !text.contains("Main St"),
        "{text}"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM inventory.reservations WHERE order_id = '{order_id}' AND status = 'picked'"
        ))
        .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM shipping.carrier_reports")
            .await,
        2,
        "two reports, each recorded once"
    );
    // Each event once (the outbox relay may publish a row twice; JetStream keeps one).
    app.wait_for("SELECT count(*) FROM events.outbox", 0, WITHIN)
        .await;
    let deadline = Instant::now() + WITHIN;
    let expected = counts(&[
        ("OrderCreated", 1),
        ("PaymentProcessed", 1),
        ("OrderConfirmed", 1),
        ("ShipmentDispatched", 1),
        ("OrderShipped", 1),
        ("ShipmentDelivered", 1),
        ("OrderDelivered", 1),
    ]);
    loop {
        let seen = events_of(&app, &order_id).await;
        if seen == expected {
            break;
        }
        assert!(Instant::now() < deadline, "events: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One notification per event the Notification service subscribes to, each once.
    app.wait_for(
        &format!("SELECT count(*) FROM notifications.sent WHERE subject LIKE '%{order_id}%'"),
        7,
        WITHIN,
    )
    .await;
    let kinds: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT kind FROM notifications.sent WHERE subject LIKE '%{order_id}%' ORDER BY kind"
    )))
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        kinds,
        [
            "OrderConfirmed",
            "OrderCreated",
            "OrderDelivered",
            "OrderShipped",
            "PaymentProcessed",
            "ShipmentDelivered",
            "ShipmentDispatched"
        ]
    );
    // The Order service's history of it: every event of the order, in order, once.
    let deadline = Instant::now() + WITHIN;
    loop {
        let o = app.get_json(&format!("/orders/{order_id}")).await;
        let history: Vec<&str> = o["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["event"].as_str().unwrap())
            .collect();
        if history.len() == 7 {
            assert_eq!(history.first(), Some(&"OrderCreated"), "{history:?}");
            assert_eq!(history.last(), Some(&"OrderDelivered"), "{history:?}");
            let mut sorted = history.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 7, "each once: {history:?}");
            break;
        }
        assert!(Instant::now() < deadline, "history: {history:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The same OrderConfirmed again, as another publisher's copy (another message id, so
    // JetStream does not drop it): once the starts consumer has handled it, still one
    // fulfilment for the order.
    let mut copy = app
        .published_events()
        .await
        .into_iter()
        .find(|e| e["type"] == "OrderConfirmed" && e["order_id"] == order_id.as_str())
        .expect("the OrderConfirmed");
    copy["id"] = json!(uuid::Uuid::now_v7());
    publish(&app, "order", "OrderConfirmed", copy).await;
    wait_consumed(&app, "orchestrator-starts").await;
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM orchestrator.sagas WHERE saga_type = 'fulfilment' AND subject = '{order_id}'"
        ))
        .await,
        1,
        "one fulfilment per order"
    );
    app.assert_logs_replay().await;
}

/// Until the durable consumer `name` of the app's events stream has handled every message.
async fn wait_consumed(app: &App, name: &str) {
    let client = async_nats::connect(&app.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(format!("{}_EVENTS", app.name.to_uppercase()))
        .await
        .unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(name).await.unwrap();
    let deadline = Instant::now() + WITHIN;
    loop {
        let info = consumer.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never caught up: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Publish an event of a service outside the repository (the Cart's), as it would.
async fn publish(app: &App, source: &str, name: &str, body: Value) {
    let client = async_nats::connect(&app.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut event = json!({
        "id": uuid::Uuid::now_v7(), "type": name, "v": 1, "occurred_at": chrono::Utc::now(),
        "source": source, "correlation_id": "cart-test",
    });
    event
        .as_object_mut()
        .unwrap()
        .extend(body.as_object().unwrap().clone());
    js.publish(
        format!("{}.events.{source}.{name}", app.name),
        serde_json::to_vec(&event).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test]
async fn a_checkout_a_cart_initiated_twice_starts_once_and_carries_no_personal_data() {
    let app = App::spawn_with(Options::with_fulfilment()).await;
    let cart = uuid::Uuid::now_v7();
    let reference = format!("co-{cart}");
    // The Cart service keeps the details; its event names them by reference only.
    let r = app
        .http
        .put(format!("{}/cart/v1/checkouts/{reference}", app.sim))
        .json(&order(&[("B", 1)], "tok_cart_secret_4242"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    for _ in 0..2 {
        publish(
            &app,
            "cart",
            "CheckoutInitiated",
            json!({"cart_id": cart, "customer": {"id": "cust-1"}, "checkout_ref": reference}),
        )
        .await;
    }
    // A cart whose details the Cart service does not have: set aside, nothing started.
    publish(
        &app,
        "cart",
        "CheckoutInitiated",
        json!({"cart_id": uuid::Uuid::now_v7(), "customer": {"id": "cust-2"}, "checkout_ref": "co-unknown"}),
    )
    .await;
    let deadline = Instant::now() + WITHIN;
    let checkout = loop {
        let ids: Vec<(uuid::Uuid, String)> = sqlx::query_as(
            "SELECT id, correlation_id FROM orchestrator.sagas WHERE saga_type = 'checkout'",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        if let [(id, correlation)] = ids.as_slice() {
            assert_eq!(
                correlation, "cart-test",
                "the event's correlation id follows it"
            );
            break id.to_string();
        }
        assert!(ids.len() < 2, "one checkout per cart: {ids:?}");
        assert!(Instant::now() < deadline, "no checkout for the cart");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let done = app.wait_terminal(&checkout, WITHIN).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let order_id = done["data"]["order_id"].as_str().unwrap().to_owned();
    wait_order_status(&app, &order_id, "delivered").await;
    // Both deliveries of the event were handled (one started, one found it), and the unknown
    // cart's was dead-lettered: the consumer has nothing left to do.
    app.wait_for(
        "SELECT count(*) FROM orchestrator.sagas WHERE saga_type = 'checkout'",
        1,
        WITHIN,
    )
    .await;
    // No event published, whoever published it, holds the token or the address.
    for e in app.published_events().await {
        let text = e.to_string();
        assert!(
            !text.contains("tok_cart_secret")
                && !text.contains("Main St")
                && !text.contains("ada@example.com"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_cancel_before_dispatch_undoes_all_and_one_after_is_refused() {
    let app = App::spawn_with(Options::with_fulfilment()).await;
    // The first order's parcel is never collected; the second's is, and is never delivered.
    let (checkout, order_id) = place(&app, "A").await;
    app.plan_shipment(&order_id, &json!({"dispatch_after_ms": null}))
        .await;
    let (_, shipped_id) = place(&app, "B").await;
    app.plan_shipment(&shipped_id, &json!({"outcome": "never"}))
        .await;
    // The checkout sold the unit: it left the stock.
    assert_eq!(
        app.wait_terminal(&checkout, WITHIN).await["status"],
        "completed"
    );
    let sold = app
        .count("SELECT quantity::bigint FROM inventory.variants WHERE sku = 'A'")
        .await;

    let fulfilment = app.fulfilment_of(&order_id, WITHIN).await;
    let deadline = Instant::now() + WITHIN;
    loop {
        let s = app.saga(&fulfilment).await;
        if s["state"] == "awaiting" && s["steps"][3]["status"] == "awaiting" {
            break;
        }
        assert!(Instant::now() < deadline, "not awaiting the carrier: {s:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = app
        .http
        .post(format!("{}/orders/{order_id}/cancel", app.base))
        .json(&json!({"reason": "changed my mind"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let f = app.wait_terminal(&fulfilment, WITHIN).await;
    assert_eq!(f["status"], "compensated", "{f:#}");
    let o = wait_order_status(&app, &order_id, "cancelled").await;
    assert_eq!(o["refunded"], true, "{o:#}");
    assert_eq!(o["restocked"], true, "{o:#}");
    assert_eq!(refunds(&app, &checkout).await, 1);
    assert_eq!(restocks(&app, &order_id).await, 1);
    assert_eq!(
        app.count("SELECT quantity::bigint FROM inventory.variants WHERE sku = 'A'")
            .await,
        sold + 1,
        "the unit is back on the shelf"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM shipping.shipments WHERE order_id = '{order_id}' AND status = 'cancelled'"
        ))
        .await,
        1
    );
    let ledger: Value = app.ledger().await;
    let cancelled =
        ledger["shipments"].as_array().unwrap().iter().any(|s| {
            s["idempotency_key"] == format!("shipment:{order_id}") && s["cancelled"] == true
        });
    assert!(
        cancelled,
        "the carrier has the shipment cancelled: {ledger:#}"
    );

    // The other order left the warehouse: its cancel is refused, and nothing changes.
    let shipped = app.fulfilment_of(&shipped_id, WITHIN).await;
    wait_order_status(&app, &shipped_id, "shipped").await;
    let r = app
        .http
        .post(format!("{}/orders/{shipped_id}/cancel", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("order-not-cancellable"),
        "{problem:#}"
    );
    assert!(
        problem["detail"].as_str().unwrap().contains("pivot"),
        "the reason is given: {problem:#}"
    );
    assert_eq!(app.saga(&shipped).await["status"], "running");
    let events = events_of(&app, &order_id).await;
    assert_eq!(events.get("OrderCancelled"), Some(&1), "{events:?}");
    assert_eq!(events.get("OrderShipped"), None, "{events:?}");
}

#[tokio::test]
async fn a_lost_parcel_is_refunded_not_restocked_and_opens_a_case() {
    let app = App::spawn_with(Options::with_fulfilment()).await;
    let (checkout, order_id) = place(&app, "A").await;
    app.plan_shipment(
        &order_id,
        &json!({"outcome": "lost", "lost_reason": "fell off the van"}),
    )
    .await;
    let fulfilment = app.fulfilment_of(&order_id, WITHIN).await;
    let f = app.wait_terminal(&fulfilment, WITHIN).await;
    assert_eq!(f["status"], "failed", "a case: {f:#}");
    let o = wait_order_status(&app, &order_id, "needs_attention").await;
    assert!(
        o["case"].as_str().unwrap().contains("lost the parcel")
            && o["case"].as_str().unwrap().contains("fell off the van"),
        "{o:#}"
    );
    assert_eq!(o["refunded"], true);
    assert_eq!(refunds(&app, &checkout).await, 1);
    assert_eq!(
        restocks(&app, &order_id).await,
        0,
        "the unit left with the parcel"
    );
    let events = events_of(&app, &order_id).await;
    for (name, n) in [
        ("ShipmentDispatched", 1),
        ("OrderShipped", 1),
        ("ShipmentLost", 1),
        ("OrderCancelled", 1),
    ] {
        assert_eq!(events.get(name), Some(&n), "{name}: {events:?}");
    }
    // The customer is told their money came back and that someone is on it.
    app.wait_for(
        &format!(
            "SELECT count(*) FROM notifications.sent WHERE subject LIKE '%{order_id}%'
              AND kind = 'OrderCancelled' AND body LIKE '%refunded%' AND body LIKE '%Our team%'"
        ),
        1,
        WITHIN,
    )
    .await;
}

#[tokio::test]
async fn a_carrier_that_does_not_collect_within_its_sla_undoes_all_and_opens_a_case() {
    let app = App::spawn_with(
        Options::with_fulfilment()
            .orchestrator("SAGA_SAGAS__POLICIES__FULFILMENT__DISPATCH__SLA_MS", "1500"),
    )
    .await;
    let (checkout, order_id) = place(&app, "A").await;
    app.plan_shipment(&order_id, &json!({"dispatch_after_ms": null}))
        .await;
    let fulfilment = app.fulfilment_of(&order_id, WITHIN).await;
    let f = app.wait_terminal(&fulfilment, WITHIN).await;
    assert_eq!(f["status"], "failed", "{f:#}");
    assert_eq!(f["failure"]["code"], "sla_expired", "{f:#}");
    let o = wait_order_status(&app, &order_id, "needs_attention").await;
    assert!(
        o["case"].as_str().unwrap().contains("did not collect"),
        "{o:#}"
    );
    assert_eq!(refunds(&app, &checkout).await, 1);
    assert_eq!(restocks(&app, &order_id).await, 1);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM shipping.shipments WHERE order_id = '{order_id}' AND status = 'cancelled'"
        ))
        .await,
        1
    );
}
