//! The HTTP API. Handlers parse and validate, call the engine or read the database, and map
//! every error to a problem (RFC 9457) in [`problem`].

pub mod admin;
pub mod auth;
pub mod breakers;
pub mod checkout;
pub mod dashboard;
pub mod health;
pub mod input;
pub mod openapi;
pub mod orders;
pub mod problem;
pub mod sagas;
pub mod signals;
pub mod wait;

use std::sync::Arc;

use async_nats::jetstream;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
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
    pub auth: Arc<auth::Auth>,
    pub dead_letters: crate::dead_letters::DeadLetters,
}

/// The correlation id of the request being served.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

pub const CORRELATION_HEADER: HeaderName = HeaderName::from_static("x-correlation-id");

/// Who may call a route ([`auth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// What a shop's customers and services reach: the checkout and the masked views of it.
    Public,
    /// Reads that show personal data, or the system's insides.
    Viewer,
    /// Every write but the checkout's own and a customer's cancel.
    Operator,
}

/// One route: who may call it, its method and path, and its handler.
pub struct Route {
    pub access: Access,
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<AppState>,
}

fn route<H, T>(access: Access, method: Method, path: &'static str, handler: H) -> Route
where
    H: axum::handler::Handler<T, AppState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a routable method");
    Route {
        access,
        method,
        path,
        handler: on(filter, handler),
    }
}

/// Every route of the API and the dashboard. The router is built from this list alone, so a
/// route cannot escape its access check; `tests/tests/admin_auth.rs` walks it.
#[rustfmt::skip] // A table: one route a line.
pub fn routes() -> Vec<Route> {
    use Access::*;
    vec![
        route(Public, Method::POST, "/checkout", checkout::create),
        route(Public, Method::GET, "/orders/{id}", orders::get),
        route(Public, Method::POST, "/orders/{id}/cancel", orders::cancel),
        route(Public, Method::GET, "/sagas/{id}", sagas::get),
        route(Public, Method::GET, "/metrics", breakers::metrics),
        route(Public, Method::GET, "/healthz", health::healthz),
        route(Public, Method::GET, "/readyz", health::readyz),
        route(Public, Method::GET, "/problems/{slug}", problem_doc),
        route(Public, Method::GET, "/openapi.json", openapi::serve),
        route(Public, Method::GET, "/dashboard/login", dashboard::login_form),
        route(Public, Method::POST, "/dashboard/login", dashboard::login),
        route(Viewer, Method::GET, "/orders", orders::list),
        route(Viewer, Method::GET, "/sagas", sagas::list),
        route(Viewer, Method::GET, "/sagas/{id}/verify", sagas::verify),
        route(Viewer, Method::GET, "/breakers", breakers::list),
        route(Viewer, Method::GET, "/admin/sagas", admin::list),
        route(Viewer, Method::GET, "/admin/sagas/{id}", admin::get),
        route(Viewer, Method::GET, "/admin/audit", admin::audit_log),
        route(Viewer, Method::GET, "/admin/dead-letters", admin::dead_letters),
        route(Viewer, Method::GET, "/admin/partitions", admin::partitions),
        route(Viewer, Method::POST, "/dashboard/logout", dashboard::logout),
        route(Viewer, Method::GET, "/dashboard", dashboard::overview),
        route(Viewer, Method::GET, "/dashboard/sagas", dashboard::list),
        route(Viewer, Method::GET, "/dashboard/sagas/{id}", dashboard::detail),
        route(Viewer, Method::GET, "/dashboard/dead-letters", dashboard::dead_letters),
        route(Viewer, Method::GET, "/dashboard/audit", dashboard::audit_page),
        route(Viewer, Method::GET, "/dashboard/events", dashboard::events),
        route(Operator, Method::POST, "/sagas/{id}/cancel", sagas::cancel),
        route(Operator, Method::POST, "/sagas/{id}/signals/{name}", signals::send),
        route(Operator, Method::PUT, "/breakers/{step}", breakers::force),
        route(Operator, Method::POST, "/admin/sagas/bulk", admin::bulk),
        route(Operator, Method::POST, "/admin/sagas/{id}/actions/{action}", admin::act),
        route(Operator, Method::POST, "/admin/dead-letters/bulk", admin::dead_letters_bulk),
        route(Operator, Method::POST, "/admin/dead-letters/{seq}/{action}", admin::dead_letter_act),
        route(Operator, Method::POST, "/dashboard/sagas/bulk", dashboard::bulk),
        route(Operator, Method::POST, "/dashboard/sagas/{id}/actions/{action}", dashboard::act),
        route(Operator, Method::POST, "/dashboard/breakers/{step}", dashboard::breaker),
        route(Operator, Method::POST, "/dashboard/dead-letters", dashboard::dead_letters_act),
    ]
}

pub fn router(state: AppState) -> Router {
    let max_body = state.settings.http.max_body_bytes;
    let mut router = Router::new();
    for r in routes() {
        let handler = match r.access {
            Access::Public => r.handler,
            Access::Viewer => r.handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::require_viewer,
            )),
            Access::Operator => r.handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::require_operator,
            )),
        };
        router = router.route(r.path, handler);
    }
    router
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
