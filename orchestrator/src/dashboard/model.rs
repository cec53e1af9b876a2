//! The view models: plain data the handlers fill and the pages render.
//!
//! Nothing here reads a database or a clock: every time a page shows relative to now comes in
//! a `now` field, and every text is data that the templates escape. Strings that name a status,
//! a state or a kind are the stored words (`running`, `step_succeeded`, ...); an unknown word is
//! shown as it is, in a neutral colour.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Who is looking, as the session says: a viewer sees everything and changes nothing (no action
/// form is rendered for one); an operator may act on sagas, breakers and dead letters.
pub use crate::http::auth::Role;

/// The logged-in user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub role: Role,
}

/// What every page shares: its title, who is looking, and what every form carries.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// The document's title (the layout appends the product's name).
    pub title: String,
    /// `None` on the login page, or in development mode if the handler has no name to show.
    pub user: Option<User>,
    /// No authentication: every page shows the `#dev-warning` banner.
    pub dev_mode: bool,
    /// The anti-forgery token, put as the hidden field `csrf` into every POST form.
    pub csrf: String,
    /// A one-off message (`#flash`), e.g. "Saga cancelled." after a redirect.
    pub flash: Option<String>,
}

impl Page {
    /// Whether action forms are rendered.
    pub fn is_operator(&self) -> bool {
        matches!(&self.user, Some(u) if u.role == Role::Operator)
    }
}

/// The statuses a saga may have, in the order the pages list them.
pub const STATUSES: [&str; 7] = [
    "running",
    "parked",
    "compensating",
    "completed",
    "compensated",
    "failed",
    "resolved",
];

/// One row of `orchestrator.sagas`, as the list and the detail page show it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRow {
    pub id: Uuid,
    pub saga_type: String,
    pub status: String,
    /// The machine's leaf state (`running`, `retrying`, `compensation_parked`, ...).
    pub state: String,
    pub correlation_id: String,
    /// The business subject, for the shop the order id.
    pub subject: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

// ---------------------------------------------------------------------------------------------
// Login and errors

/// The login form: what the user typed (never the password) and why the last try failed.
#[derive(Debug, Clone, Default)]
pub struct LoginView {
    pub username: String,
    pub error: Option<String>,
}

/// A problem shown in the browser.
#[derive(Debug, Clone)]
pub struct ErrorView {
    /// The HTTP status, e.g. 404.
    pub status: u16,
    /// e.g. "Saga not found".
    pub title: String,
    pub detail: String,
}

// ---------------------------------------------------------------------------------------------
// Overview

/// How many sagas of a type have a status.
#[derive(Debug, Clone, PartialEq)]
pub struct CountRow {
    pub saga_type: String,
    pub status: String,
    pub count: i64,
}

/// Sagas started and completed in the minute starting at `minute`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThroughputPoint {
    pub minute: DateTime<Utc>,
    pub started: i64,
    pub completed: i64,
}

/// Latency percentiles (start to completion, milliseconds) of the sagas completed in the minute
/// starting at `minute`. A minute with no completion has no point (or `None`s): a gap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyPoint {
    pub minute: DateTime<Utc>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Sagas that ended compensated or failed in the minute starting at `minute`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailurePoint {
    pub minute: DateTime<Utc>,
    pub compensated: i64,
    pub failed: i64,
}

/// A saga an operator should look at.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionRow {
    pub id: Uuid,
    pub saga_type: String,
    pub status: String,
    pub state: String,
    pub subject: Option<String>,
    /// Why it is listed, e.g. "failed", "parked on charge_payment", "past its deadline by 3 min".
    pub why: String,
    /// Since when (its last update, or its deadline).
    pub since: DateTime<Utc>,
}

/// A circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

/// What an operator forced a breaker to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forced {
    Open,
    Closed,
}

impl Forced {
    pub fn as_str(self) -> &'static str {
        match self {
            Forced::Open => "open",
            Forced::Closed => "closed",
        }
    }
}

/// A step's circuit breaker.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerRow {
    pub step: String,
    pub state: BreakerState,
    pub forced: Option<Forced>,
}

/// A worker pool's backlog (its command consumer).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolRow {
    pub service: String,
    /// Commands not yet delivered.
    pub pending: u64,
    /// Commands delivered and not yet acknowledged.
    pub ack_pending: u64,
}

