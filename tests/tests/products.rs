//! The Product service: its repositories on the real PostgreSQL (the aggregate stored and
//! read back, optimistic locking, reservations and their movements, cascades) and its REST
//! API over HTTP (ETags, 412 and 428, no update lost among concurrent writers, events written
//! once per change and valid against their schemas).

use std::time::Duration;

use chrono::Utc;
use e2e::{App, Options};
use sagas::shop::{Currency, Money, OrderId, Sku};
use serde_json::{Value, json};
use uuid::Uuid;
use workers::product::model::{
    AttributeKind, Attributes, Category, CategoryAttribute, Details, Image, NewVariant, Product,
    ProductStatus, Rule, VariantStatus,
};
use workers::product::repo::{Categories, Error, Products, Reservations, UnitOfWork};

const WITHIN: Duration = Duration::from_secs(30);

fn eur(minor: i64) -> Money {
    Money {
        minor,
        currency: Currency::parse("EUR").unwrap(),
    }
}

fn variant(sku: &str, quantity: i64) -> NewVariant {
    NewVariant {
        sku: Sku::parse(sku).unwrap(),
        name: sku.into(),
        price: eur(2500),
        quantity,
        status: VariantStatus::Active,
        attributes: Attributes::from([("color".to_owned(), "blue".to_owned())]),
    }
}

async fn uow(app: &App) -> UnitOfWork {
    let subjects = sagas::wire::Subjects::new("products-test").unwrap();
    UnitOfWork::begin(&app.pool, &subjects, "test-correlation")
        .await
        .unwrap()
}

async fn count(app: &App, sql: &str) -> i64 {
    app.count(sql).await
}

/// Every variant's stock equals the sum of its movements (the books add up).
async fn assert_books(app: &App) {
    let off = count(
        app,
        "SELECT count(*) FROM inventory.variants v
           LEFT JOIN (SELECT sku, sum(quantity_delta) AS q, sum(reserved_delta) AS r
                        FROM inventory.stock_movements GROUP BY sku) m ON m.sku = v.sku
          WHERE v.sku LIKE 'SHIRT-%'
            AND (v.quantity, v.reserved) IS DISTINCT FROM (coalesce(m.q, 0)::int, coalesce(m.r, 0)::int)",
    )
    .await;
    assert_eq!(off, 0, "a variant's stock is not the sum of its movements");
}

