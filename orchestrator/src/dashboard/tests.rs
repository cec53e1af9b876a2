//! Every page with sample data and with none; hostile text escaped everywhere; viewers get no
//! action form; every POST form carries `csrf`; the dev-mode warning on every page.

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use super::diagram::StepDef;
use super::model::*;
use super::*;

/// Breaks out of an element, an attribute (either quote) and a script.
const EVIL: &str = r#"<script>alert("x")</script>'"><img src=x onerror=alert(1)>&amp;"#;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2024-05-01T12:34:56Z")
        .unwrap()
        .to_utc()
}

fn page(role: Option<Role>, dev_mode: bool, hostile: bool) -> Page {
    let text = |s: &str| {
        if hostile {
            format!("{s}{EVIL}")
        } else {
            s.to_owned()
        }
    };
    Page {
        title: text("Title"),
        user: role.map(|role| User {
            name: text("ada"),
            role,
        }),
        dev_mode,
        csrf: text("csrf-token-123"),
        flash: Some(text("Saga cancelled.")),
    }
}

fn saga(t: &dyn Fn(&str) -> String, status: &str) -> SagaRow {
    SagaRow {
        id: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001),
        saga_type: t("checkout"),
        status: status.to_owned(),
        state: t("retrying"),
        correlation_id: t("corr-1"),
        subject: Some(t("order-42")),
        created_at: now() - TimeDelta::minutes(5),
        updated_at: now() - TimeDelta::seconds(3),
    }
}

fn overview_view(t: &dyn Fn(&str) -> String) -> OverviewView {
    let start = now() - TimeDelta::minutes(59);
    OverviewView {
        now: now(),
        counts: vec![
            CountRow {
                saga_type: t("checkout"),
                status: "running".into(),
                count: 3,
            },
            CountRow {
                saga_type: t("checkout"),
                status: "failed".into(),
                count: 1,
            },
            CountRow {
                saga_type: t("fulfilment"),
                status: t("weird"),
                count: 2,
            },
        ],
        throughput: (0..60)
            .map(|i| ThroughputPoint {
                minute: start + TimeDelta::minutes(i),
                started: i % 7,
                completed: i % 5,
            })
            .collect(),
        latency: vec![LatencyPoint {
            minute: now(),
            p50_ms: Some(12.5),
            p95_ms: Some(80.0),
            p99_ms: None,
        }],
        failures: vec![FailurePoint {
            minute: now(),
            compensated: 1,
            failed: 2,
        }],
        attention: vec![AttentionRow {
            id: Uuid::nil(),
            saga_type: t("checkout"),
            status: "parked".into(),
            state: t("parked"),
            subject: Some(t("order-1")),
            why: t("parked on charge_payment"),
            since: now(),
        }],
        breakers: vec![
            BreakerRow {
                step: t("charge_payment"),
                state: BreakerState::Open,
                forced: Some(Forced::Open),
            },
            BreakerRow {
                step: t("reserve_stock"),
                state: BreakerState::HalfOpen,
                forced: None,
            },
        ],
        pools: vec![PoolRow {
            service: t("payment"),
            pending: 4,
            ack_pending: 1,
        }],
        dead_letters: vec![OriginCount {
            origin: t("replies"),
            count: 37,
        }],
        members: vec![MemberRow {
            instance: t("host-a/0190a000"),
            partitions: vec![0, 2, 4],
            expires_at: now(),
        }],
        unowned: vec![7],
    }
}

fn empty_overview() -> OverviewView {
    OverviewView {
        now: now(),
        counts: vec![],
        throughput: vec![],
        latency: vec![],
        failures: vec![],
        attention: vec![],
        breakers: vec![],
        pools: vec![],
        dead_letters: vec![],
        members: vec![],
        unowned: vec![],
    }
}

fn list_view(t: &dyn Fn(&str) -> String) -> SagaListView {
    SagaListView {
        filter: SagaFilter {
            saga_type: Some(t("checkout")),
            status: Some("failed".into()),
            state: Some(t("retrying")),
            from: Some(t("2024-05-01T12:00")),
            to: None,
            q: Some(t("someone@example.com")),
        },
        types: vec![t("checkout"), "fulfilment".into()],
        rows: vec![saga(t, "failed"), saga(t, &t("running"))],
        count: Some(2),
        next: Some(t("/dashboard/sagas?after=abc")),
        bulk_actions: SagaAction::ALL.to_vec(),
    }
}

