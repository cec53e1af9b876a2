//! The audit log: what operators did or tried, by whom, when and why, and what came of it
//! (`orchestrator.audit_log`, append-only). Every operator action of the dashboard and the
//! admin API writes one row, refused ones too. An action on a saga is also in the saga's event
//! log (its input names the operator and the reason), written by the same commit as its
//! effect; this row follows that commit, so a crash between the two loses the row, never the
//! event.

use serde::Serialize;
use sqlx::PgPool;

use crate::http::auth::Principal;

/// One row of the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub id: i64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub target: String,
    pub reason: String,
    pub outcome: String,
    pub correlation_id: Option<String>,
}

/// What an action came to, as the log says it.
pub enum Outcome<'a> {
    Done,
    Refused(&'a str),
    /// Refused, with a reason made on the spot.
    RefusedOwned(String),
}

impl Outcome<'_> {
    fn text(&self) -> String {
        match self {
            Outcome::Done => "done".to_owned(),
            Outcome::Refused(why) => format!("refused: {why}"),
            Outcome::RefusedOwned(why) => format!("refused: {why}"),
        }
    }
}

/// Append a row. A failure is logged, not returned: the action it records already happened
/// (or was refused), and the caller must learn of that, not of the log.
pub async fn record(
    pool: &PgPool,
    who: &Principal,
    action: &str,
    target: &str,
    reason: &str,
    outcome: Outcome<'_>,
    correlation_id: Option<&str>,
) {
    let outcome = outcome.text();
    let result = sqlx::query!(
        "INSERT INTO orchestrator.audit_log (actor, role, action, target, reason, outcome, correlation_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        who.name,
        who.role.as_str(),
        action,
        target,
        reason,
        outcome,
        correlation_id,
    )
    .execute(pool)
    .await;
    match result {
        Ok(_) => tracing::info!(actor = %who.name, action, target, %outcome, "operator action"),
        Err(e) => tracing::error!(
            error = %e, actor = %who.name, action, target, %outcome,
            "operator action not written to the audit log"
        ),
    }
}

/// The newest rows first, of one target if given; with `before`, those older than that row.
pub async fn list(
    pool: &PgPool,
    target: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as!(
        Entry,
        "SELECT id, at, actor, role, action, target, reason, outcome, correlation_id
           FROM orchestrator.audit_log
          WHERE ($1::text IS NULL OR target = $1) AND id < $2
          ORDER BY id DESC LIMIT $3",
        target,
        before.unwrap_or(i64::MAX),
        limit,
    )
    .fetch_all(pool)
    .await
}
