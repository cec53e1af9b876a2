//! The engine's SQL. A batch is written with one statement per table, whatever its size
//! (`unnest` of arrays), inside one transaction.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sagas::api::Status;
use sagas::wire::SagaId;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
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
}

fn uuids<'a>(ids: impl Iterator<Item = &'a SagaId>) -> Vec<Uuid> {
    ids.map(|i| i.as_uuid()).collect()
}

/// The whole batch in ONE statement, hence one round trip and one implicit transaction:
/// new sagas are inserted (unless their idempotency key is taken), changed ones updated if
/// their version is still the one we read, unchanged ones checked to be still at the version
/// we read; the event-log, outbox and timer writes of a saga happen only if its own row was
/// written or checked (`ok`). Outbox rows the relay published are deleted on the way.
const COMMIT: &str = "
WITH ins AS (
    INSERT INTO orchestrator.sagas
        (id, saga_type, state, status, snapshot, version, correlation_id, idempotency_key,
         request_hash, created_at, updated_at, parked_on, subject, idempotency_scope)
    SELECT u.id, u.saga_type, u.state, u.status, u.snapshot::json, u.version, u.correlation_id,
           u.idempotency_key, u.request_hash, u.at, u.at, u.parked_on, u.subject, u.scope
      FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                  $7::text[], $8::text[], $9::bytea[], $10::timestamptz[], $11::text[], $12::text[],
                  $45::text[])
        AS u(id, saga_type, state, status, snapshot, version, correlation_id, idempotency_key,
             request_hash, at, parked_on, subject, scope)
    ON CONFLICT (idempotency_scope, idempotency_key) DO NOTHING
    RETURNING id
), upd AS (
    UPDATE orchestrator.sagas s
       SET state = u.state, status = u.status, snapshot = u.snapshot::json,
           version = u.new_version, updated_at = u.at, parked_on = u.parked_on
      FROM unnest($13::uuid[], $14::int8[], $15::int8[], $16::text[], $17::text[], $18::text[],
                  $19::timestamptz[], $20::text[])
        AS u(id, old_version, new_version, state, status, snapshot, at, parked_on)
     WHERE s.id = u.id AND s.version = u.old_version
    RETURNING s.id
), chk AS (
    SELECT s.id FROM orchestrator.sagas s
      JOIN unnest($42::uuid[], $43::int8[]) AS c(id, version)
        ON s.id = c.id AND s.version = c.version
), ok AS (
    SELECT id FROM ins UNION ALL SELECT id FROM upd UNION ALL SELECT id FROM chk
), ev AS (
    INSERT INTO orchestrator.saga_events (saga_id, seq, kind, input, effects, state_after, at, blocked)
    SELECT e.saga_id, e.seq, e.kind, e.input::json, e.effects::json, e.state_after, e.at, e.blocked::json
      FROM unnest($21::uuid[], $22::int4[], $23::text[], $24::text[], $25::text[], $26::text[],
                  $27::timestamptz[], $28::text[])
        AS e(saga_id, seq, kind, input, effects, state_after, at, blocked)
     WHERE e.saga_id IN (SELECT id FROM ok)
), ob AS (
    INSERT INTO orchestrator.outbox (saga_id, msg_id, subject, correlation_id, payload, created_at)
    SELECT o.saga_id, o.msg_id, o.subject, o.correlation_id, o.payload, $34
      FROM unnest($29::uuid[], $30::text[], $31::text[], $32::text[], $33::bytea[])
        AS o(saga_id, msg_id, subject, correlation_id, payload)
     WHERE o.saga_id IN (SELECT id FROM ok)
    RETURNING msg_id, id
), tset AS (
    INSERT INTO orchestrator.timers (saga_id, key, fire_at, timer)
    SELECT t.saga_id, t.key, t.fire_at, t.timer::jsonb
      FROM unnest($35::uuid[], $36::text[], $37::timestamptz[], $38::text[]) AS t(saga_id, key, fire_at, timer)
     WHERE t.saga_id IN (SELECT id FROM ok)
    ON CONFLICT (saga_id, key) DO UPDATE
       SET fire_at = excluded.fire_at, timer = excluded.timer, leased_until = NULL
), tdel AS (
    DELETE FROM orchestrator.timers t
     USING unnest($39::uuid[], $40::text[], $41::timestamptz[]) AS d(saga_id, key, fire_at)
     WHERE t.saga_id = d.saga_id AND t.key = d.key
       AND (d.fire_at IS NULL OR t.fire_at = d.fire_at)
       AND d.saga_id IN (SELECT id FROM ok)
), odel AS (
    DELETE FROM orchestrator.outbox WHERE id = ANY($44::int8[])
), sset AS (
    INSERT INTO orchestrator.saga_secrets (saga_id, name, value)
    SELECT c.saga_id, c.name, c.value
      FROM unnest($46::uuid[], $47::text[], $48::text[]) AS c(saga_id, name, value)
     WHERE c.saga_id IN (SELECT id FROM ok)
), sdel AS (
    DELETE FROM orchestrator.saga_secrets
     WHERE saga_id = ANY($49::uuid[]) AND saga_id IN (SELECT id FROM ok)
)
SELECT 0::int4, id::text, 0::int8 FROM ok
UNION ALL
SELECT 1::int4, msg_id, id FROM ob";

