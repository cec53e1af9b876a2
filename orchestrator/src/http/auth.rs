//! Who is asking, and may they: API tokens, operator logins with a session cookie, roles.
//!
//! Every route of the router is in one of three groups (see [`super::router`]): public (the
//! checkout, its masked status, health), `viewer` (reads that show personal data or the
//! system's insides) and `operator` (every write). [`require_viewer`] and [`require_operator`]
//! guard the last two: a request without valid credentials gets 401 (a dashboard page is sent
//! to the login form instead), one whose role is too low 403.
//!
//! Credentials are one of:
//! - `Authorization: Bearer <token>`, a token configured in `admin.tokens` by its SHA-256 (the
//!   configuration never holds a token);
//! - the `saga_session` cookie of a dashboard login (HttpOnly, SameSite=Strict, Secure behind
//!   TLS), whose SHA-256 names a row of `orchestrator.admin_sessions`. A write made with a
//!   session must carry the session's CSRF token, as the `X-CSRF-Token` header or the `csrf`
//!   field of a form: a page of another site cannot read it, so it cannot forge the write.
//!
//! With `admin.auth = "disabled"` everyone is an operator named `dev`: development only, and
//! every dashboard page says so.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::AppState;
use super::problem::Problem;
use crate::config::{Admin, AuthMode};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "saga_session";
/// The header a JSON write made with a session carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// What a caller may do. A viewer reads everything an operator does; an operator also acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// How the caller proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    Token,
    /// A dashboard login; its writes must carry this CSRF token.
    Session {
        csrf: String,
    },
    /// `admin.auth = "disabled"`.
    DevMode,
}

/// The authenticated caller, in the request's extensions for the handlers (the audit log's
/// "who").
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub via: Via,
}

impl Principal {
    /// The CSRF token the dashboard puts in its forms (empty where none is needed).
    pub fn csrf(&self) -> &str {
        match &self.via {
            Via::Session { csrf } => csrf,
            _ => "",
        }
    }
}

/// An API token of the configuration.
#[derive(Debug, Clone)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    pub sha256: [u8; 32],
}

/// Parse `admin.tokens`: comma-separated `name:role:sha256-hex`.
pub fn parse_tokens(raw: &str) -> Result<Vec<ApiToken>, String> {
    let mut tokens: Vec<ApiToken> = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parts: Vec<&str> = entry.split(':').collect();
        let [name, role, hash] = parts[..] else {
            return Err(format!(
                "{:?} is not name:role:sha256",
                entry.split(':').next().unwrap_or_default()
            ));
        };
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
        {
            return Err(format!(
                "token name {name:?} must be 1 to 64 letters, digits or . _ @ -"
            ));
        }
        let role = Role::parse(role).ok_or_else(|| {
            format!("token {name:?}: role must be viewer or operator, got {role:?}")
        })?;
        let sha256 = parse_hex32(hash).ok_or_else(|| {
            format!("token {name:?}: the hash must be 64 hex digits (the token's SHA-256)")
        })?;
        if tokens.iter().any(|t| t.name == name) {
            return Err(format!("token {name:?} is configured twice"));
        }
        tokens.push(ApiToken {
            name: name.to_owned(),
            role,
            sha256,
        });
    }
    Ok(tokens)
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A new random secret (a session token, a CSRF token, an API token): 32 bytes from the
/// operating system's generator, as hex.
pub fn random_secret() -> String {
    use argon2::password_hash::rand_core::RngCore;
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    hex(&bytes)
}

/// Equal in a time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The authentication of this process: its mode, its API tokens and the session store.
pub struct Auth {
    mode: AuthMode,
    tokens: Vec<ApiToken>,
    session_ttl: chrono::Duration,
    secure_cookie: bool,
    /// A hash to verify against when a login names nobody, so that a wrong name takes as long
    /// as a wrong password.
    decoy: String,
}

impl Auth {
    pub fn new(settings: &Admin) -> Result<Self, String> {
        Ok(Self {
            mode: settings.auth,
            tokens: parse_tokens(&settings.tokens)?,
            session_ttl: chrono::Duration::seconds(settings.session_ttl_seconds as i64),
            secure_cookie: settings.secure_cookie,
            decoy: hash_password("not anybody's password").map_err(|e| e.to_string())?,
        })
    }

    pub fn dev_mode(&self) -> bool {
        self.mode == AuthMode::Disabled
    }

