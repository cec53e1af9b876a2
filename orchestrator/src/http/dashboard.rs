//! The dashboard's handlers: read what a page shows, fill its view model
//! ([`crate::dashboard::model`]) and render it. Every action goes through a confirmation page
//! (with a dry-run count for bulk actions), then through the same code as the admin API
//! ([`crate::admin`], [`super::admin`]), so it is refused for the same reasons and audited the
//! same way. A problem is shown as a page with its status, never as JSON.

use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::Markup;
use sagas::wire::SagaId;
use uuid::Uuid;

use super::AppState;
use super::admin::{LetterAction, letter_act, letters_to_touch};
use super::auth::Principal;
use super::problem::{PathPair, PathParam, Problem, parse_query};
use crate::admin::{self as service, Action, FilterQuery};
use crate::dashboard::{self as views, diagram, model};
use crate::{audit, engine};

/// A page or an error page.
pub struct PageResult(Result<Response, Problem>);

impl IntoResponse for PageResult {
    fn into_response(self) -> Response {
        match self.0 {
            Ok(r) => r,
            Err(p) => {
                let status = p.status;
                let page = model::Page {
                    title: p.title.to_owned(),
                    ..Default::default()
                };
                let body = views::error(
                    &page,
                    &model::ErrorView {
                        status: status.as_u16(),
                        title: p.title.to_owned(),
                        detail: p.detail,
                    },
                );
                (status, Html(body.into_string())).into_response()
            }
        }
    }
}

impl<E: Into<Problem>> From<Result<Response, E>> for PageResult {
    fn from(r: Result<Response, E>) -> Self {
        PageResult(r.map_err(Into::into))
    }
}

fn page(state: &AppState, who: &Principal, title: &str, flash: Option<String>) -> model::Page {
    model::Page {
        title: title.to_owned(),
        user: Some(model::User {
            name: who.name.clone(),
            role: who.role,
        }),
        dev_mode: state.auth.dev_mode(),
        csrf: who.csrf().to_owned(),
        flash,
    }
}

fn html(markup: Markup) -> Response {
    let mut r = Html(markup.into_string()).into_response();
    // Pages hold personal data: never kept by a shared cache, never framed by another site.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut()
        .insert("x-frame-options", HeaderValue::from_static("DENY"));
    r
}

/// The fields of a form body (a field may repeat: dead letters' `seq`).
fn form(body: &Bytes) -> Result<Vec<(String, String)>, Problem> {
    serde_urlencoded::from_bytes(body).map_err(|e| {
        Problem::bad_request(
            "invalid-form",
            "Invalid form",
            format!("the form could not be read: {e}"),
        )
    })
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn confirmed(fields: &[(String, String)]) -> bool {
    field(fields, "confirm") == Some("yes")
}

// ---------------------------------------------------------------------------------------------
// Login

pub async fn login_form(State(state): State<AppState>) -> Response {
    if state.auth.dev_mode() {
        return Redirect::to("/dashboard").into_response();
    }
    let page = model::Page {
        title: "Log in".into(),
        ..Default::default()
    };
    html(views::login(&page, &model::LoginView::default()))
}

pub async fn login(State(state): State<AppState>, body: Bytes) -> PageResult {
    let result = async {
        let fields = form(&body)?;
        let name = field(&fields, "username").unwrap_or("").trim().to_owned();
        let password = field(&fields, "password").unwrap_or("");
        let page = model::Page {
            title: "Log in".into(),
            ..Default::default()
        };
        match state.auth.login(&state.pool, &name, password).await? {
            Some(cookie) => {
                tracing::info!(operator = %name, "logged in");
                let mut r = Redirect::to("/dashboard").into_response();
                r.headers_mut().insert(header::SET_COOKIE, cookie);
                Ok(r)
            }
            None => {
                tracing::warn!(operator = %name, "login refused");
                let view = model::LoginView {
                    username: name,
                    error: Some("Wrong name or password.".into()),
                };
                let mut r = html(views::login(&page, &view));
                *r.status_mut() = StatusCode::UNAUTHORIZED;
                Ok(r)
            }
        }
    }
    .await;
    PageResult(result)
}

pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> PageResult {
    let result = async {
        let cookie = state.auth.logout(&state.pool, &headers).await?;
        let mut r = Redirect::to("/dashboard/login").into_response();
        r.headers_mut().insert(header::SET_COOKIE, cookie);
        Ok(r)
    }
    .await;
    PageResult(result)
}

// ---------------------------------------------------------------------------------------------
// Overview

/// The counts of sagas by type and status: every saga that has not ended, and those that ended
/// among the sagas started in the last day (ids are UUID v7: an index range, not a scan of the
/// whole table).
async fn counts(state: &AppState, now: DateTime<Utc>) -> Result<Vec<model::CountRow>, sqlx::Error> {
    let since = crate::admin::uuid_floor(now - chrono::Duration::days(1));
    let rows = sqlx::query!(
        r#"SELECT saga_type AS "saga_type!", status AS "status!", count(*) AS "count!"
             FROM (SELECT saga_type, status FROM orchestrator.sagas
                    WHERE status NOT IN ('completed', 'compensated')
                   UNION ALL
                   SELECT saga_type, status FROM orchestrator.sagas
                    WHERE id >= $1 AND status IN ('completed', 'compensated')) s
            GROUP BY saga_type, status ORDER BY saga_type, status"#,
        since,
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| model::CountRow {
            saga_type: r.saga_type,
            status: r.status,
            count: r.count,
        })
        .collect())
}

