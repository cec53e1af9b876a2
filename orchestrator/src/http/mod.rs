//! The HTTP API. Handlers parse and validate, call the engine or read the database, and map
//! every error to a problem (RFC 9457) in [`problem`].

pub mod breakers;
pub mod checkout;
pub mod health;
pub mod input;
pub mod orders;
pub mod problem;
pub mod sagas;
pub mod signals;
pub mod wait;

use std::sync::Arc;

use async_nats::jetstream;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sqlx::PgPool;
use tracing::Instrument;

use crate::breakers::Breakers;
use crate::catalog::Catalog;
use crate::config::Settings;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::topology::Topology;
use problem::Problem;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    /// The saga types this orchestrator runs.
    pub registry: Arc<::sagas::api::Registry>,
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub topology: Topology,
    pub catalog: Arc<Catalog>,
    pub breakers: Arc<Breakers>,
    pub metrics: Metrics,
    pub settings: Arc<Settings>,
}

/// The correlation id of the request being served.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

pub const CORRELATION_HEADER: HeaderName = HeaderName::from_static("x-correlation-id");

pub fn router(state: AppState) -> Router {
    let max_body = state.settings.http.max_body_bytes;
    Router::new()
        .route("/checkout", post(checkout::create))
        .route("/orders", get(orders::list))
        .route("/orders/{id}", get(orders::get))
        .route("/orders/{id}/cancel", post(orders::cancel))
        .route("/sagas", get(sagas::list))
        .route("/sagas/{id}", get(sagas::get))
        .route("/sagas/{id}/cancel", post(sagas::cancel))
        .route("/sagas/{id}/verify", get(sagas::verify))
        .route("/sagas/{id}/signals/{name}", post(signals::send))
        .route("/breakers", get(breakers::list))
        .route("/breakers/{step}", axum::routing::put(breakers::force))
        .route("/metrics", get(breakers::metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/problems/{slug}", get(problem_doc))
        .fallback(|| async { Problem::not_found("no such resource") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this resource does not support the method",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(correlate))
        .with_state(state)
}

/// Take the caller's `X-Correlation-Id` (or make one), run the request in a span that carries
/// it, and echo it on the response. A correlation id is stored with the saga and sent with
/// every message: one that is not 1 to 128 visible ASCII characters is refused (422).
async fn correlate(mut req: Request, next: Next) -> Response {
    let id = match input::token_header(req.headers(), "X-Correlation-Id", 128) {
        Ok(Some(id)) => id,
        Ok(None) => runtime::telemetry::new_correlation_id(),
        Err(problem) => return problem.into_response(),
    };
    req.extensions_mut().insert(CorrelationId(id.clone()));
    let span = tracing::info_span!(
        "http",
        correlation_id = %id,
        method = %req.method(),
        path = %req.uri().path()
    );
    async move {
        let mut response = next.run(req).await;
        let status = response.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), "request served");
        }
        if let Ok(v) = HeaderValue::from_str(&id) {
            response.headers_mut().insert(CORRELATION_HEADER, v);
        }
        response
    }
    .instrument(span)
    .await
}

async fn problem_doc(Path(slug): Path<String>) -> Response {
    runtime::problem::describe_type(problem::CATALOGUE, &slug)
}