fn definition() -> Vec<StepDef<'static>> {
    vec![
        StepDef {
            name: "reserve_stock",
            kind: "compensatable",
            action: Some("reserve"),
            compensation: Some("release"),
            awaits: None,
        },
        StepDef {
            name: "charge_payment",
            kind: "compensatable",
            action: Some("charge"),
            compensation: Some("refund"),
            awaits: None,
        },
        StepDef {
            name: "dispatch",
            kind: "pivot",
            action: None,
            compensation: None,
            awaits: Some("dispatched"),
        },
    ]
}

fn detail_view(t: &dyn Fn(&str) -> String) -> SagaDetailView {
    let step = |name: &str, status: &str| StepRow {
        name: name.to_owned(),
        service: Some(t("payment")),
        status: status.to_owned(),
        attempts: 2,
        compensation_attempts: 0,
        last_error: Some(t("card declined")),
    };
    let json = serde_json::json!({ "kind": t("charged"), "note": t("x") });
    SagaDetailView {
        now: now(),
        saga: saga(t, "running"),
        version: 7,
        trace_id: Some(t("4bf92f3577b34da6")),
        trace_url: Some("javascript:alert(1)".into()),
        steps: vec![
            step("reserve_stock", "succeeded"),
            step("charge_payment", "retrying"),
        ],
        failed_step: None,
        actions: vec![
            ActionView {
                action: SagaAction::RetryNow,
                enabled: true,
                why_not: None,
            },
            ActionView {
                action: SagaAction::Resolve,
                enabled: false,
                why_not: Some(t("only a failed saga can be resolved")),
            },
            ActionView {
                action: SagaAction::Cancel,
                enabled: true,
                why_not: None,
            },
        ],
        timers: vec![
            TimerRow {
                name: t("step"),
                fire_at: now() + TimeDelta::minutes(3),
            },
            TimerRow {
                name: t("sla:dispatch"),
                fire_at: now() - TimeDelta::seconds(12),
            },
        ],
        entities: vec![
            EntityRow {
                label: t("Order"),
                value: t("order-42"),
                url: Some("/orders/42".into()),
            },
            EntityRow {
                label: t("Payment"),
                value: t("ch_1"),
                url: None,
            },
        ],
        timeline: vec![
            EventRow {
                seq: 1,
                at: now() - TimeDelta::minutes(5),
                kind: "started".into(),
                summary: t("started"),
                actor: None,
                state_after: t("running"),
                input: json.clone(),
                effects: serde_json::json!([]),
            },
            EventRow {
                seq: 2,
                at: now() - TimeDelta::minutes(5) + TimeDelta::milliseconds(12),
                kind: t("step_succeeded"),
                summary: t("reserve_stock succeeded"),
                actor: None,
                state_after: t("running"),
                input: json.clone(),
                effects: serde_json::json!([json.clone()]),
            },
            EventRow {
                seq: 3,
                at: now(),
                kind: "operator_retry_now".into(),
                summary: t("retried by hand"),
                actor: Some(t("ada")),
                state_after: t("running"),
                input: json.clone(),
                effects: serde_json::json!([json.clone(), json]),
            },
        ],
    }
}

fn empty_detail() -> SagaDetailView {
    let t = |s: &str| s.to_owned();
    SagaDetailView {
        now: now(),
        saga: SagaRow {
            subject: None,
            ..saga(&t, "running")
        },
        version: 1,
        trace_id: None,
        trace_url: None,
        steps: vec![],
        failed_step: None,
        actions: vec![],
        timers: vec![],
        entities: vec![],
        timeline: vec![],
    }
}

fn confirm_view(t: &dyn Fn(&str) -> String) -> ConfirmView {
    ConfirmView {
        title: t("Cancel saga"),
        what: t("Cancel saga 0190"),
        dry_run_count: Some(37),
        action_url: t("/dashboard/sagas/x/actions/cancel"),
        hidden: vec![(t("origin"), t("replies"))],
        reason: t("customer asked"),
        back_url: t("/dashboard/sagas/x"),
    }
}

fn dead_letters_view(t: &dyn Fn(&str) -> String) -> DeadLettersView {
    DeadLettersView {
        origin: Some(t("replies")),
        origins: vec![
            OriginCount {
                origin: t("replies"),
                count: 2,
            },
            OriginCount {
                origin: "signals".into(),
                count: 1,
            },
        ],
        rows: vec![DeadLetterRow {
            seq: 17,
            origin: t("replies"),
            subject: t("shop.reply.payment"),
            reason: t("unknown saga"),
            at: now(),
            size: 312,
        }],
        next: Some(t("/dashboard/dead-letters?after=17")),
    }
}

