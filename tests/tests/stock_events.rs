//! The Product service's domain events. Every stock movement the inventory writes is a
//! `product.StockUpdated`, written to the services' outbox in the movement's transaction, with
//! the variant's levels right after it (in the order of its batch) and an id derived from the
//! movement's row; every price a catalogue load sets or changes is a `product.PriceChanged`,
//! once (an unchanged price writes nothing). Every event is checked against its committed JSON
//! Schema.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::{App, CATALOGUE, Options, order};
use sagas::shop::{Line, OrderId, Quantity, Sku};
use sagas::wire::{EventId, ReplyOutcome, SagaId, Subjects};
use serde_json::{Value, json};
use uuid::Uuid;
use workers::inventory::Inventory;

const WITHIN: Duration = Duration::from_secs(40);

/// A row of `events.outbox`.
#[derive(Debug, sqlx::FromRow)]
struct Outboxed {
    msg_id: String,
    subject: String,
    correlation_id: String,
    payload: Value,
}

/// The events of type `name` waiting in the outbox, oldest first, each checked against its
/// schema.
async fn outboxed(app: &App, name: &str) -> Vec<Outboxed> {
    let rows: Vec<Outboxed> = sqlx::query_as(
        "SELECT msg_id, subject, correlation_id, payload FROM events.outbox
          WHERE payload->>'type' = $1 ORDER BY id",
    )
    .bind(name)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    for r in &rows {
        e2e::check_schema(&r.payload);
        assert_eq!(r.msg_id, r.payload["id"], "{r:?}");
        assert_eq!(r.correlation_id, r.payload["correlation_id"], "{r:?}");
    }
    rows
}

/// A variant's `(quantity, reserved)` now.
async fn levels(app: &App, sku: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT quantity::bigint, reserved::bigint FROM inventory.variants WHERE sku = $1",
    )
    .bind(sku)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

fn levels_of(event: &Value) -> (i64, i64, i64) {
    (
        event["quantity"].as_i64().unwrap(),
        event["reserved"].as_i64().unwrap(),
        event["available"].as_i64().unwrap(),
    )
}

#[tokio::test]
async fn a_checkout_publishes_its_reserve_and_its_sale_with_the_levels_after_each() {
    let app = App::spawn().await;
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let saga = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(saga["status"], "completed", "{saga:#}");
    let order_id = saga["data"]["order_id"].as_str().unwrap().to_owned();
    // The sale's events were committed with it, before the saga heard of it: once the outbox
    // is empty, a relay published them all.
    app.wait_for("SELECT count(*) FROM events.outbox", 0, WITHIN)
        .await;
    let stock: Vec<Value> = app
        .published_events()
        .await
        .into_iter()
        .filter(|e| e["type"] == "StockUpdated" && e["order_id"] == order_id.as_str())
        .collect();
    let movements: Vec<&str> = stock
        .iter()
        .map(|e| e["movement"].as_str().unwrap())
        .collect();
    assert_eq!(
        movements,
        ["reserve", "consume"],
        "the order's StockUpdated events (none: is the inventory worker started with \
         `Inventory::with_events`, workers/src/run.rs?): {stock:#?}"
    );
    let (reserve, sale) = (&stock[0], &stock[1]);
    for e in [reserve, sale] {
        assert_eq!(e["source"], "product", "{e:#}");
        assert_eq!(e["sku"], "A", "{e:#}");
        assert_eq!(
            e["correlation_id"],
            format!("inventory-{order_id}"),
            "{e:#}"
        );
    }
    assert_ne!(reserve["id"], sale["id"]);
    // After the sale, the variant is as the table has it; before it, the unit was on hand and
    // held.
    let (quantity, reserved) = levels(&app, "A").await;
    assert_eq!(levels_of(sale), (quantity, reserved, quantity - reserved));
    assert_eq!(
        levels_of(reserve),
        (quantity + 1, reserved + 1, quantity - reserved)
    );
    assert_eq!(
        quantity, 999,
        "one unit of the catalogue's 1000 was sold: {sale:#}"
    );
}

fn lines(items: &[(&str, i64)]) -> Vec<Line> {
    items
        .iter()
        .map(|(sku, n)| Line {
            sku: Sku::parse(sku).unwrap(),
            quantity: Quantity::new(*n).unwrap(),
        })
        .collect()
}

fn succeeded(outcome: &ReplyOutcome) -> bool {
    matches!(outcome, ReplyOutcome::Succeeded { .. })
}

/// A checkout placed (its saga stays at its first step: no worker runs), and its order.
async fn placed(app: &App, items: &[(&str, i64)]) -> (SagaId, OrderId) {
    let id = app.place(&order(items, "tok_visa")).await;
    let saga = app.saga(&id).await;
    (
        id.parse().unwrap(),
        saga["data"]["order_id"].as_str().unwrap().parse().unwrap(),
    )
}

