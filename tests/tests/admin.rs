//! The admin API and its guard, over the real stack: every route of the router walked without
//! credentials, with a wrong token and as a viewer; operator actions on real sagas (a failed
//! saga resolved by hand, a parked one retried through its open breaker, a cancel refused past
//! the pivot), each in the audit log and on the saga's timeline; the list's filters and search.

use std::time::{Duration, Instant};

use e2e::{App, OPERATOR_TOKEN, Options, VIEWER_TOKEN, client, order};
use orchestrator::http::{Access, routes};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(40);

/// A path of the router with its parameters filled in.
fn concrete(path: &str, saga: &str) -> String {
    path.replace("{id}", saga)
        .replace("{action}", "cancel")
        .replace("{name}", "PaymentSettled")
        .replace("{step}", "charge_payment")
        .replace("{slug}", "not-found")
}

async fn call(http: &reqwest::Client, base: &str, method: &str, path: &str) -> reqwest::Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    http.request(method, format!("{base}{path}"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test]
async fn no_admin_route_answers_without_credentials_and_a_viewer_cannot_act() {
    let app = App::spawn_with(Options::without_workers()).await;
    let saga = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let anonymous = client(None);
    let wrong = client(Some("not-a-token-anybody-has"));
    let viewer = client(Some(VIEWER_TOKEN));
    let all = routes();
    let guarded = all.iter().filter(|r| r.access != Access::Public).count();
    assert!(guarded >= 10, "the walk covers the admin routes: {guarded}");
    for r in &all {
        let path = concrete(r.path, &saga);
        let what = format!("{} {}", r.method, r.path);
        let got = call(&anonymous, &app.base, r.method.as_str(), &path).await;
        if r.access == Access::Public {
            // (A failed login is a 401 of its own, without the guard's challenge.)
            assert!(
                got.status() != 403
                    && !(got.status() == 401 && got.headers().contains_key("www-authenticate")),
                "{what} is public, got {}",
                got.status()
            );
            continue;
        }
        let is_page = r.path.starts_with("/dashboard") && r.method.as_str() == "GET";
        if is_page {
            assert_eq!(
                got.status(),
                303,
                "{what} sends an anonymous browser to log in"
            );
            let to = got.headers()["location"].to_str().unwrap();
            assert!(to.starts_with("/dashboard/login"), "{what}: {to}");
        } else {
            assert_eq!(got.status(), 401, "{what} without credentials");
            assert!(got.headers().contains_key("www-authenticate"), "{what}");
            let problem: Value = got.json().await.unwrap();
            assert_eq!(
                problem["type"], "/problems/unauthorized",
                "{what}: {problem}"
            );
            let got = call(&wrong, &app.base, r.method.as_str(), &path).await;
            assert_eq!(got.status(), 401, "{what} with a wrong token");
        }
        let got = call(&viewer, &app.base, r.method.as_str(), &path).await;
        match r.access {
            Access::Operator => {
                assert_eq!(got.status(), 403, "{what} refuses a viewer");
                let problem: Value = got.json().await.unwrap();
                assert_eq!(problem["type"], "/problems/forbidden", "{what}: {problem}");
            }
            _ => assert!(
                !matches!(got.status().as_u16(), 401 | 403),
                "{what} lets a viewer read, got {}",
                got.status()
            ),
        }
    }
    // Nothing the refused writes asked for happened.
    let s = app.saga(&saga).await;
    assert_eq!(s["status"], "running", "{s:#}");
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.breaker_overrides")
            .await,
        0
    );
    // The masked public view stays public, the whole one needs a login.
    let public: Value = anonymous
        .get(format!("{}/sagas/{saga}", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(
        public["data"]["customer"]["email"], "ada@example.com",
        "{public:#}"
    );
    let whole = app.get_json(&format!("/admin/sagas/{saga}")).await;
    assert_eq!(
        whole["data"]["customer"]["email"], "ada@example.com",
        "{whole:#}"
    );
    assert!(
        !whole.to_string().contains("tok_visa"),
        "a payment token is never shown"
    );
}

async fn act(app: &App, token: &str, saga: &str, action: &str, reason: &str) -> reqwest::Response {
    client(Some(token))
        .post(format!("{}/admin/sagas/{saga}/actions/{action}", app.base))
        .json(&json!({ "reason": reason }))
        .send()
        .await
        .unwrap()
}

async fn place(app: &App, sku: &str) -> (String, String) {
    let id = app.place(&order(&[(sku, 1)], "tok_visa")).await;
    let saga = app.saga(&id).await;
    (id, saga["data"]["order_id"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn an_operator_resolves_a_failed_saga_and_it_is_audited_and_on_its_timeline() {
    let app = App::spawn_with(Options::with_fulfilment()).await;
    let (_checkout, order_id) = place(&app, "A").await;
    app.plan_shipment(
        &order_id,
        &json!({"outcome": "lost", "lost_reason": "fell off the van"}),
    )
    .await;
    let fulfilment = app.fulfilment_of(&order_id, WITHIN).await;
    let f = app.wait_terminal(&fulfilment, WITHIN).await;
    assert_eq!(f["status"], "failed", "{f:#}");

    // The detail says what may be done, and why not the rest.
    let detail = app.get_json(&format!("/admin/sagas/{fulfilment}")).await;
    let allowed = |name: &str| {
        detail["actions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["action"] == name)
            .unwrap_or_else(|| panic!("{name}: {detail:#}"))
            .clone()
    };
    assert_eq!(allowed("resolve")["allowed"], true, "{detail:#}");
    assert_eq!(allowed("retry_now")["allowed"], false, "{detail:#}");
    assert!(allowed("retry_now")["why_not"].is_string(), "{detail:#}");

    let r = act(
        &app,
        VIEWER_TOKEN,
        &fulfilment,
        "resolve",
        "refunded by phone",
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = act(&app, OPERATOR_TOKEN, &fulfilment, "resolve", "  ").await;
    assert_eq!(r.status(), 422, "a reason is required");
    let r = act(&app, OPERATOR_TOKEN, &fulfilment, "teleport", "x").await;
    assert_eq!(r.status(), 404);
    let r = act(
        &app,
        OPERATOR_TOKEN,
        &fulfilment,
        "resolve",
        "customer refunded by phone",
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let s = app.saga(&fulfilment).await;
    assert_eq!(s["status"], "resolved", "{s:#}");

    // Once resolved, nothing more: refused with the machine's reason, and audited too.
    let r = act(&app, OPERATOR_TOKEN, &fulfilment, "recover", "again").await;
    assert_eq!(r.status(), 409);
    let problem: Value = r.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().len() > 5, "{problem:#}");

    let detail = app.get_json(&format!("/admin/sagas/{fulfilment}")).await;
    let last = detail["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "operator_resolve", "{last:#}");
    assert_eq!(last["input"]["by"], "e2e", "{last:#}");
    assert_eq!(last["input"]["reason"], "customer refunded by phone");
    let audit = detail["audit"].as_array().unwrap();
    assert_eq!(audit.len(), 2, "{audit:#?}");
    assert_eq!(audit[0]["action"], "saga.recover");
    assert!(
        audit[0]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("refused: ")
    );
    assert_eq!(audit[1]["action"], "saga.resolve");
    assert_eq!(audit[1]["actor"], "e2e");
    assert_eq!(audit[1]["outcome"], "done");
    // The replayed log gives the stored snapshot.
    let v = app.get_json(&format!("/sagas/{fulfilment}/verify")).await;
    assert_eq!(v["consistent"], true, "{v:#}");
}

#[tokio::test]
async fn retry_now_sends_a_parked_checkout_through_its_open_breaker() {
    let app = App::spawn().await;
    let r = app
        .http
        .put(format!("{}/breakers/charge_payment", app.base))
        .json(&json!({"force": "open", "reason": "processor maintenance"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let deadline = Instant::now() + WITHIN;
    loop {
        let s = app.saga(&id).await;
        if s["status"] == "parked" {
            break;
        }
        assert!(Instant::now() < deadline, "never parked: {s:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = act(&app, OPERATOR_TOKEN, &id, "retry_now", "this one is urgent").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let s = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(s["status"], "completed", "{s:#}");
    // The breaker is still forced open: only the operator's saga went through.
    let breakers = app.get_json("/breakers").await;
    let charge = breakers["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["step"] == "charge_payment")
        .unwrap()
        .clone();
    assert_eq!(charge["forced"], "open", "{charge:#}");
    assert_eq!(charge["blocking"], true, "{charge:#}");
    let audit = app.get_json("/admin/audit").await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["saga.retry_now", "breaker.force_open"],
        "{audit:#}"
    );
    // Retrying a completed saga is refused with the reason.
    let r = act(&app, OPERATOR_TOKEN, &id, "retry_now", "again").await;
    assert_eq!(r.status(), 409);
    // The metrics say what happened, per saga type and step.
    let metrics = client(None)
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"saga_step_dispatches_total{type="checkout",step="charge_payment",phase="forward",kind="first"} 1"#,
        r#"saga_step_replies_total{type="checkout",step="commit_stock",phase="forward"} 1"#,
        r#"saga_step_seconds_count{type="checkout",step="reserve_stock",phase="forward"} 1"#,
        r#"saga_pool_backlog{pool="payment",kind="pending"} 0"#,
        "saga_outbox_lag_seconds ",
        r#"saga_breaker_state{step="charge_payment"}"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
}

#[tokio::test]
async fn the_list_filters_searches_and_pages_and_a_bulk_action_counts_first() {
    let app = App::spawn_with(Options::without_workers()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut body = order(&[("A", 1)], "tok_visa");
        body["customer"]["id"] = json!(format!("cust-{i}"));
        body["customer"]["email"] = json!(format!("Buyer{i}@Example.com"));
        ids.push(app.place(&body).await);
    }
    let page = |q: &str| {
        let app = &app;
        let q = q.to_owned();
        async move { app.get_json(&format!("/admin/sagas?{q}")).await }
    };
    let found = |v: &Value| -> Vec<String> {
        v["sagas"]
            .as_array()
            .unwrap_or_else(|| panic!("{v:#}"))
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(
        found(&page("type=checkout&status=running").await),
        newest_first
    );
    assert!(found(&page("status=completed").await).is_empty());
    // Keyset pages: two, two, one, then no next link.
    let first = page("limit=2").await;
    assert_eq!(found(&first), newest_first[..2]);
    let second = app.get_json(first["next"].as_str().unwrap()).await;
    assert_eq!(found(&second), newest_first[2..4]);
    // Search: by saga id, order id, correlation id, customer id and email (any case).
    let s2 = app.get_json(&format!("/admin/sagas/{}", ids[2])).await;
    let order_id = s2["data"]["order_id"].as_str().unwrap().to_owned();
    let correlation = s2["saga"]["correlation_id"].as_str().unwrap().to_owned();
    for q in [
        ids[2].clone(),
        order_id,
        correlation,
        "cust-2".into(),
        "buyer2@example.com".into(),
    ] {
        let got = found(&page(&format!("q={}", urlencode(&q))).await);
        assert_eq!(got, [ids[2].clone()], "search {q}");
    }
    // A time range is an id range.
    let from = chrono::Utc::now() + chrono::Duration::hours(1);
    assert!(found(&page(&format!("from={}", urlencode(&from.to_rfc3339()))).await).is_empty());
    // Bad filters are 400 problems naming the parameter.
    for bad in [
        "status=lost",
        "type=nope",
        "limit=0",
        "from=yesterday",
        "after=x",
        "colour=red",
    ] {
        let r = app
            .http
            .get(format!("{}/admin/sagas?{bad}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{bad}"
        );
    }
    // A bulk cancel over a filter: the dry run counts, then it cancels them all.
    let bulk = |dry: bool| {
        app.http
            .post(format!("{}/admin/sagas/bulk", app.base))
            .json(&json!({"action": "cancel", "reason": "test clean-up",
                          "filter": {"status": "running"}, "dry_run": dry}))
            .send()
    };
    let dry: Value = bulk(true).await.unwrap().json().await.unwrap();
    assert_eq!(dry["matched"], 5, "{dry:#}");
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.audit_log")
            .await,
        0
    );
    let r = app
        .http
        .post(format!("{}/admin/sagas/bulk", app.base))
        .json(&json!({"action": "cancel", "reason": "x", "filter": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "a bulk action needs a filter");
    let done: Value = bulk(false).await.unwrap().json().await.unwrap();
    assert_eq!(done["applied"].as_array().unwrap().len(), 5, "{done:#}");
    for id in &ids {
        // No worker runs here: each waits for its reservation to be released.
        let s = app.saga(id).await;
        assert_eq!(s["status"], "compensating", "{s:#}");
        assert!(
            s["cancel_reason"]
                .as_str()
                .unwrap()
                .contains("test clean-up (by e2e)"),
            "{s:#}"
        );
    }
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.audit_log WHERE action = 'saga.cancel' AND outcome = 'done'").await,
        5
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An account of the dashboard, made as `orchestrator admin users add` makes it.
async fn account(app: &App, name: &str, role: &str, password: &str) {
    let hash = orchestrator::http::auth::hash_password(password).unwrap();
    sqlx::query(
        "INSERT INTO orchestrator.operators (name, role, password_hash) VALUES ($1, $2, $3)",
    )
    .bind(name)
    .bind(role)
    .bind(hash)
    .execute(&app.pool)
    .await
    .unwrap();
}

/// Log in through the form; the session cookie.
async fn log_in(app: &App, name: &str, password: &str) -> Option<String> {
    let r = client(None)
        .post(format!("{}/dashboard/login", app.base))
        .form(&[("username", name), ("password", password)])
        .send()
        .await
        .unwrap();
    if r.status() != 303 {
        return None;
    }
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    Some(cookie.split(';').next().unwrap().to_owned())
}

fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    page[at..at + 64].to_owned()
}

#[tokio::test]
async fn a_dashboard_session_reads_and_acts_only_with_its_csrf_token() {
    let app = App::spawn_with(Options::without_workers()).await;
    let saga = app.place(&order(&[("A", 1)], "tok_visa")).await;
    account(&app, "ada", "operator", "correct horse battery").await;
    account(&app, "bob", "viewer", "another long password").await;
    assert_eq!(log_in(&app, "ada", "wrong password").await, None);
    assert_eq!(log_in(&app, "nobody", "correct horse battery").await, None);
    let cookie = log_in(&app, "ada", "correct horse battery")
        .await
        .expect("logged in");
    let browser = client(None);
    let get = |path: String| {
        browser
            .get(format!("{}{path}", app.base))
            .header("cookie", &cookie)
            .send()
    };
    for path in [
        "/dashboard".to_owned(),
        "/dashboard/sagas?status=running".to_owned(),
        format!("/dashboard/sagas/{saga}"),
        "/dashboard/dead-letters".to_owned(),
        "/dashboard/audit".to_owned(),
    ] {
        let r = get(path.clone()).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-store", "{path}");
        let body = r.text().await.unwrap();
        assert!(body.contains("ada"), "{path} names who is logged in");
        assert!(
            !body.contains("id=\"dev-warning\""),
            "{path}: not in dev mode"
        );
    }
    let detail = get(format!("/dashboard/sagas/{saga}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        detail.contains(&saga) && detail.contains("id=\"diagram\""),
        "the detail page"
    );
    let csrf = csrf_of(&detail);
    let post = |fields: Vec<(&'static str, String)>, token: Option<String>| {
        let mut fields = fields;
        if let Some(t) = token {
            fields.push(("csrf", t));
        }
        browser
            .post(format!(
                "{}/dashboard/sagas/{saga}/actions/cancel",
                app.base
            ))
            .header("cookie", &cookie)
            .form(&fields)
            .send()
    };
    // Without the session's CSRF token (a forged form of another site), refused.
    let r = post(
        vec![("reason", "x".into()), ("confirm", "yes".into())],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = post(
        vec![("reason", "x".into()), ("confirm", "yes".into())],
        Some("0".repeat(64)),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(app.saga(&saga).await["status"], "running");
    // With it: first a confirmation page, then the action.
    let r = post(
        vec![("reason", "customer called".into())],
        Some(csrf.clone()),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text().await.unwrap().contains("id=\"confirm\""),
        "a confirmation first"
    );
    assert_eq!(app.saga(&saga).await["status"], "running");
    let r = post(
        vec![
            ("reason", "customer called".into()),
            ("confirm", "yes".into()),
        ],
        Some(csrf),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(app.saga(&saga).await["status"], "compensating");
    let audit = app.get_json("/admin/audit").await;
    assert_eq!(audit["entries"][0]["actor"], "ada", "{audit:#}");
    assert_eq!(audit["entries"][0]["role"], "operator", "{audit:#}");

    // A viewer reads but has no action forms, and a write is refused.
    let viewer = log_in(&app, "bob", "another long password").await.unwrap();
    let page = browser
        .get(format!("{}/dashboard/sagas/{saga}", app.base))
        .header("cookie", &viewer)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("/actions/"), "no action forms for a viewer");
    let r = browser
        .post(format!(
            "{}/dashboard/sagas/{saga}/actions/resolve",
            app.base
        ))
        .header("cookie", &viewer)
        .form(&[
            ("reason", "x"),
            ("confirm", "yes"),
            ("csrf", &csrf_of(&page)),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Logged out, the cookie is worth nothing.
    let r = browser
        .post(format!("{}/dashboard/logout", app.base))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf_of(&detail))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = get("/dashboard".to_owned()).await.unwrap();
    assert_eq!(r.status(), 303, "back to the login form");
}

#[tokio::test]
async fn dev_mode_is_explicit_and_says_so_on_every_page() {
    let app =
        App::spawn_with(Options::without_workers().orchestrator("SAGA_ADMIN__AUTH", "disabled"))
            .await;
    let anonymous = client(None);
    for path in ["/dashboard", "/dashboard/sagas", "/dashboard/audit"] {
        let r = anonymous
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.text().await.unwrap().contains("id=\"dev-warning\""),
            "{path}"
        );
    }
    let r = anonymous
        .get(format!("{}/admin/sagas", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn dead_letters_are_listed_replayed_and_discarded_by_an_operator() {
    let app = App::spawn_with(Options::without_workers()).await;
    let nats = async_nats::connect(&app.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    for i in 0..3 {
        js.publish(
            format!("{}.reply.inventory", app.name),
            format!("{{\"not\": \"a reply\", \"n\": {i}}}").into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let deadline = Instant::now() + WITHIN;
    let listed = loop {
        let v = app.get_json("/admin/dead-letters").await;
        if v["letters"].as_array().is_some_and(|l| l.len() == 3) {
            break v;
        }
        assert!(Instant::now() < deadline, "never dead-lettered: {v:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(listed["counts"]["replies"], 3, "{listed:#}");
    let letters = listed["letters"].as_array().unwrap();
    let first = &letters[0];
    assert_eq!(first["origin"], "replies", "{first:#}");
    assert!(
        first["reason"].as_str().unwrap().contains("undecodable"),
        "{first:#}"
    );
    assert_eq!(first["subject"], format!("{}.reply.inventory", app.name));
    let seqs: Vec<u64> = letters.iter().map(|l| l["seq"].as_u64().unwrap()).collect();

    // A viewer may look, not act.
    let r = client(Some(VIEWER_TOKEN))
        .post(format!(
            "{}/admin/dead-letters/{}/discard",
            app.base, seqs[0]
        ))
        .json(&json!({"reason": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Discard one.
    let r = app
        .http
        .post(format!(
            "{}/admin/dead-letters/{}/discard",
            app.base, seqs[0]
        ))
        .json(&json!({"reason": "garbage from a test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // Replay one: it goes back to its subject, is still not a reply, and is set aside again
    // (a new letter), which is how an operator sees that a fix did not take.
    let r = app
        .http
        .post(format!(
            "{}/admin/dead-letters/{}/replay",
            app.base, seqs[1]
        ))
        .json(&json!({"reason": "after the fix"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let deadline = Instant::now() + WITHIN;
    loop {
        let v = app.get_json("/admin/dead-letters").await;
        let now: Vec<u64> = v["letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["seq"].as_u64().unwrap())
            .collect();
        if now.len() == 2 && !now.contains(&seqs[0]) && !now.contains(&seqs[1]) {
            break;
        }
        assert!(Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Bulk over the origin: a dry run counts, then all go.
    let bulk = |dry: bool| {
        app.http
            .post(format!("{}/admin/dead-letters/bulk", app.base))
            .json(&json!({"action": "discard", "origin": "replies", "reason": "clean-up", "dry_run": dry}))
            .send()
    };
    let dry: Value = bulk(true).await.unwrap().json().await.unwrap();
    assert_eq!(dry["matched"], 2, "{dry:#}");
    let done: Value = bulk(false).await.unwrap().json().await.unwrap();
    assert_eq!(done["done"].as_array().unwrap().len(), 2, "{done:#}");
    let v = app.get_json("/admin/dead-letters").await;
    assert!(v["letters"].as_array().unwrap().is_empty(), "{v:#}");
    // A letter that is gone is a 404; every action is in the audit log.
    let r = app
        .http
        .post(format!(
            "{}/admin/dead-letters/{}/replay",
            app.base, seqs[0]
        ))
        .json(&json!({"reason": "again"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.audit_log WHERE action LIKE 'dead_letter.%' AND outcome = 'done'").await,
        4
    );
}
