//! Inspecting and steering sagas: `GET /sagas`, `GET /sagas/{id}`, `POST /sagas/{id}/cancel`.

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sagas::api::Input;
use sagas::wire::SagaId;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::input;
use super::problem::{OptionalJsonBody, PathParam, Problem, parse_query};
use super::{AppState, CorrelationId};
use crate::engine::{self, Applied, EventRow, Origin, SagaRecord};

pub fn parse_id(raw: &str) -> Result<SagaId, Problem> {
    raw.parse().map_err(|_| {
        Problem::bad_request(
            "invalid-saga-id",
            "Invalid saga id",
            format!("{raw:?} is not a UUID"),
        )
    })
}

/// The business entity a saga runs for (a checkout's order id).
pub async fn order_id_of(pool: &PgPool, id: SagaId) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT subject FROM orchestrator.sagas WHERE id = $1",
        id.as_uuid(),
    )
    .fetch_optional(pool)
    .await
    .map(Option::flatten)
}

/// A saga as `GET /sagas/{id}` shows it.
#[derive(Debug, Serialize)]
pub struct SagaView {
    #[serde(flatten)]
    pub record: Summary,
    /// The saga's data (for a checkout: the order).
    pub data: serde_json::Value,
    /// Each step with its status, attempts, last error and output.
    pub steps: serde_json::Value,
    pub failure: serde_json::Value,
    pub cancel_reason: serde_json::Value,
    /// Every signal the saga received, with what became of it (applied, buffered, ignored).
    pub signals: serde_json::Value,
    /// Every input the saga applied, in order, with the effects it produced.
    pub events: Vec<EventRow>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub id: SagaId,
    #[serde(rename = "type")]
    pub saga_type: String,
    pub status: String,
    pub state: String,
    pub version: i64,
    pub correlation_id: String,
    pub idempotency_key: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl From<&SagaRecord> for Summary {
    fn from(r: &SagaRecord) -> Self {
        Summary {
            id: r.id,
            saga_type: r.saga_type.clone(),
            status: r.status.clone(),
            state: r.state.clone(),
            version: r.version,
            correlation_id: r.correlation_id.clone(),
            idempotency_key: r.idempotency_key.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetQuery {
    /// Long poll: answer when the saga ended, or after this many seconds.
    pub wait: Option<String>,
}

pub async fn get(
    State(state): State<AppState>,
    PathParam(raw): PathParam,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let id = parse_id(&raw)?;
    let q: GetQuery = parse_query(query.as_deref())?;
    if let Some(raw) = q.wait {
        let seconds = super::wait::parse(&raw, state.settings.http.max_wait_seconds)?;
        state
            .engine
            .wait_ended(
                &state.pool,
                id,
                std::time::Duration::from_secs(seconds),
                None,
            )
            .await?;
    }
    let Some((record, events)) = engine::load_record(&state.pool, id).await? else {
        return Err(Problem::not_found(format!("no saga {id}")));
    };
    let field = |name: &str| {
        record
            .snapshot
            .get(name)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    };
    let view = SagaView {
        record: Summary::from(&record),
        data: field("data"),
        steps: complete_steps(field("steps")),
        failure: field("failure"),
        cancel_reason: field("cancel_reason"),
        signals: match field("signals") {
            serde_json::Value::Null => serde_json::json!([]),
            signals => signals,
        },
        events,
    };
    // A public route (the checkout's status URL): the masked view; `/admin/sagas/{id}` is the whole.
    let mut body = serde_json::to_value(&view).expect("a saga view serializes");
    crate::privacy::public_view(&mut body);
    Ok(axum::Json(body).into_response())
}

/// Snapshots leave out what is zero or empty; the API shows every field of every step.
fn complete_steps(mut steps: serde_json::Value) -> serde_json::Value {
    if let Some(list) = steps.as_array_mut() {
        for step in list.iter_mut().filter_map(|s| s.as_object_mut()) {
            for (key, default) in [
                ("attempts", serde_json::json!(0)),
                ("compensation_attempts", serde_json::json!(0)),
                ("renewals", serde_json::json!(0)),
                ("last_error", serde_json::Value::Null),
                ("output", serde_json::Value::Null),
            ] {
                step.entry(key).or_insert(default);
            }
        }
    }
    steps
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub status: Option<String>,
    pub limit: Option<String>,
    /// A saga id: the page starts after it (the `next` link of the page before).
    pub before: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let q: ListQuery = parse_query(query.as_deref())?;
    let status = q.status.as_deref().map(input::status).transpose()?;
    let limit = input::limit(q.limit.as_deref(), 50, 500)?;
    let before = match q.before.as_deref() {
        None => None,
        Some(raw) => Some(raw.parse::<SagaId>().map_err(|_| {
            Problem::bad_query("before", format!("must be a saga id, got {raw:?}"))
        })?),
    };
    let records = engine::list_records(&state.pool, status, before, limit).await?;
    let sagas: Vec<Summary> = records.iter().map(Summary::from).collect();
    // A full page may have more after it.
    let next = (sagas.len() as i64 == limit).then(|| {
        let last = sagas.last().expect("a full page is not empty").id;
        match status {
            Some(s) => format!("/sagas?status={}&limit={limit}&before={last}", s.as_str()),
            None => format!("/sagas?limit={limit}&before={last}"),
        }
    });
    Ok(axum::Json(serde_json::json!({ "sagas": sagas, "next": next })).into_response())
}

#[derive(Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

pub async fn cancel(
    State(state): State<AppState>,
    Extension(CorrelationId(correlation_id)): Extension<CorrelationId>,
    PathParam(raw): PathParam,
    // The body is optional: `{"reason": "..."}`.
    OptionalJsonBody(request): OptionalJsonBody<CancelRequest>,
) -> Result<Response, Problem> {
    let id = parse_id(&raw)?;
    let mut errors = Vec::new();
    let reason = input::optional_text(&mut errors, "/reason", request.reason.as_deref(), 500)
        .unwrap_or_else(|| "cancelled by request".to_owned());
    if !errors.is_empty() {
        return Err(Problem::invalid(errors));
    }
    let origin = Origin {
        correlation_id: Some(correlation_id),
        ..Default::default()
    };
    match state
        .engine
        .apply(id, Input::Cancel { reason }, origin)
        .await?
    {
        Applied::Applied { status, state } => Ok((
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "saga_id": id, "status": status, "state": state })),
        )
            .into_response()),
        Applied::Ignored(why) => Err(Problem::new(
            StatusCode::CONFLICT,
            "cannot-cancel",
            "The saga cannot be cancelled",
            why,
        )),
        Applied::NotFound => Err(Problem::not_found(format!("no saga {id}"))),
    }
}

/// Replay the saga's event log through its machine and compare with the stored snapshot.
pub async fn verify(
    State(state): State<AppState>,
    PathParam(raw): PathParam,
) -> Result<Response, Problem> {
    let id = parse_id(&raw)?;
    let Some((record, events)) = engine::load_record(&state.pool, id).await? else {
        return Err(Problem::not_found(format!("no saga {id}")));
    };
    let body = match engine::replay(&state.registry, &record.saga_type, id, &events) {
        Ok(replayed) if replayed == record.snapshot => {
            serde_json::json!({ "saga_id": id, "consistent": true, "events": events.len() })
        }
        Ok(_) => serde_json::json!({ "saga_id": id, "consistent": false, "events": events.len(),
                                     "detail": "the replayed snapshot differs from the stored one" }),
        Err(e) => {
            serde_json::json!({ "saga_id": id, "consistent": false, "events": events.len(), "detail": e })
        }
    };
    Ok(axum::Json(body).into_response())
}