/// A live orchestrator on the overview.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRow {
    pub instance: String,
    pub partitions: Vec<i32>,
    pub expires_at: DateTime<Utc>,
}

/// Dead letters of one origin (`replies`, `signals`, `cmd-payment`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct OriginCount {
    pub origin: String,
    pub count: u64,
}

/// The overview page.
#[derive(Debug, Clone)]
pub struct OverviewView {
    /// The end of the charts' hour: the last bucket is the minute that holds `now`.
    pub now: DateTime<Utc>,
    pub counts: Vec<CountRow>,
    /// Per minute; minutes left out count as zero.
    pub throughput: Vec<ThroughputPoint>,
    /// Per minute; minutes left out are gaps.
    pub latency: Vec<LatencyPoint>,
    /// Per minute; minutes left out count as zero.
    pub failures: Vec<FailurePoint>,
    pub attention: Vec<AttentionRow>,
    pub breakers: Vec<BreakerRow>,
    pub pools: Vec<PoolRow>,
    pub dead_letters: Vec<OriginCount>,
    /// The live orchestrators and their partitions.
    pub members: Vec<MemberRow>,
    /// Partitions nobody holds now.
    pub unowned: Vec<i32>,
}

// ---------------------------------------------------------------------------------------------
// Saga list

/// The list's filter, as the user typed it: each field is the query parameter of its name
/// (`type`, `status`, `state`, `from`, `to`, `q`), `None` or empty when not given. `from` and
/// `to` are `datetime-local` values (`2024-05-01T12:00`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SagaFilter {
    pub saga_type: Option<String>,
    pub status: Option<String>,
    pub state: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Saga id, order id, correlation id, customer id or email.
    pub q: Option<String>,
}

impl SagaFilter {
    /// The filter's non-empty fields as query parameters (or hidden fields), in form order.
    pub fn pairs(&self) -> Vec<(&'static str, &str)> {
        [
            ("type", &self.saga_type),
            ("status", &self.status),
            ("state", &self.state),
            ("from", &self.from),
            ("to", &self.to),
            ("q", &self.q),
        ]
        .into_iter()
        .filter_map(|(k, v)| match v.as_deref().map(str::trim) {
            Some(v) if !v.is_empty() => Some((k, v)),
            _ => None,
        })
        .collect()
    }

    /// `/dashboard/sagas?...` with this filter.
    pub fn url(&self) -> String {
        super::layout::with_query("/dashboard/sagas", &self.pairs())
    }
}

/// What an operator may do to a saga, by its name in the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaAction {
    /// Fire the pending retry or deadline now.
    RetryNow,
    /// Resume a parked or failed saga.
    Recover,
    /// Mark a failed saga as handled by hand.
    Resolve,
    /// Cancel: compensate what was done.
    Cancel,
}

impl SagaAction {
    pub const ALL: [SagaAction; 4] = [
        SagaAction::RetryNow,
        SagaAction::Recover,
        SagaAction::Resolve,
        SagaAction::Cancel,
    ];

    /// The name in `/dashboard/sagas/{id}/actions/{name}`, in `#action-{name}` and in the bulk
    /// form's `action` field.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaAction::RetryNow => "retry_now",
            SagaAction::Recover => "recover",
            SagaAction::Resolve => "resolve",
            SagaAction::Cancel => "cancel",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            SagaAction::RetryNow => "Retry now",
            SagaAction::Recover => "Recover",
            SagaAction::Resolve => "Resolve",
            SagaAction::Cancel => "Cancel",
        }
    }
}

/// The saga list page.
#[derive(Debug, Clone, Default)]
pub struct SagaListView {
    pub filter: SagaFilter,
    /// The registered saga types, for the type select.
    pub types: Vec<String>,
    pub rows: Vec<SagaRow>,
    /// How many sagas match, when the handler counted them.
    pub count: Option<i64>,
    /// The next page's URL (keyset pagination), if there is one.
    pub next: Option<String>,
    /// The actions of the bulk form (operators only); empty: no bulk form.
    pub bulk_actions: Vec<SagaAction>,
}

// ---------------------------------------------------------------------------------------------
// Saga detail

/// One step of the saga, from its snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    pub name: String,
    /// The worker pool; `None` for a step that only awaits a signal.
    pub service: Option<String>,
    /// `pending`, `running`, `retrying`, `parked`, `awaiting`, `succeeded`, `rejected`,
    /// `abandoned`, `compensating`, `compensation_retrying`, `compensation_parked`,
    /// `compensated`, `compensation_failed`.
    pub status: String,
    pub attempts: u32,
    pub compensation_attempts: u32,
    pub last_error: Option<String>,
}

