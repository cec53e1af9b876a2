//! The engine's SQL. A batch is written with one statement per table, whatever its size
//! (`unnest` of arrays), inside one transaction.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sagas::api::Status;
use sagas::wire::SagaId;
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::FiredTimer;
use crate::relay;

#[derive(Debug, Clone)]
pub(super) struct NewSagaRow {
    pub id: SagaId,
    pub saga_type: String,
    pub state: String,
    pub status: String,
    pub snapshot: serde_json::Value,
    pub parked_on: Option<String>,
    pub version: i64,
    pub correlation_id: String,
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
    pub snapshot: serde_json::Value,
    pub parked_on: Option<String>,
    pub at: DateTime<Utc>,
}

/// One row of the event log.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub saga_id: SagaId,
    pub seq: i32,
    pub kind: String,
    pub input: serde_json::Value,
    pub effects: serde_json::Value,
    pub state_after: String,
    pub at: DateTime<Utc>,
    /// The steps whose breaker was open when the input was applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked: Option<serde_json::Value>,
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
    Set {
        timer: serde_json::Value,
        at: DateTime<Utc>,
    },
    Cancel,
}

#[derive(Debug, Default)]
pub(super) struct Batch {
    pub new_sagas: Vec<NewSagaRow>,
    pub updates: Vec<UpdateRow>,
    pub events: Vec<EventRow>,
    pub outbox: Vec<OutboxRow>,
    pub timers: Vec<(SagaId, String, TimerOp)>,
    pub fired: Vec<(SagaId, FiredTimer)>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.new_sagas.is_empty() && self.updates.is_empty() && self.fired.is_empty()
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
    /// Sagas whose version changed under us: nothing of theirs was written.
    pub conflicted: HashSet<SagaId>,
    /// New sagas whose idempotency key was taken: nothing of theirs was written.
    pub duplicates: HashMap<SagaId, Existing>,
    /// The committed outbox rows, per saga, for the relay.
    pub outbox: HashMap<SagaId, Vec<relay::Message>>,
}

fn uuids<'a>(ids: impl Iterator<Item = &'a SagaId>) -> Vec<Uuid> {
    ids.map(|i| i.as_uuid()).collect()
}