/// Per minute of the last hour: sagas started, ended (and how), and the latency percentiles of
/// those that completed. Read from the sagas started in the last two hours (an id range).
async fn minutes(
    state: &AppState,
    now: DateTime<Utc>,
) -> Result<
    (
        Vec<model::ThroughputPoint>,
        Vec<model::LatencyPoint>,
        Vec<model::FailurePoint>,
    ),
    sqlx::Error,
> {
    let since = crate::admin::uuid_floor(now - chrono::Duration::hours(2));
    let hour_ago = now - chrono::Duration::hours(1);
    let rows = sqlx::query!(
        r#"WITH recent AS (SELECT status, created_at, updated_at FROM orchestrator.sagas WHERE id >= $1),
                started AS (SELECT date_trunc('minute', created_at) AS minute, count(*) AS n
                              FROM recent WHERE created_at >= $2 GROUP BY 1),
                ended AS (SELECT date_trunc('minute', updated_at) AS minute,
                                 count(*) FILTER (WHERE status = 'completed') AS completed,
                                 count(*) FILTER (WHERE status = 'compensated') AS compensated,
                                 count(*) FILTER (WHERE status = 'failed') AS failed,
                                 percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at) * 1000)
                                     FILTER (WHERE status = 'completed') AS p50,
                                 percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at) * 1000)
                                     FILTER (WHERE status = 'completed') AS p95,
                                 percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at) * 1000)
                                     FILTER (WHERE status = 'completed') AS p99
                            FROM recent
                           WHERE updated_at >= $2 AND status IN ('completed', 'compensated', 'failed')
                           GROUP BY 1)
           SELECT coalesce(s.minute, e.minute) AS "minute!", coalesce(s.n, 0) AS "started!",
                  coalesce(e.completed, 0) AS "completed!", coalesce(e.compensated, 0) AS "compensated!",
                  coalesce(e.failed, 0) AS "failed!", e.p50, e.p95, e.p99
             FROM started s FULL JOIN ended e ON s.minute = e.minute
            ORDER BY 1"#,
        since,
        hour_ago,
    )
    .fetch_all(&state.pool)
    .await?;
    let mut throughput = Vec::new();
    let mut latency = Vec::new();
    let mut failures = Vec::new();
    for r in rows {
        throughput.push(model::ThroughputPoint {
            minute: r.minute,
            started: r.started,
            completed: r.completed,
        });
        latency.push(model::LatencyPoint {
            minute: r.minute,
            p50_ms: r.p50,
            p95_ms: r.p95,
            p99_ms: r.p99,
        });
        failures.push(model::FailurePoint {
            minute: r.minute,
            compensated: r.compensated,
            failed: r.failed,
        });
    }
    Ok((throughput, latency, failures))
}

