// Problem (an HTTP error) is large by nature and built once per failed request.
#![allow(clippy::result_large_err)]

//! RFC 9457 problem details, for every HTTP API of the system (the orchestrator's, the Product
//! service's): the one place where errors become responses, and the extractors whose
//! rejections are problems. Each service documents its problem types at `/problems/<slug>`.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// One invalid input and what is wrong with it: a field of the body (a JSON pointer, RFC
/// 6901), a header or a query parameter.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldError {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    pub detail: String,
}

impl FieldError {
    /// A field of the body; `""` is the body itself.
    pub fn new(pointer: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            pointer: Some(pointer.into()),
            header: None,
            parameter: None,
            detail: detail.into(),
        }
    }

    pub fn header(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            pointer: None,
            header: Some(name.into()),
            parameter: None,
            detail: detail.into(),
        }
    }

    pub fn parameter(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            pointer: None,
            header: None,
            parameter: Some(name.into()),
            detail: detail.into(),
        }
    }

    /// How the error names its input, for a message: `/customer/email`, `header
    /// Idempotency-Key`, `parameter limit`, or `the body`.
    fn name(&self) -> String {
        match (&self.pointer, &self.header, &self.parameter) {
            (Some(p), _, _) if p.is_empty() => "the body".to_owned(),
            (Some(p), _, _) => p.clone(),
            (None, Some(h), _) => format!("header {h}"),
            (None, None, Some(q)) => format!("parameter {q}"),
            (None, None, None) => "the request".to_owned(),
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
            [one] => format!("{}: {}", one.name(), one.detail),
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

    /// A query parameter that is not valid (400), named in `errors`.
    pub fn bad_query(parameter: &str, detail: impl Into<String>) -> Self {
        let error = FieldError::parameter(parameter, detail);
        Self {
            detail: format!("{}: {}", error.name(), error.detail),
            errors: vec![error],
            ..Self::bad_request("invalid-query", "Invalid query", "")
        }
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

impl<S: Send + Sync, T: DeserializeOwned + Serialize> FromRequest<S> for JsonBody<T> {
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

impl<S: Send + Sync, T: DeserializeOwned + Serialize + Default> FromRequest<S>
    for OptionalJsonBody<T>
{
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

/// The query string of a request read into `T`, whose fields are all optional strings that
/// the handler parses itself: only unknown or repeated parameters are refused here (400,
/// naming the parameter).
pub fn parse_query<T: DeserializeOwned + Default>(raw: Option<&str>) -> Result<T, Problem> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(T::default());
    };
    serde_urlencoded::from_str(raw).map_err(|e| {
        let (name, detail) = describe_message(String::new(), &e.to_string());
        Problem::bad_query(name.trim_start_matches('/'), detail)
    })
}

/// The two parameters of a path (`/sagas/{id}/signals/{name}`), whose rejection is a problem.
pub struct PathPair(pub String, pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathPair {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path((a, b))| PathPair(a, b))
            .map_err(|r| Problem::bad_request("invalid-path", "Invalid path", r.body_text()))
    }
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

/// Parse a JSON body, telling malformed JSON (400) from JSON of the wrong shape (422), and
/// saying what is wrong in the client's terms (JSON's types and the fields' names, not this
/// service's Rust types).
///
/// Only a JSON object is an object: serde also reads a struct from an array of its fields in
/// order, so after parsing, the body is compared with what the parsed value serializes to, and
/// an array where that has an object is refused.
pub fn parse_json<T: DeserializeOwned + Serialize>(bytes: &[u8]) -> Result<T, Problem> {
    let malformed = |e: serde_json::Error| {
        Problem::bad_request(
            "malformed-json",
            "The body is not valid JSON",
            format!("the body is not valid JSON: {e}"),
        )
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            malformed(e.into_inner())
        } else {
            let (pointer, detail) = describe(pointer(e.path()), inner);
            Problem::invalid(vec![FieldError::new(pointer, detail)])
        }
    })?;
    de.end().map_err(malformed)?;
    let sent: serde_json::Value = serde_json::from_slice(bytes).map_err(malformed)?;
    let read = serde_json::to_value(&value).expect("a parsed body serializes");
    if let Some(at) = array_for_object(&sent, &read, String::new()) {
        return Err(Problem::invalid(vec![FieldError::new(
            at,
            "must be an object, got an array",
        )]));
    }
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

/// The pointer of the first place where `sent` has an array and `read` (the same document as
/// parsed and serialized again) an object.
fn array_for_object(
    sent: &serde_json::Value,
    read: &serde_json::Value,
    at: String,
) -> Option<String> {
    use serde_json::Value::{Array, Object};
    match (sent, read) {
        (Array(_), Object(_)) => Some(at),
        (Object(s), Object(r)) => r.iter().find_map(|(k, rv)| {
            let sv = s.get(k)?;
            let key = k.replace('~', "~0").replace('/', "~1");
            array_for_object(sv, rv, format!("{at}/{key}"))
        }),
        (Array(s), Array(r)) => s
            .iter()
            .zip(r)
            .enumerate()
            .find_map(|(i, (sv, rv))| array_for_object(sv, rv, format!("{at}/{i}"))),
        _ => None,
    }
}

/// A serde error as the client should read it: the field it concerns (a missing or unknown
/// field is named by its own pointer, not its parent's) and what is wrong, in JSON's terms.
fn describe(pointer: String, e: &serde_json::Error) -> (String, String) {
    describe_message(pointer, &e.to_string())
}

/// [`describe`] for the text of any serde error (JSON bodies, query strings).
pub fn describe_message(pointer: String, full: &str) -> (String, String) {
    // serde_json appends the position; the pointer says where.
    let msg = match full.rfind(" at line ") {
        Some(i) => &full[..i],
        None => full,
    };
    let quoted =
        |s: &str| -> Vec<String> { s.split('`').skip(1).step_by(2).map(str::to_owned).collect() };
    // A missing field's path ends at its object; an unknown or repeated one's at itself.
    let child = |name: &str| {
        let own = format!("/{}", name.replace('~', "~0").replace('/', "~1"));
        if pointer.ends_with(&own) {
            pointer.clone()
        } else {
            format!("{pointer}{own}")
        }
    };
    if let Some(rest) = msg.strip_prefix("missing field ") {
        let name = quoted(rest).into_iter().next().unwrap_or_default();
        return (child(&name), "is required".into());
    }
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let mut names = quoted(rest).into_iter();
        let name = names.next().unwrap_or_default();
        let known: Vec<String> = names.collect();
        let detail = if known.is_empty() {
            "is not a field of this object".to_owned()
        } else {
            format!(
                "is not a field of this object (fields: {})",
                known.join(", ")
            )
        };
        return (child(&name), detail);
    }
    if let Some(rest) = msg.strip_prefix("duplicate field ") {
        let name = quoted(rest).into_iter().next().unwrap_or_default();
        return (child(&name), "appears twice".into());
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        let mut names = quoted(rest).into_iter();
        let got = names.next().unwrap_or_default();
        let known: Vec<String> = names.collect();
        return (
            pointer,
            format!("must be one of {}, got {got:?}", known.join(", ")),
        );
    }
    for prefix in ["invalid type: ", "invalid value: ", "invalid length "] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            let (got, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
            return (
                pointer,
                format!("must be {}, got {}", expected_json(expected), got_json(got)),
            );
        }
    }
    if msg.contains("number out of range") {
        return (pointer, "is a number out of range".into());
    }
    // Our own types' messages (a SKU, a quantity...) are written for the client already.
    (pointer, msg.to_owned())
}