fn audit_view(t: &dyn Fn(&str) -> String) -> AuditView {
    AuditView {
        rows: vec![AuditRow {
            at: now(),
            actor: t("ada"),
            role: t("operator"),
            action: t("cancel"),
            target: t("saga 0190"),
            target_url: Some(t("/dashboard/sagas/0190")),
            reason: t("customer asked"),
            outcome: t("refused: completed"),
        }],
        next: Some(t("/dashboard/audit?before=1")),
    }
}

fn error_view(t: &dyn Fn(&str) -> String) -> ErrorView {
    ErrorView {
        status: 404,
        title: t("Saga not found"),
        detail: t("No saga has id x."),
    }
}

/// Every page, rendered for `page`, with sample data (`hostile` texts) or with none.
fn all_pages(page: &Page, sample: bool, hostile: bool) -> Vec<(&'static str, String)> {
    let t = |s: &str| {
        if hostile {
            format!("{s}{EVIL}")
        } else {
            s.to_owned()
        }
    };
    let defs = definition();
    let html = |m: maud::Markup| m.into_string();
    if sample {
        vec![
            (
                "login",
                html(login(
                    page,
                    &LoginView {
                        username: t("ada"),
                        error: Some(t("Wrong password")),
                    },
                )),
            ),
            ("overview", html(overview(page, &overview_view(&t)))),
            ("saga_list", html(saga_list(page, &list_view(&t)))),
            (
                "saga_detail",
                html(saga_detail(page, &detail_view(&t), &defs)),
            ),
            ("confirm", html(confirm(page, &confirm_view(&t)))),
            (
                "dead_letters",
                html(dead_letters(page, &dead_letters_view(&t))),
            ),
            ("audit", html(audit(page, &audit_view(&t)))),
            ("error", html(error(page, &error_view(&t)))),
        ]
    } else {
        vec![
            ("login", html(login(page, &LoginView::default()))),
            ("overview", html(overview(page, &empty_overview()))),
            ("saga_list", html(saga_list(page, &SagaListView::default()))),
            ("saga_detail", html(saga_detail(page, &empty_detail(), &[]))),
            ("confirm", html(confirm(page, &ConfirmView::default()))),
            (
                "dead_letters",
                html(dead_letters(page, &DeadLettersView::default())),
            ),
            ("audit", html(audit(page, &AuditView::default()))),
            (
                "error",
                html(error(
                    page,
                    &ErrorView {
                        status: 500,
                        title: String::new(),
                        detail: String::new(),
                    },
                )),
            ),
        ]
    }
}

