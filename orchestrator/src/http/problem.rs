//! RFC 9457 problem details: the one place where errors become HTTP responses.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine;

/// One invalid field: a JSON pointer into the request body and what is wrong with it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldError {
    pub pointer: String,
    pub detail: String,
}

impl FieldError {
    pub fn new(pointer: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            pointer: pointer.into(),
            detail: detail.into(),
        }
    }
}

/// A problem: `type` is `/problems/<slug>`, documented at that URL by this service.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub extra: Option<serde_json::Value>,
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    r#type: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    extra: &'a Option<serde_json::Value>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            slug,
            title,
            detail: detail.into(),
            errors: Vec::new(),
            extra: None,
            retry_after: None,
        }
    }

    pub fn invalid(errors: Vec<FieldError>) -> Self {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.pointer, one.detail),
            many => format!("{} fields are invalid", many.len()),
        };
        Self {
            errors,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-request",
                "The request is not valid",
                detail,
            )
        }
    }

    pub fn bad_request(slug: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, slug, title, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Temporarily unavailable",
                detail,
            )
        }
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail,
        )
    }

    pub fn with_extra(mut self, extra: serde_json::Value) -> Self {
        self.extra = Some(extra);
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = Body {
            r#type: format!("/problems/{}", self.slug),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            errors: &self.errors,
            extra: &self.extra,
        };
        let mut response = (
            self.status,
            serde_json::to_vec(&body).expect("problems serialize"),
        )
            .into_response();
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

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

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error");
        Problem::unavailable("the database did not answer; try again")
    }
}

/// A JSON body whose rejections are problems: 415 without a JSON content type, 413 over the
/// size limit, 400 when it is not JSON, 422 naming the field (as a JSON pointer) when it is
/// JSON of the wrong shape.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(&req) {
            return Err(not_json());
        }
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A JSON body that may be left out (empty, or only white space): then `T::default()`.
/// Otherwise it is held to the rules of [`JsonBody`].
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = is_json(&req);
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        if !json {
            return Err(not_json());
        }
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| {
            m.type_() == "application"
                && (m.subtype() == "json" || m.suffix().is_some_and(|s| s == "json"))
        })
}

fn not_json() -> Problem {
    Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "The body must be JSON",
        "send the body with Content-Type: application/json",
    )
}

/// The whole body, within `http.max_body_bytes` (413 beyond it).
async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<axum::body::Bytes, Problem> {
    axum::body::Bytes::from_request(req, state)
        .await
        .map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload-too-large",
                    "The body is too large",
                    r.body_text(),
                )
            } else {
                Problem::bad_request("unreadable-body", "The body cannot be read", r.body_text())
            }
        })
}

/// The one parameter of a path (`/sagas/{id}`), whose rejection (a segment that is not valid
/// percent-encoded UTF-8) is a problem too.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(p)| PathParam(p))
            .map_err(|r| Problem::bad_request("invalid-path", "Invalid path", r.body_text()))
    }
}

/// Parse a JSON body, telling malformed JSON (400) from JSON of the wrong shape (422).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let malformed = |e: serde_json::Error| {
        Problem::bad_request(
            "malformed-json",
            "The body is not valid JSON",
            e.to_string(),
        )
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            malformed(e.into_inner())
        } else {
            Problem::invalid(vec![FieldError::new(pointer(e.path()), inner.to_string())])
        }
    })?;
    de.end().map_err(malformed)?;
    Ok(value)
}

/// A serde path as a JSON pointer (RFC 6901): `items[0].quantity` -> `/items/0/quantity`.
fn pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        out.push('/');
        match segment {
            Segment::Seq { index } => out.push_str(&index.to_string()),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                out.push_str(&key.replace('~', "~0").replace('/', "~1"))
            }
            Segment::Unknown => out.push('?'),
        }
    }
    out
}

/// What each problem type means; served at `/problems/<slug>`.
pub const CATALOGUE: &[(&str, &str)] = &[
    (
        "invalid-request",
        "The body is well-formed JSON but a field is missing, of the wrong type or out of range. `errors` lists each field as a JSON pointer with what is wrong. Nothing was written.",
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
        "invalid-idempotency-key",
        "The Idempotency-Key header must be 1 to 255 visible ASCII characters. Nothing was written.",
    ),
    (
        "idempotency-key-reused",
        "This Idempotency-Key was already used with a different request; `saga_id` names the saga it belongs to. Use a new key for a new request. Nothing was written.",
    ),
    ("invalid-saga-id", "The saga id in the path is not a UUID."),
    (
        "invalid-path",
        "A segment of the path is not valid percent-encoded UTF-8.",
    ),
    (
        "invalid-wait",
        "A wait (`Prefer: wait=<seconds>` or `?wait=<seconds>`) must be a whole number of seconds from 0 to http.max_wait_seconds.",
    ),
    ("invalid-query", "A query parameter is invalid."),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        items: Vec<Item>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Item {
        quantity: i64,
    }

    #[test]
    fn malformed_json_is_400_and_wrong_shapes_are_422_with_a_pointer() {
        let p = parse_json::<Body>(br#"{"items": [{"quantity": 1}"#).unwrap_err();
        assert_eq!(
            (p.status, p.slug),
            (StatusCode::BAD_REQUEST, "malformed-json")
        );
        let p = parse_json::<Body>(br#"{"items": [{"quantity": 1}]} trailing"#).unwrap_err();
        assert_eq!(p.status, StatusCode::BAD_REQUEST);
        let p = parse_json::<Body>(br#"{"items": [{"quantity": 1}, {"quantity": "two"}]}"#)
            .unwrap_err();
        assert_eq!(p.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(p.errors[0].pointer, "/items/1/quantity");
        assert!(parse_json::<Body>(br#"{"items": []}"#).is_ok());
    }
}
