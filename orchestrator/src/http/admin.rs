//! The admin API (JSON, under `/admin`): the dashboard's operations for scripts and the CLI.
//! Reads need a viewer, actions an operator ([`super::auth`]); every action is written to the
//! audit log.

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sagas::wire::SagaId;
use serde::{Deserialize, Serialize};

use super::auth::Principal;
use super::problem::{FieldError, JsonBody, PathPair, PathParam, Problem, parse_query};
use super::sagas::{Summary, parse_id};
use super::{AppState, CorrelationId, input};
use crate::admin::{self, Action, FilterQuery};
use crate::{audit, engine};

/// `GET /admin/sagas`: filtered, searched, newest first, in keyset pages.
pub async fn list(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let q: FilterQuery = parse_query(query.as_deref())?;
    let filter = q.parse(&state.registry)?;
    let rows = admin::list(&state.pool, &state.registry, &filter).await?;
    let next = (rows.len() as i64 == filter.limit).then(|| {
        filter.next_link(
            "/admin/sagas",
            SagaId::from_uuid(rows.last().expect("a full page").id),
        )
    });
    Ok(axum::Json(serde_json::json!({ "sagas": rows, "next": next })).into_response())
}

/// An action's availability, as the detail shows it.
#[derive(Debug, Serialize)]
pub struct ActionView {
    pub action: &'static str,
    pub allowed: bool,
    /// Why not, when it is not allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

/// Which operator actions the saga's state allows now, as its machine says.
pub fn actions_of(state: &AppState, record: &engine::SagaRecord) -> Vec<ActionView> {
    let machine = state
        .registry
        .get(&record.saga_type)
        .and_then(|t| t.restore(&record.snapshot).ok());
    let now = chrono::Utc::now();
    let answers = machine.map(|m| m.operator_actions(now)).unwrap_or_default();
    Action::ALL
        .into_iter()
        .map(|action| {
            let verdict = match action {
                Action::RetryNow => find(&answers, sagas::api::OperatorAction::RetryNow),
                Action::Recover => find(&answers, sagas::api::OperatorAction::Recover),
                Action::Resolve => find(&answers, sagas::api::OperatorAction::Resolve),
                // A cancel is the machine's to refuse; it is offered while the saga runs.
                Action::Cancel => match sagas::api::Status::parse(&record.status) {
                    Some(s) if s.is_terminal() => Err("the saga has ended".to_owned()),
                    Some(sagas::api::Status::Compensating) => {
                        Err("the saga is already compensating".to_owned())
                    }
                    _ => Ok(()),
                },
            };
            ActionView {
                action: action.as_str(),
                allowed: verdict.is_ok(),
                why_not: verdict.err(),
            }
        })
        .collect()
}

fn find(
    answers: &[(sagas::api::OperatorAction, Result<(), String>)],
    action: sagas::api::OperatorAction,
) -> Result<(), String> {
    answers
        .iter()
        .find(|(a, _)| *a == action)
        .map(|(_, r)| r.clone())
        .unwrap_or_else(|| Err("this saga type does not support it".to_owned()))
}

/// `GET /admin/sagas/{id}`: the whole saga, personal data included (the reader logged in).
pub async fn get(
    State(state): State<AppState>,
    PathParam(raw): PathParam,
) -> Result<Response, Problem> {
    let id = parse_id(&raw)?;
    let Some((record, events)) = engine::load_record(&state.pool, id).await? else {
        return Err(Problem::not_found(format!("no saga {id}")));
    };
    let timers = admin::timers(&state.pool, id).await?;
    let audit = audit::list(&state.pool, Some(&id.to_string()), None, 100).await?;
    let actions = actions_of(&state, &record);
    let mut snapshot = record.snapshot.clone();
    // Never stored with a saga, and dropped here all the same should old data hold one.
    crate::privacy::drop_secrets(&mut snapshot);
    let field = |name: &str| {
        snapshot
            .get(name)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    };
    let body = serde_json::json!({
        "saga": Summary::from(&record),
        "subject": super::sagas::order_id_of(&state.pool, id).await?,
        "data": field("data"),
        "steps": field("steps"),
        "failure": field("failure"),
        "resolution": field("resolution"),
        "signals": field("signals"),
        "events": events,
        "timers": timers,
        "actions": actions,
        "audit": audit,
    });
    Ok(axum::Json(body).into_response())
}

#[derive(Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// Why: required, it goes to the audit log and the saga's timeline.
    pub reason: String,
}

