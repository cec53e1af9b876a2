//! What the dashboard and the admin API share: finding sagas (filters, search, keyset pages),
//! reading one whole, and acting on it as an operator. The JSON handlers
//! ([`crate::http::admin`]) and the pages ([`crate::http::dashboard`]) are two faces of these.

use chrono::{DateTime, Utc};
use sagas::api::{Input, OperatorAction, OperatorInput, Status};
use sagas::wire::SagaId;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, QueryBuilder};
use uuid::Uuid;

use crate::audit;
use crate::engine::{Applied, Engine, Origin};
use crate::http::auth::Principal;
use crate::http::problem::Problem;

/// The longest page.
pub const MAX_LIMIT: i64 = 500;

/// The list's filters as a query string carries them (`?type=checkout&status=failed&q=...`).
#[derive(Debug, Default, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterQuery {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub saga_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Created at or after (RFC 3339, or `YYYY-MM-DDTHH:MM` as a browser's form sends it, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Created before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A saga id, an order id, a correlation id, a customer id or an email.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// The id of the last saga of the page before (the `next` link carries it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// The filters, checked.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub saga_type: Option<String>,
    pub status: Option<Status>,
    pub state: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub q: Option<String>,
    pub limit: i64,
    pub after: Option<SagaId>,
}

impl FilterQuery {
    /// Check every parameter; an empty one is no filter (a form sends its empty fields).
    pub fn parse(&self, registry: &sagas::api::Registry) -> Result<Filter, Problem> {
        let given = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let saga_type = given(&self.saga_type);
        if let Some(t) = &saga_type
            && registry.get(t).is_none()
        {
            let known: Vec<&str> = registry.types().map(|t| t.name()).collect();
            return Err(Problem::bad_query(
                "type",
                format!("must be one of {}, got {t:?}", known.join(", ")),
            ));
        }
        let status = given(&self.status)
            .map(|s| crate::http::input::status(&s))
            .transpose()?;
        let state = given(&self.state);
        if let Some(s) = &state
            && (s.len() > 64 || !s.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        {
            return Err(Problem::bad_query(
                "state",
                format!("must be a state name (lower-case letters and _), got {s:?}"),
            ));
        }
        let time = |name: &str, v: &Option<String>| -> Result<Option<DateTime<Utc>>, Problem> {
            match given(v) {
                None => Ok(None),
                Some(raw) => parse_time(&raw).map(Some).ok_or_else(|| {
                    Problem::bad_query(
                        name,
                        format!(
                            "must be a time (RFC 3339, or YYYY-MM-DDTHH:MM in UTC), got {raw:?}"
                        ),
                    )
                }),
            }
        };
        let from = time("from", &self.from)?;
        let to = time("to", &self.to)?;
        let q = given(&self.q);
        if let Some(q) = &q
            && (q.chars().count() > 200 || q.chars().any(char::is_control))
        {
            return Err(Problem::bad_query(
                "q",
                "must be at most 200 characters, none of them control characters",
            ));
        }
        let limit = crate::http::input::limit(given(&self.limit).as_deref(), 50, MAX_LIMIT)?;
        let after = match given(&self.after) {
            None => None,
            Some(raw) => Some(raw.parse::<SagaId>().map_err(|_| {
                Problem::bad_query("after", format!("must be a saga id, got {raw:?}"))
            })?),
        };
        Ok(Filter {
            saga_type,
            status,
            state,
            from,
            to,
            q,
            limit,
            after,
        })
    }
}

fn parse_time(raw: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(raw, format) {
            return Some(t.and_utc());
        }
    }
    chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The smallest UUID v7 of a millisecond: ids are UUID v7, so "created from `t`" is "id at
/// least this", which the primary key answers.
pub fn uuid_floor(t: DateTime<Utc>) -> Uuid {
    let ms = t.timestamp_millis().max(0) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    bytes[6] = 0x70;
    bytes[8] = 0x80;
    Uuid::from_bytes(bytes)
}

impl Filter {
    /// The query string of this filter, without the cursor (for links and forms).
    pub fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(t) = &self.saga_type {
            q.push(("type", t.clone()));
        }
        if let Some(s) = self.status {
            q.push(("status", s.as_str().to_owned()));
        }
        if let Some(s) = &self.state {
            q.push(("state", s.clone()));
        }
        if let Some(t) = self.from {
            q.push(("from", t.to_rfc3339()));
        }
        if let Some(t) = self.to {
            q.push(("to", t.to_rfc3339()));
        }
        if let Some(s) = &self.q {
            q.push(("q", s.clone()));
        }
        q
    }

    /// The link to the page after `last`, for `base` (`/admin/sagas` or `/dashboard/sagas`).
    pub fn next_link(&self, base: &str, last: SagaId) -> String {
        let mut q = self.query();
        q.push(("limit", self.limit.to_string()));
        q.push(("after", last.to_string()));
        format!(
            "{base}?{}",
            serde_urlencoded::to_string(&q).expect("strings encode")
        )
    }