/// Sagas that need a person: failed ones, parked ones, and those whose timer is overdue by more
/// than half a minute (the timer loop is behind, or their orchestrator is down).
async fn attention(state: &AppState) -> Result<Vec<model::AttentionRow>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT id AS "id!", saga_type AS "saga_type!", status AS "status!", state AS "state!",
                  subject, why AS "why!", since AS "since!"
             FROM (
               (SELECT s.id, s.saga_type, s.status, s.state, s.subject,
                       CASE WHEN s.status = 'failed' THEN 'failed: waiting for an operator'
                            ELSE 'parked on ' || coalesce(s.parked_on, 'a breaker') END AS why,
                       s.updated_at AS since
                  FROM orchestrator.sagas s
                 WHERE s.status IN ('failed', 'parked') AND s.status NOT IN ('completed', 'compensated')
                 ORDER BY s.id DESC LIMIT 50)
               UNION ALL
               (SELECT s.id, s.saga_type, s.status, s.state, s.subject,
                       'timer ' || t.key || ' overdue' AS why, t.fire_at AS since
                  FROM orchestrator.timers t JOIN orchestrator.sagas s ON s.id = t.saga_id
                 WHERE t.fire_at < now() - interval '30 seconds'
                 ORDER BY t.fire_at LIMIT 50)
             ) a
            ORDER BY since LIMIT 100"#,
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| model::AttentionRow {
            id: r.id,
            saga_type: r.saga_type,
            status: r.status,
            state: r.state,
            subject: r.subject,
            why: r.why,
            since: r.since,
        })
        .collect())
}

fn breakers(state: &AppState) -> Vec<model::BreakerRow> {
    use crate::breakers::{Force, State as B};
    state
        .breakers
        .views()
        .into_iter()
        .map(|v| model::BreakerRow {
            step: v.step.to_owned(),
            // What the breaker does now: a forced state wins over its own.
            state: match (v.forced, v.state) {
                (Some(Force::Open), _) => model::BreakerState::Open,
                (Some(Force::Closed), _) => model::BreakerState::Closed,
                (None, B::Closed) => model::BreakerState::Closed,
                (None, B::HalfOpen) => model::BreakerState::HalfOpen,
                (None, B::Open) => model::BreakerState::Open,
            },
            forced: v.forced.map(|f| match f {
                Force::Open => model::Forced::Open,
                Force::Closed => model::Forced::Closed,
            }),
        })
        .collect()
}

/// Each worker pool's backlog: its command consumer's pending and unacknowledged messages.
pub async fn pools(state: &AppState) -> Vec<model::PoolRow> {
    let stream_name = state
        .topology
        .stream_name(crate::topology::streams::COMMANDS);
    let Ok(stream) = state.js.get_stream(&stream_name).await else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for service in state.registry.services() {
        let name = sagas::wire::consumers::commands(service);
        let Ok(mut consumer) = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(name)
            .await
        else {
            continue;
        };
        if let Ok(info) = consumer.info().await {
            rows.push(model::PoolRow {
                service: service.to_owned(),
                pending: info.num_pending,
                ack_pending: info.num_ack_pending as u64,
            });
        }
    }
    rows
}

pub async fn overview(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> PageResult {
    let result: Result<Response, Problem> = async {
        let now = Utc::now();
        let counts = counts(&state, now).await?;
        let (throughput, latency, failures) = minutes(&state, now).await?;
        let attention = attention(&state).await?;
        let dead_letters = state
            .dead_letters
            .counts()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(origin, count)| model::OriginCount { origin, count })
            .collect();
        let cluster = crate::partitions::view(&state.pool).await?;
        let view = model::OverviewView {
            members: cluster
                .members
                .into_iter()
                .map(|m| model::MemberRow {
                    instance: m.instance,
                    partitions: m.partitions,
                    expires_at: m.expires_at,
                })
                .collect(),
            unowned: cluster.unowned,
            now,
            counts,
            throughput,
            latency,
            failures,
            attention,
            breakers: breakers(&state),
            pools: pools(&state).await,
            dead_letters,
        };
        Ok(html(views::overview(
            &page(&state, &who, "Overview", None),
            &view,
        )))
    }
    .await;
    PageResult(result)
}

// ---------------------------------------------------------------------------------------------
// Sagas

