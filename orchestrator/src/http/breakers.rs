//! `GET /breakers`, `PUT /breakers/{step}`: see and force the circuit breakers.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::problem::{FieldError, JsonBody, PathParam, Problem};
use crate::breakers::{Force, View};

#[derive(Serialize)]
struct Listed {
    #[serde(flatten)]
    view: View,
    /// Sagas parked on the step now (all orchestrators).
    parked: i64,
}

pub async fn list(State(state): State<AppState>) -> Result<Response, Problem> {
    // PostgreSQL does not carry the `IS NOT NULL` over to the column's type, nor know that a
    // count is never NULL: both are said here.
    let parked: std::collections::HashMap<String, i64> = sqlx::query!(
        r#"SELECT parked_on AS "parked_on!", count(*) AS "parked!"
             FROM orchestrator.sagas WHERE parked_on IS NOT NULL GROUP BY parked_on"#,
    )
    .fetch_all(&state.pool)
    .await?
    .into_iter()
    .map(|r| (r.parked_on, r.parked))
    .collect();
    let breakers: Vec<Listed> = state
        .breakers
        .views()
        .into_iter()
        .map(|view| Listed {
            parked: parked.get(view.step).copied().unwrap_or(0),
            view,
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "breakers": breakers })).into_response())
}

#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceRequest {
    /// `"open"`, `"closed"`, or `null` to let the breaker decide again. Required: an operator
    /// says which.
    #[serde(deserialize_with = "required_or_null")]
    pub force: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// A field that must be present, and may be `null`.
fn required_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

/// Force a breaker open or closed for every orchestrator, or hand it back (`force: null`).
pub async fn force(
    State(state): State<AppState>,
    axum::Extension(who): axum::Extension<super::auth::Principal>,
    PathParam(step): PathParam,
    JsonBody(req): JsonBody<ForceRequest>,
) -> Result<Response, Problem> {
    if !state.breakers.has(&step) {
        return Err(Problem::not_found(format!("no breaker for step {step:?}")));
    }
    let mut errors = Vec::new();
    let reason = super::input::optional_text(&mut errors, "/reason", req.reason.as_deref(), 500)
        .unwrap_or_default();
    let force = match req.force.as_deref() {
        None => None,
        Some(s) => {
            let force = Force::parse(s);
            if force.is_none() {
                errors.push(FieldError::new(
                    "/force",
                    format!("must be \"open\", \"closed\" or null, got {s:?}"),
                ));
            }
            force
        }
    };
    if !errors.is_empty() {
        return Err(Problem::invalid(errors));
    }
    apply_force(&state, &who, &step, force.map(|f| f.as_str()), &reason).await?;
    let view = state.breakers.views().into_iter().find(|v| v.step == step);
    Ok((StatusCode::OK, axum::Json(view)).into_response())
}

/// Store an operator's override of a breaker (`force` open or closed; `None` hands it back),
/// apply it here at once, and audit it. The other orchestrators read it within
/// `breakers.unpark_interval_ms`.
pub async fn apply_force(
    state: &AppState,
    who: &super::auth::Principal,
    step: &str,
    force: Option<&str>,
    reason: &str,
) -> Result<(), Problem> {
    if !state.breakers.has(step) {
        return Err(Problem::not_found(format!("no breaker for step {step:?}")));
    }
    match force {
        Some(f) => {
            sqlx::query!(
                "INSERT INTO orchestrator.breaker_overrides (step, force, reason, set_at) VALUES ($1, $2, $3, now())
                 ON CONFLICT (step) DO UPDATE SET force = excluded.force, reason = excluded.reason, set_at = now()",
                step,
                f,
                reason,
            )
            .execute(&state.pool)
            .await?;
        }
        None => {
            sqlx::query!(
                "DELETE FROM orchestrator.breaker_overrides WHERE step = $1",
                step,
            )
            .execute(&state.pool)
            .await?;
        }
    }
    // Apply it here at once; the other orchestrators (and this one, if reading it back fails
    // now) read it within `breakers.unpark_interval_ms`. The override is stored either way,
    // so the answer says so.
    match crate::unpark::load_overrides(&state.pool).await {
        Ok(overrides) => state.breakers.set_forced(overrides),
        Err(e) => {
            tracing::warn!(error = %e, "override stored; it applies at the next unparker pass")
        }
    }
    tracing::warn!(step, ?force, reason = %reason, actor = %who.name, "breaker override set");
    let action = match force {
        Some(f) => format!("breaker.force_{f}"),
        None => "breaker.clear_force".to_owned(),
    };
    crate::audit::record(
        &state.pool,
        who,
        &action,
        step,
        reason,
        crate::audit::Outcome::Done,
        None,
    )
    .await;
    Ok(())
}

/// `GET /metrics`. What is not counted as it happens is read now: each pool's backlog from its
/// JetStream consumer, the outbox from PostgreSQL (the outbox is small: its rows are deleted
/// once published). A source that does not answer leaves its last value.
pub async fn metrics(State(state): State<AppState>) -> Response {
    for pool in super::dashboard::pools(&state).await {
        state
            .metrics
            .pool_backlog(&pool.service, pool.pending, pool.ack_pending);
    }
    if let Ok(row) = sqlx::query!(
        r#"SELECT count(*) AS "rows!",
                  coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS "oldest!"
             FROM orchestrator.outbox"#
    )
    .fetch_one(&state.pool)
    .await
    {
        state.metrics.outbox(row.rows, row.oldest.max(0.0));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
