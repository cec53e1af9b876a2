//! The orchestrator's problem types: the shared RFC 9457 problems ([`runtime::problem`]), the
//! engine's errors as problems, and what each problem type means.

pub use runtime::problem::*;

use crate::engine;

impl From<engine::Error> for Problem {
    fn from(e: engine::Error) -> Self {
        match e {
            engine::Error::InvalidStart(detail) => {
                Problem::invalid(vec![FieldError::new("", detail)])
            }
            engine::Error::Database(ref db) => {
                tracing::error!(error = %db, "database error");
                Problem::unavailable("the database did not answer; try again")
            }
            engine::Error::Contention(_) | engine::Error::Stopped => {
                Problem::unavailable(e.to_string())
            }
            engine::Error::UnknownType(_) | engine::Error::Corrupt { .. } => {
                tracing::error!(error = %e, "engine error");
                Problem::internal(e.to_string())
            }
        }
    }
}

/// What each problem type means; served at `/problems/<slug>`.
pub const CATALOGUE: &[(&str, &str)] = &[
    (
        "invalid-request",
        "The body is well-formed JSON but a field is missing, unknown, of the wrong type or out of range, or a header is invalid. `errors` lists each: a field of the body as a JSON `pointer`, a `header` by its name, with what is wrong. Nothing was written.",
    ),
    (
        "malformed-json",
        "The body is not valid JSON. Nothing was written.",
    ),
    (
        "unsupported-media-type",
        "The body must be sent as application/json. Nothing was written.",
    ),
    (
        "payload-too-large",
        "The body is larger than the configured limit (http.max_body_bytes). Nothing was written.",
    ),
    (
        "unreadable-body",
        "The body could not be read. Nothing was written.",
    ),
    (
        "idempotency-key-reused",
        "This customer already used this Idempotency-Key with a different request. Use a new key for a new request. Nothing was written.",
    ),
    ("invalid-saga-id", "The saga id in the path is not a UUID."),
    (
        "invalid-order-id",
        "The order id in the path is not a UUID.",
    ),
    (
        "order-not-cancellable",
        "The order can no longer be cancelled: its parcel left the warehouse, or it ended. `detail` says why.",
    ),
    (
        "invalid-path",
        "A segment of the path is not valid percent-encoded UTF-8.",
    ),
    (
        "invalid-wait",
        "A wait (`Prefer: wait=<seconds>` or `?wait=<seconds>`) must be a whole number of seconds from 0 to http.max_wait_seconds.",
    ),
    (
        "invalid-query",
        "A query parameter is unknown, repeated or invalid; `errors` names it (`parameter`).",
    ),
    ("not-found", "No such resource."),
    (
        "cannot-cancel",
        "The saga can no longer be cancelled (it ended, is already compensating, or passed its pivot step).",
    ),
    (
        "method-not-allowed",
        "This resource does not support the method.",
    ),
    (
        "unavailable",
        "A dependency (PostgreSQL or NATS) did not answer. Retry after the Retry-After delay; with an Idempotency-Key the retry is safe.",
    ),
    (
        "internal",
        "An unexpected error; it is logged with the request's correlation id.",
    ),
];