/// Every POST form's markup (from `<form` to `</form>`).
fn post_forms(html: &str) -> Vec<&str> {
    html.split("<form")
        .skip(1)
        .map(|f| &f[..f.find("</form>").expect("form closed")])
        .filter(|f| f[..f.find('>').unwrap()].contains(r#"method="post""#))
        .collect()
}

#[test]
fn every_page_renders_a_document_with_sample_and_empty_data() {
    for role in [None, Some(Role::Viewer), Some(Role::Operator)] {
        for sample in [true, false] {
            for (name, html) in all_pages(&page(role, false, false), sample, false) {
                assert!(
                    html.starts_with("<!DOCTYPE html><html lang=\"en\">"),
                    "{name}"
                );
                assert!(html.ends_with("</html>"), "{name}");
                assert_eq!(html.matches("<main").count(), 1, "{name}");
                assert_eq!(
                    html.matches("<script>").count(),
                    1,
                    "{name}: only our own script"
                );
                assert!(!html.contains("NaN") && !html.contains("inf\""), "{name}");
                assert!(!html.contains("id=\"dev-warning\""), "{name}");
                assert!(
                    !html.contains("http://") || !html.contains("src=\"http"),
                    "{name}: no external resource"
                );
            }
        }
    }
}

#[test]
fn pages_carry_their_test_ids() {
    let op = page(Some(Role::Operator), false, false);
    let pages: std::collections::BTreeMap<_, _> = all_pages(&op, true, false).into_iter().collect();
    let has = |name: &str, ids: &[&str]| {
        for id in ids {
            assert!(
                pages[name].contains(&format!("id=\"{id}\"")),
                "{name} lacks #{id}"
            );
        }
    };
    for name in pages.keys() {
        has(name, &["flash"]);
    }
    has("login", &["login-form"]);
    has(
        "overview",
        &[
            "overview-counts",
            "chart-throughput",
            "chart-latency",
            "chart-failures",
            "attention",
            "breakers",
            "pools",
            "orchestrators",
        ],
    );
    has("saga_list", &["saga-list", "saga-count", "bulk"]);
    has(
        "saga_detail",
        &[
            "saga-status",
            "saga-state",
            "diagram",
            "timeline",
            "actions",
            "action-retry_now",
            "action-resolve",
            "action-cancel",
        ],
    );
    has("confirm", &["confirm", "dry-run-count"]);
    has("dead_letters", &["dead-letters", "dl-bulk"]);
    has("audit", &["audit"]);
    // The status badge's text is exactly the status; the live pages name their streams.
    assert!(
        pages["saga_detail"]
            .contains(r#"data-testid="saga-status" class="badge st-running">running</span>"#)
    );
    assert!(pages["saga_detail"].contains(
        r#"<main data-live="/dashboard/events?saga=01900000-0000-7000-8000-000000000001&amp;version=7">"#
    ));
    assert!(pages["overview"].contains(r#"<main data-live="/dashboard/events">"#));
    assert!(pages["saga_list"].contains(r#"<main data-live="/dashboard/events">"#));
    assert!(pages["audit"].contains("<main>"));
    // Counts link to the filtered list; a zero is not a link.
    assert!(
        pages["overview"].contains(r#"href="/dashboard/sagas?type=checkout&amp;status=running""#)
    );
    // The nav, and the login page without it.
    for (href, label) in [
        ("/dashboard", "Overview"),
        ("/dashboard/sagas", "Sagas"),
        ("/dashboard/dead-letters", "Dead letters"),
        ("/dashboard/audit", "Audit log"),
    ] {
        assert!(
            pages["overview"].contains(&format!(r#"href="{href}">{label}</a>"#)),
            "{label}"
        );
        assert!(
            !pages["login"].contains(&format!(">{label}</a>")),
            "{label}"
        );
    }
    assert!(pages["overview"].contains(r#"<a class="on" href="/dashboard">Overview</a>"#));
}

#[test]
fn hostile_text_is_escaped_everywhere() {
    for role in [Some(Role::Viewer), Some(Role::Operator)] {
        for dev in [false, true] {
            let p = page(role, dev, true);
            for (name, html) in all_pages(&p, true, true) {
                assert_eq!(
                    html.matches("<script").count(),
                    1,
                    "{name}: a script got through"
                );
                assert!(!html.contains("<img"), "{name}: an element got through");
                assert!(
                    !html.contains(r#"" onerror"#) && !html.contains(r#"' onerror"#),
                    "{name}: an attribute was broken out of"
                );
                assert!(!html.contains("javascript:"), "{name}: a javascript: link");
                assert!(
                    html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"),
                    "{name}: the text is still shown"
                );
                assert!(html.contains("&amp;amp;"), "{name}: & is escaped");
            }
        }
    }
}

#[test]
fn pretty_json_in_the_timeline_is_escaped() {
    let t = |s: &str| format!("{s}{EVIL}");
    let html = saga_detail(
        &page(Some(Role::Viewer), false, false),
        &detail_view(&t),
        &definition(),
    )
    .into_string();
    assert!(
        html.contains("&quot;kind&quot;: &quot;charged&lt;script&gt;"),
        "{html}"
    );
    assert!(html.contains(r#"<details id="ev-2">"#));
    assert!(
        html.contains("12 ms"),
        "the duration since the previous entry"
    );
    assert!(html.contains("4 min"));
    assert!(html.contains("in 3 min") && html.contains("overdue by 12 s"));
}

#[test]
fn viewers_get_no_action_forms() {
    let viewer = page(Some(Role::Viewer), false, false);
    for (name, html) in all_pages(&viewer, true, false)
        .into_iter()
        .filter(|(n, _)| *n != "login")
    {
        let forms = post_forms(&html);
        assert_eq!(forms.len(), 1, "{name}: {forms:?}");
        assert!(forms[0].contains(r#"action="/dashboard/logout""#), "{name}");
        for id in ["actions", "bulk", "dl-bulk", "confirm\""] {
            assert!(!html.contains(&format!("id=\"{id}")), "{name}: #{id}");
        }
        assert!(!html.contains("type=\"checkbox\""), "{name}");
    }
}

#[test]
fn operators_get_the_action_forms_with_csrf() {
    let op = page(Some(Role::Operator), false, false);
    let pages: std::collections::BTreeMap<_, _> = all_pages(&op, true, false).into_iter().collect();
    for (name, html) in &pages {
        for form in post_forms(html) {
            assert!(
                form.contains(r#"<input type="hidden" name="csrf" value="csrf-token-123">"#),
                "{name}: {form}"
            );
        }
    }
    let count = |name: &str| post_forms(&pages[name]).len();
    assert_eq!(count("login"), 1);
    assert_eq!(count("overview"), 1 + 2, "logout + one per breaker");
    assert_eq!(count("saga_list"), 1 + 1, "logout + bulk");
    assert_eq!(count("saga_detail"), 1 + 3, "logout + one per action");
    assert_eq!(count("confirm"), 1 + 1);
    assert_eq!(
        count("dead_letters"),
        1 + 1 + 2,
        "logout + bulk + replay and discard of the row"
    );
    assert_eq!(count("audit"), 1);

    let detail = &pages["saga_detail"];
    assert!(detail.contains(r#"id="action-retry_now" data-testid="action-retry_now" method="post" action="/dashboard/sagas/01900000-0000-7000-8000-000000000001/actions/retry_now""#));
    assert!(detail.contains(r#"<button type="submit" disabled>Resolve</button><span class="why">only a failed saga can be resolved</span>"#), "{detail}");
    assert!(detail.contains(r#"name="reason" required"#));
    let breakers = &pages["overview"];
    assert!(breakers.contains(r#"action="/dashboard/breakers/charge_payment""#));
    assert!(breakers.contains(r#"name="state" value="auto""#));
    let list = &pages["saga_list"];
    assert!(list.contains(r#"<input type="hidden" name="type" value="checkout">"#));
    assert!(list.contains(r#"<input type="hidden" name="q" value="someone@example.com">"#));
    assert!(list.contains(r#"<option value="retry_now">Retry now</option>"#));
    let confirm = &pages["confirm"];
    assert!(confirm.contains(r#"<input type="hidden" name="origin" value="replies"><input type="hidden" name="confirm" value="yes">"#));
    assert!(confirm.contains(r#"name="reason" value="customer asked""#));
    let dl = &pages["dead_letters"];
    assert!(dl.contains(r#"<input type="checkbox" name="seq" value="17" form="dl-bulk""#));
    assert!(dl.contains(r#"<input type="hidden" name="origin" value="replies">"#));
    for action in ["replay", "discard", "replay_all", "discard_all"] {
        assert!(
            dl.contains(&format!(r#"name="action" value="{action}""#)),
            "{action}"
        );
    }
}

#[test]
fn the_dev_warning_is_on_every_page() {
    for role in [None, Some(Role::Viewer), Some(Role::Operator)] {
        for sample in [true, false] {
            for (name, html) in all_pages(&page(role, true, false), sample, false) {
                assert!(
                    html.contains(r#"<div class="dev-warning" id="dev-warning" role="alert""#),
                    "{name}"
                );
                assert!(html.contains(DEV_WARNING), "{name}");
            }
        }
    }
}

#[test]
fn the_list_keeps_its_filter_and_omits_what_it_was_not_given() {
    let t = |s: &str| s.to_owned();
    let html = saga_list(&page(Some(Role::Viewer), false, false), &list_view(&t)).into_string();
    assert!(html.contains(r#"<option value="failed" selected>failed</option>"#));
    assert!(html.contains(r#"<option value="checkout" selected>checkout</option>"#));
    assert!(html.contains(r#"name="from" value="2024-05-01T12:00""#));
    assert!(html.contains(r#"<a href="/dashboard/sagas?after=abc">Next page →</a>"#));
    let html = saga_list(
        &page(Some(Role::Viewer), false, false),
        &SagaListView::default(),
    )
    .into_string();
    assert!(!html.contains("saga-count") && !html.contains("Next page"));
    assert_eq!(
        list_view(&t).filter.url(),
        "/dashboard/sagas?type=checkout&status=failed&state=retrying&from=2024-05-01T12%3A00&q=someone%40example.com"
    );
}

#[test]
fn the_detail_page_diagram_follows_the_saga() {
    let t = |s: &str| s.to_owned();
    let html =
        saga_detail(&page(None, false, false), &detail_view(&t), &definition()).into_string();
    assert!(html.contains(r#"data-position="forward:1""#));
    assert!(
        html.contains(r#"data-step="charge_payment" data-mark="active" data-current="forward""#)
    );
    let mut done = detail_view(&t);
    done.saga.status = "completed".into();
    let html = saga_detail(&page(None, false, false), &done, &definition()).into_string();
    assert!(html.contains(r#"data-position="completed""#));
}