#[tokio::test]
async fn each_movement_is_one_event_with_the_running_levels_of_its_batch() {
    // The inventory service driven directly, for orders whose sagas exist; no relay runs, so
    // what the writer writes stays in the outbox.
    let app = App::spawn_with(Options::without_workers()).await;
    let inventory = Inventory::new(app.pool.clone()).with_events(Subjects::new(&app.name).unwrap());
    let (one, two) = (
        placed(&app, &[("A", 1)]).await,
        placed(&app, &[("A", 2), ("B", 1)]).await,
    );
    let (a, b) = (levels(&app, "A").await, levels(&app, "B").await);

    // Both reserves in one batch (queued before the writer runs), then the first order's sale
    // and the second's release in another: A moves twice in each batch.
    let (lines_one, lines_two) = (lines(&[("A", 1)]), lines(&[("A", 2), ("B", 1)]));
    let (r1, r2) = tokio::join!(
        inventory.reserve(one.0, one.1, &lines_one, 300),
        inventory.reserve(two.0, two.1, &lines_two, 300),
    );
    assert!(succeeded(&r1.unwrap()) && succeeded(&r2.unwrap()));
    let (c1, r2) = tokio::join!(
        inventory.commit(one.0, one.1),
        inventory.release(two.0, two.1, None),
    );
    assert!(succeeded(&c1.unwrap()) && succeeded(&r2.unwrap()));

    // One event per movement, its id derived from the movement's row.
    let movements: Vec<(i64, String, String, Uuid, i32, i32)> = sqlx::query_as(
        "SELECT id, sku, kind, order_id, quantity_delta, reserved_delta
           FROM inventory.stock_movements WHERE order_id = ANY($1) ORDER BY id",
    )
    .bind(vec![one.1.as_uuid(), two.1.as_uuid()])
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(movements.len(), 6, "{movements:?}");
    // (The seeded stock's events, for no order, are not the batches'.)
    let events: BTreeMap<String, Outboxed> = outboxed(&app, "StockUpdated")
        .await
        .into_iter()
        .filter(|r| r.payload.get("order_id").is_some())
        .map(|r| (r.msg_id.clone(), r))
        .collect();
    assert_eq!(events.len(), movements.len(), "{events:#?}");
    // Each also in the product's history, under the same id.
    let history: Vec<String> = sqlx::query_scalar(
        "SELECT id::text FROM inventory.domain_events
          WHERE event_type = 'StockUpdated' AND payload ? 'order_id'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut outboxed_ids: Vec<&String> = events.keys().collect();
    let mut history_ids: Vec<&String> = history.iter().collect();
    outboxed_ids.sort();
    history_ids.sort();
    assert_eq!(history_ids, outboxed_ids);
    // Replayed from the levels the variants had, in the order the movements were written,
    // each event tells the levels right after its movement.
    let mut running: BTreeMap<String, (i64, i64)> =
        BTreeMap::from([("A".to_owned(), a), ("B".to_owned(), b)]);
    let mut batches: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for (id, sku, kind, order_id, dq, dr) in &movements {
        let event_id = EventId::derive_from(
            Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("stock-movement/{id}").as_bytes(),
            ),
            "StockUpdated",
        )
        .to_string();
        let row = events
            .get(&event_id)
            .unwrap_or_else(|| panic!("no event {event_id} for movement {id}: {events:#?}"));
        let e = &row.payload;
        assert_eq!(
            row.subject,
            format!("{}.events.product.StockUpdated", app.name)
        );
        assert_eq!(row.correlation_id, format!("inventory-{order_id}"));
        assert_eq!(e["sku"], sku.as_str(), "{e:#}");
        assert_eq!(e["movement"], kind.as_str(), "{e:#}");
        assert_eq!(e["order_id"], order_id.to_string(), "{e:#}");
        let level = running.get_mut(sku).unwrap();
        *level = (level.0 + i64::from(*dq), level.1 + i64::from(*dr));
        assert_eq!(
            levels_of(e),
            (level.0, level.1, level.0 - level.1),
            "movement {id} ({kind} of {sku}): {e:#}"
        );
        if sku == "A" {
            batches
                .entry(e["occurred_at"].as_str().unwrap().to_owned())
                .or_default()
                .push((level.0, level.1));
        }
    }
    // A moved twice in each of two batches, and each event has its own levels, not the
    // batch's last.
    assert_eq!(batches.len(), 2, "{batches:?}");
    for (at, seen) in &batches {
        assert_eq!(seen.len(), 2, "A's movements at {at}: {seen:?}");
        assert_ne!(seen[0], seen[1], "A's movements at {at}: {seen:?}");
    }
    // The last levels replayed are those the variants have.
    assert_eq!(running["A"], levels(&app, "A").await);
    assert_eq!(running["B"], levels(&app, "B").await);
    assert_eq!(running["A"], (a.0 - 1, a.1));

    // A command answered from its record moves nothing and writes no event.
    let again = inventory.commit(one.0, one.1).await.unwrap();
    assert!(succeeded(&again));
    let for_orders = outboxed(&app, "StockUpdated")
        .await
        .into_iter()
        .filter(|r| r.payload.get("order_id").is_some())
        .count();
    assert_eq!(for_orders, 6);
}

