//! The engine: load a saga, feed it inputs, and commit the new snapshot, the event-log rows,
//! the outbox rows, the timers, the secrets and the read-model rows in ONE statement guarded by the saga's version. Only after
//! the commit does anything leave the process (the outbox rows go to the relay, the callers get
//! their answers).
//!
//! Sagas are partitioned over shards by id. A shard is a single task that takes every request
//! waiting in its queue (up to `max_batch`), applies them in memory, and writes them with one
//! statement (`store::CommitStatement`, an `unnest` of arrays per table): while one transaction commits, the next batch gathers. That is where the
//! throughput comes from. A shard keeps the sagas it touched in a cache; the version check makes
//! the cache safe even with several orchestrators: a stale entry fails the check, is reloaded
//! and the input is applied again.
//!
//! The engine knows saga types only through [`sagas::api`]; a new type needs no change here.

mod shard;
mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sagas::api::{Input, Registry, Status};
use sagas::wire::{SagaId, Subjects};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::breakers::Breakers;
use crate::config;
use crate::metrics::Metrics;
use crate::partitions::Ownership;
use crate::relay;

pub use store::{EventRow, SagaRecord, list_records, load_record};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("database error: {0}")]
    Database(Arc<sqlx::Error>),
    #[error("unknown saga type {0:?}")]
    UnknownType(String),
    #[error("{0}")]
    InvalidStart(String),
    #[error("stored saga {id} cannot be read: {reason}")]
    Corrupt { id: SagaId, reason: String },
    #[error("saga {0} is modified concurrently too often; try again")]
    Contention(SagaId),
    #[error("the engine is shutting down")]
    Stopped,
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Database(Arc::new(e))
    }
}

/// A client's idempotency key with a digest of its request, so that a key reused with another
/// request is told apart from a retry. A key is unique within its scope (the client it
/// belongs to): the same key in another scope is another request.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub scope: String,
    pub key: String,
    pub request_hash: Vec<u8>,
}

/// A saga to start.
#[derive(Debug, Clone)]
pub struct NewSaga {
    pub saga_type: String,
    pub request: serde_json::Value,
    pub correlation_id: String,
    pub idempotency: Option<Idempotency>,
    /// What the saga's steps need and nobody may see (a payment token), by name: written with
    /// the saga in its first commit to `orchestrator.saga_secrets`, never into its snapshot,
    /// event log or messages, and deleted by the commit that ends it.
    pub secrets: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    Created {
        id: SagaId,
        status: Status,
    },
    /// The key was used before with the same request: that saga.
    Existing {
        id: SagaId,
        status: Status,
    },
    /// The key was used before with another request.
    KeyReused {
        id: SagaId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Applied { status: Status, state: &'static str },
    Ignored(String),
    NotFound,
}

/// A timer row claimed by the timer loop; the commit that applies (or ignores) it removes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredTimer {
    pub key: String,
    pub fire_at: chrono::DateTime<chrono::Utc>,
}

/// Where an input came from.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub correlation_id: Option<String>,
    pub fired_timer: Option<FiredTimer>,
    /// Apply the input as if this step's breaker were closed: the half-open probe.
    pub unblock: Option<String>,
}

enum Request {
    Start {
        id: SagaId,
        new: NewSaga,
        reply: oneshot::Sender<Result<Started, Error>>,
    },
    Apply {
        id: SagaId,
        input: Input,
        origin: Origin,
        reply: oneshot::Sender<Result<Applied, Error>>,
    },
}

impl Request {
    fn saga_id(&self) -> SagaId {
        match self {
            Request::Start { id, .. } | Request::Apply { id, .. } => *id,
        }
    }