/// Check an operator's reason: required, one line of at most 500 characters.
pub fn reason(raw: &str, pointer: &str) -> Result<String, Problem> {
    let mut errors: Vec<FieldError> = Vec::new();
    let reason = input::text(&mut errors, pointer, raw, 500);
    if errors.is_empty() {
        Ok(reason)
    } else {
        Err(Problem::invalid(errors))
    }
}

pub fn parse_action(raw: &str) -> Result<Action, Problem> {
    Action::parse(raw).ok_or_else(|| {
        let all: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
        Problem::not_found(format!(
            "no action {raw:?}; the actions are {}",
            all.join(", ")
        ))
    })
}

/// `POST /admin/sagas/{id}/actions/{action}` with `{"reason": "..."}`.
pub async fn act(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(CorrelationId(correlation_id)): Extension<CorrelationId>,
    PathPair(raw, action): PathPair,
    JsonBody(req): JsonBody<ActionRequest>,
) -> Result<Response, Problem> {
    let id = parse_id(&raw)?;
    let action = parse_action(&action)?;
    let reason = reason(&req.reason, "/reason")?;
    let acted = admin::act(
        &state.engine,
        &state.pool,
        &who,
        id,
        action,
        &reason,
        Some(&correlation_id),
    )
    .await?;
    Ok((StatusCode::OK, axum::Json(acted)).into_response())
}

/// The most sagas one bulk action touches.
pub const BULK_CAP: i64 = 10_000;

#[derive(Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    pub action: String,
    #[serde(default)]
    pub reason: String,
    /// The list's filters (`type`, `status`, `state`, `from`, `to`, `q`).
    #[serde(default)]
    pub filter: FilterQuery,
    /// Count what the filter matches, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a bulk action did (or, dry, would touch).
#[derive(Debug, Default, Serialize, schemars::JsonSchema)]
pub struct BulkOutcome {
    pub matched: i64,
    #[schemars(with = "Vec<uuid::Uuid>")]
    pub applied: Vec<SagaId>,
    /// Each refused saga with the reason.
    #[schemars(with = "Vec<(uuid::Uuid, String)>")]
    pub refused: Vec<(SagaId, String)>,
    pub dry_run: bool,
}

/// Apply an action to every saga a filter matches (at most [`BULK_CAP`]); a dry run counts.
pub async fn bulk_apply(
    state: &AppState,
    who: &Principal,
    action: Action,
    reason: &str,
    filter: &admin::Filter,
    dry_run: bool,
    correlation_id: &str,
) -> Result<BulkOutcome, Problem> {
    if filter.saga_type.is_none()
        && filter.status.is_none()
        && filter.state.is_none()
        && filter.q.is_none()
        && filter.from.is_none()
        && filter.to.is_none()
    {
        return Err(Problem::invalid(vec![FieldError::new(
            "/filter",
            "a bulk action needs at least one filter: it never applies to every saga",
        )]));
    }
    let matched = admin::count(&state.pool, &state.registry, filter, BULK_CAP).await?;
    let mut outcome = BulkOutcome {
        matched,
        dry_run,
        ..Default::default()
    };
    if dry_run {
        return Ok(outcome);
    }
    for id in admin::ids(&state.pool, &state.registry, filter, BULK_CAP).await? {
        match admin::act(
            &state.engine,
            &state.pool,
            who,
            id,
            action,
            reason,
            Some(correlation_id),
        )
        .await
        {
            Ok(_) => outcome.applied.push(id),
            Err(p) if p.status == StatusCode::CONFLICT => outcome.refused.push((id, p.detail)),
            Err(p) if p.status == StatusCode::NOT_FOUND => {}
            Err(p) => return Err(p),
        }
    }
    Ok(outcome)
}

