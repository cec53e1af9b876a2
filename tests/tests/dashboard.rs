//! The admin dashboard in a real browser (headless Chromium over WebDriver, `e2e::browser`),
//! over the real stack. An operator logs in, reads the overview, filters and searches the saga
//! list, reads a compensated saga's timeline and diagram, resolves a failed saga and retries a
//! parked one through the pages' forms and their confirmation, and sees a saga's page follow an
//! action done elsewhere (the JSON admin API) without a reload. An anonymous visitor is sent to
//! log in; a viewer sees no action and a write with a viewer's session is refused.
//!
//! Screenshots of the overview, the list and a saga's page are saved (`e2e::browser`): the
//! README shows them.

use std::time::{Duration, Instant};

use e2e::browser::Browser;
use e2e::{App, Options, client, order};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(40);
/// How long a page may take to show what the stack did.
const SHOWN: Duration = Duration::from_secs(15);

/// An account of the dashboard (`orchestrator.operators`).
async fn account(app: &App, name: &str, role: &str, password: &str) {
    let hash = orchestrator::http::auth::hash_password(password).expect("hash");
    sqlx::query(
        "INSERT INTO orchestrator.operators (name, role, password_hash) VALUES ($1, $2, $3)",
    )
    .bind(name)
    .bind(role)
    .bind(hash)
    .execute(&app.pool)
    .await
    .expect("insert the account");
}

/// A checkout whose fulfilment fails: the carrier loses the parcel. Returns the checkout's
/// order id.
async fn lost_parcel(app: &App) -> String {
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let order_id = app.saga(&id).await["data"]["order_id"]
        .as_str()
        .expect("order_id")
        .to_owned();
    app.plan_shipment(
        &order_id,
        &json!({"outcome": "lost", "lost_reason": "fell off the van"}),
    )
    .await;
    order_id
}