/// The test catalogue's product with the variant `sku` at `price` (and as many available as
/// it has).
fn catalogue_with(sku: &str, minor: i64, currency: &str) -> workers::product::seed::CatalogueFile {
    let (_, _, available) = CATALOGUE.iter().find(|(s, ..)| *s == sku).unwrap();
    serde_json::from_value(json!({
        "products": [{
            "id": "0192a000-0000-7000-8000-0000000000aa",
            "name": "Test product",
            "variants": [{"sku": sku, "name": sku, "price": {"minor": minor, "currency": currency}, "available": available}]
        }]
    }))
    .unwrap()
}

#[tokio::test]
async fn a_catalogue_load_writes_one_price_changed_per_price_it_changes() {
    // No relay runs: what the loads write stays in the outbox.
    let app = App::spawn_with(Options::without_workers()).await;
    let subjects = Subjects::new(&app.name).unwrap();
    // The catalogue the app started with set every price: one event each, with no previous.
    let seeded = outboxed(&app, "PriceChanged").await;
    assert_eq!(seeded.len(), CATALOGUE.len(), "{seeded:#?}");
    for (row, (sku, minor, _)) in seeded.iter().zip(CATALOGUE) {
        assert_eq!(row.payload["sku"], *sku, "{row:?}");
        assert_eq!(
            row.payload["price"],
            json!({"minor": minor, "currency": "EUR"})
        );
        assert!(row.payload.get("previous").is_none(), "{row:?}");
        assert_eq!(row.correlation_id, "catalog-load");
        assert_eq!(
            row.subject,
            format!("{}.events.product.PriceChanged", app.name)
        );
    }
    let load = async |file: &workers::product::seed::CatalogueFile| {
        workers::product::seed::load(&app.pool, file, &subjects)
            .await
            .unwrap();
        outboxed(&app, "PriceChanged").await
    };
    let price = |minor: i64, currency: &str| json!({"minor": minor, "currency": currency});

    // A's price changes: one event, from the old price to the new.
    let changed = catalogue_with("A", 1600, "EUR");
    let after = load(&changed).await;
    assert_eq!(after.len(), seeded.len() + 1, "{after:#?}");
    let e = &after.last().unwrap().payload;
    assert_eq!(e["sku"], "A", "{e:#}");
    assert_eq!(e["previous"], price(1500, "EUR"), "{e:#}");
    assert_eq!(e["price"], price(1600, "EUR"), "{e:#}");
    assert_eq!(after.last().unwrap().correlation_id, "catalog-load");
    // Loading the same file again changes no price: nothing is written.
    assert_eq!(load(&changed).await.len(), after.len());
    assert_eq!(
        app.count("SELECT price_minor FROM inventory.variants WHERE sku = 'A'")
            .await,
        1600
    );

    // Back to the first price: a change of its own, not a duplicate of the first load's.
    let back = load(&catalogue_with("A", 1500, "EUR")).await;
    assert_eq!(back.len(), after.len() + 1, "{back:#?}");
    let e = &back.last().unwrap().payload;
    assert_eq!(
        (&e["sku"], &e["previous"], &e["price"]),
        (&json!("A"), &price(1600, "EUR"), &price(1500, "EUR")),
        "{e:#}"
    );
    // The same amount in another currency is another price.
    let usd = load(&catalogue_with("A", 1500, "USD")).await;
    assert_eq!(usd.len(), back.len() + 1, "{usd:#?}");
    let e = &usd.last().unwrap().payload;
    assert_eq!(
        (&e["previous"], &e["price"]),
        (&price(1500, "EUR"), &price(1500, "USD")),
        "{e:#}"
    );
    // No other SKU's price moved.
    let skus: Vec<&Value> = usd[seeded.len()..]
        .iter()
        .map(|r| &r.payload["sku"])
        .collect();
    assert!(skus.iter().all(|s| *s == "A"), "{skus:?}");
}
