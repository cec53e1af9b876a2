//! Every input is checked before anything stores it. One table sends bad inputs to every
//! endpoint that takes a body, a header or a query: arrays where objects belong, objects where
//! strings belong, numbers as strings, huge numbers, NUL and control characters in every text
//! field, invalid emails, unknown and repeated fields, very long header values. Each gets the
//! right status and a problem document that names the input in the client's terms, and no row
//! of the database changes. After the whole table, checkouts still complete and no breaker
//! opened.

use std::time::Duration;

use e2e::{App, Options, WORKERS, order};
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(60);

/// What a case sends.
enum Body {
    Json(Value),
    Raw(&'static str, Vec<u8>),
    None,
}

struct Case {
    name: String,
    method: reqwest::Method,
    path: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Body,
    status: u16,
    problem: &'static str,
    /// The input the problem must name: `/pointer`, `header:Name` or `parameter:name`.
    names: Option<String>,
}

fn case(
    name: impl Into<String>,
    method: reqwest::Method,
    path: impl Into<String>,
    body: Body,
) -> Case {
    Case {
        name: name.into(),
        method,
        path: path.into(),
        headers: Vec::new(),
        body,
        status: 422,
        problem: "invalid-request",
        names: None,
    }
}

impl Case {
    fn expect(mut self, status: u16, problem: &'static str, names: Option<&str>) -> Self {
        self.status = status;
        self.problem = problem;
        self.names = names.map(str::to_owned);
        self
    }

    fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// `doc` with the value at `pointer` replaced (or added).
fn with(doc: &Value, pointer: &str, v: Value) -> Value {
    let mut doc = doc.clone();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = if parent.is_empty() {
        &mut doc
    } else {
        doc.pointer_mut(parent).unwrap()
    };
    match target {
        Value::Array(a) => a[key.parse::<usize>().unwrap()] = v,
        Value::Object(o) => {
            o.insert(key.to_owned(), v);
        }
        _ => panic!("{pointer}"),
    }
    doc
}

/// Everything the database holds, as one digest per table.
async fn fingerprint(app: &App) -> Vec<(String, String)> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables
          WHERE table_schema IN ('orchestrator', 'inventory', 'payments', 'shipping', 'notifications')
            AND table_type = 'BASE TABLE'
            -- Renewed by the lease keeper every few seconds, whatever the requests.
            AND table_name NOT IN ('partition_leases', 'members')
          ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut out = Vec::new();
    for t in tables {
        let digest: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT md5(string_agg(x::text, '|' ORDER BY x::text)) FROM {t} x"
        )))
        .fetch_one(&app.pool)
        .await
        .unwrap();
        out.push((t, digest.unwrap_or_default()));
    }
    out
}