/// `POST /admin/sagas/bulk`.
pub async fn bulk(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(CorrelationId(correlation_id)): Extension<CorrelationId>,
    JsonBody(req): JsonBody<BulkRequest>,
) -> Result<Response, Problem> {
    let action = Action::parse(&req.action).ok_or_else(|| {
        let all: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
        Problem::invalid(vec![FieldError::new(
            "/action",
            format!("must be one of {}, got {:?}", all.join(", "), req.action),
        )])
    })?;
    let filter = req.filter.parse(&state.registry)?;
    let reason = if req.dry_run {
        req.reason.clone()
    } else {
        reason(&req.reason, "/reason")?
    };
    let outcome = bulk_apply(
        &state,
        &who,
        action,
        &reason,
        &filter,
        req.dry_run,
        &correlation_id,
    )
    .await?;
    Ok(axum::Json(outcome).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub target: Option<String>,
    pub before: Option<String>,
    pub limit: Option<String>,
}

impl AuditQuery {
    /// The checked parameters: the target, the row the page starts after, the page's length
    /// (100 by default).
    pub fn parse(&self) -> Result<(Option<&str>, Option<i64>, i64), Problem> {
        let before = match self.before.as_deref() {
            None => None,
            Some(raw) => Some(raw.parse::<i64>().map_err(|_| {
                Problem::bad_query("before", format!("must be an audit row id, got {raw:?}"))
            })?),
        };
        let limit = input::limit(self.limit.as_deref(), 100, admin::MAX_LIMIT)?;
        Ok((self.target.as_deref(), before, limit))
    }
}

/// `GET /admin/audit`: the audit log, newest first.
pub async fn audit_log(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let q: AuditQuery = parse_query(query.as_deref())?;
    let (target, before, limit) = q.parse()?;
    let rows = audit::list(&state.pool, target, before, limit).await?;
    let next = (rows.len() as i64 == limit).then(|| {
        let last = rows.last().expect("a full page").id;
        format!("/admin/audit?limit={limit}&before={last}")
    });
    Ok(axum::Json(serde_json::json!({ "entries": rows, "next": next })).into_response())
}

impl From<crate::dead_letters::Error> for Problem {
    fn from(e: crate::dead_letters::Error) -> Self {
        match e {
            crate::dead_letters::Error::NotFound(_) => Problem::not_found(e.to_string()),
            crate::dead_letters::Error::Nats(_) => {
                tracing::warn!(error = %e, "dead letters");
                Problem::unavailable(e.to_string())
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LettersQuery {
    pub origin: Option<String>,
    pub before: Option<String>,
    pub limit: Option<String>,
}

/// The checked parameters of a dead-letter list.
pub struct LettersFilter {
    pub origin: Option<String>,
    pub before: Option<u64>,
    pub limit: usize,
}

impl LettersQuery {
    pub fn parse(&self) -> Result<LettersFilter, Problem> {
        let origin = self
            .origin
            .as_deref()
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(str::to_owned);
        if let Some(o) = &origin
            && (o.len() > 64
                || !o
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)))
        {
            return Err(Problem::bad_query(
                "origin",
                format!("must be a consumer's name, got {o:?}"),
            ));
        }
        let before = match self.before.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(raw) => Some(raw.parse::<u64>().map_err(|_| {
                Problem::bad_query(
                    "before",
                    format!("must be a dead letter's sequence, got {raw:?}"),
                )
            })?),
        };
        let limit =
            input::limit(self.limit.as_deref().filter(|s| !s.is_empty()), 50, 200)? as usize;
        Ok(LettersFilter {
            origin,
            before,
            limit,
        })
    }
}

/// `GET /admin/partitions`: the live orchestrators, the partitions each holds, and every
/// partition's lease (`crate::partitions`).
pub async fn partitions(State(state): State<AppState>) -> Result<Response, Problem> {
    let view = crate::partitions::view(&state.pool).await?;
    Ok(axum::Json(view).into_response())
}

/// `GET /admin/dead-letters`: newest first, with the count per origin.
pub async fn dead_letters(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let q: LettersQuery = parse_query(query.as_deref())?;
    let f = q.parse()?;
    let letters = state
        .dead_letters
        .list(f.origin.as_deref(), f.before, f.limit)
        .await?;
    let counts = state.dead_letters.counts().await?;
    let next = (letters.len() == f.limit).then(|| {
        let last = letters.last().expect("a full page").seq;
        match &f.origin {
            Some(o) => format!(
                "/admin/dead-letters?origin={o}&limit={}&before={last}",
                f.limit
            ),
            None => format!("/admin/dead-letters?limit={}&before={last}", f.limit),
        }
    });
    Ok(
        axum::Json(serde_json::json!({ "letters": letters, "counts": counts, "next": next }))
            .into_response(),
    )
}

/// What may be done to a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LetterAction {
    Replay,
    Discard,
}

impl LetterAction {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "replay" => Some(Self::Replay),
            "discard" => Some(Self::Discard),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::Discard => "discard",
        }
    }
}