pub(super) async fn commit(pool: &PgPool, batch: Batch) -> Result<Outcome, sqlx::Error> {
    let mut outcome = Outcome::default();
    if batch.is_empty() {
        return Ok(outcome);
    }
    let n = &batch.new_sagas;
    let u = &batch.updates;
    let e = &batch.events;
    let o = &batch.outbox;
    let mut set = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut del = (Vec::new(), Vec::new(), Vec::new());
    for t in &batch.timers {
        match t {
            TimerWrite::Set {
                saga_id,
                key,
                at,
                timer,
            } => {
                set.0.push(saga_id.as_uuid());
                set.1.push(key.as_str());
                set.2.push(*at);
                set.3.push(timer.as_str());
            }
            TimerWrite::Delete {
                saga_id,
                key,
                fire_at,
            } => {
                del.0.push(saga_id.as_uuid());
                del.1.push(key.as_str());
                del.2.push(*fire_at);
            }
        }
    }
    let rows = sqlx::query(COMMIT)
        .bind(uuids(n.iter().map(|r| &r.id)))
        .bind(n.iter().map(|r| r.saga_type.as_str()).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.state.as_str()).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.snapshot.as_str()).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.version).collect::<Vec<_>>())
        .bind(
            n.iter()
                .map(|r| r.correlation_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            n.iter()
                .map(|r| r.idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            n.iter()
                .map(|r| r.request_hash.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(n.iter().map(|r| r.at).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.parked_on.as_deref()).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.subject.as_deref()).collect::<Vec<_>>())
        .bind(uuids(u.iter().map(|r| &r.id)))
        .bind(u.iter().map(|r| r.old_version).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.new_version).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.state.as_str()).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.snapshot.as_str()).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.at).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.parked_on.as_deref()).collect::<Vec<_>>())
        .bind(uuids(e.iter().map(|r| &r.saga_id)))
        .bind(e.iter().map(|r| r.seq).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.input.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.effects.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.state_after.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.at).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.blocked.as_deref()).collect::<Vec<_>>())
        .bind(uuids(o.iter().map(|r| &r.saga_id)))
        .bind(o.iter().map(|r| r.msg_id.as_str()).collect::<Vec<_>>())
        .bind(o.iter().map(|r| r.subject.as_str()).collect::<Vec<_>>())
        .bind(
            o.iter()
                .map(|r| r.correlation_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(o.iter().map(|r| r.payload.as_slice()).collect::<Vec<_>>())
        .bind(Utc::now())
        .bind(&set.0)
        .bind(&set.1)
        .bind(&set.2)
        .bind(&set.3)
        .bind(&del.0)
        .bind(&del.1)
        .bind(&del.2)
        .bind(uuids(batch.checks.iter().map(|(id, _)| id)))
        .bind(batch.checks.iter().map(|(_, v)| *v).collect::<Vec<_>>())
        .bind(&batch.published)
        .bind(
            n.iter()
                .map(|r| r.idempotency_scope.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(uuids(batch.secrets.iter().map(|(id, _, _)| id)))
        .bind(
            batch
                .secrets
                .iter()
                .map(|(_, n, _)| n.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .secrets
                .iter()
                .map(|(_, _, v)| v.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(uuids(batch.ended.iter()))
        .fetch_all(pool)
        .await?;
    let mut written: HashSet<Uuid> = HashSet::with_capacity(n.len() + u.len());
    let mut outbox_ids: HashMap<String, i64> = HashMap::with_capacity(o.len());
    for row in rows {
        let kind: i32 = row.get(0);
        let key: String = row.get(1);
        if kind == 0 {
            written.insert(key.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?);
        } else {
            outbox_ids.insert(key, row.get(2));
        }
    }
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
    if !lost.is_empty() {
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
                    subject: row.subject,
                    msg_id: row.msg_id,
                    correlation_id: row.correlation_id,
                    payload: Bytes::from(row.payload),
                });
        }
    }
    Ok(outcome)
}

/// The sagas that hold the idempotency keys of new sagas that could not be inserted.
async fn holders_of(
    pool: &PgPool,
    lost: &[&NewSagaRow],
) -> Result<HashMap<SagaId, Existing>, sqlx::Error> {
    let (scopes, keys): (Vec<&str>, Vec<&str>) = lost
        .iter()
        .filter_map(|r| Some((r.idempotency_scope.as_str(), r.idempotency_key.as_deref()?)))
        .unzip();
    let rows = sqlx::query(
        "SELECT s.idempotency_scope, s.idempotency_key, s.id, s.status, s.request_hash
           FROM orchestrator.sagas s
           JOIN unnest($1::text[], $2::text[]) AS k(scope, key)
             ON s.idempotency_scope = k.scope AND s.idempotency_key = k.key",
    )
    .bind(&scopes)
    .bind(&keys)
    .fetch_all(pool)
    .await?;
    let mut by_key = HashMap::new();
    for row in rows {
        let status: String = row.get(3);
        by_key.insert(
            (row.get::<String, _>(0), row.get::<String, _>(1)),
            Existing {
                id: SagaId::from_uuid(row.get(2)),
                status: Status::parse(&status).unwrap_or(Status::Running),
                request_hash: row.get(4),
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
    let rows = sqlx::query(
        "SELECT id, saga_type, snapshot, version, correlation_id
           FROM orchestrator.sagas WHERE id = ANY($1)",
    )
    .bind(uuids(ids.iter()))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| LoadedRow {
            id: SagaId::from_uuid(r.get(0)),
            saga_type: r.get(1),
            snapshot: r.get(2),
            version: r.get(3),
            correlation_id: r.get(4),
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

const RECORD_COLUMNS: &str = "id, saga_type, state, status, version, correlation_id, \
                              idempotency_key, created_at, updated_at, snapshot";

fn record(r: &sqlx::postgres::PgRow) -> SagaRecord {
    SagaRecord {
        id: SagaId::from_uuid(r.get(0)),
        saga_type: r.get(1),
        state: r.get(2),
        status: r.get(3),
        version: r.get(4),
        correlation_id: r.get(5),
        idempotency_key: r.get(6),
        created_at: r.get(7),
        updated_at: r.get(8),
        snapshot: r.get(9),
    }
}

/// A saga and its event log, read in one statement so that both come from one snapshot of
/// the database (two statements could show a log newer than the row).
pub async fn load_record(
    pool: &PgPool,
    id: SagaId,
) -> Result<Option<(SagaRecord, Vec<EventRow>)>, sqlx::Error> {
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {RECORD_COLUMNS},
                (SELECT coalesce(json_agg(json_build_object(
                            'saga_id', e.saga_id, 'seq', e.seq, 'kind', e.kind,
                            'input', e.input, 'effects', e.effects,
                            'state_after', e.state_after, 'at', e.at, 'blocked', e.blocked)
                          ORDER BY e.seq), '[]'::json)
                   FROM orchestrator.saga_events e WHERE e.saga_id = s.id)
           FROM orchestrator.sagas s WHERE s.id = $1"
    )))
    .bind(id.as_uuid())
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let events: serde_json::Value = row.get(10);
    let events: Vec<EventRow> =
        serde_json::from_value(events).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(Some((record(&row), events)))
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
    let filter = match status {
        None => "id < $1",
        Some(Status::Completed | Status::Compensated) => "id < $1 AND status = $3",
        Some(_) => "id < $1 AND status = $3 AND status NOT IN ('completed', 'compensated')",
    };
    let query = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {RECORD_COLUMNS} FROM orchestrator.sagas WHERE {filter} ORDER BY id DESC LIMIT $2"
    )))
    .bind(before)
    .bind(limit);
    let query = match status {
        Some(status) => query.bind(status.as_str()),
        None => query,
    };
    let rows = query.fetch_all(pool).await?;
    Ok(rows.iter().map(record).collect())
}

/// The status of a saga, if it exists.
pub(super) async fn status(pool: &PgPool, id: SagaId) -> Result<Option<Status>, sqlx::Error> {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM orchestrator.sagas WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_optional(pool)
            .await?;
    Ok(status.and_then(|s| Status::parse(&s)))
}