fn bad_cases(saga: &str) -> Vec<Case> {
    use reqwest::Method;
    let good = order(&[("A", 1)], "tok_visa");
    let checkout =
        |name: String, body: Value| case(name, Method::POST, "/checkout", Body::Json(body));
    let mut cases = Vec::new();

    // Shapes: only an object is an object.
    cases.push(
        checkout(
            "a checkout as an array of its fields".into(),
            json!([
                good["customer"],
                good["items"],
                good["payment_token"],
                good["shipping_address"]
            ]),
        )
        .expect(422, "invalid-request", Some("")),
    );
    for (pointer, v) in [
        ("/customer", json!(["cust-1", "ada@example.com"])),
        ("/items/0", json!(["A", 1])),
        (
            "/shipping_address",
            json!(["Ada", "1 Main St", null, "Madrid", "28001", "ES"]),
        ),
    ] {
        cases.push(
            checkout(format!("{pointer} as an array"), with(&good, pointer, v)).expect(
                422,
                "invalid-request",
                Some(pointer),
            ),
        );
    }
    cases.push(
        checkout("the body a string".into(), json!("checkout")).expect(
            422,
            "invalid-request",
            Some(""),
        ),
    );
    cases.push(checkout("the body null".into(), Value::Null).expect(
        422,
        "invalid-request",
        Some(""),
    ));
    // Every text field: NUL, terminal escapes and bells, a bidi override, an object, a number,
    // a huge text.
    let texts = [
        "/customer/id",
        "/customer/email",
        "/payment_token",
        "/shipping_address/name",
        "/shipping_address/line1",
        "/shipping_address/line2",
        "/shipping_address/city",
        "/shipping_address/postal_code",
        "/shipping_address/country",
    ];
    for pointer in texts {
        for (what, v) in [
            ("a NUL", json!("ab\u{0}cd")),
            ("control characters", json!("a\u{7}\u{1b}[31mb")),
            ("a bidi override", json!("a\u{202e}b")),
            ("an object", json!({"text": "x"})),
            ("a number", json!(12)),
            ("ten thousand characters", json!("x".repeat(10_000))),
        ] {
            cases.push(
                checkout(format!("{pointer}: {what}"), with(&good, pointer, v)).expect(
                    422,
                    "invalid-request",
                    Some(pointer),
                ),
            );
        }
    }
    for email in [
        "ada@@example.com",
        "a@b@example.com",
        "ada@example..com",
        "ada@localhost",
        "nope",
    ] {
        cases.push(
            checkout(
                format!("email {email}"),
                with(&good, "/customer/email", json!(email)),
            )
            .expect(422, "invalid-request", Some("/customer/email")),
        );
    }
    // Numbers.
    for (what, v) in [
        ("a number as a string", json!("2")),
        ("a fraction", json!(1.5)),
        ("a huge number", json!(1e30)),
        (
            "a number past 64 bits",
            serde_json::from_str::<Value>("99999999999999999999").unwrap(),
        ),
        ("negative", json!(-1)),
        ("zero", json!(0)),
        ("too many", json!(1_000_000)),
        ("null", Value::Null),
    ] {
        cases.push(
            checkout(
                format!("quantity: {what}"),
                with(&good, "/items/0/quantity", v),
            )
            .expect(422, "invalid-request", Some("/items/0/quantity")),
        );
    }
    for (what, v) in [
        ("a number", json!(7)),
        ("unknown", json!("NOPE")),
        ("with spaces", json!("A B")),
    ] {
        cases.push(
            checkout(format!("sku: {what}"), with(&good, "/items/0/sku", v)).expect(
                422,
                "invalid-request",
                Some("/items/0/sku"),
            ),
        );
    }
    cases.push(
        checkout("no items".into(), with(&good, "/items", json!([]))).expect(
            422,
            "invalid-request",
            Some("/items"),
        ),
    );
    cases.push(
        checkout(
            "items an object".into(),
            with(&good, "/items", json!({"sku": "A"})),
        )
        .expect(422, "invalid-request", Some("/items")),
    );
    // Fields: unknown, missing, repeated.
    cases.push(
        checkout("an unknown field".into(), with(&good, "/extra", json!(1))).expect(
            422,
            "invalid-request",
            Some("/extra"),
        ),
    );
    cases.push(
        checkout(
            "an unknown nested field".into(),
            with(&good, "/customer/phone", json!("1")),
        )
        .expect(422, "invalid-request", Some("/customer/phone")),
    );
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("payment_token");
    cases.push(checkout("a missing field".into(), missing).expect(
        422,
        "invalid-request",
        Some("/payment_token"),
    ));
    let text = serde_json::to_string(&good).unwrap();
    let repeated = text.replacen(
        "\"payment_token\"",
        "\"payment_token\":\"tok_other\",\"payment_token\"",
        1,
    );
    cases.push(
        case(
            "a repeated field",
            Method::POST,
            "/checkout",
            Body::Raw("application/json", repeated.into_bytes()),
        )
        .expect(422, "invalid-request", Some("/payment_token")),
    );
    // Not JSON, too large, truncated, empty.
    cases.push(
        case(
            "malformed JSON",
            Method::POST,
            "/checkout",
            Body::Raw("application/json", b"{\"customer\": ".to_vec()),
        )
        .expect(400, "malformed-json", None),
    );
    cases.push(
        case(
            "no body",
            Method::POST,
            "/checkout",
            Body::Raw("application/json", Vec::new()),
        )
        .expect(400, "malformed-json", None),
    );
    cases.push(
        case(
            "not JSON",
            Method::POST,
            "/checkout",
            Body::Raw("text/plain", b"hello".to_vec()),
        )
        .expect(415, "unsupported-media-type", None),
    );
    cases.push(
        case("no content type", Method::POST, "/checkout", Body::None).expect(
            415,
            "unsupported-media-type",
            None,
        ),
    );
    cases.push(
        case(
            "an oversized body",
            Method::POST,
            "/checkout",
            Body::Raw(
                "application/json",
                format!("{{\"pad\": \"{}\"}}", "x".repeat(100_000)).into_bytes(),
            ),
        )
        .expect(413, "payload-too-large", None),
    );
    // Headers that reach the database: Idempotency-Key and X-Correlation-Id. (A NUL cannot be
    // sent in a header at all: HTTP refuses it before the service sees it.)
    for (header, max) in [("Idempotency-Key", 255), ("X-Correlation-Id", 128)] {
        for (what, value) in [
            ("a tab", b"a\tb".to_vec()),
            ("a space", b"a b".to_vec()),
            ("non-ASCII bytes", b"caf\xc3\xa9".to_vec()),
            ("empty", Vec::new()),
            ("one character too long", vec![b'k'; max + 1]),
            ("ten kilobytes", vec![b'k'; 10_000]),
        ] {
            cases.push(
                checkout(format!("{header}: {what}"), good.clone())
                    .header(header, value)
                    .expect(422, "invalid-request", Some(&format!("header:{header}"))),
            );
        }
    }
    cases.push(
        checkout("Idempotency-Key twice".into(), good.clone())
            .header("Idempotency-Key", "one")
            .header("Idempotency-Key", "two")
            .expect(422, "invalid-request", Some("header:Idempotency-Key")),
    );
    cases.push(
        checkout("Prefer: wait=abc".into(), good.clone())
            .header("Prefer", "wait=abc")
            .expect(400, "invalid-wait", None),
    );

    // Cancel: its reason is stored in the saga.
    let cancel =
        |name: String, body: Body| case(name, Method::POST, format!("/sagas/{saga}/cancel"), body);
    for (what, v, names) in [
        (
            "a NUL in the reason",
            json!({"reason": "changed my mind\u{0}"}),
            "/reason",
        ),
        (
            "control characters in the reason",
            json!({"reason": "\u{7}\u{1b}[31mred"}),
            "/reason",
        ),
        (
            "a reason of 10,000 characters",
            json!({"reason": "x".repeat(10_000)}),
            "/reason",
        ),
        (
            "a reason that is an object",
            json!({"reason": {"why": "x"}}),
            "/reason",
        ),
        (
            "a reason that is a number",
            json!({"reason": 42}),
            "/reason",
        ),
        ("an array", json!(["changed my mind"]), ""),
        (
            "an unknown field",
            json!({"reason": "x", "force": true}),
            "/force",
        ),
    ] {
        cases.push(cancel(format!("cancel: {what}"), Body::Json(v)).expect(
            422,
            "invalid-request",
            Some(names),
        ));
    }
    cases.push(
        cancel(
            "cancel: malformed JSON".into(),
            Body::Raw("application/json", b"{\"reason\": ".to_vec()),
        )
        .expect(400, "malformed-json", None),
    );
    cases.push(
        cancel(
            "cancel: not JSON".into(),
            Body::Raw("text/plain", b"please".to_vec()),
        )
        .expect(415, "unsupported-media-type", None),
    );
    cases.push(
        cancel(
            "cancel: X-Correlation-Id with a tab".into(),
            Body::Json(json!({"reason": "x"})),
        )
        .header("X-Correlation-Id", b"a\tb".to_vec())
        .expect(422, "invalid-request", Some("header:X-Correlation-Id")),
    );

    // Breakers: what an operator forces is shared by every orchestrator.
    let force = |name: String, body: Value| {
        case(
            name,
            Method::PUT,
            "/breakers/charge_payment",
            Body::Json(body),
        )
    };
    for (what, v, names) in [
        ("an array", json!(["open"]), ""),
        (
            "a NUL in the reason",
            json!({"force": "open", "reason": "maintenance\u{0}"}),
            "/reason",
        ),
        (
            "control characters in the reason",
            json!({"force": "open", "reason": "\u{1b}[2J"}),
            "/reason",
        ),
        ("an unknown value", json!({"force": "ajar"}), "/force"),
        ("force as an array", json!({"force": ["open"]}), "/force"),
        ("no force", json!({"reason": "x"}), "/force"),
        (
            "an unknown field",
            json!({"force": "open", "until": "tomorrow"}),
            "/until",
        ),
    ] {
        cases.push(force(format!("breaker: {what}"), v).expect(
            422,
            "invalid-request",
            Some(names),
        ));
    }

    // Queries.
    for (path, names) in [
        ("/sagas?status=bogus", "parameter:status"),
        ("/sagas?limit=abc", "parameter:limit"),
        ("/sagas?limit=0", "parameter:limit"),
        ("/sagas?limit=1e3", "parameter:limit"),
        ("/sagas?before=yesterday", "parameter:before"),
        ("/sagas?sort=asc", "parameter:sort"),
        ("/sagas?limit=5&limit=6", "parameter:limit"),
    ] {
        cases.push(
            case(format!("GET {path}"), Method::GET, path, Body::None).expect(
                400,
                "invalid-query",
                Some(names),
            ),
        );
    }
    cases.push(
        case(
            "GET a saga with ?wait=abc",
            Method::GET,
            format!("/sagas/{saga}?wait=abc"),
            Body::None,
        )
        .expect(400, "invalid-wait", None),
    );
    cases.push(
        case(
            "GET a saga that is not a UUID",
            Method::GET,
            "/sagas/not-a-uuid",
            Body::None,
        )
        .expect(400, "invalid-saga-id", None),
    );
    let unknown = uuid::Uuid::now_v7();
    cases.push(
        case(
            "GET a saga that does not exist",
            Method::GET,
            format!("/sagas/{unknown}"),
            Body::None,
        )
        .expect(404, "not-found", None),
    );
    // Answered at once, not after the wait (the client gives up after 30 s).
    cases.push(
        case(
            "a long poll of a saga that does not exist",
            Method::GET,
            format!("/sagas/{unknown}?wait=60"),
            Body::None,
        )
        .expect(404, "not-found", None),
    );
    cases.push(
        case(
            "cancel a saga that does not exist",
            Method::POST,
            format!("/sagas/{unknown}/cancel"),
            Body::Json(json!({})),
        )
        .expect(404, "not-found", None),
    );
    cases.push(
        case("DELETE /checkout", Method::DELETE, "/checkout", Body::None).expect(
            405,
            "method-not-allowed",
            None,
        ),
    );
    cases.push(
        case(
            "a path that does not exist",
            Method::GET,
            "/nope",
            Body::None,
        )
        .expect(404, "not-found", None),
    );
    cases.push(
        case(
            "a path that is not UTF-8",
            Method::GET,
            "/sagas/%FF",
            Body::None,
        )
        .expect(400, "invalid-path", None),
    );
    cases
}