/// Replay or discard one letter, and audit it.
pub async fn letter_act(
    state: &AppState,
    who: &Principal,
    seq: u64,
    action: LetterAction,
    reason: &str,
) -> Result<crate::dead_letters::Letter, Problem> {
    let result = match action {
        LetterAction::Replay => state.dead_letters.replay(seq).await,
        LetterAction::Discard => state.dead_letters.discard(seq).await,
    };
    let audit_action = format!("dead_letter.{}", action.as_str());
    let outcome = match &result {
        Ok(_) => audit::Outcome::Done,
        Err(e) => audit::Outcome::RefusedOwned(e.to_string()),
    };
    audit::record(
        &state.pool,
        who,
        &audit_action,
        &seq.to_string(),
        reason,
        outcome,
        None,
    )
    .await;
    Ok(result?)
}

/// `POST /admin/dead-letters/{seq}/{action}` with `{"reason": "..."}`.
pub async fn dead_letter_act(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    PathPair(seq, action): PathPair,
    JsonBody(req): JsonBody<ActionRequest>,
) -> Result<Response, Problem> {
    let seq: u64 = seq
        .parse()
        .map_err(|_| Problem::not_found(format!("no dead letter {seq:?}")))?;
    let action = LetterAction::parse(&action).ok_or_else(|| {
        Problem::not_found(format!(
            "no action {action:?}; the actions are replay, discard"
        ))
    })?;
    let reason = reason(&req.reason, "/reason")?;
    let letter = letter_act(&state, &who, seq, action, &reason).await?;
    Ok(
        axum::Json(serde_json::json!({ "action": action.as_str(), "letter": letter }))
            .into_response(),
    )
}

#[derive(Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LettersBulkRequest {
    pub action: String,
    #[serde(default)]
    pub reason: String,
    /// These letters...
    #[serde(default)]
    pub seqs: Vec<u64>,
    /// ... or every letter of this origin (at most 1,000 at once).
    #[serde(default)]
    pub origin: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /admin/dead-letters/bulk`.
pub async fn dead_letters_bulk(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    JsonBody(req): JsonBody<LettersBulkRequest>,
) -> Result<Response, Problem> {
    let action = LetterAction::parse(&req.action).ok_or_else(|| {
        Problem::invalid(vec![FieldError::new(
            "/action",
            format!("must be replay or discard, got {:?}", req.action),
        )])
    })?;
    let seqs = letters_to_touch(&state, &req.seqs, req.origin.as_deref()).await?;
    if req.dry_run {
        return Ok(
            axum::Json(serde_json::json!({ "matched": seqs.len(), "dry_run": true }))
                .into_response(),
        );
    }
    let reason = reason(&req.reason, "/reason")?;
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for seq in seqs {
        match letter_act(&state, &who, seq, action, &reason).await {
            Ok(_) => done.push(seq),
            Err(p) => failed.push((seq, p.detail)),
        }
    }
    Ok(axum::Json(serde_json::json!({ "matched": done.len() + failed.len(), "done": done, "failed": failed, "dry_run": false })).into_response())
}

/// The letters a bulk action names: its list, or an origin's (at most 1,000), never all.
pub async fn letters_to_touch(
    state: &AppState,
    seqs: &[u64],
    origin: Option<&str>,
) -> Result<Vec<u64>, Problem> {
    match (
        seqs.is_empty(),
        origin.map(str::trim).filter(|o| !o.is_empty()),
    ) {
        (false, None) => {
            if seqs.len() > 1000 {
                return Err(Problem::invalid(vec![FieldError::new(
                    "/seqs",
                    "at most 1000 at once",
                )]));
            }
            Ok(seqs.to_vec())
        }
        (true, Some(origin)) => Ok(state
            .dead_letters
            .list(Some(origin), None, 1000)
            .await?
            .into_iter()
            .map(|l| l.seq)
            .collect()),
        _ => Err(Problem::invalid(vec![FieldError::new(
            "",
            "name the letters: either `seqs` or an `origin`, not both, not neither",
        )])),
    }
}