#[tokio::test]
async fn the_repository_keeps_the_aggregate_its_stock_its_events_and_its_cascades() {
    let app = App::spawn_with(Options::without_workers()).await;

    // A category tree: apparel > shirts, shirts asking for a size.
    let mut apparel = Category {
        id: Uuid::now_v7(),
        parent_id: None,
        name: "Apparel".into(),
        slug: "apparel".into(),
        attributes: vec![],
        version: 0,
    };
    let mut shirts = Category {
        id: Uuid::now_v7(),
        parent_id: Some(apparel.id),
        name: "Shirts".into(),
        slug: "shirts".into(),
        attributes: vec![CategoryAttribute {
            name: "size".into(),
            kind: AttributeKind::Text,
            required: true,
        }],
        version: 0,
    };
    let mut u = uow(&app).await;
    Categories::add(&mut u, &mut apparel).await.unwrap();
    Categories::add(&mut u, &mut shirts).await.unwrap();
    u.commit().await.unwrap();

    // Moving apparel under its own sub-category is refused.
    let mut u = uow(&app).await;
    let mut cycle = apparel.clone();
    cycle.parent_id = Some(shirts.id);
    assert!(matches!(
        Categories::save(&mut u, &mut cycle).await,
        Err(Error::Rule(Rule::Invalid { .. }))
    ));
    drop(u);

    let (s, m) = (Uuid::now_v7(), Uuid::now_v7());
    let mut product = Product::create(
        Uuid::now_v7(),
        Details {
            name: "Oxford shirt".into(),
            description: "Cotton".into(),
            status: ProductStatus::Active,
            category_id: Some(shirts.id),
            attributes: Attributes::from([("size".to_owned(), "M".to_owned())]),
            images: vec![Image {
                url: "https://img.example/oxford.jpg".into(),
                alt: "front".into(),
            }],
        },
        vec![(s, variant("SHIRT-S", 5)), (m, variant("SHIRT-M", 0))],
    )
    .unwrap();
    let mut u = uow(&app).await;
    Products::add(&mut u, &mut product).await.unwrap();
    assert_eq!(
        u.commit().await.unwrap(),
        3,
        "two prices and one stock level"
    );
    let mut conn = app.pool.acquire().await.unwrap();
    let stored = Products::get(&mut conn, product.id).await.unwrap().unwrap();
    assert_eq!(stored, product, "read back as it was stored");
    assert_eq!(stored.version, 1);
    drop(conn);
    // The events are in the aggregate's history and in the outbox, the same ids.
    assert_eq!(
        count(
            &app,
            &format!(
                "SELECT count(*) FROM inventory.domain_events e
                   JOIN events.outbox o ON o.msg_id = e.id::text
                  WHERE e.aggregate_id = '{}'",
                product.id
            )
        )
        .await,
        3
    );
    assert_books(&app).await;

    // Optimistic locking: two copies read at version 1; the second save is refused.
    let mut conn = app.pool.acquire().await.unwrap();
    let mut first = Products::get(&mut conn, product.id).await.unwrap().unwrap();
    let mut second = first.clone();
    drop(conn);
    first.change_price(s, eur(2900)).unwrap();
    let mut u = uow(&app).await;
    Products::save(&mut u, &mut first).await.unwrap();
    u.commit().await.unwrap();
    assert_eq!(first.version, 2);
    let mut d = second.details.clone();
    d.name = "Lost update".into();
    second.update(d).unwrap();
    let mut u = uow(&app).await;
    match Products::save(&mut u, &mut second).await {
        Err(Error::Stale {
            expected: 1,
            actual: 2,
            ..
        }) => {}
        other => panic!("a stale save must be refused, got {other:?}"),
    }
    drop(u);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM inventory.products WHERE name = 'Lost update'"
        )
        .await,
        0
    );

    // Reservations: reserve, release, commit, expire; each a movement; the version stays.
    let (o1, o2, o3) = (
        OrderId::from_uuid(Uuid::now_v7()),
        OrderId::from_uuid(Uuid::now_v7()),
        OrderId::from_uuid(Uuid::now_v7()),
    );
    let later = Utc::now() + chrono::Duration::minutes(30);
    let mut u = uow(&app).await;
    let r1 = Reservations::reserve_stock(&mut u, s, 2, o1, later)
        .await
        .unwrap();
    u.commit().await.unwrap();
    let mut u = uow(&app).await;
    match Reservations::reserve_stock(&mut u, m, 1, o2, later).await {
        Err(Error::Rule(Rule::Insufficient {
            available: 0,
            asked: 1,
        })) => {}
        other => panic!("SHIRT-M has none, got {other:?}"),
    }
    drop(u);
    let mut u = uow(&app).await;
    let r2 = Reservations::reserve_stock(&mut u, s, 3, o2, later)
        .await
        .unwrap();
    u.commit().await.unwrap();
    let mut u = uow(&app).await;
    match Reservations::reserve_stock(&mut u, s, 1, o3, later).await {
        Err(Error::Rule(Rule::Insufficient {
            available: 0,
            asked: 1,
        })) => {}
        other => panic!("all five are held, got {other:?}"),
    }
    drop(u);
    let mut u = uow(&app).await;
    Reservations::release(&mut u, r1, false).await.unwrap();
    Reservations::commit(&mut u, r2).await.unwrap();
    u.commit().await.unwrap();
    // Again: nothing more happens.
    let mut u = uow(&app).await;
    Reservations::release(&mut u, r1, false).await.unwrap();
    Reservations::commit(&mut u, r2).await.unwrap();
    assert!(matches!(
        Reservations::commit(&mut u, r1).await,
        Err(Error::Conflict(_))
    ));
    drop(u);
    let mut u = uow(&app).await;
    let r3 = Reservations::reserve_stock(&mut u, s, 1, o3, later)
        .await
        .unwrap();
    Reservations::release(&mut u, r3, true).await.unwrap();
    u.commit().await.unwrap();
    let levels: (i32, i32, i64) = sqlx::query_as(
        "SELECT v.quantity, v.reserved, p.version FROM inventory.variants v
           JOIN inventory.products p ON p.id = v.product_id WHERE v.sku = 'SHIRT-S'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        levels,
        (2, 0, 2),
        "3 sold of 5, none held, the version untouched"
    );
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM inventory.stock_movements WHERE sku = 'SHIRT-S' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        kinds,
        [
            "adjust", "reserve", "reserve", "release", "consume", "reserve", "expire"
        ]
    );
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM inventory.reservations WHERE id = ANY($1) ORDER BY created_at, id",
    )
    .bind(vec![r1, r2, r3])
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(statuses, ["released", "consumed", "expired"]);
    assert_books(&app).await;

    // Cascades: a category with products in its sub-tree stays; a product holding reserved
    // units stays; once free, deleting it deletes its variants, attributes and images, and
    // then the category's sub-tree goes with it.
    let mut u = uow(&app).await;
    assert!(matches!(
        Categories::delete(&mut u, apparel.id, 1).await,
        Err(Error::Conflict(_))
    ));
    drop(u);
    let mut u = uow(&app).await;
    let held = Reservations::reserve_stock(&mut u, s, 1, OrderId::from_uuid(Uuid::now_v7()), later)
        .await
        .unwrap();
    u.commit().await.unwrap();
    let mut u = uow(&app).await;
    assert!(matches!(
        Products::delete(&mut u, product.id, 2).await,
        Err(Error::Rule(Rule::StillReserved { .. }))
    ));
    drop(u);
    let mut u = uow(&app).await;
    Reservations::release(&mut u, held, false).await.unwrap();
    assert!(matches!(
        Products::delete(&mut u, product.id, 1).await,
        Err(Error::Stale { .. })
    ));
    u.commit().await.unwrap();
    let mut u = uow(&app).await;
    Products::delete(&mut u, product.id, 2).await.unwrap();
    Categories::delete(&mut u, apparel.id, 1).await.unwrap();
    u.commit().await.unwrap();
    for table in [
        "inventory.variants WHERE sku LIKE 'SHIRT-%'",
        "inventory.product_attributes",
        "inventory.product_images",
        "inventory.variant_attributes",
        "inventory.categories",
        "inventory.category_attributes",
    ] {
        assert_eq!(
            count(&app, &format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table} after the deletes"
        );
    }
}