fn row(r: service::Row) -> model::SagaRow {
    model::SagaRow {
        id: r.id,
        saga_type: r.saga_type,
        status: r.status,
        state: r.state,
        correlation_id: r.correlation_id,
        subject: r.subject,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

fn to_view_filter(q: &FilterQuery) -> model::SagaFilter {
    model::SagaFilter {
        saga_type: q.saga_type.clone(),
        status: q.status.clone(),
        state: q.state.clone(),
        from: q.from.clone(),
        to: q.to.clone(),
        q: q.q.clone(),
    }
}

fn view_action(a: Action) -> model::SagaAction {
    match a {
        Action::RetryNow => model::SagaAction::RetryNow,
        Action::Recover => model::SagaAction::Recover,
        Action::Resolve => model::SagaAction::Resolve,
        Action::Cancel => model::SagaAction::Cancel,
    }
}

pub async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> PageResult {
    let result: Result<Response, Problem> = async {
        let q: FilterQuery = parse_query(query.as_deref())?;
        let filter = q.parse(&state.registry)?;
        let rows = service::list(&state.pool, &state.registry, &filter).await?;
        let next = (rows.len() as i64 == filter.limit).then(|| {
            let last = SagaId::from_uuid(rows.last().expect("a full page").id);
            let mut q = q.clone();
            q.after = Some(last.to_string());
            format!(
                "/dashboard/sagas?{}",
                serde_urlencoded::to_string(&q).expect("strings encode")
            )
        });
        let view = model::SagaListView {
            filter: to_view_filter(&q),
            types: state
                .registry
                .types()
                .map(|t| t.name().to_owned())
                .collect(),
            rows: rows.into_iter().map(row).collect(),
            count: None,
            next,
            bulk_actions: Action::ALL.into_iter().map(view_action).collect(),
        };
        Ok(html(views::saga_list(
            &page(&state, &who, "Sagas", None),
            &view,
        )))
    }
    .await;
    PageResult(result)
}

/// A one-line summary of an event of the log, for the timeline.
fn summary(e: &engine::EventRow) -> (String, Option<String>) {
    let input = &e.input;
    let s = |k: &str| input.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let effects = e.effects.as_array().map_or(0, Vec::len);
    let text = match e.kind.as_str() {
        "started" => "saga started".to_owned(),
        "step_succeeded" => format!(
            "{} {} attempt {} succeeded",
            s("step"),
            s("phase"),
            input["attempt"]
        ),
        // A reply's outcome is flattened into it: `code` and `reason` sit beside `step`.
        "step_failed_retryable" | "step_failed_permanent" => format!(
            "{} {} attempt {} failed: {} {}",
            s("step"),
            s("phase"),
            input["attempt"],
            s("code"),
            s("reason")
        ),
        "timer_fired" => format!("timer {} fired", s("name")),
        "signal" => format!("signal {}", s("name")),
        "cancel_requested" => format!("cancel: {}", s("reason")),
        "resumed" => format!("breaker of {} let the saga through", s("step")),
        k if k.starts_with("operator_") => format!(
            "{}: {}",
            k.trim_start_matches("operator_").replace('_', " "),
            s("reason")
        ),
        other => other.replace('_', " "),
    };
    let actor = input.get("by").and_then(|v| v.as_str()).map(str::to_owned);
    (
        format!("{text} → {} ({effects} effects)", e.state_after),
        actor,
    )
}

pub async fn detail(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    PathParam(raw): PathParam,
    RawQuery(query): RawQuery,
) -> PageResult {
    let result: Result<Response, Problem> = async {
        let id = super::sagas::parse_id(&raw)?;
        let Some((record, events)) = engine::load_record(&state.pool, id).await? else {
            return Err(Problem::not_found(format!("no saga {id}")));
        };
        let flash = query
            .as_deref()
            .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok())
            .and_then(|q| q.into_iter().find(|(k, _)| k == "done").map(|(_, v)| v))
            // Only an action's own name makes a message: a link cannot put words here.
            .and_then(|done| Action::parse(&done))
            .map(|done| format!("Done: {}.", done.label()));
        let timers = service::timers(&state.pool, id).await?;
        let actions = super::admin::actions_of(&state, &record);
        let mut snapshot = record.snapshot.clone();
        crate::privacy::drop_secrets(&mut snapshot);
        let services: std::collections::HashMap<&str, Option<&str>> = state
            .registry
            .get(&record.saga_type)
            .map(|t| t.steps().into_iter().map(|s| (s.name, s.service)).collect())
            .unwrap_or_default();
        let steps: Vec<model::StepRow> = snapshot["steps"]
            .as_array()
            .map(|steps| {
                steps
                    .iter()
                    .map(|s| model::StepRow {
                        name: s["name"].as_str().unwrap_or("").to_owned(),
                        service: s["name"]
                            .as_str()
                            .and_then(|n| services.get(n).copied().flatten())
                            .map(str::to_owned),
                        status: s["status"].as_str().unwrap_or("pending").to_owned(),
                        attempts: s["attempts"].as_u64().unwrap_or(0) as u32,
                        compensation_attempts: s["compensation_attempts"].as_u64().unwrap_or(0)
                            as u32,
                        last_error: s.get("last_error").filter(|e| !e.is_null()).map(|e| {
                            format!(
                                "{} attempt {}: {} {}",
                                e["phase"].as_str().unwrap_or(""),
                                e["attempt"],
                                e["code"].as_str().unwrap_or(""),
                                e["reason"].as_str().unwrap_or("")
                            )
                        }),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let subject = super::sagas::order_id_of(&state.pool, id).await?;
        let mut entities = Vec::new();
        if let Some(order) = &subject {
            entities.push(model::EntityRow {
                label: "Order".into(),
                value: order.clone(),
                url: Some(format!("/orders/{order}")),
            });
            entities.push(model::EntityRow {
                label: "Sagas of the order".into(),
                value: "search".into(),
                url: Some(format!("/dashboard/sagas?q={order}")),
            });
        }
        for (key, label) in [
            ("charge_id", "Payment"),
            ("payment_id", "Payment"),
            ("reservation_id", "Reservation"),
            ("shipment_id", "Shipment"),
            ("tracking_number", "Tracking number"),
        ] {
            if let Some(v) = find_key(&snapshot, key) {
                entities.push(model::EntityRow {
                    label: label.into(),
                    value: v,
                    url: None,
                });
            }
        }
        let view = model::SagaDetailView {
            now: Utc::now(),
            saga: model::SagaRow {
                id: record.id.as_uuid(),
                saga_type: record.saga_type.clone(),
                status: record.status.clone(),
                state: record.state.clone(),
                correlation_id: record.correlation_id.clone(),
                subject,
                created_at: record.created_at,
                updated_at: record.updated_at,
            },
            version: record.version,
            // A saga's trace id is its id (runtime::telemetry), shown when traces are exported.
            trace_id: runtime::telemetry::tracing_enabled()
                .then(|| record.id.as_uuid().simple().to_string()),
            trace_url: {
                let base = state.settings.admin.trace_url.trim();
                (!base.is_empty())
                    .then(|| base.replace("{trace_id}", &record.id.as_uuid().simple().to_string()))
            },
            failed_step: snapshot["failure"]["step"].as_str().map(str::to_owned),
            steps,
            actions: actions
                .iter()
                .filter_map(|a| {
                    Action::parse(a.action).map(|action| model::ActionView {
                        action: view_action(action),
                        enabled: a.allowed,
                        why_not: a.why_not.clone(),
                    })
                })
                .collect(),
            timers: timers
                .into_iter()
                .map(|t| model::TimerRow {
                    name: t.name,
                    fire_at: t.fire_at,
                })
                .collect(),
            entities,
            timeline: events
                .iter()
                .map(|e| {
                    let (summary, actor) = summary(e);
                    let mut input = e.input.clone();
                    let mut effects = e.effects.clone();
                    crate::privacy::drop_secrets(&mut input);
                    crate::privacy::drop_secrets(&mut effects);
                    model::EventRow {
                        seq: i64::from(e.seq),
                        at: e.at,
                        kind: e.kind.clone(),
                        summary,
                        actor,
                        state_after: e.state_after.clone(),
                        input,
                        effects,
                    }
                })
                .collect(),
        };
        let definition: Vec<diagram::StepDef<'_>> = state
            .registry
            .get(&record.saga_type)
            .map(|t| {
                t.steps()
                    .into_iter()
                    .map(|s| diagram::StepDef {
                        name: s.name,
                        kind: s.kind,
                        action: s.action,
                        compensation: s.compensation,
                        awaits: s.awaits,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let title = format!("Saga {id}");
        Ok(html(views::saga_detail(
            &page(&state, &who, &title, flash),
            &view,
            &definition,
        )))
    }
    .await;
    PageResult(result)
}

fn find_key(doc: &serde_json::Value, key: &str) -> Option<String> {
    match doc {
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k == key {
                match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                }
            } else {
                find_key(v, key)
            }
        }),
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_key(v, key)),
        _ => None,
    }
}

/// `POST /dashboard/sagas/{id}/actions/{action}`: confirm, then act.
pub async fn act(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    PathPair(raw, action): PathPair,
    body: Bytes,
) -> PageResult {
    let result: Result<Response, Problem> = async {
        let id = super::sagas::parse_id(&raw)?;
        let action = super::admin::parse_action(&action)?;
        let fields = form(&body)?;
        let reason = super::admin::reason(field(&fields, "reason").unwrap_or(""), "reason")?;
        let back = format!("/dashboard/sagas/{id}");
        if !confirmed(&fields) {
            let view = model::ConfirmView {
                title: action.label().to_owned(),
                what: format!("{} saga {id}", action.label()),
                dry_run_count: None,
                action_url: format!("/dashboard/sagas/{id}/actions/{}", action.as_str()),
                hidden: Vec::new(),
                reason,
                back_url: back,
            };
            return Ok(html(views::confirm(
                &page(&state, &who, "Confirm", None),
                &view,
            )));
        }
        service::act(&state.engine, &state.pool, &who, id, action, &reason, None).await?;
        Ok(Redirect::to(&format!("{back}?done={}", action.as_str())).into_response())
    }
    .await;
    PageResult(result)
}

/// `POST /dashboard/sagas/bulk`: a dry-run count to confirm, then the action on every match.
pub async fn bulk(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> PageResult {
    let result: Result<Response, Problem> = async {
        let fields = form(&body)?;
        let action = super::admin::parse_action(field(&fields, "action").unwrap_or(""))?;
        let reason = super::admin::reason(field(&fields, "reason").unwrap_or(""), "reason")?;
        let q = FilterQuery {
            saga_type: field(&fields, "type").map(str::to_owned),
            status: field(&fields, "status").map(str::to_owned),
            state: field(&fields, "state").map(str::to_owned),
            from: field(&fields, "from").map(str::to_owned),
            to: field(&fields, "to").map(str::to_owned),
            q: field(&fields, "q").map(str::to_owned),
            ..Default::default()
        };
        let filter = q.parse(&state.registry)?;
        let dry = !confirmed(&fields);
        let outcome =
            super::admin::bulk_apply(&state, &who, action, &reason, &filter, dry, "dashboard")
                .await?;
        let list = to_view_filter(&q).url();
        if dry {
            let mut hidden: Vec<(String, String)> = to_view_filter(&q)
                .pairs()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            hidden.push(("action".into(), action.as_str().into()));
            let view = model::ConfirmView {
                title: format!("{} (bulk)", action.label()),
                what: format!(
                    "{} every saga matching the filter (at most {})",
                    action.label(),
                    super::admin::BULK_CAP
                ),
                dry_run_count: Some(outcome.matched),
                action_url: "/dashboard/sagas/bulk".into(),
                hidden,
                reason,
                back_url: list,
            };
            return Ok(html(views::confirm(
                &page(&state, &who, "Confirm", None),
                &view,
            )));
        }
        let flash = format!(
            "{}: {} applied, {} refused.",
            action.label(),
            outcome.applied.len(),
            outcome.refused.len()
        );
        let view = model::ErrorView {
            status: 200,
            title: "Bulk action done".into(),
            detail: flash,
        };
        Ok(html(views::error(
            &page(&state, &who, "Bulk action done", None),
            &view,
        )))
    }
    .await;
    PageResult(result)
}

/// `POST /dashboard/breakers/{step}`: force a breaker open or closed, or hand it back.
pub async fn breaker(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    PathParam(step): PathParam,
    body: Bytes,
) -> PageResult {
    let result: Result<Response, Problem> = async {
        let fields = form(&body)?;
        let reason = super::admin::reason(field(&fields, "reason").unwrap_or(""), "reason")?;
        let wanted = field(&fields, "state").unwrap_or("");
        let force = match wanted {
            "open" => Some("open"),
            "closed" => Some("closed"),
            "auto" => None,
            other => {
                return Err(Problem::bad_request(
                    "invalid-form",
                    "Invalid form",
                    format!("state must be open, closed or auto, got {other:?}"),
                ));
            }
        };
        if !confirmed(&fields) {
            let view = model::ConfirmView {
                title: "Circuit breaker".into(),
                what: match force {
                    Some(f) => format!("Force the breaker of {step} {f} for every orchestrator"),
                    None => format!("Let the breaker of {step} decide again"),
                },
                dry_run_count: None,
                action_url: format!("/dashboard/breakers/{step}"),
                hidden: vec![("state".into(), wanted.into())],
                reason,
                back_url: "/dashboard".into(),
            };
            return Ok(html(views::confirm(
                &page(&state, &who, "Confirm", None),
                &view,
            )));
        }
        super::breakers::apply_force(&state, &who, &step, force, &reason).await?;
        Ok(Redirect::to("/dashboard").into_response())
    }
    .await;
    PageResult(result)
}

// ---------------------------------------------------------------------------------------------
// Dead letters and audit

pub async fn dead_letters(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> PageResult {
    let result: Result<Response, Problem> = async {
        let q: super::admin::LettersQuery = parse_query(query.as_deref())?;
        let f = q.parse()?;
        let letters = state
            .dead_letters
            .list(f.origin.as_deref(), f.before, f.limit)
            .await?;
        let origins = state
            .dead_letters
            .counts()
            .await?
            .into_iter()
            .map(|(origin, count)| model::OriginCount { origin, count })
            .collect();
        let next = (letters.len() == f.limit).then(|| {
            let last = letters.last().expect("a full page").seq;
            match &f.origin {
                Some(o) => format!("/dashboard/dead-letters?origin={o}&before={last}"),
                None => format!("/dashboard/dead-letters?before={last}"),
            }
        });
        let view = model::DeadLettersView {
            origin: f.origin.clone(),
            origins,
            rows: letters
                .into_iter()
                .map(|l| model::DeadLetterRow {
                    seq: l.seq,
                    origin: l.origin,
                    subject: l.subject,
                    reason: l.reason,
                    at: l.at,
                    size: l.size as u64,
                })
                .collect(),
            next,
        };
        Ok(html(views::dead_letters(
            &page(&state, &who, "Dead letters", None),
            &view,
        )))
    }
    .await;
    PageResult(result)
}

/// `POST /dashboard/dead-letters`: replay or discard the selected letters (or all of an
/// origin), after a confirmation with their count.
pub async fn dead_letters_act(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> PageResult {
    let result: Result<Response, Problem> = async {
        let fields = form(&body)?;
        let raw_action = field(&fields, "action").unwrap_or("");
        let (action, all) = match raw_action {
            "replay" => (LetterAction::Replay, false),
            "discard" => (LetterAction::Discard, false),
            "replay_all" => (LetterAction::Replay, true),
            "discard_all" => (LetterAction::Discard, true),
            other => {
                return Err(Problem::bad_request(
                    "invalid-form",
                    "Invalid form",
                    format!(
                        "action must be replay, discard, replay_all or discard_all, got {other:?}"
                    ),
                ));
            }
        };
        let seqs: Vec<u64> = fields
            .iter()
            .filter(|(k, _)| k == "seq")
            .map(|(_, v)| {
                v.parse::<u64>().map_err(|_| {
                    Problem::bad_request(
                        "invalid-form",
                        "Invalid form",
                        format!("{v:?} is not a dead letter's sequence"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let origin = field(&fields, "origin").filter(|o| !o.is_empty());
        let targets = if all {
            letters_to_touch(&state, &[], Some(origin.unwrap_or(""))).await?
        } else {
            letters_to_touch(&state, &seqs, None).await?
        };
        if !confirmed(&fields) {
            let mut hidden: Vec<(String, String)> = vec![("action".into(), raw_action.into())];
            if all {
                hidden.push(("origin".into(), origin.unwrap_or("").into()));
            } else {
                hidden.extend(targets.iter().map(|s| ("seq".to_owned(), s.to_string())));
            }
            let view = model::ConfirmView {
                title: format!("{} dead letters", action.as_str()),
                what: match (all, origin) {
                    (true, Some(o)) => format!("{} every dead letter of {o}", action.as_str()),
                    _ => format!("{} the selected dead letters", action.as_str()),
                },
                dry_run_count: Some(targets.len() as i64),
                action_url: "/dashboard/dead-letters".into(),
                hidden,
                reason: field(&fields, "reason").unwrap_or("").to_owned(),
                back_url: "/dashboard/dead-letters".into(),
            };
            return Ok(html(views::confirm(
                &page(&state, &who, "Confirm", None),
                &view,
            )));
        }
        let reason = super::admin::reason(field(&fields, "reason").unwrap_or(""), "reason")?;
        for seq in targets {
            // One that fails is audited as refused; the others go on.
            let _ = letter_act(&state, &who, seq, action, &reason).await;
        }
        Ok(Redirect::to("/dashboard/dead-letters").into_response())
    }
    .await;
    PageResult(result)
}

pub async fn audit_page(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> PageResult {
    let result: Result<Response, Problem> = async {
        let q: super::admin::AuditQuery = parse_query(query.as_deref())?;
        let (target, before, limit) = q.parse()?;
        let rows = audit::list(&state.pool, target, before, limit).await?;
        let next = (rows.len() as i64 == limit).then(|| {
            format!(
                "/dashboard/audit?limit={limit}&before={}",
                rows.last().expect("a full page").id
            )
        });
        let view = model::AuditView {
            rows: rows
                .into_iter()
                .map(|r| model::AuditRow {
                    target_url: r
                        .target
                        .parse::<Uuid>()
                        .ok()
                        .map(|id| format!("/dashboard/sagas/{id}")),
                    at: r.at,
                    actor: r.actor,
                    role: r.role,
                    action: r.action,
                    target: r.target,
                    reason: r.reason,
                    outcome: r.outcome,
                })
                .collect(),
            next,
        };
        Ok(html(views::audit(
            &page(&state, &who, "Audit log", None),
            &view,
        )))
    }
    .await;
    PageResult(result)
}

// ---------------------------------------------------------------------------------------------
// Live updates

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    pub saga: Option<String>,
    /// The version of the saga the page shows: a change made since it was rendered is sent
    /// at once.
    pub version: Option<String>,
}

/// `GET /dashboard/events`: server-sent events telling an open page to refresh. With `saga`,
/// one whenever that saga's version changes (checked every half second); without, one every
/// five seconds (the overview's figures and the list move all the time).
pub async fn events(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let q: EventsQuery = parse_query(query.as_deref())?;
    let saga = match q.saga.as_deref() {
        None => None,
        Some(raw) => Some(super::sagas::parse_id(raw)?),
    };
    let shown = match q.version.as_deref() {
        None => None,
        Some(raw) => Some(raw.parse::<i64>().map_err(|_| {
            Problem::bad_query("version", format!("must be a saga version, got {raw:?}"))
        })?),
    };
    let pool = state.pool.clone();
    let stream = futures::stream::unfold(shown, move |last| {
        let pool = pool.clone();
        async move {
            match saga {
                Some(id) => loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let version = sqlx::query_scalar!(
                        "SELECT version FROM orchestrator.sagas WHERE id = $1",
                        id.as_uuid()
                    )
                    .fetch_optional(&pool)
                    .await
                    .ok()
                    .flatten();
                    if let Some(v) = version
                        && last != Some(v)
                    {
                        // The first look only records where the page stands.
                        if last.is_some() {
                            let event = Event::default().data(v.to_string());
                            return Some((Ok::<_, std::convert::Infallible>(event), Some(v)));
                        }
                        return Some((Ok(Event::default().comment("watching")), Some(v)));
                    }
                },
                None => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Some((Ok(Event::default().data("tick")), last))
                }
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
