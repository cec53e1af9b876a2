//! The engine's SQL. A batch is written with one statement whatever its size: a data-modifying
//! CTE per table, each an `unnest` of arrays.
//!
//! Every statement but the commit is a `sqlx::query!` macro (or `query_as!`, `query_scalar!`),
//! checked against the schema when the crate is built (from the data in `.sqlx/` when offline)
//! and read by column name. The commit cannot be: [`CommitStatement`] is put together at start-up
//! from [`PARTS`] and the read-model tables of the registered saga types, which only the
//! running binary knows; it reads its rows into [`CommitRow`], by name too.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sagas::api::ProjectionTable;
use sagas::api::Status;
use sagas::wire::SagaId;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgPool};
use uuid::Uuid;

use crate::relay;

#[derive(Debug, Clone)]
pub(super) struct NewSagaRow {
    pub id: SagaId,
    pub saga_type: String,
    pub state: String,
    pub status: String,
    /// JSON text, cast to jsonb by PostgreSQL.
    pub snapshot: String,
    pub subject: Option<String>,
    pub parked_on: Option<String>,
    pub version: i64,
    pub correlation_id: String,
    pub idempotency_scope: String,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<Vec<u8>>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub(super) struct UpdateRow {
    pub id: SagaId,
    pub old_version: i64,
    pub new_version: i64,
    pub state: String,
    pub status: String,
    pub snapshot: String,
    pub parked_on: Option<String>,
    pub at: DateTime<Utc>,
}

/// One row of the event log, as the API reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRow {
    pub saga_id: SagaId,
    pub seq: i32,
    pub kind: String,
    pub input: serde_json::Value,
    pub effects: serde_json::Value,
    pub state_after: String,
    pub at: DateTime<Utc>,
    /// The steps whose breaker was open when the input was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<serde_json::Value>,
}

/// One row of the event log, as the engine writes it (JSON as text).
#[derive(Debug, Clone)]
pub(super) struct EventWrite {
    pub saga_id: SagaId,
    pub seq: i32,
    pub kind: String,
    pub input: String,
    pub effects: String,
    pub state_after: String,
    pub at: DateTime<Utc>,
    pub blocked: Option<String>,
}

#[derive(Debug, Clone)]
pub(super) struct OutboxRow {
    pub saga_id: SagaId,
    pub msg_id: String,
    pub subject: String,
    pub correlation_id: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone)]
pub(super) enum TimerOp {
    Set { timer: String, at: DateTime<Utc> },
    Cancel,
}

/// One write to the timers table. At most one per saga and key in a batch.
#[derive(Debug, Clone)]
pub(super) enum TimerWrite {
    Set {
        saga_id: SagaId,
        key: String,
        at: DateTime<Utc>,
        timer: String,
    },
    /// Delete the row, if the saga's own write or check went through; only if it still fires
    /// at `fire_at` when given (a consumed timer that nothing replaced).
    Delete {
        saga_id: SagaId,
        key: String,
        fire_at: Option<DateTime<Utc>>,
    },
}

#[derive(Debug, Default)]
pub(super) struct Batch {
    pub new_sagas: Vec<NewSagaRow>,
    pub updates: Vec<UpdateRow>,
    pub events: Vec<EventWrite>,
    pub outbox: Vec<OutboxRow>,
    pub timers: Vec<TimerWrite>,
    /// Sagas none of whose inputs changed them, with the version the verdict was reached at:
    /// the commit checks that it is still the stored one.
    pub checks: Vec<(SagaId, i64)>,
    /// Outbox rows JetStream acknowledged (the relay's), deleted by this statement rather than
    /// by a transaction of their own.
    pub published: Vec<i64>,
    /// Secrets of the new sagas: (saga, name, value).
    pub secrets: Vec<(SagaId, String, String)>,
    /// Sagas this batch ends: their secrets are deleted.
    pub ended: Vec<SagaId>,
    /// Read-model rows (JSON objects), by table.
    pub projections: std::collections::BTreeMap<&'static str, Vec<String>>,
    /// The owned partitions the batch touches, with the epoch their lease is held at: the
    /// batch is written only if every one is still held at it.
    pub fence: Vec<(u32, i64)>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.new_sagas.is_empty()
            && self.updates.is_empty()
            && self.timers.is_empty()
            && self.checks.is_empty()
            && self.published.is_empty()
    }
}

