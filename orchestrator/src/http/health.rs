//! Liveness and readiness.

use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::problem::Problem;
use crate::topology::streams;

/// The process is up and serving HTTP.
pub async fn healthz() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Ready only when PostgreSQL and JetStream both answer.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let limit = Duration::from_secs(2);
    let ping = sqlx::query_scalar!("SELECT 1").fetch_one(&state.pool);
    let db = tokio::time::timeout(limit, ping).await;
    if !matches!(db, Ok(Ok(_))) {
        return Problem::unavailable("PostgreSQL does not answer").into_response();
    }
    let stream = state.topology.stream_name(streams::COMMANDS);
    let js = tokio::time::timeout(limit, state.js.get_stream(stream)).await;
    if !matches!(js, Ok(Ok(_))) {
        return Problem::unavailable("JetStream does not answer").into_response();
    }
    axum::Json(serde_json::json!({ "status": "ready", "postgres": "ok", "jetstream": "ok" }))
        .into_response()
}