    /// Who sent these headers: `Ok(None)` when they carry no credentials, `Err` when the
    /// credentials are wrong (an unknown token, an expired session).
    pub async fn authenticate(
        &self,
        pool: &PgPool,
        headers: &HeaderMap,
    ) -> Result<Option<Principal>, Problem> {
        if self.dev_mode() {
            return Ok(Some(Principal {
                name: "dev".to_owned(),
                role: Role::Operator,
                via: Via::DevMode,
            }));
        }
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
            let hash = sha256(token.as_bytes());
            // Every configured token is compared, whichever matches.
            let found = self
                .tokens
                .iter()
                .fold(None, |found, t| match same(&t.sha256, &hash) {
                    true => Some(t),
                    false => found,
                });
            return match found {
                Some(t) => Ok(Some(Principal {
                    name: t.name.clone(),
                    role: t.role,
                    via: Via::Token,
                })),
                None => Err(unauthorized("the token is not valid")),
            };
        }
        let Some(cookie) = session_cookie(headers) else {
            return Ok(None);
        };
        let hash = sha256(cookie.as_bytes());
        let row = sqlx::query!(
            r#"SELECT s.operator, o.role, s.csrf
                 FROM orchestrator.admin_sessions s
                 JOIN orchestrator.operators o ON o.name = s.operator
                WHERE s.token_hash = $1 AND s.expires_at > now() AND NOT o.disabled"#,
            &hash[..],
        )
        .fetch_optional(pool)
        .await
        .map_err(database)?;
        match row {
            Some(r) => Ok(Some(Principal {
                name: r.operator,
                role: Role::parse(&r.role).unwrap_or(Role::Viewer),
                via: Via::Session { csrf: r.csrf },
            })),
            None => Err(unauthorized(
                "the session has expired or was ended; log in again",
            )),
        }
    }

    /// Check a login; on success open a session and return the cookie to set.
    pub async fn login(
        &self,
        pool: &PgPool,
        name: &str,
        password: &str,
    ) -> Result<Option<HeaderValue>, Problem> {
        let row = sqlx::query!(
            "SELECT password_hash, disabled FROM orchestrator.operators WHERE name = $1",
            name,
        )
        .fetch_optional(pool)
        .await
        .map_err(database)?;
        let (hash, usable) = match &row {
            Some(r) => (r.password_hash.as_str(), !r.disabled),
            None => (self.decoy.as_str(), false),
        };
        // Argon2 is slow on purpose: off the async threads.
        let (hash, password) = (hash.to_owned(), password.to_owned());
        let matches = tokio::task::spawn_blocking(move || verify_password(&hash, &password))
            .await
            .unwrap_or(false);
        if !(matches && usable) {
            return Ok(None);
        }
        let token = random_secret();
        let expires = chrono::Utc::now() + self.session_ttl;
        let mut tx = pool.begin().await.map_err(database)?;
        sqlx::query!("DELETE FROM orchestrator.admin_sessions WHERE expires_at <= now()")
            .execute(&mut *tx)
            .await
            .map_err(database)?;
        sqlx::query!(
            "INSERT INTO orchestrator.admin_sessions (token_hash, operator, csrf, expires_at)
             VALUES ($1, $2, $3, $4)",
            &sha256(token.as_bytes())[..],
            name,
            random_secret(),
            expires,
        )
        .execute(&mut *tx)
        .await
        .map_err(database)?;
        tx.commit().await.map_err(database)?;
        let cookie = format!(
            "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.session_ttl.num_seconds(),
            if self.secure_cookie { "; Secure" } else { "" }
        );
        Ok(Some(
            HeaderValue::from_str(&cookie).expect("a cookie of hex and ASCII"),
        ))
    }

    /// End the session these headers carry (if any); the cookie that clears it.
    pub async fn logout(&self, pool: &PgPool, headers: &HeaderMap) -> Result<HeaderValue, Problem> {
        if let Some(cookie) = session_cookie(headers) {
            sqlx::query!(
                "DELETE FROM orchestrator.admin_sessions WHERE token_hash = $1",
                &sha256(cookie.as_bytes())[..],
            )
            .execute(pool)
            .await
            .map_err(database)?;
        }
        Ok(HeaderValue::from_static(
            "saga_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ))
    }
}

/// An Argon2id hash of `password` in the PHC string format (the salt and parameters inside).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|v| !v.is_empty())
}