/// An operator action on the detail page: rendered for operators, disabled with the reason
/// when it does not apply now.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionView {
    pub action: SagaAction,
    pub enabled: bool,
    /// Shown next to a disabled button, e.g. "only a failed saga can be resolved".
    pub why_not: Option<String>,
}

/// A pending timer of the saga.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerRow {
    pub name: String,
    pub fire_at: DateTime<Utc>,
}

/// Something the saga touched: an order, a payment, a reservation, a shipment.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityRow {
    pub label: String,
    pub value: String,
    /// A page about it, when there is one (a relative URL or http(s)).
    pub url: Option<String>,
}

/// One entry of the saga's event log.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub seq: i64,
    pub at: DateTime<Utc>,
    /// `started`, `step_succeeded`, `step_failed_retryable`, `step_failed_permanent`,
    /// `timer_fired`, `signal`, `cancel_requested`, `resumed`, `operator_retry_now`, ...
    pub kind: String,
    /// One line the handler computes, e.g. "charge_payment succeeded (attempt 2)".
    pub summary: String,
    /// The operator who did it, for an operator's input.
    pub actor: Option<String>,
    pub state_after: String,
    pub input: serde_json::Value,
    pub effects: serde_json::Value,
}

/// The saga detail page.
#[derive(Debug, Clone)]
pub struct SagaDetailView {
    /// For "fires in 3 min".
    pub now: DateTime<Utc>,
    pub saga: SagaRow,
    pub version: i64,
    pub trace_id: Option<String>,
    /// Where the trace can be seen; the id is a link when given.
    pub trace_url: Option<String>,
    /// In the definition's order.
    pub steps: Vec<StepRow>,
    /// The step whose failure turned the saga around, when the handler knows it (from the
    /// event log); otherwise the diagram marks the step whose status is `rejected`,
    /// `abandoned` or `compensation_failed`.
    pub failed_step: Option<String>,
    /// Rendered for operators only.
    pub actions: Vec<ActionView>,
    pub timers: Vec<TimerRow>,
    pub entities: Vec<EntityRow>,
    /// Oldest first.
    pub timeline: Vec<EventRow>,
}

// ---------------------------------------------------------------------------------------------
// Confirmation, dead letters, audit

/// "Are you sure?" for an operator's action.
#[derive(Debug, Clone, Default)]
pub struct ConfirmView {
    pub title: String,
    /// What will happen, e.g. "Cancel saga 0190..." or "Replay 37 dead letters matching
    /// origin=replies".
    pub what: String,
    /// How many things the action will touch, when a dry run counted them.
    pub dry_run_count: Option<i64>,
    /// Where the Confirm button posts.
    pub action_url: String,
    /// Posted as they are, with `confirm=yes`, `reason` and `csrf`.
    pub hidden: Vec<(String, String)>,
    /// The reason field's prefill.
    pub reason: String,
    /// Where Cancel goes.
    pub back_url: String,
}

/// A message on the dead-letter stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRow {
    /// The stream sequence: the row's key for replay and discard.
    pub seq: u64,
    /// `replies`, `signals`, `cmd-payment`, ...
    pub origin: String,
    /// The subject it was first published on.
    pub subject: String,
    pub reason: String,
    pub at: DateTime<Utc>,
    /// Bytes.
    pub size: u64,
}

/// The dead-letter page.
#[derive(Debug, Clone, Default)]
pub struct DeadLettersView {
    /// The origin filter (`?origin=`), if any.
    pub origin: Option<String>,
    /// Every origin with its count, for the filter select.
    pub origins: Vec<OriginCount>,
    pub rows: Vec<DeadLetterRow>,
    pub next: Option<String>,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub at: DateTime<Utc>,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub target: String,
    /// A page about the target (e.g. the saga's), when there is one.
    pub target_url: Option<String>,
    pub reason: String,
    /// e.g. "ok", "refused: saga is completed".
    pub outcome: String,
}

/// The audit log page.
#[derive(Debug, Clone, Default)]
pub struct AuditView {
    /// Newest first.
    pub rows: Vec<AuditRow>,
    pub next: Option<String>,
}
