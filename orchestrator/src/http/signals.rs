//! `POST /sagas/{id}/signals/{name}`: send a saga a signal (something that happened in the
//! world, that the saga may be waiting for). The body, if any, is its JSON payload. With an
//! `Idempotency-Key`, the same key is the same signal: sent twice, it is applied once.
//! Services publish signals on JetStream instead (`crate::signals`).

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sagas::api::Input;
use sagas::wire::{Signal, SignalId};

use super::problem::{FieldError, OptionalJsonBody, PathPair, Problem};
use super::{AppState, CorrelationId, input};
use crate::engine::{Applied, Origin};

pub async fn send(
    State(state): State<AppState>,
    Extension(CorrelationId(correlation_id)): Extension<CorrelationId>,
    PathPair(raw_id, name): PathPair,
    headers: HeaderMap,
    OptionalJsonBody(payload): OptionalJsonBody<serde_json::Value>,
) -> Result<Response, Problem> {
    let id = super::sagas::parse_id(&raw_id)?;
    input::signal_name(&name)
        .map_err(|why| Problem::bad_request("invalid-path", "Invalid path", why))?;
    if let Err(why) = input::json_texts(&payload) {
        let (pointer, detail) = why.split_once(": ").unwrap_or(("", why.as_str()));
        return Err(Problem::invalid(vec![FieldError::new(pointer, detail)]));
    }
    let key = input::token_header(&headers, "Idempotency-Key", 255)?;
    let signal_id = match &key {
        Some(key) => SignalId::derive(id, &name, key),
        None => SignalId::from_uuid(uuid::Uuid::now_v7()),
    };
    let origin = Origin {
        correlation_id: Some(correlation_id),
        ..Default::default()
    };
    let signal = Signal {
        id: signal_id,
        name,
        payload,
    };
    match state
        .engine
        .apply(id, Input::Signal(signal), origin)
        .await?
    {
        // Applied: the saga's signal history says whether it was awaited, buffered or
        // recorded and ignored (`GET /sagas/{id}`).
        Applied::Applied { status, state } => Ok((
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({
                "saga_id": id, "signal_id": signal_id, "status": status, "state": state,
            })),
        )
            .into_response()),
        // A signal sent before (the same key), or a saga that has ended or is compensating:
        // nothing changed, and the answer says why.
        Applied::Ignored(why) => Ok((
            StatusCode::OK,
            axum::Json(serde_json::json!({
                "saga_id": id, "signal_id": signal_id, "ignored": why,
            })),
        )
            .into_response()),
        Applied::NotFound => Err(Problem::not_found(format!("no saga {id}"))),
    }
}