#[tokio::test]
async fn every_bad_input_gets_its_problem_and_changes_nothing() {
    // Without workers, with a first step that waits a day: nothing moves but what the requests
    // do. A running saga is the target of the cancels.
    let mut app = App::spawn_with(Options::without_workers().orchestrator(
        "SAGA_CHECKOUT__POLICIES__RESERVE_STOCK__FORWARD__DEADLINE_MS",
        "86400000",
    ))
    .await;
    let saga = app.place(&order(&[("B", 1)], "tok_visa")).await;
    app.wait_for("SELECT count(*) FROM orchestrator.outbox", 0, WITHIN)
        .await;
    let before = fingerprint(&app).await;

    let cases = bad_cases(&saga);
    assert!(cases.len() > 120, "{} cases", cases.len());
    for c in cases {
        let mut request = app
            .http
            .request(c.method.clone(), format!("{}{}", app.base, c.path));
        for (name, value) in &c.headers {
            request = request.header(
                HeaderName::from_static(leak_lower(name)),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        request = match &c.body {
            Body::Json(v) => request.json(v),
            Body::Raw(content_type, bytes) => request
                .header("content-type", *content_type)
                .body(bytes.clone()),
            Body::None => request,
        };
        let r = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let status = r.status().as_u16();
        let content_type = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = r.text().await.unwrap();
        assert_eq!(status, c.status, "{}: {text}", c.name);
        assert_eq!(
            content_type.as_deref(),
            Some("application/problem+json"),
            "{}",
            c.name
        );
        let p: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            p["type"],
            format!("/problems/{}", c.problem),
            "{}: {p}",
            c.name
        );
        assert_eq!(p["status"], c.status, "{}", c.name);
        let detail = p["detail"].as_str().unwrap_or_default();
        assert!(!detail.is_empty(), "{}: {p}", c.name);
        // In the client's terms: JSON's types and the fields' names, never ours.
        for rust in [
            "struct ",
            "i64",
            "u32",
            "CheckoutRequest",
            "Request",
            "sequence",
            "map",
        ] {
            assert!(
                !detail.contains(rust),
                "{}: the detail speaks Rust: {detail}",
                c.name
            );
        }
        if let Some(names) = &c.names {
            let named: Vec<String> = p["errors"]
                .as_array()
                .unwrap_or_else(|| panic!("{}: no errors in {p}", c.name))
                .iter()
                .map(|e| {
                    if let Some(h) = e["header"].as_str() {
                        format!("header:{h}")
                    } else if let Some(q) = e["parameter"].as_str() {
                        format!("parameter:{q}")
                    } else {
                        e["pointer"].as_str().unwrap_or("?").to_owned()
                    }
                })
                .collect();
            assert!(
                named.contains(names),
                "{}: names {named:?}, not {names}: {p}",
                c.name
            );
        }
        // The status list names every status.
        if c.path == "/sagas?status=bogus" {
            for status in [
                "running",
                "parked",
                "compensating",
                "completed",
                "compensated",
                "failed",
            ] {
                assert!(detail.contains(status), "{detail}");
            }
        }
        assert_eq!(fingerprint(&app).await, before, "{}: a row changed", c.name);
    }

    // Nothing broke: with the workers up, the waiting saga and a new one complete, and no
    // breaker ever opened.
    for w in WORKERS {
        app.start(w);
    }
    let fresh = app.place(&order(&[("A", 1)], "tok_visa")).await;
    for id in [&saga, &fresh] {
        let s = app.wait_terminal(id, WITHIN).await;
        assert_eq!(s["status"], "completed", "{s:#}");
    }
    let breakers = app.get_json("/breakers").await;
    for b in breakers["breakers"].as_array().unwrap() {
        assert_eq!(
            (&b["state"], &b["times_opened"]),
            (&json!("closed"), &json!(0)),
            "{b}"
        );
        assert!(b["forced"].is_null(), "{b}");
    }
    app.assert_invariants(2, Duration::from_secs(60)).await;
}

/// A header name as reqwest wants it (lower case, 'static).
fn leak_lower(name: &str) -> &'static str {
    Box::leak(name.to_ascii_lowercase().into_boxed_str())
}