/// The saga an idempotency key already belongs to.
#[derive(Debug, Clone)]
pub(super) struct Existing {
    pub id: SagaId,
    pub status: Status,
    pub request_hash: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// Sagas whose version changed under us (updated or only checked): nothing of theirs was
    /// written.
    pub conflicted: HashSet<SagaId>,
    /// New sagas whose idempotency key was taken: nothing of theirs was written.
    pub duplicates: HashMap<SagaId, Existing>,
    /// The committed outbox rows, per saga, for the relay.
    pub outbox: HashMap<SagaId, Vec<relay::Message>>,
    /// Fenced partitions whose lease was no longer held at its epoch: nothing was written.
    pub lost: Vec<u32>,
}

fn uuids<'a>(ids: impl Iterator<Item = &'a SagaId>) -> Vec<Uuid> {
    ids.map(|i| i.as_uuid()).collect()
}

/// The parts of the commit statement, each a data-modifying CTE (or the final `SELECT`) with
/// its parameters named `@name`. [`Named::compile`] numbers them.
///
/// The whole batch goes in ONE statement, hence one round trip and one implicit transaction:
/// new sagas are inserted (unless their idempotency key is taken), changed ones updated if
/// their version is still the one we read, unchanged ones checked to be still at the version we
/// read; the event-log, outbox, timer, secret and read-model writes of a saga happen only if its
/// own row was written or checked (`ok`). Outbox rows the relay published are deleted on the
/// way.
///
/// The fence comes first: the lease rows of the owned partitions the batch touches, locked
/// `FOR KEY SHARE` at the epochs this process holds them with (`crate::partitions`). Nothing
/// of the batch is written unless every one of them is still at that epoch; a take-over raises
/// the epoch (a key column), so it waits for a commit holding the lock, and a commit after it
/// finds nothing to lock. Sagas of partitions this process does not own (an operator's action,
/// a start while it owns none) are guarded by their version alone.
const PARTS: &[(&str, &str)] = &[
    (
        "fence",
        "SELECT l.partition FROM orchestrator.partition_leases l
           JOIN unnest(@fence_part::int4[], @fence_epoch::int8[]) AS f(partition, epoch)
             ON l.partition = f.partition AND l.epoch = f.epoch
            FOR KEY SHARE OF l",
    ),
    (
        "fenced",
        "SELECT count(*) = cardinality(@fence_part::int4[]) AS held FROM fence",
    ),
    (
        "ins",
        "INSERT INTO orchestrator.sagas
             (id, saga_type, state, status, snapshot, version, correlation_id, idempotency_key,
              request_hash, created_at, updated_at, parked_on, subject, idempotency_scope)
         SELECT u.id, u.saga_type, u.state, u.status, u.snapshot::json, u.version,
                u.correlation_id, u.idempotency_key, u.request_hash, u.at, u.at, u.parked_on,
                u.subject, u.scope
           FROM unnest(@new_id::uuid[], @new_type::text[], @new_state::text[],
                       @new_status::text[], @new_snapshot::text[], @new_version::int8[],
                       @new_correlation::text[], @new_key::text[], @new_hash::bytea[],
                       @new_at::timestamptz[], @new_parked::text[], @new_subject::text[],
                       @new_scope::text[])
             AS u(id, saga_type, state, status, snapshot, version, correlation_id,
                  idempotency_key, request_hash, at, parked_on, subject, scope)
          WHERE (SELECT held FROM fenced)
         ON CONFLICT (idempotency_scope, idempotency_key) DO NOTHING
         RETURNING id",
    ),
    (
        "upd",
        "UPDATE orchestrator.sagas s
            SET state = u.state, status = u.status, snapshot = u.snapshot::json,
                version = u.new_version, updated_at = u.at, parked_on = u.parked_on
           FROM unnest(@upd_id::uuid[], @upd_old::int8[], @upd_new::int8[], @upd_state::text[],
                       @upd_status::text[], @upd_snapshot::text[], @upd_at::timestamptz[],
                       @upd_parked::text[])
             AS u(id, old_version, new_version, state, status, snapshot, at, parked_on)
          WHERE s.id = u.id AND s.version = u.old_version AND (SELECT held FROM fenced)
         RETURNING s.id",
    ),
    (
        "chk",
        "SELECT s.id FROM orchestrator.sagas s
           JOIN unnest(@chk_id::uuid[], @chk_version::int8[]) AS c(id, version)
             ON s.id = c.id AND s.version = c.version
          WHERE (SELECT held FROM fenced)",
    ),
    (
        "ok",
        "SELECT id FROM ins UNION ALL SELECT id FROM upd UNION ALL SELECT id FROM chk",
    ),
    (
        "ev",
        "INSERT INTO orchestrator.saga_events
             (saga_id, seq, kind, input, effects, state_after, at, blocked)
         SELECT e.saga_id, e.seq, e.kind, e.input::json, e.effects::json, e.state_after, e.at,
                e.blocked::json
           FROM unnest(@ev_saga::uuid[], @ev_seq::int4[], @ev_kind::text[], @ev_input::text[],
                       @ev_effects::text[], @ev_state::text[], @ev_at::timestamptz[],
                       @ev_blocked::text[])
             AS e(saga_id, seq, kind, input, effects, state_after, at, blocked)
          WHERE e.saga_id IN (SELECT id FROM ok)",
    ),
    (
        "ob",
        "INSERT INTO orchestrator.outbox (saga_id, msg_id, subject, correlation_id, payload, created_at)
         SELECT o.saga_id, o.msg_id, o.subject, o.correlation_id, o.payload, @now
           FROM unnest(@ob_saga::uuid[], @ob_msg::text[], @ob_subject::text[],
                       @ob_correlation::text[], @ob_payload::bytea[])
             AS o(saga_id, msg_id, subject, correlation_id, payload)
          WHERE o.saga_id IN (SELECT id FROM ok)
         RETURNING msg_id, id",
    ),
    (
        "tset",
        "INSERT INTO orchestrator.timers (saga_id, key, fire_at, timer)
         SELECT t.saga_id, t.key, t.fire_at, t.timer::jsonb
           FROM unnest(@tset_saga::uuid[], @tset_key::text[], @tset_at::timestamptz[],
                       @tset_timer::text[])
             AS t(saga_id, key, fire_at, timer)
          WHERE t.saga_id IN (SELECT id FROM ok)
         ON CONFLICT (saga_id, key) DO UPDATE
            SET fire_at = excluded.fire_at, timer = excluded.timer, leased_until = NULL",
    ),
    (
        "tdel",
        "DELETE FROM orchestrator.timers t
          USING unnest(@tdel_saga::uuid[], @tdel_key::text[], @tdel_at::timestamptz[])
             AS d(saga_id, key, fire_at)
          WHERE t.saga_id = d.saga_id AND t.key = d.key
            AND (d.fire_at IS NULL OR t.fire_at = d.fire_at)
            AND d.saga_id IN (SELECT id FROM ok)",
    ),
    (
        "odel",
        "DELETE FROM orchestrator.outbox WHERE id = ANY(@published::int8[])",
    ),
    (
        "sset",
        "INSERT INTO orchestrator.saga_secrets (saga_id, name, value)
         SELECT c.saga_id, c.name, c.value
           FROM unnest(@secret_saga::uuid[], @secret_name::text[], @secret_value::text[])
             AS c(saga_id, name, value)
          WHERE c.saga_id IN (SELECT id FROM ok)",
    ),
    (
        "sdel",
        "DELETE FROM orchestrator.saga_secrets
          WHERE saga_id = ANY(@ended::uuid[]) AND saga_id IN (SELECT id FROM ok)",
    ),
];