/// serde's description of what a visitor expected, in JSON's terms.
fn expected_json(expected: &str) -> String {
    let e = expected.trim();
    let integers = [
        "i8", "i16", "i32", "i64", "i128", "u8", "u16", "u32", "u64", "u128", "isize", "usize",
    ];
    if e.starts_with("struct ") || e == "a map" || e.starts_with("map") {
        "an object".into()
    } else if e == "a sequence" || e.starts_with("a sequence") || e.starts_with("tuple") {
        "an array".into()
    } else if integers.contains(&e) || e.contains("integer") {
        "an integer".into()
    } else if e == "f32" || e == "f64" {
        "a number".into()
    } else if e == "a boolean" {
        "true or false".into()
    } else if e.is_empty() {
        "something else".into()
    } else {
        e.to_owned()
    }
}

/// serde's description of the value it found, in JSON's terms.
fn got_json(got: &str) -> String {
    let g = got.trim();
    let after = |p: &str| g.strip_prefix(p).map(|v| v.trim_matches('`').to_owned());
    if let Some(v) = g.strip_prefix("string ") {
        format!("the string {v}")
    } else if let Some(v) = after("integer ").or_else(|| after("floating point ")) {
        format!("the number {v}")
    } else if let Some(v) = after("boolean ") {
        v
    } else if g == "sequence" {
        "an array".into()
    } else if g == "map" {
        "an object".into()
    } else if g == "unit value" || g == "null" {
        "null".into()
    } else {
        g.to_owned()
    }
}