/// The API's view of a product, and its ETag.
async fn read(app: &App, base: &str, id: &str) -> (Value, String) {
    let r = app
        .http
        .get(format!("{base}/products/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    (r.json().await.unwrap(), etag)
}

async fn patch(app: &App, url: &str, if_match: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = app.http.patch(url).json(body);
    if let Some(tag) = if_match {
        req = req.header("if-match", tag);
    }
    req.send().await.unwrap()
}

async fn problem(r: reqwest::Response, status: u16) -> Value {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    r.json().await.unwrap()
}

#[tokio::test]
async fn the_api_changes_only_what_its_if_match_read_and_publishes_each_change_once() {
    // The inventory worker runs the relay that publishes the API's events.
    let app = App::spawn_with(Options {
        workers: vec!["inventory"],
        ..Options::without_workers()
    })
    .await;
    let base = app.product_api(WITHIN).await;
    let created = app
        .http
        .post(format!("{base}/products"))
        .json(&json!({
            "name": "Oxford shirt",
            "attributes": {"fit": "slim"},
            "images": [{"url": "https://img.example/o.jpg"}],
            "variants": [{"sku": "SHIRT-L", "name": "L", "price": {"minor": 3000, "currency": "EUR"}, "quantity": 4}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["etag"], "\"1\"");
    let body: Value = created.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    let variant = body["variants"][0]["id"].as_str().unwrap().to_owned();
    let url = format!("{base}/products/{id}");

    // Without If-Match (or with *): 428. With the version read: 200. With it again: 412.
    let change = json!({"name": "Oxford shirt, blue"});
    let p = problem(patch(&app, &url, None, &change).await, 428).await;
    assert_eq!(p["type"], "/problems/precondition-required");
    problem(patch(&app, &url, Some("*"), &change).await, 428).await;
    let ok = patch(&app, &url, Some("\"1\""), &change).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["etag"], "\"2\"");
    let p = problem(
        patch(&app, &url, Some("\"1\""), &json!({"name": "Lost"})).await,
        412,
    )
    .await;
    assert_eq!(p["current_etag"], "\"2\"");
    // Not an object, an unknown field, a control character: 422 and nothing changed.
    for bad in [
        json!(["Oxford"]),
        json!({"nme": "x"}),
        json!({"name": "a\u{0}b"}),
    ] {
        let r = patch(&app, &url, Some("\"2\""), &bad).await;
        assert!(
            r.status() == 422 || r.status() == 400,
            "{bad}: {}",
            r.status()
        );
    }
    let (now, etag) = read(&app, &base, &id).await;
    assert_eq!(
        (now["name"].as_str(), etag.as_str()),
        (Some("Oxford shirt, blue"), "\"2\"")
    );

    // Stock and price, each under If-Match, each an event; availability in real time.
    let adjusted = app
        .http
        .post(format!("{url}/variants/{variant}/stock-adjustments"))
        .header("if-match", "\"2\"")
        .json(&json!({"delta": 6, "note": "delivery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(adjusted.status(), 200);
    let below = app
        .http
        .post(format!("{url}/variants/{variant}/stock-adjustments"))
        .header("if-match", "\"3\"")
        .json(&json!({"delta": -11}))
        .send()
        .await
        .unwrap();
    problem(below, 409).await;
    let priced = app
        .http
        .put(format!("{url}/variants/{variant}/price"))
        .header("if-match", "\"3\"")
        .json(&json!({"price": {"minor": 3300, "currency": "EUR"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(priced.status(), 200);
    let available: Value = app
        .http
        .get(format!("{base}/skus/SHIRT-L/availability"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&available["quantity"], &available["available"]),
        (&json!(10), &json!(10))
    );

    // Each change's event once in the outbox (the relay may have published and deleted it:
    // the aggregate's history keeps them all), each valid against its schema.
    let history: Vec<Value> = sqlx::query_scalar(
        "SELECT jsonb_build_object('type', event_type) || payload FROM inventory.domain_events
          WHERE aggregate_id = $1 ORDER BY version, at",
    )
    .bind(Uuid::parse_str(&id).unwrap())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let names: Vec<&str> = history
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "PriceChanged",
            "StockUpdated",
            "StockUpdated",
            "PriceChanged"
        ],
        "{history:?}"
    );
    app.wait_for(
        &format!(
            "SELECT count(*) FROM inventory.domain_events e
              WHERE e.aggregate_id = '{id}'
                AND NOT EXISTS (SELECT 1 FROM events.outbox o WHERE o.msg_id = e.id::text)"
        ),
        4,
        WITHIN,
    )
    .await;
    let published: Vec<Value> = app
        .published_events()
        .await
        .into_iter()
        .filter(|e| e["sku"] == "SHIRT-L")
        .collect();
    assert_eq!(published.len(), 4, "{published:?}");
    for e in &published {
        e2e::check_schema(e);
    }

    // A delete names the version too.
    let gone = app
        .http
        .delete(&url)
        .header("if-match", "\"3\"")
        .send()
        .await
        .unwrap();
    problem(gone, 412).await;
    let gone = app
        .http
        .delete(&url)
        .header("if-match", "\"4\"")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 204);
    let missing = app.http.get(&url).send().await.unwrap();
    problem(missing, 404).await;
}

#[tokio::test]
async fn concurrent_writers_through_the_api_lose_no_update() {
    let app = App::spawn_with(Options::without_workers()).await;
    let base = app.product_api(WITHIN).await;
    let body: Value = app
        .http
        .post(format!("{base}/products"))
        .json(&json!({"name": "Counter", "attributes": {"n": "0"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    // Two updates of what both read at version 1, at once: one is made, the other refused.
    let url = format!("{base}/products/{id}");
    let (by_a, by_b) = (
        json!({"description": "by a"}),
        json!({"description": "by b"}),
    );
    let (a, b) = tokio::join!(
        patch(&app, &url, Some("\"1\""), &by_a),
        patch(&app, &url, Some("\"1\""), &by_b),
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 412]);
    const WRITERS: usize = 8;
    const EACH: usize = 10;
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (app_http, base, id) = (app.http.clone(), base.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let url = format!("{base}/products/{id}");
            let mut refused = 0;
            let mut done = 0;
            while done < EACH {
                let r = app_http.get(&url).send().await.unwrap();
                let etag = r.headers()["etag"].to_str().unwrap().to_owned();
                let now: Value = r.json().await.unwrap();
                let n: u64 = now["attributes"]["n"].as_str().unwrap().parse().unwrap();
                let w = app_http
                    .patch(&url)
                    .header("if-match", &etag)
                    .json(&json!({"attributes": {"n": (n + 1).to_string()}}))
                    .send()
                    .await
                    .unwrap();
                match w.status().as_u16() {
                    200 => done += 1,
                    412 => refused += 1,
                    other => panic!("unexpected {other}"),
                }
            }
            refused
        }));
    }
    let mut refused = 0;
    for t in tasks {
        refused += t.await.unwrap();
    }
    let (now, etag) = read(&app, &base, &id).await;
    assert_eq!(
        now["attributes"]["n"],
        (WRITERS * EACH).to_string(),
        "every increment counted ({refused} stale writes refused and retried)"
    );
    assert_eq!(etag, format!("\"{}\"", WRITERS * EACH + 2));
}

/// Create a product of one variant through the API; its id, its variant's id.
async fn create(app: &App, base: &str, sku: &str, minor: i64, quantity: u32) -> (String, String) {
    let r = app
        .http
        .post(format!("{base}/products"))
        .json(&json!({
            "name": sku,
            "variants": [{"sku": sku, "name": sku, "price": {"minor": minor, "currency": "EUR"}, "quantity": quantity}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    (
        body["id"].as_str().unwrap().to_owned(),
        body["variants"][0]["id"].as_str().unwrap().to_owned(),
    )
}

/// The total of the order a checkout placed.
async fn total(app: &App, saga: &str) -> i64 {
    let saga = Uuid::parse_str(saga).unwrap();
    app.wait_for(
        &format!("SELECT count(*) FROM orders.orders WHERE saga_id = '{saga}'"),
        1,
        WITHIN,
    )
    .await;
    sqlx::query_scalar("SELECT total_minor FROM orders.orders WHERE saga_id = $1")
        .bind(saga)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn checkouts_are_validated_and_priced_by_the_product_service() {
    // No cache: each checkout asks the Product service (the bound on a price change is
    // catalog.ttl_ms; here 0).
    let mut app =
        App::spawn_with(Options::without_workers().orchestrator("SAGA_CATALOG__TTL_MS", "0")).await;
    let base = app.product_api(WITHIN).await;
    let (id, variant) = create(&app, &base, "PRICED", 1000, 10).await;
    let first = app.place(&e2e::order(&[("PRICED", 2)], "tok_visa")).await;
    assert_eq!(total(&app, &first).await, 2000);
    let changed = app
        .http
        .put(format!("{base}/products/{id}/variants/{variant}/price"))
        .header("if-match", "\"1\"")
        .json(&json!({"price": {"minor": 1250, "currency": "EUR"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    let second = app.place(&e2e::order(&[("PRICED", 2)], "tok_visa")).await;
    assert_eq!(total(&app, &second).await, 2500, "the new price, at once");

    // A variant that is not for sale is refused, naming the line.
    let off = app
        .http
        .patch(format!("{base}/products/{id}/variants/{variant}"))
        .header("if-match", "\"2\"")
        .json(&json!({"status": "inactive"}))
        .send()
        .await
        .unwrap();
    assert_eq!(off.status(), 200);
    let r = app
        .checkout(&e2e::order(&[("A", 1), ("PRICED", 1)], "tok_visa"), None)
        .await;
    let p = problem(r, 422).await;
    assert_eq!(p["errors"][0]["pointer"], "/items/1/sku", "{p}");

    // The Product service down: the checkout is refused (503, Retry-After), nothing written.
    let sagas = count(&app, "SELECT count(*) FROM orchestrator.sagas").await;
    app.kill("product");
    let r = app
        .checkout(&e2e::order(&[("A", 1)], "tok_visa"), None)
        .await;
    assert!(r.headers().contains_key("retry-after"));
    let p = problem(r, 503).await;
    assert!(
        p["detail"].as_str().unwrap().contains("Product service"),
        "{p}"
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM orchestrator.sagas").await,
        sagas
    );
    // Back: checkouts are accepted again (once its breaker lets a lookup through).
    app.start("product");
    app.product_api(WITHIN).await;
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        let r = app
            .checkout(&e2e::order(&[("A", 1)], "tok_visa"), None)
            .await;
        if r.status() == 202 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(
            std::time::Instant::now() < deadline,
            "checkouts not accepted again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn many_checkouts_for_a_few_units_never_oversell_and_the_books_add_up() {
    let app = App::spawn().await;
    let base = app.product_api(WITHIN).await;
    create(&app, &base, "SHIRT-FEW", 1500, 3).await;
    let placed = e2e::place_many(
        app.base.clone(),
        30,
        10,
        |_| e2e::order(&[("SHIRT-FEW", 1)], "tok_visa"),
        WITHIN,
    )
    .await;
    assert_eq!(placed.len(), 30);
    let mut completed = 0;
    for p in &placed {
        let saga = app.wait_terminal(&p.saga_id, Duration::from_secs(60)).await;
        match saga["status"].as_str().unwrap() {
            "completed" => completed += 1,
            "compensated" => {}
            other => panic!("saga {} ended {other}", p.saga_id),
        }
    }
    assert_eq!(completed, 3, "as many orders as units, no more");
    let (quantity, reserved): (i32, i32) =
        sqlx::query_as("SELECT quantity, reserved FROM inventory.variants WHERE sku = 'SHIRT-FEW'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((quantity, reserved), (0, 0));
    assert_books(&app).await;
    let consumed = count(
        &app,
        "SELECT count(*) FROM inventory.reservations
          WHERE status = 'consumed' AND lines @> '[{\"sku\": \"SHIRT-FEW\"}]'",
    )
    .await;
    assert_eq!(consumed, completed);
    let sold: i64 = count(
        &app,
        "SELECT -coalesce(sum(quantity_delta), 0) FROM inventory.stock_movements
          WHERE sku = 'SHIRT-FEW' AND kind = 'consume'",
    )
    .await;
    assert_eq!(sold, completed);
}

#[tokio::test]
async fn stock_of_a_variant_taken_off_sale_is_not_reserved_for_a_checkout_already_placed() {
    // No workers yet: the checkout's reserve waits while the variant is taken off sale.
    let mut app = App::spawn_with(Options::without_workers()).await;
    let base = app.product_api(WITHIN).await;
    let (id, variant) = create(&app, &base, "SOON-GONE", 900, 5).await;
    let saga = app
        .place(&e2e::order(&[("SOON-GONE", 1)], "tok_visa"))
        .await;
    let off = app
        .http
        .patch(format!("{base}/products/{id}/variants/{variant}"))
        .header("if-match", "\"1\"")
        .json(&json!({"status": "inactive"}))
        .send()
        .await
        .unwrap();
    assert_eq!(off.status(), 200);
    app.start("inventory");
    let ended = app.wait_terminal(&saga, Duration::from_secs(60)).await;
    assert_eq!(ended["status"], "compensated", "{ended:#}");
    let (quantity, reserved): (i32, i32) =
        sqlx::query_as("SELECT quantity, reserved FROM inventory.variants WHERE sku = 'SOON-GONE'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((quantity, reserved), (5, 0), "nothing held for it");
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM inventory.reservations WHERE status = 'rejected'
          AND lines @> '[{\"sku\": \"SOON-GONE\"}]'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(reason.contains("not for sale"), "{reason}");
}

#[tokio::test]
async fn products_are_listed_by_category_attribute_and_stock_a_page_at_a_time() {
    let app = App::spawn_with(Options::without_workers()).await;
    let base = app.product_api(WITHIN).await;
    let post = async |path: &str, body: Value| -> Value {
        let r = app
            .http
            .post(format!("{base}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{path} {body}");
        r.json().await.unwrap()
    };
    let clothes = post("/categories", json!({"name": "Clothes", "slug": "clothes"})).await;
    let shirts = post(
        "/categories",
        json!({"name": "Shirts", "slug": "shirts", "parent_id": clothes["id"]}),
    )
    .await;
    let mut in_shirts = Vec::new();
    for i in 0..5 {
        let p = post(
            "/products",
            json!({
                "name": format!("Shirt {i}"), "category_id": shirts["id"],
                "attributes": {"color": if i % 2 == 0 { "red" } else { "blue" }},
                "variants": [{"sku": format!("LIST-{i}"), "name": "M",
                              "price": {"minor": 1000, "currency": "EUR"}, "quantity": i}]
            }),
        )
        .await;
        in_shirts.push(p["id"].as_str().unwrap().to_owned());
    }
    post("/products", json!({"name": "Elsewhere", "variants": []})).await;
    let list = async |query: &str| -> Value {
        app.http
            .get(format!("{base}/products?{query}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    };
    let ids = |page: &Value| -> Vec<String> {
        page["products"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect()
    };
    // By the parent category: its sub-category's products, a page of two at a time.
    let mut seen = Vec::new();
    let mut query = format!("category={}&limit=2", clothes["id"].as_str().unwrap());
    loop {
        let page = list(&query).await;
        assert!(page["products"].as_array().unwrap().len() <= 2);
        seen.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => {
                query = format!(
                    "category={}&limit=2&after={next}",
                    clothes["id"].as_str().unwrap()
                )
            }
            None => break,
        }
    }
    assert_eq!(seen, in_shirts, "every product once, in id order");
    // By attribute, and in stock (Shirt 0 has none).
    let red = ids(&list(&format!(
        "category={}&attribute=color:red",
        shirts["id"].as_str().unwrap()
    ))
    .await);
    assert_eq!(
        red,
        [
            in_shirts[0].clone(),
            in_shirts[2].clone(),
            in_shirts[4].clone()
        ]
    );
    let stocked = ids(&list(&format!(
        "category={}&in_stock=true",
        shirts["id"].as_str().unwrap()
    ))
    .await);
    assert_eq!(stocked, in_shirts[1..]);
    // A bad parameter is a problem naming it.
    let r = app
        .http
        .get(format!("{base}/products?limit=0"))
        .send()
        .await
        .unwrap();
    let p = problem(r, 400).await;
    assert_eq!(p["errors"][0]["parameter"], "limit", "{p}");
}