    /// Append the WHERE clause of this filter (without the cursor) to `sql`.
    fn push_where(&self, sql: &mut QueryBuilder<sqlx::Postgres>, registry: &sagas::api::Registry) {
        sql.push(" WHERE true");
        if let Some(t) = &self.saga_type {
            sql.push(" AND s.saga_type = ").push_bind(t.clone());
        }
        if let Some(status) = self.status {
            sql.push(" AND s.status = ").push_bind(status.as_str());
            if !matches!(status, Status::Completed | Status::Compensated) {
                // Repeats the predicate of `sagas_in_flight`, so that its plan can use it.
                sql.push(" AND s.status NOT IN ('completed', 'compensated')");
            }
        }
        if let Some(state) = &self.state {
            sql.push(" AND s.state = ").push_bind(state.clone());
            if !matches!(state.as_str(), "completed" | "compensated") {
                // A saga in any other state has not ended that way: the predicate of
                // `sagas_in_flight_state`, so that its plan can use it (a state few sagas are
                // in would otherwise walk the whole table).
                sql.push(" AND s.status NOT IN ('completed', 'compensated')");
            }
        }
        if let Some(from) = self.from {
            sql.push(" AND s.id >= ").push_bind(uuid_floor(from));
        }
        if let Some(to) = self.to {
            sql.push(" AND s.id < ").push_bind(uuid_floor(to));
        }
        if let Some(q) = &self.q {
            let types: Vec<String> = registry.types().map(|t| t.name().to_owned()).collect();
            // Each alternative is answered by an index: the primary key, `sagas_correlation`,
            // `sagas_type_subject` (an order id is the subject of its sagas), and the orders'
            // `orders_customer` and `orders_customer_email` for a customer's sagas.
            sql.push(" AND (s.correlation_id = ").push_bind(q.clone());
            if let Ok(id) = q.parse::<Uuid>() {
                sql.push(" OR s.id = ").push_bind(id);
            }
            sql.push(" OR (s.saga_type = ANY(")
                .push_bind(types.clone())
                .push(") AND s.subject = ")
                .push_bind(q.clone())
                .push(")");
            sql.push(" OR (s.saga_type = ANY(")
                .push_bind(types)
                // `= ANY(ARRAY(...))`, not `IN (...)`: inside an OR, a subquery cannot become an
                // index condition, and the plan walked the whole table (deploy/bench-admin).
                .push(") AND s.subject = ANY(ARRAY(SELECT o.id::text FROM orders.orders o WHERE o.customer_id = ")
                .push_bind(q.clone())
                .push(" OR lower(o.customer_email) = lower(")
                .push_bind(q.clone())
                .push("))))");
            sql.push(")");
        }
    }
}

/// A saga as a list shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Row {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub saga_type: String,
    pub status: String,
    pub state: String,
    pub version: i64,
    pub correlation_id: String,
    /// The business entity (a checkout's order id).
    pub subject: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One page of sagas, newest first.
pub async fn list(
    pool: &PgPool,
    registry: &sagas::api::Registry,
    filter: &Filter,
) -> Result<Vec<Row>, sqlx::Error> {
    let mut sql = QueryBuilder::new(
        "SELECT s.id, s.saga_type, s.status, s.state, s.version, s.correlation_id, s.subject,
                s.created_at, s.updated_at
           FROM orchestrator.sagas s",
    );
    filter.push_where(&mut sql, registry);
    if let Some(after) = filter.after {
        sql.push(" AND s.id < ").push_bind(after.as_uuid());
    }
    sql.push(" ORDER BY s.id DESC LIMIT ")
        .push_bind(filter.limit);
    sql.build_query_as::<Row>().fetch_all(pool).await
}

/// How many sagas the filter matches, counting at most `cap` (a bulk action's dry run).
pub async fn count(
    pool: &PgPool,
    registry: &sagas::api::Registry,
    filter: &Filter,
    cap: i64,
) -> Result<i64, sqlx::Error> {
    let mut sql = QueryBuilder::new("SELECT count(*) FROM (SELECT 1 FROM orchestrator.sagas s");
    filter.push_where(&mut sql, registry);
    sql.push(" LIMIT ").push_bind(cap).push(") matched");
    sql.build_query_scalar::<i64>().fetch_one(pool).await
}