async fn wait_status(app: &App, id: &str, status: &str) -> Value {
    let deadline = Instant::now() + WITHIN;
    loop {
        let s = app.saga(id).await;
        if s["status"] == status {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "saga {id} not {status} within {WITHIN:?}: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The ids of the sagas the list page shows, in its order.
async fn listed(browser: &Browser) -> Vec<String> {
    browser.attrs("#saga-list tr[data-saga]", "data-saga").await
}

/// On a saga's page: fill the reason of the action's form, send it, confirm, and land on the
/// saga's page again with the flash message, which is returned.
async fn act_in_page(browser: &Browser, saga: &str, action: &str, reason: &str) -> String {
    let form = browser.wait_for(&format!("#action-{action}"), SHOWN).await;
    browser.fill_in(&form, "reason", reason).await;
    browser.click_submit(&form).await;
    // The confirmation page says what will happen and carries the reason on.
    browser.wait_for("#confirm", SHOWN).await;
    browser.screenshot(&format!("confirm-{action}")).await;
    let confirmation = browser.text_of("main").await.unwrap_or_default();
    assert!(
        confirmation.contains(saga),
        "the confirmation names the saga: {confirmation}"
    );
    assert_eq!(
        browser.attrs("main input[name=reason]", "value").await,
        [reason],
        "the confirmation carries the reason"
    );
    browser.click("#confirm").await;
    browser
        .wait_for_path(&format!("/dashboard/sagas/{saga}"), SHOWN)
        .await;
    browser.wait_for_text("#flash", "", SHOWN).await
}

#[tokio::test]
async fn an_operator_inspects_and_acts_on_sagas_in_the_dashboard() {
    let app = App::spawn_with(Options::with_fulfilment()).await;
    account(&app, "olga", "operator", "correct horse battery").await;

    // What the pages will show: two failed fulfilments (lost parcels), a checkout compensated
    // after a declined card, and, once the processor's breaker is forced open, a parked one.
    let lost = [lost_parcel(&app).await, lost_parcel(&app).await];
    let declined = app.place(&order(&[("B", 2)], "tok_decline")).await;
    let mut failed = Vec::new();
    for order_id in &lost {
        let f = app.fulfilment_of(order_id, WITHIN).await;
        assert_eq!(app.wait_terminal(&f, WITHIN).await["status"], "failed");
        failed.push(f);
    }
    let compensated = app.wait_terminal(&declined, WITHIN).await;
    assert_eq!(compensated["status"], "compensated", "{compensated:#}");
    let declined_order = compensated["data"]["order_id"].as_str().unwrap().to_owned();
    let r = app
        .http
        .put(format!("{}/breakers/charge_payment", app.base))
        .json(&json!({"force": "open", "reason": "processor maintenance"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let parked = app.place(&order(&[("A", 1)], "tok_visa")).await;
    wait_status(&app, &parked, "parked").await;

    let browser = Browser::start(&app.logs).await;
    browser
        .login(&app.base, "olga", "correct horse battery")
        .await;
    browser.wait_for_path("/dashboard", SHOWN).await;
    assert!(
        !browser.has("#dev-warning").await,
        "no development-mode banner"
    );

    // The overview: counts by type and status, the three charts, the breakers.
    browser
        .wait_for_text("#overview-counts", "checkout", SHOWN)
        .await;
    browser
        .wait_for_text("#overview-counts", "fulfilment", SHOWN)
        .await;
    for chart in ["#chart-throughput", "#chart-latency", "#chart-failures"] {
        assert!(browser.has(chart).await, "{chart} on the overview");
    }
    browser
        .wait_for_text("#breakers", "charge_payment", SHOWN)
        .await;
    assert!(browser.has("#attention").await && browser.has("#pools").await);
    browser.screenshot("overview").await;

    // The list, then filtered by status, then searched by the order id.
    browser.goto(&format!("{}/dashboard/sagas", app.base)).await;
    browser.wait_for("#saga-list", SHOWN).await;
    let all = listed(&browser).await;
    for id in failed.iter().chain([&declined, &parked]) {
        assert!(all.contains(id), "{id} in the list: {all:?}");
    }
    browser.screenshot("list").await;
    let filter = browser.wait_for("#saga-filter", SHOWN).await;
    browser.select(&filter, "status", "compensated").await;
    browser.click_submit(&filter).await;
    let deadline = Instant::now() + SHOWN;
    while !browser
        .url()
        .await
        .query()
        .is_some_and(|q| q.contains("status=compensated"))
    {
        assert!(Instant::now() < deadline, "the filter form was not sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser.wait_for("#saga-list", SHOWN).await;
    assert_eq!(
        listed(&browser).await,
        std::slice::from_ref(&declined),
        "status=compensated"
    );
    let filter = browser.wait_for("#saga-filter", SHOWN).await;
    browser.select(&filter, "status", "").await;
    browser.fill_in(&filter, "q", &declined_order).await;
    browser.click_submit(&filter).await;
    let deadline = Instant::now() + SHOWN;
    while !browser
        .url()
        .await
        .query()
        .is_some_and(|q| q.contains(&format!("q={declined_order}")))
    {
        assert!(Instant::now() < deadline, "the search was not sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser.wait_for("#saga-list", SHOWN).await;
    assert_eq!(
        listed(&browser).await,
        std::slice::from_ref(&declined),
        "search {declined_order}"
    );

    // The compensated checkout: its timeline, and the diagram with the failure and the
    // compensation marked.
    browser
        .click(&format!("#saga-list a[href='/dashboard/sagas/{declined}']"))
        .await;
    browser
        .wait_for_path(&format!("/dashboard/sagas/{declined}"), SHOWN)
        .await;
    assert_eq!(
        browser
            .wait_for_text("#saga-status", "compensated", SHOWN)
            .await,
        "compensated"
    );
    let kinds = browser.attrs("#timeline tr[data-kind]", "data-kind").await;
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("started"),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k == "step_failed_permanent") && kinds.len() >= 4,
        "the timeline has the saga's events: {kinds:?}"
    );
    let failure = browser
        .text_of("#timeline tr[data-kind=step_failed_permanent]")
        .await
        .unwrap_or_default();
    assert!(
        failure.contains("card_declined"),
        "the timeline says why the step failed: {failure}"
    );
    let diagram = browser.attrs("#diagram", "data-position").await;
    assert_eq!(diagram, ["compensated"], "the diagram's position");
    assert!(
        browser
            .has("#diagram g.step.fwd.failed[data-step=charge_payment]")
            .await,
        "the failed step is marked"
    );
    assert!(
        browser
            .has("#diagram g.step.comp.compensated[data-step=reserve_stock]")
            .await,
        "the compensation is marked"
    );
    assert!(
        browser
            .has("#diagram g.terminal.reached[data-terminal=compensated]")
            .await
    );
    browser.screenshot("detail").await;

    // A failed fulfilment resolved through its page's form and the confirmation.
    browser
        .goto(&format!("{}/dashboard/sagas/{}", app.base, failed[0]))
        .await;
    assert_eq!(
        browser.wait_for_text("#saga-status", "failed", SHOWN).await,
        "failed"
    );
    assert!(browser.has("#actions").await);
    let flash = act_in_page(&browser, &failed[0], "resolve", "refunded by phone").await;
    assert!(!flash.is_empty(), "a flash message after the action");
    assert_eq!(
        browser
            .wait_for_text("#saga-status", "resolved", SHOWN)
            .await,
        "resolved"
    );
    browser.screenshot("resolved").await;
    let s = app.saga(&failed[0]).await;
    assert_eq!(s["status"], "resolved", "{s:#}");
    let audit = app.get_json(&format!("/admin/sagas/{}", failed[0])).await;
    let last = audit["audit"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (&last["action"], &last["actor"], &last["reason"]),
        (
            &json!("saga.resolve"),
            &json!("olga"),
            &json!("refunded by phone")
        ),
        "{last:#}"
    );

    // The other one is resolved through the JSON API while its page is open: the page
    // follows without being loaded again (a mark set in the page survives).
    browser
        .goto(&format!("{}/dashboard/sagas/{}", app.base, failed[1]))
        .await;
    browser.wait_for_text("#saga-status", "failed", SHOWN).await;
    browser.execute("window.e2eMark = 'still here';").await;
    let r = app
        .http
        .post(format!(
            "{}/admin/sagas/{}/actions/resolve",
            app.base, failed[1]
        ))
        .json(&json!({"reason": "refunded by the bank"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(
        browser
            .wait_for_text("#saga-status", "resolved", SHOWN)
            .await,
        "resolved"
    );
    assert_eq!(
        browser.execute("return window.e2eMark;").await,
        "still here",
        "the page was updated in place, not loaded again"
    );
    browser
        .wait_for_text("#timeline", "refunded by the bank", SHOWN)
        .await;

    // The parked checkout, retried through its open breaker from its page: it completes
    // while the page is open.
    browser
        .goto(&format!("{}/dashboard/sagas/{parked}", app.base))
        .await;
    assert_eq!(
        browser.wait_for_text("#saga-status", "parked", SHOWN).await,
        "parked"
    );
    act_in_page(&browser, &parked, "retry_now", "this one is urgent").await;
    browser.execute("window.e2eMark = 'retried';").await;
    assert_eq!(
        browser
            .wait_for_text("#saga-status", "completed", WITHIN)
            .await,
        "completed"
    );
    assert_eq!(browser.execute("return window.e2eMark;").await, "retried");
    assert!(
        browser
            .has("#diagram g.terminal.reached[data-terminal=completed]")
            .await
    );
    browser.close().await;
}

#[tokio::test]
async fn anonymous_visitors_log_in_first_and_a_viewer_cannot_act() {
    let app = App::spawn_with(Options::without_workers()).await;
    account(&app, "vera", "viewer", "only looking").await;
    let saga = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let page = format!("{}/dashboard/sagas/{saga}", app.base);

    let browser = Browser::start(&app.logs).await;
    // Without a session, a page sends the browser to the login form, saying where it was.
    browser.goto(&format!("{}/dashboard", app.base)).await;
    browser.wait_for_path("/dashboard/login", SHOWN).await;
    browser.wait_for("#login-form", SHOWN).await;
    browser.goto(&page).await;
    let at = browser.wait_for_path("/dashboard/login", SHOWN).await;
    assert!(
        at.query_pairs()
            .any(|(k, v)| k == "next" && v.contains(&saga)),
        "the login page knows where to go back to: {at}"
    );
    assert!(!browser.has("#saga-status").await);
    // A wrong password: the form again, with an error.
    browser.submit_login("vera", "not the password").await;
    browser.wait_for("[data-testid=login-error]", SHOWN).await;
    browser.wait_for_path("/dashboard/login", SHOWN).await;
    assert_eq!(browser.cookie("saga_session").await, None);
    browser.screenshot("login-refused").await;

    // A viewer reads the saga but is offered no action.
    browser.login(&app.base, "vera", "only looking").await;
    browser.goto(&page).await;
    assert_eq!(
        browser
            .wait_for_text("#saga-status", "running", SHOWN)
            .await,
        "running"
    );
    assert!(browser.has("#timeline").await && browser.has("#diagram").await);
    assert!(!browser.has("#actions").await, "no actions for a viewer");
    browser.screenshot("viewer-detail").await;
    assert_eq!(browser.count("form[id^=action-]").await, 0);
    browser.goto(&format!("{}/dashboard", app.base)).await;
    browser.wait_for("#breakers", SHOWN).await;
    assert_eq!(
        browser.count("#breakers form").await,
        0,
        "no breaker forms for a viewer"
    );

    // A write crafted with the viewer's session (and its CSRF token) is refused.
    let cookie = browser
        .cookie("saga_session")
        .await
        .expect("a session cookie");
    let csrf = browser
        .attrs("input[name=csrf]", "value")
        .await
        .into_iter()
        .next()
        .expect("the logout form's csrf field");
    for confirm in [false, true] {
        let mut form = vec![("reason", "just looking"), ("csrf", csrf.as_str())];
        if confirm {
            form.push(("confirm", "yes"));
        }
        let r = client(None)
            .post(format!(
                "{}/dashboard/sagas/{saga}/actions/cancel",
                app.base
            ))
            .header("cookie", format!("saga_session={cookie}"))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "a viewer's POST (confirm: {confirm})");
    }
    assert_eq!(app.saga(&saga).await["status"], "running");

    // Logging out ends the session: the pages ask for a login again.
    browser
        .click("form[action='/dashboard/logout'] [type=submit]")
        .await;
    browser.wait_for_path("/dashboard/login", SHOWN).await;
    browser.goto(&page).await;
    browser.wait_for_path("/dashboard/login", SHOWN).await;
    let r = client(None)
        .get(&page)
        .header("cookie", format!("saga_session={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "the old cookie is no session any more");
    browser.close().await;
}