pub(super) async fn commit(pool: &PgPool, batch: Batch) -> Result<Outcome, sqlx::Error> {
    let mut outcome = Outcome::default();
    if batch.is_empty() {
        return Ok(outcome);
    }
    let mut tx = pool.begin().await?;

    if !batch.new_sagas.is_empty() {
        let n = &batch.new_sagas;
        let inserted: HashSet<Uuid> = sqlx::query(
            "INSERT INTO orchestrator.sagas
                 (id, saga_type, state, status, snapshot, version, correlation_id,
                  idempotency_key, request_hash, created_at, parked_on, updated_at)
             SELECT u.*, u.at FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],
                                          $5::jsonb[], $6::bigint[], $7::text[], $8::text[],
                                          $9::bytea[], $10::timestamptz[], $11::text[])
                 AS u(id, saga_type, state, status, snapshot, version, correlation_id,
                      idempotency_key, request_hash, at, parked_on)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING id",
        )
        .bind(uuids(n.iter().map(|r| &r.id)))
        .bind(n.iter().map(|r| r.saga_type.clone()).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.state.clone()).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.status.clone()).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.snapshot.clone()).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.version).collect::<Vec<_>>())
        .bind(
            n.iter()
                .map(|r| r.correlation_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            n.iter()
                .map(|r| r.idempotency_key.clone())
                .collect::<Vec<_>>(),
        )
        .bind(n.iter().map(|r| r.request_hash.clone()).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.at).collect::<Vec<_>>())
        .bind(n.iter().map(|r| r.parked_on.clone()).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.get::<Uuid, _>(0))
        .collect();
        let lost: Vec<&NewSagaRow> = n
            .iter()
            .filter(|r| !inserted.contains(&r.id.as_uuid()))
            .collect();
        if !lost.is_empty() {
            let keys: Vec<String> = lost
                .iter()
                .filter_map(|r| r.idempotency_key.clone())
                .collect();
            let rows = sqlx::query(
                "SELECT idempotency_key, id, status, request_hash FROM orchestrator.sagas
                 WHERE idempotency_key = ANY($1)",
            )
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?;
            let mut by_key = HashMap::new();
            for row in rows {
                let status: String = row.get(2);
                by_key.insert(
                    row.get::<String, _>(0),
                    Existing {
                        id: SagaId::from_uuid(row.get(1)),
                        status: Status::parse(&status).unwrap_or(Status::Running),
                        request_hash: row.get(3),
                    },
                );
            }
            for r in lost {
                let existing = r
                    .idempotency_key
                    .as_ref()
                    .and_then(|k| by_key.get(k))
                    .cloned()
                    .ok_or_else(|| {
                        sqlx::Error::Protocol(format!("saga {} was not inserted", r.id))
                    })?;
                outcome.duplicates.insert(r.id, existing);
            }
        }
    }

    if !batch.updates.is_empty() {
        let u = &batch.updates;
        let updated: HashSet<Uuid> = sqlx::query(
            "UPDATE orchestrator.sagas s
                SET state = u.state, status = u.status, snapshot = u.snapshot,
                    version = u.new_version, updated_at = u.at, parked_on = u.parked_on
               FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
                           $6::jsonb[], $7::timestamptz[], $8::text[])
                 AS u(id, old_version, new_version, state, status, snapshot, at, parked_on)
              WHERE s.id = u.id AND s.version = u.old_version
          RETURNING s.id",
        )
        .bind(uuids(u.iter().map(|r| &r.id)))
        .bind(u.iter().map(|r| r.old_version).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.new_version).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.state.clone()).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.status.clone()).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.snapshot.clone()).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.at).collect::<Vec<_>>())
        .bind(u.iter().map(|r| r.parked_on.clone()).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.get::<Uuid, _>(0))
        .collect();
        outcome.conflicted = u
            .iter()
            .filter(|r| !updated.contains(&r.id.as_uuid()))
            .map(|r| r.id)
            .collect();
    }

    let keep =
        |id: &SagaId| !outcome.conflicted.contains(id) && !outcome.duplicates.contains_key(id);

    let events: Vec<&EventRow> = batch.events.iter().filter(|e| keep(&e.saga_id)).collect();
    if !events.is_empty() {
        sqlx::query(
            "INSERT INTO orchestrator.saga_events (saga_id, seq, kind, input, effects, state_after, at, blocked)
             SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::jsonb[], $5::jsonb[],
                                  $6::text[], $7::timestamptz[], $8::jsonb[])",
        )
        .bind(uuids(events.iter().map(|e| &e.saga_id)))
        .bind(events.iter().map(|e| e.seq).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.input.clone()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.effects.clone()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.state_after.clone()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.at).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.blocked.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }

    let outbox: Vec<&OutboxRow> = batch.outbox.iter().filter(|o| keep(&o.saga_id)).collect();
    if !outbox.is_empty() {
        let now = Utc::now();
        let ids: HashMap<String, i64> = sqlx::query(
            "INSERT INTO orchestrator.outbox (saga_id, msg_id, subject, correlation_id, payload, created_at)
             SELECT u.*, $6 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[]) AS u
             RETURNING msg_id, id",
        )
        .bind(uuids(outbox.iter().map(|o| &o.saga_id)))
        .bind(outbox.iter().map(|o| o.msg_id.clone()).collect::<Vec<_>>())
        .bind(outbox.iter().map(|o| o.subject.clone()).collect::<Vec<_>>())
        .bind(outbox.iter().map(|o| o.correlation_id.clone()).collect::<Vec<_>>())
        .bind(outbox.iter().map(|o| o.payload.clone()).collect::<Vec<_>>())
        .bind(now)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect();
        for o in outbox {
            let id = ids.get(&o.msg_id).copied().ok_or_else(|| {
                sqlx::Error::Protocol(format!("outbox row {} was not inserted", o.msg_id))
            })?;
            outcome
                .outbox
                .entry(o.saga_id)
                .or_default()
                .push(relay::Message {
                    id,
                    subject: o.subject.clone(),
                    msg_id: o.msg_id.clone(),
                    correlation_id: o.correlation_id.clone(),
                    payload: Bytes::from(o.payload.clone()),
                });
        }
    }

    // A fired timer is consumed, unless the transition set it again (the upsert below).
    let fired: Vec<&(SagaId, FiredTimer)> = batch.fired.iter().filter(|(id, _)| keep(id)).collect();
    if !fired.is_empty() {
        sqlx::query(
            "DELETE FROM orchestrator.timers t
              USING unnest($1::uuid[], $2::text[], $3::timestamptz[]) AS u(saga_id, key, fire_at)
              WHERE t.saga_id = u.saga_id AND t.key = u.key AND t.fire_at = u.fire_at",
        )
        .bind(uuids(fired.iter().map(|(id, _)| id)))
        .bind(fired.iter().map(|(_, f)| f.key.clone()).collect::<Vec<_>>())
        .bind(fired.iter().map(|(_, f)| f.fire_at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }

    let mut set = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut cancel = (Vec::new(), Vec::new());
    for (id, key, op) in batch.timers.iter().filter(|(id, _, _)| keep(id)) {
        match op {
            TimerOp::Set { timer, at } => {
                set.0.push(id.as_uuid());
                set.1.push(key.clone());
                set.2.push(*at);
                set.3.push(timer.clone());
            }
            TimerOp::Cancel => {
                cancel.0.push(id.as_uuid());
                cancel.1.push(key.clone());
            }
        }
    }
    if !set.0.is_empty() {
        sqlx::query(
            "INSERT INTO orchestrator.timers (saga_id, key, fire_at, timer)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::jsonb[])
             ON CONFLICT (saga_id, key) DO UPDATE
                SET fire_at = excluded.fire_at, timer = excluded.timer, leased_until = NULL",
        )
        .bind(&set.0)
        .bind(&set.1)
        .bind(&set.2)
        .bind(&set.3)
        .execute(&mut *tx)
        .await?;
    }
    if !cancel.0.is_empty() {
        sqlx::query(
            "DELETE FROM orchestrator.timers t
              USING unnest($1::uuid[], $2::text[]) AS u(saga_id, key)
              WHERE t.saga_id = u.saga_id AND t.key = u.key",
        )
        .bind(&cancel.0)
        .bind(&cancel.1)
        .execute(&mut *tx)
        .await?;
    }

    tx.commit().await?;
    Ok(outcome)
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

/// A saga and its event log.
pub async fn load_record(
    pool: &PgPool,
    id: SagaId,
) -> Result<Option<(SagaRecord, Vec<EventRow>)>, sqlx::Error> {
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {RECORD_COLUMNS} FROM orchestrator.sagas WHERE id = $1"
    )))
    .bind(id.as_uuid())
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let events = sqlx::query(
        "SELECT saga_id, seq, kind, input, effects, state_after, at, blocked
           FROM orchestrator.saga_events WHERE saga_id = $1 ORDER BY seq",
    )
    .bind(id.as_uuid())
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| EventRow {
        saga_id: SagaId::from_uuid(r.get(0)),
        seq: r.get(1),
        kind: r.get(2),
        input: r.get(3),
        effects: r.get(4),
        state_after: r.get(5),
        at: r.get(6),
        blocked: r.get(7),
    })
    .collect();
    Ok(Some((record(&row), events)))
}

/// The newest sagas, optionally of one status, created before `before`.
pub async fn list_records(
    pool: &PgPool,
    status: Option<Status>,
    before: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<SagaRecord>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {RECORD_COLUMNS} FROM orchestrator.sagas
          WHERE ($1::text IS NULL OR status = $1)
            AND ($2::timestamptz IS NULL OR created_at < $2)
          ORDER BY created_at DESC LIMIT $3"
    )))
    .bind(status.map(|s| s.as_str()))
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
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