/// What the statement returns: the sagas written or checked, the outbox rows with their ids,
/// and the fenced partitions whose lease is still held.
const RESULT: &str = "SELECT 0::int4 AS kind, id::text AS key, 0::int8 AS row_id FROM ok
                      UNION ALL
                      SELECT 1::int4, msg_id, id FROM ob
                      UNION ALL
                      SELECT 2::int4, '', partition::int8 FROM fence";

/// A statement whose parameters are named `@name` in its text, numbered once.
#[derive(Debug)]
struct Named {
    text: String,
    /// `$k` is `names[k - 1]`.
    names: Vec<String>,
}

impl Named {
    fn compile(template: &str) -> Named {
        let mut text = String::with_capacity(template.len());
        let mut names: Vec<String> = Vec::new();
        let mut chars = template.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c != '@' {
                text.push(c);
                continue;
            }
            let start = i + 1;
            let mut end = start;
            while let Some((j, n)) = chars.peek().copied() {
                if n.is_ascii_alphanumeric() || n == '_' {
                    end = j + n.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let name = &template[start..end];
            let k = match names.iter().position(|n| n == name) {
                Some(k) => k + 1,
                None => {
                    names.push(name.to_owned());
                    names.len()
                }
            };
            text.push_str(&format!("${k}"));
        }
        Named { text, names }
    }
}

type Bind = Box<dyn FnOnce(&mut PgArguments) -> Result<(), sqlx::error::BoxDynError> + Send>;

/// The values of one run of a [`Named`] statement, by name.
#[derive(Default)]
struct Binds(HashMap<String, Bind>);

impl Binds {
    fn set<T>(&mut self, name: &str, value: T)
    where
        T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + 'static,
    {
        self.0
            .insert(name.to_owned(), Box::new(move |args| args.add(value)));
    }