    fn fail(self, e: Error) {
        match self {
            Request::Start { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Request::Apply { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// Who waits for a saga to end (long polls, `Prefer: wait`).
#[derive(Default)]
pub struct Watchers {
    waiting: Mutex<HashMap<SagaId, Vec<oneshot::Sender<Status>>>>,
    /// Cancelled when the process stops: waiters answer with what they have at once, so that
    /// a graceful shutdown does not wait out their long polls (the sagas they wait for cannot
    /// end while the reply consumer and the timer loop are stopping).
    released: tokio_util::sync::CancellationToken,
}

/// A waiter's registration: it gets the status when the saga ends through this process, and
/// unregisters itself when dropped, however the waiting ends (an answer, a timeout, a client
/// that went away and took the request's future with it).
pub struct Watch {
    id: SagaId,
    rx: oneshot::Receiver<Status>,
    watchers: Arc<Watchers>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.rx.close();
        self.watchers.forget(self.id);
    }
}

impl Watchers {
    fn watch(self: &Arc<Self>, id: SagaId) -> Watch {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("watchers lock")
            .entry(id)
            .or_default()
            .push(tx);
        Watch {
            id,
            rx,
            watchers: self.clone(),
        }
    }

    fn ended(&self, id: SagaId, status: Status) {
        let waiting = self.waiting.lock().expect("watchers lock").remove(&id);
        for tx in waiting.into_iter().flatten() {
            let _ = tx.send(status);
        }
    }

    /// Drop the registrations of waiters that gave up.
    fn forget(&self, id: SagaId) {
        let mut waiting = self.waiting.lock().expect("watchers lock");
        if let Some(list) = waiting.get_mut(&id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiting.remove(&id);
            }
        }
    }

    /// Answer every waiter now and every later one at once: the process is stopping.
    pub fn release(&self) {
        self.released.cancel();
    }
}

/// A handle to the engine; cheap to clone. The shards stop when every handle is dropped, after
/// finishing what is queued.
#[derive(Clone)]
pub struct Engine {
    shards: Arc<Vec<mpsc::Sender<Request>>>,
    watchers: Arc<Watchers>,
    ownership: Ownership,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        pool: sqlx::PgPool,
        registry: Registry,
        subjects: Subjects,
        relay: relay::Handle,
        breakers: Arc<Breakers>,
        metrics: Metrics,
        settings: &config::Engine,
        ownership: Ownership,
    ) -> (Engine, Vec<JoinHandle<()>>) {
        let commit = Arc::new(store::CommitStatement::new(&registry.projections()));
        let registry = Arc::new(registry);
        let watchers = Arc::new(Watchers::default());
        let mut senders = Vec::with_capacity(settings.shards);
        let mut tasks = Vec::with_capacity(settings.shards);
        for index in 0..settings.shards {
            let (tx, rx) = mpsc::channel(settings.max_batch * 4);
            senders.push(tx);
            let shard = shard::Shard::new(
                index,
                pool.clone(),
                registry.clone(),
                commit.clone(),
                subjects.clone(),
                relay.clone(),
                watchers.clone(),
                breakers.clone(),
                metrics.clone(),
                settings.max_batch,
                settings.pipeline,
                settings.cache_capacity,
                ownership.clone(),
            );
            tasks.push(tokio::spawn(shard.run(rx)));
        }
        (
            Engine {
                shards: Arc::new(senders),
                watchers,
                ownership,
            },
            tasks,
        )
    }

    fn shard(&self, id: SagaId) -> &mpsc::Sender<Request> {
        // UUID v7 ids start with the time; the random tail spreads sagas evenly.
        let n = id.as_uuid().as_u128() as u64;
        &self.shards[(n % self.shards.len() as u64) as usize]
    }

    /// Start a saga. With an idempotency key, a second start with the same key returns the
    /// first saga and writes nothing.
    pub async fn start(&self, new: NewSaga) -> Result<Started, Error> {
        self.start_watched(new, false).await.map(|(s, _)| s)
    }

    /// Start a saga and, with `watch`, get a receiver of its terminal status. The watch is set
    /// before the saga exists, so no ending can be missed.
    pub async fn start_watched(
        &self,
        new: NewSaga,
        watch: bool,
    ) -> Result<(Started, Option<Watch>), Error> {
        // In a partition of this process, so that the replies come back here.
        let id = self.ownership.new_id();
        let watched = watch.then(|| self.watchers.watch(id));
        let (reply, rx) = oneshot::channel();
        let sent = self
            .shard(id)
            .send(Request::Start { id, new, reply })
            .await
            .map_err(|_| Error::Stopped);
        let started = match sent {
            Ok(()) => rx.await.map_err(|_| Error::Stopped).and_then(|r| r),
            Err(e) => Err(e),
        };
        match started {
            Ok(s @ Started::Created { .. }) => Ok((s, watched)),
            // No saga with this id will ever end: the watch is dropped.
            other => other.map(|s| (s, None)),
        }
    }

    /// Wait until saga `id` ended or `within` passed; the terminal status if it ended. Endings
    /// committed by this process wake the waiter at once; the database is asked every second
    /// too, for sagas another orchestrator finishes. A saga that does not exist is not waited
    /// for (`None` at once), unless `watch` says this process just started it. When the
    /// process stops, waiting ends at once with `None`.
    pub async fn wait_ended(
        &self,
        pool: &sqlx::PgPool,
        id: SagaId,
        within: std::time::Duration,
        watch: Option<Watch>,
    ) -> Result<Option<Status>, Error> {
        let deadline = tokio::time::Instant::now() + within;
        let fresh = watch.is_some();
        let mut watch = watch.unwrap_or_else(|| self.watchers.watch(id));
        let mut check_now = !fresh;
        loop {
            if check_now {
                match store::status(pool, id).await {
                    Ok(Some(status)) if status.is_terminal() => return Ok(Some(status)),
                    Ok(None) if !fresh => return Ok(None),
                    Ok(_) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            check_now = true;
            let now = tokio::time::Instant::now();
            if now >= deadline || self.watchers.released.is_cancelled() {
                return Ok(None);
            }
            let nap = (deadline - now).min(std::time::Duration::from_secs(1));
            tokio::select! {
                ended = &mut watch.rx => match ended {
                    Ok(status) => return Ok(Some(status)),
                    // The sender went away (its shard stopped): fall back to the database.
                    Err(_) => watch = self.watchers.watch(id),
                },
                _ = tokio::time::sleep(nap) => {}
                _ = self.watchers.released.cancelled() => {}
            }
        }
    }

    /// Feed one input to a saga and wait until its effect is committed.
    pub async fn apply(&self, id: SagaId, input: Input, origin: Origin) -> Result<Applied, Error> {
        let (reply, rx) = oneshot::channel();
        self.shard(id)
            .send(Request::Apply {
                id,
                input,
                origin,
                reply,
            })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Which partitions this process holds.
    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    /// The process is stopping: answer every waiter now.
    pub fn release_waiters(&self) {
        self.watchers.release();
    }
}

/// Replay a saga's event log through its machine and return the snapshot it gives; the stored
/// snapshot must be equal (an invariant the tests check for every saga, and an operator can
/// check with `GET /sagas/{id}/verify`).
pub fn replay(
    registry: &Registry,
    saga_type: &str,
    id: SagaId,
    events: &[EventRow],
) -> Result<serde_json::Value, String> {
    use sagas::api::{Env, Verdict};
    let t = registry
        .get(saga_type)
        .ok_or_else(|| format!("unknown saga type {saga_type:?}"))?;
    let env = |e: &EventRow| -> Result<Env, String> {
        Ok(Env {
            now: e.at,
            blocked: match &e.blocked {
                Some(b) => serde_json::from_value(b.clone()).map_err(|e| e.to_string())?,
                None => Default::default(),
            },
        })
    };
    let (first, rest) = events.split_first().ok_or("the event log is empty")?;
    let (mut saga, _) = t
        .start(id, &first.input, &env(first)?)
        .map_err(|e| format!("event 1 (start): {e}"))?;
    for (i, e) in rest.iter().enumerate() {
        if e.seq as usize != i + 2 {
            return Err(format!("the event log has a gap before seq {}", e.seq));
        }
        let input: Input = serde_json::from_value(e.input.clone())
            .map_err(|err| format!("event {}: {err}", e.seq))?;
        if let Verdict::Ignored(why) = saga.apply(&input, &env(e)?) {
            return Err(format!("event {} was ignored on replay: {why}", e.seq));
        }
    }
    Ok(saga.snapshot())
}