fn database(e: sqlx::Error) -> Problem {
    tracing::error!(error = %e, "database error");
    Problem::unavailable("the database did not answer; try again")
}

pub fn unauthorized(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Authentication required",
        detail,
    )
}

pub fn forbidden(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", "Not allowed", detail)
}

/// Guard of the viewer routes.
pub async fn require_viewer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    require(state, Role::Viewer, req, next).await
}

/// Guard of the operator routes.
pub async fn require_operator(State(state): State<AppState>, req: Request, next: Next) -> Response {
    require(state, Role::Operator, req, next).await
}

async fn require(state: AppState, role: Role, req: Request, next: Next) -> Response {
    let is_page = req.uri().path().starts_with("/dashboard");
    let principal = match state.auth.authenticate(&state.pool, req.headers()).await {
        Ok(Some(p)) => p,
        Ok(None) if is_page && req.method() == Method::GET => {
            return to_login(&req);
        }
        Ok(None) => {
            return with_challenge(unauthorized(
                "log in, or send `Authorization: Bearer <token>`",
            ));
        }
        Err(problem) if is_page && req.method() == Method::GET => {
            let _ = problem;
            return to_login(&req);
        }
        Err(problem) => return with_challenge(problem),
    };
    if principal.role < role {
        return forbidden(format!(
            "{} is a {}; this needs an {}",
            principal.name,
            principal.role.as_str(),
            role.as_str()
        ))
        .into_response();
    }
    let mut req = req;
    if let Via::Session { csrf } = &principal.via
        && !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
    {
        let (checked, rebuilt) =
            match check_csrf(req, csrf, state.settings.http.max_body_bytes).await {
                Ok(r) => r,
                Err(problem) => return problem.into_response(),
            };
        if !checked {
            return forbidden(
                "this write carries no valid CSRF token (the X-CSRF-Token header or the csrf field of the form)",
            )
            .into_response();
        }
        req = rebuilt;
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Whether the request carries `csrf` (header, or the `csrf` field of a form body), and the
/// request again (its body read and put back).
async fn check_csrf(req: Request, csrf: &str, limit: usize) -> Result<(bool, Request), Problem> {
    if let Some(v) = req.headers().get(CSRF_HEADER) {
        let ok = same(v.as_bytes(), csrf.as_bytes());
        return Ok((ok, req));
    }
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Ok((false, req));
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
            format!("the body is larger than {limit} bytes"),
        )
    })?;
    let ok =
        form_urlencoded_field(&bytes, "csrf").is_some_and(|v| same(v.as_bytes(), csrf.as_bytes()));
    Ok((ok, Request::from_parts(parts, Body::from(bytes))))
}

fn form_urlencoded_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn to_login(req: &Request) -> Response {
    let next = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/dashboard");
    let target = format!(
        "/dashboard/login?next={}",
        serde_urlencoded::to_string([("", next)])
            .unwrap_or_default()
            .trim_start_matches('=')
    );
    Redirect::to(&target).into_response()
}

fn with_challenge(problem: Problem) -> Response {
    let mut response = problem.into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"saga-admin\""),
    );
    response
}

/// What an [`Arc<Auth>`] is for the handlers.
pub type Shared = Arc<Auth>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_refuse() {
        let h = hex(&sha256(b"secret"));
        let t = parse_tokens(&format!("ops:operator:{h}, ro:viewer:{h}")).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].role, Role::Operator);
        assert_eq!(t[1].name, "ro");
        assert!(parse_tokens("").unwrap().is_empty());
        for bad in [
            "ops:operator".to_owned(),
            format!("ops:admin:{h}"),
            "ops:viewer:abc".to_owned(),
            format!("o ps:viewer:{h}"),
            format!("ops:viewer:{h},ops:operator:{h}"),
        ] {
            assert!(parse_tokens(&bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horse "));
        assert!(!verify_password("not a hash", "correct horse"));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; saga_session=abc; b=2"),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some("abc"));
        h.insert(header::COOKIE, HeaderValue::from_static("saga_session="));
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn form_fields_are_read() {
        assert_eq!(
            form_urlencoded_field(b"reason=x+y&csrf=abc%21", "csrf").as_deref(),
            Some("abc!")
        );
        assert_eq!(form_urlencoded_field(b"reason=x", "csrf"), None);
    }
}