    fn arguments(mut self, named: &Named) -> Result<PgArguments, sqlx::Error> {
        let mut args = PgArguments::default();
        for name in &named.names {
            let bind = self
                .0
                .remove(name)
                .ok_or_else(|| sqlx::Error::Protocol(format!("no value for @{name}")))?;
            bind(&mut args).map_err(sqlx::Error::Encode)?;
        }
        Ok(args)
    }
}

/// The engine's commit: [`PARTS`], plus an upsert per table of the registered saga types' read
/// models, in one statement, built once per process (so its text, and its prepared plan, are
/// the same for every batch).
#[derive(Debug)]
pub(super) struct CommitStatement {
    named: Named,
    /// The tables of the read-model parts, with the name of their parameter.
    projections: Vec<(&'static str, String)>,
}

impl CommitStatement {
    pub(super) fn new(tables: &[ProjectionTable]) -> Self {
        let mut parts: Vec<(String, String)> = PARTS
            .iter()
            .map(|(n, sql)| ((*n).to_owned(), (*sql).to_owned()))
            .collect();
        let mut projections = Vec::new();
        for (i, t) in tables.iter().enumerate() {
            let param = format!("proj{i}");
            let columns = t.columns.join(", ");
            let selected: Vec<String> = t.columns.iter().map(|c| format!("r.{c}")).collect();
            let updates: Vec<String> = t
                .columns
                .iter()
                .filter(|c| !t.key.contains(c))
                .map(|c| format!("{c} = excluded.{c}"))
                .collect();
            let changing: Vec<&str> = t
                .columns
                .iter()
                .filter(|c| !t.key.contains(c))
                .copied()
                .collect();
            // A row written again as it is (after a load, the engine no longer knows what it
            // wrote) makes no new row version.
            let on_conflict = if updates.is_empty() {
                "DO NOTHING".to_owned()
            } else {
                format!(
                    "DO UPDATE SET {} WHERE ({}) IS DISTINCT FROM ({})",
                    updates.join(", "),
                    changing
                        .iter()
                        .map(|c| format!("t.{c}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    changing
                        .iter()
                        .map(|c| format!("excluded.{c}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            };
            // Typed rows from JSON objects: each value is cast to its column's type.
            parts.push((
                format!("p{i}"),
                format!(
                    "INSERT INTO {table} AS t ({columns})
                     SELECT {selected}
                       FROM unnest(@{param}::text[]) AS j(row),
                            jsonb_populate_record(NULL::{table}, j.row::jsonb) AS r
                      WHERE r.saga_id IN (SELECT id FROM ok)
                     ON CONFLICT ({key}) {on_conflict}",
                    table = t.table,
                    selected = selected.join(", "),
                    key = t.key.join(", "),
                ),
            ));
            projections.push((t.table, param));
        }
        let ctes: Vec<String> = parts
            .iter()
            .map(|(name, sql)| format!("{name} AS ({sql})"))
            .collect();
        let template = format!("WITH {}\n{RESULT}", ctes.join(",\n"));
        Self {
            named: Named::compile(&template),
            projections,
        }
    }

    /// Write `batch`.
    pub(super) async fn run(&self, pool: &PgPool, batch: Batch) -> Result<Outcome, sqlx::Error> {
        let mut outcome = Outcome::default();
        if batch.is_empty() {
            return Ok(outcome);
        }
        let mut b = Binds::default();
        let n = &batch.new_sagas;
        b.set("new_id", uuids(n.iter().map(|r| &r.id)));
        b.set("new_type", strings(n.iter().map(|r| r.saga_type.as_str())));
        b.set("new_state", strings(n.iter().map(|r| r.state.as_str())));
        b.set("new_status", strings(n.iter().map(|r| r.status.as_str())));
        b.set(
            "new_snapshot",
            strings(n.iter().map(|r| r.snapshot.as_str())),
        );
        b.set(
            "new_version",
            n.iter().map(|r| r.version).collect::<Vec<_>>(),
        );
        b.set(
            "new_correlation",
            strings(n.iter().map(|r| r.correlation_id.as_str())),
        );
        b.set(
            "new_key",
            n.iter()
                .map(|r| r.idempotency_key.clone())
                .collect::<Vec<_>>(),
        );
        b.set(
            "new_hash",
            n.iter().map(|r| r.request_hash.clone()).collect::<Vec<_>>(),
        );
        b.set("new_at", n.iter().map(|r| r.at).collect::<Vec<_>>());
        b.set(
            "new_parked",
            n.iter().map(|r| r.parked_on.clone()).collect::<Vec<_>>(),
        );
        b.set(
            "new_subject",
            n.iter().map(|r| r.subject.clone()).collect::<Vec<_>>(),
        );
        b.set(
            "new_scope",
            strings(n.iter().map(|r| r.idempotency_scope.as_str())),
        );
        let u = &batch.updates;
        b.set("upd_id", uuids(u.iter().map(|r| &r.id)));
        b.set(
            "upd_old",
            u.iter().map(|r| r.old_version).collect::<Vec<_>>(),
        );
        b.set(
            "upd_new",
            u.iter().map(|r| r.new_version).collect::<Vec<_>>(),
        );
        b.set("upd_state", strings(u.iter().map(|r| r.state.as_str())));
        b.set("upd_status", strings(u.iter().map(|r| r.status.as_str())));
        b.set(
            "upd_snapshot",
            strings(u.iter().map(|r| r.snapshot.as_str())),
        );
        b.set("upd_at", u.iter().map(|r| r.at).collect::<Vec<_>>());
        b.set(
            "upd_parked",
            u.iter().map(|r| r.parked_on.clone()).collect::<Vec<_>>(),
        );
        b.set("chk_id", uuids(batch.checks.iter().map(|(id, _)| id)));
        b.set(
            "chk_version",
            batch.checks.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
        );
        let e = &batch.events;
        b.set("ev_saga", uuids(e.iter().map(|r| &r.saga_id)));
        b.set("ev_seq", e.iter().map(|r| r.seq).collect::<Vec<_>>());
        b.set("ev_kind", strings(e.iter().map(|r| r.kind.as_str())));
        b.set("ev_input", strings(e.iter().map(|r| r.input.as_str())));
        b.set("ev_effects", strings(e.iter().map(|r| r.effects.as_str())));
        b.set(
            "ev_state",
            strings(e.iter().map(|r| r.state_after.as_str())),
        );
        b.set("ev_at", e.iter().map(|r| r.at).collect::<Vec<_>>());
        b.set(
            "ev_blocked",
            e.iter().map(|r| r.blocked.clone()).collect::<Vec<_>>(),
        );
        let o = &batch.outbox;
        b.set("ob_saga", uuids(o.iter().map(|r| &r.saga_id)));
        b.set("ob_msg", strings(o.iter().map(|r| r.msg_id.as_str())));
        b.set("ob_subject", strings(o.iter().map(|r| r.subject.as_str())));
        b.set(
            "ob_correlation",
            strings(o.iter().map(|r| r.correlation_id.as_str())),
        );
        b.set(
            "ob_payload",
            o.iter().map(|r| r.payload.clone()).collect::<Vec<_>>(),
        );
        b.set("now", Utc::now());
        let (mut set_saga, mut set_key, mut set_at, mut set_timer) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut del_saga, mut del_key, mut del_at) = (Vec::new(), Vec::new(), Vec::new());
        for t in &batch.timers {
            match t {
                TimerWrite::Set {
                    saga_id,
                    key,
                    at,
                    timer,
                } => {
                    set_saga.push(saga_id.as_uuid());
                    set_key.push(key.clone());
                    set_at.push(*at);
                    set_timer.push(timer.clone());
                }
                TimerWrite::Delete {
                    saga_id,
                    key,
                    fire_at,
                } => {
                    del_saga.push(saga_id.as_uuid());
                    del_key.push(key.clone());
                    del_at.push(*fire_at);
                }
            }
        }
        b.set("tset_saga", set_saga);
        b.set("tset_key", set_key);
        b.set("tset_at", set_at);
        b.set("tset_timer", set_timer);
        b.set("tdel_saga", del_saga);
        b.set("tdel_key", del_key);
        b.set("tdel_at", del_at);
        b.set("published", batch.published.clone());
        b.set(
            "secret_saga",
            uuids(batch.secrets.iter().map(|(id, _, _)| id)),
        );
        b.set(
            "secret_name",
            strings(batch.secrets.iter().map(|(_, n, _)| n.as_str())),
        );
        b.set(
            "secret_value",
            strings(batch.secrets.iter().map(|(_, _, v)| v.as_str())),
        );
        b.set("ended", uuids(batch.ended.iter()));
        b.set(
            "fence_part",
            batch
                .fence
                .iter()
                .map(|(p, _)| *p as i32)
                .collect::<Vec<_>>(),
        );
        b.set(
            "fence_epoch",
            batch.fence.iter().map(|(_, e)| *e).collect::<Vec<_>>(),
        );
        for (table, param) in &self.projections {
            let rows = batch.projections.get(table).cloned().unwrap_or_default();
            b.set(param, rows);
        }
        let args = b.arguments(&self.named)?;
        let rows: Vec<CommitRow> =
            sqlx::query_as_with(sqlx::AssertSqlSafe(self.named.text.clone()), args)
                .fetch_all(pool)
                .await?;
        let mut written: HashSet<Uuid> = HashSet::with_capacity(n.len() + u.len());
        let mut outbox_ids: HashMap<String, i64> = HashMap::with_capacity(o.len());
        let mut held: HashSet<u32> = HashSet::with_capacity(batch.fence.len());
        for row in rows {
            if row.kind == 2 {
                held.insert(row.row_id as u32);
            } else if row.kind == 0 {
                written.insert(
                    row.key
                        .parse()
                        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                );
            } else {
                outbox_ids.insert(row.key, row.row_id);
            }
        }
        outcome.lost = batch
            .fence
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| !held.contains(p))
            .collect();
        outcome.conflicted = u
            .iter()
            .map(|r| r.id)
            .chain(batch.checks.iter().map(|(id, _)| *id))
            .filter(|id| !written.contains(&id.as_uuid()))
            .collect();
        let lost: Vec<&NewSagaRow> = n
            .iter()
            .filter(|r| !written.contains(&r.id.as_uuid()))
            .collect();
        if !outcome.lost.is_empty() {
            // Fenced off: nothing was written, whatever the keys.
            outcome.conflicted.extend(lost.iter().map(|r| r.id));
        } else if !lost.is_empty() {
            // The batch is committed: a failure to find who holds the keys must not make it look
            // failed. Those starts wrote nothing; they are run again, like a lost version race.
            match holders_of(pool, &lost).await {
                Ok(holders) => outcome.duplicates = holders,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the holders of taken idempotency keys; those starts are retried");
                    outcome.conflicted.extend(lost.iter().map(|r| r.id));
                }
            }
        }
        for row in batch.outbox {
            if let Some(id) = outbox_ids.get(&row.msg_id).copied() {
                outcome
                    .outbox
                    .entry(row.saga_id)
                    .or_default()
                    .push(relay::Message {
                        id,
                        saga_id: row.saga_id.as_uuid(),
                        subject: row.subject,
                        msg_id: row.msg_id,
                        correlation_id: row.correlation_id,
                        payload: Bytes::from(row.payload),
                    });
            }
        }
        Ok(outcome)
    }
}

/// A row of the commit's result: a saga written or checked (`kind` 0, its id in `key`), or an
/// outbox row (`kind` 1, its message id in `key`, its id in `row_id`).
#[derive(sqlx::FromRow)]
struct CommitRow {
    kind: i32,
    key: String,
    row_id: i64,
}

fn strings<'a>(items: impl Iterator<Item = &'a str>) -> Vec<String> {
    items.map(str::to_owned).collect()
}

/// The sagas that hold the idempotency keys of new sagas that could not be inserted.
async fn holders_of(
    pool: &PgPool,
    lost: &[&NewSagaRow],
) -> Result<HashMap<SagaId, Existing>, sqlx::Error> {
    let (scopes, keys): (Vec<String>, Vec<String>) = lost
        .iter()
        .filter_map(|r| Some((r.idempotency_scope.clone(), r.idempotency_key.clone()?)))
        .unzip();
    // The key matched one of ours, so it is not NULL.
    let rows = sqlx::query!(
        r#"SELECT s.idempotency_scope, s.idempotency_key AS "idempotency_key!", s.id, s.status,
                  s.request_hash
             FROM orchestrator.sagas s
             JOIN unnest($1::text[], $2::text[]) AS k(scope, key)
               ON s.idempotency_scope = k.scope AND s.idempotency_key = k.key"#,
        &scopes,
        &keys,
    )
    .fetch_all(pool)
    .await?;
    let mut by_key = HashMap::new();
    for row in rows {
        by_key.insert(
            (row.idempotency_scope, row.idempotency_key),
            Existing {
                id: SagaId::from_uuid(row.id),
                status: Status::parse(&row.status).unwrap_or(Status::Running),
                request_hash: row.request_hash,
            },
        );
    }
    let mut out = HashMap::new();
    for r in lost {
        let existing = r
            .idempotency_key
            .as_ref()
            .and_then(|k| by_key.get(&(r.idempotency_scope.clone(), k.clone())))
            .cloned()
            .ok_or_else(|| sqlx::Error::Protocol(format!("saga {} was not inserted", r.id)))?;
        out.insert(r.id, existing);
    }
    Ok(out)
}

/// A stored saga, as the engine restores it.
pub(super) struct LoadedRow {
    pub id: SagaId,
    pub saga_type: String,
    pub snapshot: serde_json::Value,
    pub version: i64,
    pub correlation_id: String,
}

pub(super) async fn load(pool: &PgPool, ids: &[SagaId]) -> Result<Vec<LoadedRow>, sqlx::Error> {
    let rows = sqlx::query!(
        "SELECT id, saga_type, snapshot, version, correlation_id
           FROM orchestrator.sagas WHERE id = ANY($1)",
        &uuids(ids.iter()),
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| LoadedRow {
            id: SagaId::from_uuid(r.id),
            saga_type: r.saga_type,
            snapshot: r.snapshot,
            version: r.version,
            correlation_id: r.correlation_id,
        })
        .collect())
}

/// A saga as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SagaRecord {
    pub id: SagaId,
    pub saga_type: String,
    pub state: String,
    pub status: String,
    pub version: i64,
    pub correlation_id: String,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub snapshot: serde_json::Value,
}

/// A saga row as the API reads it: the columns of a [`SagaRecord`], by name.
struct RecordRow {
    id: Uuid,
    saga_type: String,
    state: String,
    status: String,
    version: i64,
    correlation_id: String,
    idempotency_key: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    snapshot: serde_json::Value,
}

impl From<RecordRow> for SagaRecord {
    fn from(r: RecordRow) -> Self {
        SagaRecord {
            id: SagaId::from_uuid(r.id),
            saga_type: r.saga_type,
            state: r.state,
            status: r.status,
            version: r.version,
            correlation_id: r.correlation_id,
            idempotency_key: r.idempotency_key,
            created_at: r.created_at,
            updated_at: r.updated_at,
            snapshot: r.snapshot,
        }
    }
}

/// A saga and its event log, read in one statement so that both come from one snapshot of
/// the database (two statements could show a log newer than the row).
pub async fn load_record(
    pool: &PgPool,
    id: SagaId,
) -> Result<Option<(SagaRecord, Vec<EventRow>)>, sqlx::Error> {
    // `coalesce` gives the empty array when the saga has no events, so the log is never NULL.
    let Some(row) = sqlx::query!(
        r#"SELECT id, saga_type, state, status, version, correlation_id, idempotency_key,
                  created_at, updated_at, snapshot,
                  (SELECT coalesce(json_agg(json_build_object(
                              'saga_id', e.saga_id, 'seq', e.seq, 'kind', e.kind,
                              'input', e.input, 'effects', e.effects,
                              'state_after', e.state_after, 'at', e.at, 'blocked', e.blocked)
                            ORDER BY e.seq), '[]'::json)
                     FROM orchestrator.saga_events e WHERE e.saga_id = s.id) AS "events!"
             FROM orchestrator.sagas s WHERE s.id = $1"#,
        id.as_uuid(),
    )
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let events: Vec<EventRow> =
        serde_json::from_value(row.events).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    let record = SagaRecord::from(RecordRow {
        id: row.id,
        saga_type: row.saga_type,
        state: row.state,
        status: row.status,
        version: row.version,
        correlation_id: row.correlation_id,
        idempotency_key: row.idempotency_key,
        created_at: row.created_at,
        updated_at: row.updated_at,
        snapshot: row.snapshot,
    });
    Ok(Some((record, events)))
}

/// The newest sagas first (ids are UUID v7, so they sort by creation), optionally of one
/// status; with `before`, those older than that saga (keyset paging on the id).
pub async fn list_records(
    pool: &PgPool,
    status: Option<Status>,
    before: Option<SagaId>,
    limit: i64,
) -> Result<Vec<SagaRecord>, sqlx::Error> {
    // One statement per filter, so that each has a plan that uses its index: the primary key
    // for all sagas or the (many) ended ones, `sagas_in_flight` for the others (its predicate
    // is repeated so that the generic plan can use it).
    let before = before.map_or(Uuid::max(), |id| id.as_uuid());
    let rows = match status {
        None => {
            sqlx::query_as!(
                RecordRow,
                "SELECT id, saga_type, state, status, version, correlation_id, idempotency_key,
                        created_at, updated_at, snapshot
                   FROM orchestrator.sagas WHERE id < $1 ORDER BY id DESC LIMIT $2",
                before,
                limit,
            )
            .fetch_all(pool)
            .await?
        }
        Some(status @ (Status::Completed | Status::Compensated)) => {
            sqlx::query_as!(
                RecordRow,
                "SELECT id, saga_type, state, status, version, correlation_id, idempotency_key,
                        created_at, updated_at, snapshot
                   FROM orchestrator.sagas WHERE id < $1 AND status = $3
                  ORDER BY id DESC LIMIT $2",
                before,
                limit,
                status.as_str(),
            )
            .fetch_all(pool)
            .await?
        }
        Some(status) => {
            sqlx::query_as!(
                RecordRow,
                "SELECT id, saga_type, state, status, version, correlation_id, idempotency_key,
                        created_at, updated_at, snapshot
                   FROM orchestrator.sagas
                  WHERE id < $1 AND status = $3 AND status NOT IN ('completed', 'compensated')
                  ORDER BY id DESC LIMIT $2",
                before,
                limit,
                status.as_str(),
            )
            .fetch_all(pool)
            .await?
        }
    };
    Ok(rows.into_iter().map(SagaRecord::from).collect())
}

/// The status of a saga, if it exists.
pub(super) async fn status(pool: &PgPool, id: SagaId) -> Result<Option<Status>, sqlx::Error> {
    let status = sqlx::query_scalar!(
        "SELECT status FROM orchestrator.sagas WHERE id = $1",
        id.as_uuid(),
    )
    .fetch_optional(pool)
    .await?;
    Ok(status.and_then(|s| Status::parse(&s)))
}