/// The answer to `GET /problems/<slug>`: what the problem type means, from a service's
/// `catalogue` of `(slug, description)`.
pub fn describe_type(catalogue: &[(&str, &str)], slug: &str) -> Response {
    match catalogue.iter().find(|(s, _)| *s == slug) {
        Some((slug, text)) => axum::Json(
            serde_json::json!({ "type": format!("/problems/{slug}"), "description": text }),
        )
        .into_response(),
        None => Problem::not_found(format!("no problem type {slug:?}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        items: Vec<Item>,
    }

    #[derive(Debug, serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        quantity: i64,
    }

    fn error(body: &str) -> (String, String) {
        let p = parse_json::<Body>(body.as_bytes()).unwrap_err();
        assert_eq!(p.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        (
            p.errors[0].pointer.clone().unwrap_or_default(),
            p.errors[0].detail.clone(),
        )
    }

    #[test]
    fn only_an_object_is_an_object() {
        assert_eq!(
            error(r#"[[{"quantity": 1}]]"#),
            ("".into(), "must be an object, got an array".into())
        );
        assert_eq!(
            error(r#"{"items": [[1]]}"#),
            ("/items/0".into(), "must be an object, got an array".into())
        );
        assert_eq!(
            error(r#""items""#),
            (
                "".into(),
                "must be an object, got the string \"items\"".into()
            )
        );
    }

    #[test]
    fn errors_speak_json_not_rust() {
        assert_eq!(
            error(r#"{"items": [{"quantity": "2"}]}"#),
            (
                "/items/0/quantity".into(),
                "must be an integer, got the string \"2\"".into()
            )
        );
        assert_eq!(
            error(r#"{"items": [{"quantity": 1e30}]}"#),
            (
                "/items/0/quantity".into(),
                "must be an integer, got the number 1e+30".into()
            )
        );
        assert_eq!(
            error(r#"{"items": [{}]}"#),
            ("/items/0/quantity".into(), "is required".into())
        );
        assert_eq!(
            error(r#"{"items": [], "extra": 1}"#),
            (
                "/extra".into(),
                "is not a field of this object (fields: items)".into()
            )
        );
        assert_eq!(
            error(r#"{"items": {"quantity": 1}}"#),
            ("/items".into(), "must be an array, got an object".into())
        );
        let (_, detail) = error(r#"{"items": [{"quantity": 99999999999999999999}]}"#);
        assert!(
            !detail.contains("i64") && !detail.contains("struct"),
            "{detail}"
        );
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
        assert_eq!(p.errors[0].pointer.as_deref(), Some("/items/1/quantity"));
        assert!(parse_json::<Body>(br#"{"items": []}"#).is_ok());
    }
}