/// The ids a bulk action applies to: the first `cap` the filter matches, newest first.
pub async fn ids(
    pool: &PgPool,
    registry: &sagas::api::Registry,
    filter: &Filter,
    cap: i64,
) -> Result<Vec<SagaId>, sqlx::Error> {
    let mut sql = QueryBuilder::new("SELECT s.id FROM orchestrator.sagas s");
    filter.push_where(&mut sql, registry);
    sql.push(" ORDER BY s.id DESC LIMIT ").push_bind(cap);
    let ids: Vec<Uuid> = sql.build_query_scalar().fetch_all(pool).await?;
    Ok(ids.into_iter().map(SagaId::from_uuid).collect())
}

/// A timer a saga has armed.
#[derive(Debug, Clone, Serialize)]
pub struct Timer {
    pub name: String,
    pub fire_at: DateTime<Utc>,
}

pub async fn timers(pool: &PgPool, id: SagaId) -> Result<Vec<Timer>, sqlx::Error> {
    sqlx::query_as!(
        Timer,
        "SELECT key AS name, fire_at FROM orchestrator.timers WHERE saga_id = $1 ORDER BY fire_at",
        id.as_uuid(),
    )
    .fetch_all(pool)
    .await
}

/// What an operator may do to a saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A step waiting on its backoff or its breaker: attempt it now.
    RetryNow,
    /// A failed saga: retry the compensation that failed, or the step that failed past the
    /// pivot.
    Recover,
    /// A failed saga the operator fixed outside: it ends `resolved`, with their note.
    Resolve,
    /// Stop the saga and undo what it did (refused past the pivot).
    Cancel,
}

impl Action {
    pub const ALL: [Action; 4] = [
        Action::RetryNow,
        Action::Recover,
        Action::Resolve,
        Action::Cancel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::RetryNow => "retry_now",
            Action::Recover => "recover",
            Action::Resolve => "resolve",
            Action::Cancel => "cancel",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            Action::RetryNow => "Retry now",
            Action::Recover => "Recover (retry the failed step or compensation)",
            Action::Resolve => "Mark resolved",
            Action::Cancel => "Cancel and compensate",
        }
    }

    fn input(self, by: &str, reason: &str) -> Input {
        let operator = |action| {
            Input::Operator(OperatorInput {
                by: by.to_owned(),
                reason: reason.to_owned(),
                action,
            })
        };
        match self {
            Action::RetryNow => operator(OperatorAction::RetryNow),
            Action::Recover => operator(OperatorAction::Recover),
            Action::Resolve => operator(OperatorAction::Resolve),
            Action::Cancel => Input::Cancel {
                reason: format!("{reason} (by {by})"),
            },
        }
    }
}

/// What came of an action.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Acted {
    #[schemars(with = "uuid::Uuid")]
    pub saga_id: SagaId,
    pub action: &'static str,
    pub status: String,
    pub state: String,
}

/// Apply `action` to saga `id` for `who`, and write it to the audit log (refused or not).
/// A refusal is a 409 problem whose detail is the machine's reason.
pub async fn act(
    engine: &Engine,
    pool: &PgPool,
    who: &Principal,
    id: SagaId,
    action: Action,
    reason: &str,
    correlation_id: Option<&str>,
) -> Result<Acted, Problem> {
    let origin = Origin {
        correlation_id: correlation_id.map(str::to_owned),
        ..Default::default()
    };
    let audit_action = format!("saga.{}", action.as_str());
    let target = id.to_string();
    match engine
        .apply(id, action.input(&who.name, reason), origin)
        .await?
    {
        Applied::Applied { status, state } => {
            audit::record(
                pool,
                who,
                &audit_action,
                &target,
                reason,
                audit::Outcome::Done,
                correlation_id,
            )
            .await;
            Ok(Acted {
                saga_id: id,
                action: action.as_str(),
                status: status.as_str().to_owned(),
                state: state.to_owned(),
            })
        }
        Applied::Ignored(why) => {
            audit::record(
                pool,
                who,
                &audit_action,
                &target,
                reason,
                audit::Outcome::Refused(&why),
                correlation_id,
            )
            .await;
            Err(Problem::new(
                axum::http::StatusCode::CONFLICT,
                "action-refused",
                "The saga's state does not allow this action",
                why,
            ))
        }
        Applied::NotFound => Err(Problem::not_found(format!("no saga {id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_is_an_id_bound() {
        let t = DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let floor = uuid_floor(t);
        assert_eq!(floor.get_version_num(), 7);
        let (secs, nanos) = floor.get_timestamp().unwrap().to_unix();
        assert_eq!(secs as i64, t.timestamp());
        assert_eq!(nanos, 0);
        // Every id made in that millisecond or later sorts at or after it.
        let later = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, 0));
        assert!(later >= floor);
    }

    #[test]
    fn times_parse_as_forms_send_them() {
        assert!(parse_time("2026-12-03T10:00").is_some());
        assert!(parse_time("2026-12-03T10:00:00+01:00").is_some());
        assert!(parse_time("2026-12-03").is_some());
        assert!(parse_time("yesterday").is_none());
    }
}
