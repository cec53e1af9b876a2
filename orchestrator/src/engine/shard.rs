//! One shard: a single writer for the sagas whose id maps to it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use chrono::{SubsecRound, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sagas::api::{Effect, Env, Input, Registry, Saga, Verdict};
use sagas::wire::{SagaId, Subjects};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::store::{
    self, Batch, EventWrite, NewSagaRow, OutboxRow, TimerOp, TimerWrite, UpdateRow,
};
use super::{Applied, Error, FiredTimer, Request, Started, Watchers};
use crate::breakers::Breakers;
use crate::metrics::Metrics;
use crate::partitions::{Owned, Ownership};
use crate::relay;

/// How often a batch is re-run for the sagas that lost an optimistic-lock race.
const MAX_ROUNDS: usize = 5;

/// A second transaction starts while one commits only when at least this many inputs wait:
/// below that, waiting for the first makes a bigger (cheaper per input) batch.
const PIPELINE_MIN: usize = 8;

/// A live saga as the shard keeps it.
struct Entry {
    saga: Box<dyn Saga>,
    saga_type: &'static str,
    version: i64,
    correlation_id: String,
    /// The read-model rows last written for it (table and JSON text), so that a transition
    /// writes only the rows it changed (an order's status, not its lines). Empty after a load:
    /// the next change writes them all again (and the upsert skips those that are the same).
    projected: Vec<(&'static str, String)>,
    /// The status and revision ([`Saga::revision`]) the rows were last computed at: while they
    /// stay the same, the rows cannot have changed and are not computed again.
    projected_mark: Option<(sagas::api::Status, u64)>,
    /// When this process last dispatched a command of the saga: a reply to it measures the
    /// step's round trip (`saga_step_seconds`). Unknown after a load: that reply is not timed.
    dispatched_at: Option<std::time::Instant>,
    /// The saga's partition: its commands name it, so that the replies go to its owner.
    partition: u32,
}

/// A batch applied in memory, ready to commit.
struct Prepared {
    work: HashMap<SagaId, Work>,
    followers: Vec<(Request, SagaId)>,
    batch: Batch,
    inputs: usize,
}

/// What one round does to one saga.
struct Work {
    entry: Entry,
    /// The version in the database before this round; `None` for a saga created in it.
    base_version: Option<i64>,
    events: Vec<EventWrite>,
    outbox: Vec<OutboxRow>,
    timers: BTreeMap<String, TimerOp>,
    fired: Vec<FiredTimer>,
    requests: Vec<Request>,
    answers: Vec<Answer>,
    idempotency: Option<super::Idempotency>,
    /// The secrets of a saga created in this round.
    secrets: Vec<(String, String)>,
    changed: bool,
    /// What the applied inputs say about the health of their steps, for the breakers once the
    /// commit went through (a re-applied or failed batch must not count twice).
    health: Vec<(String, bool)>,
    /// What the applied inputs did, for the metrics once the commit went through.
    observed: Vec<Observed>,
}

/// A dispatch or a reply, for the step metrics.
enum Observed {
    Dispatch {
        step: String,
        phase: sagas::wire::Phase,
        attempt: u32,
        dispatch: u32,
    },
    Reply {
        step: String,
        phase: sagas::wire::Phase,
        seconds: Option<f64>,
    },
}

enum Answer {
    Started(Started),
    Applied(Applied),
}

pub(super) struct Shard {
    index: usize,
    pool: sqlx::PgPool,
    registry: Arc<Registry>,
    commit: Arc<store::CommitStatement>,
    subjects: Subjects,
    relay: relay::Handle,
    watchers: Arc<Watchers>,
    breakers: Arc<Breakers>,
    metrics: Metrics,
    max_batch: usize,
    pipeline: usize,
    cache_capacity: usize,
    cache: HashMap<SagaId, Entry>,
    ownership: Ownership,
    /// The partitions held when the cache was last trimmed to them.
    cached_for: Arc<Owned>,
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        index: usize,
        pool: sqlx::PgPool,
        registry: Arc<Registry>,
        commit: Arc<store::CommitStatement>,
        subjects: Subjects,
        relay: relay::Handle,
        watchers: Arc<Watchers>,
        breakers: Arc<Breakers>,
        metrics: Metrics,
        max_batch: usize,
        pipeline: usize,
        cache_capacity: usize,
        ownership: Ownership,
    ) -> Self {
        Self {
            index,
            pool,
            registry,
            commit,
            subjects,
            relay,
            watchers,
            breakers,
            metrics,
            max_batch,
            pipeline,
            cache_capacity,
            cache: HashMap::new(),
            cached_for: ownership.current(),
            ownership,
        }
    }

    /// The shard's loop. Requests gather while a batch commits, so batches grow with the load
    /// (group commit). Under heavy load a second batch of *other* sagas is applied and
    /// committed while the first one is still committing (`pipeline` commits at most at once);
    /// a request for a saga whose batch is in flight waits for it. Batches in flight never
    /// share a saga, so one failing never affects another.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let span = tracing::info_span!("shard", shard = self.index);
        async move {
            let mut pending: VecDeque<(Request, usize)> = VecDeque::new();
            let mut in_flight: HashSet<SagaId> = HashSet::new();
            let mut commits = FuturesUnordered::new();
            let mut buffer = Vec::with_capacity(self.max_batch);
            let mut closed = false;
            loop {
                // Start a batch when nothing commits, or when enough waits to be worth a
                // second transaction.
                let room = commits.len() < self.pipeline
                    && (commits.is_empty() || pending.len() >= PIPELINE_MIN);
                if room && !pending.is_empty() {
                    let mut batch = Vec::new();
                    let mut deferred = VecDeque::new();
                    while let Some((r, round)) = pending.pop_front() {
                        if in_flight.contains(&r.saga_id()) || batch.len() >= self.max_batch {
                            deferred.push_back((r, round));
                        } else {
                            batch.push((r, round));
                        }
                    }
                    pending = deferred;
                    if !batch.is_empty() {
                        let rounds: HashMap<SagaId, usize> =
                            batch.iter().map(|(r, n)| (r.saga_id(), *n)).collect();
                        let requests = batch.into_iter().map(|(r, _)| r).collect();
                        if let Some(mut prepared) = self.prepare(requests).await {
                            in_flight.extend(prepared.work.keys().copied());
                            let pool = self.pool.clone();
                            let statement = self.commit.clone();
                            // Rows the relay published go out with this commit; if it fails,
                            // they are handed back for the next one.
                            prepared.batch.published = self.relay.take_acked();
                            let published = prepared.batch.published.clone();
                            commits.push(async move {
                                let started = std::time::Instant::now();
                                let result = statement.run(&pool, prepared.batch).await;
                                (prepared.work, prepared.followers, prepared.inputs, rounds, started, result, published)
                            });
                        }
                        continue;
                    }
                }
                if closed && commits.is_empty() && pending.is_empty() {
                    break;
                }
                tokio::select! {
                    Some((work, followers, inputs, rounds, started, result, published)) = commits.next(), if !commits.is_empty() => {
                        self.metrics.batch(inputs, started.elapsed().as_secs_f64());
                        if result.is_err() {
                            self.relay.untake(published);
                        }
                        for id in work.keys() {
                            in_flight.remove(id);
                        }
                        for r in self.finish(work, followers, result) {
                            let id = r.saga_id();
                            let round = rounds.get(&id).copied().unwrap_or(0) + 1;
                            if round >= MAX_ROUNDS {
                                r.fail(Error::Contention(id));
                            } else {
                                pending.push_front((r, round));
                            }
                        }
                    }
                    n = rx.recv_many(&mut buffer, self.max_batch), if !closed => {
                        if n == 0 {
                            closed = true;
                        }
                        pending.extend(buffer.drain(..).map(|r| (r, 0)));
                    }
                    else => {}
                }
            }
            tracing::debug!("shard stopped");
        }
        .instrument(span)
        .await
    }

    /// Apply a batch in memory and turn it into rows. Requests that need no write (an invalid
    /// start, an unknown saga) are answered here.
    async fn prepare(&mut self, requests: Vec<Request>) -> Option<Prepared> {
        // The machine gets the time at PostgreSQL's precision, so that what the event log
        // stores is exactly what the machine saw, and a replay gives the same snapshot.
        let env = Env {
            now: Utc::now().trunc_subsecs(6),
            blocked: self.breakers.blocked(),
        };
        let inputs = requests.len();
        let owned = self.ownership.current();
        if !Arc::ptr_eq(&owned, &self.cached_for) {
            // Partitions moved: another orchestrator writes the sagas of those we gave up, so
            // their copies here would only go stale.
            self.cache.retain(|_, e| owned.holds(e.partition));
            self.cached_for = owned.clone();
        }
        let unreadable = match self.load_missing(&requests).await {
            Ok(unreadable) => unreadable,
            Err(e) => {
                for r in requests {
                    r.fail(e.clone());
                }
                return None;
            }
        };
        let mut work: HashMap<SagaId, Work> = HashMap::new();
        // Keys started in this batch: a second start with one of them waits for the first.
        let mut keys: HashMap<(String, String), SagaId> = HashMap::new();
        let mut key_followers: Vec<(Request, SagaId)> = Vec::new();
        for request in requests {
            match request {
                Request::Start { id, new, reply } => {
                    if let Some(idem) = &new.idempotency
                        && let Some(first) = keys.get(&(idem.scope.clone(), idem.key.clone()))
                    {
                        let first = *first;
                        key_followers.push((Request::Start { id, new, reply }, first));
                        continue;
                    }
                    match self.start(id, &new, &env) {
                        Ok(mut w) => {
                            if let Some(idem) = &new.idempotency {
                                keys.insert((idem.scope.clone(), idem.key.clone()), id);
                            }
                            let status = w.entry.saga.status();
                            w.answers
                                .push(Answer::Started(Started::Created { id, status }));
                            w.requests.push(Request::Start { id, new, reply });
                            work.insert(id, w);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Request::Apply {
                    id,
                    input,
                    origin,
                    reply,
                } => {
                    let w = match work.get_mut(&id) {
                        Some(w) => w,
                        None => match self.cache.remove(&id) {
                            Some(entry) => work.entry(id).or_insert(Work::new(entry, true)),
                            None => {
                                let _ = reply.send(match unreadable.get(&id) {
                                    Some(reason) => Err(Error::Corrupt {
                                        id,
                                        reason: reason.clone(),
                                    }),
                                    None => Ok(Applied::NotFound),
                                });
                                continue;
                            }
                        },
                    };
                    let answer = if let Some(step) = &origin.unblock {
                        // The half-open probe goes through the breaker it probes.
                        let mut probe = env.clone();
                        probe.blocked.remove(step);
                        w.apply(&self.subjects, &input, &origin, &probe)
                    } else {
                        w.apply(&self.subjects, &input, &origin, &env)
                    };
                    self.metrics
                        .input(input.kind(), matches!(answer, Applied::Applied { .. }));
                    w.answers.push(Answer::Applied(answer));
                    w.requests.push(Request::Apply {
                        id,
                        input,
                        origin,
                        reply,
                    });
                }
            }
        }

        let mut batch = Batch::build(&mut work, env.now);
        // The owned partitions written to are fenced at the epochs held; the others (not ours)
        // are guarded by the version check alone.
        let fence: std::collections::BTreeSet<u32> = work
            .values()
            .map(|w| w.entry.partition)
            .filter(|p| owned.holds(*p))
            .collect();
        batch.fence = fence.into_iter().map(|p| (p, owned.epochs[&p])).collect();
        Some(Prepared {
            work,
            followers: key_followers,
            batch,
            inputs,
        })
    }

    /// Answer a committed (or failed) batch. Returns the requests of sagas that lost a version
    /// race, to be applied again on a fresh copy.
    fn finish(
        &mut self,
        work: HashMap<SagaId, Work>,
        key_followers: Vec<(Request, SagaId)>,
        result: Result<store::Outcome, sqlx::Error>,
    ) -> Vec<Request> {
        match result {
            Err(e) => {
                self.metrics.commit_failed();
                tracing::error!(error = %e, sagas = work.len(), "batch commit failed");
                let e = Error::from(e);
                for (_, w) in work {
                    for r in w.requests {
                        r.fail(e.clone());
                    }
                }
                for (r, _) in key_followers {
                    r.fail(e.clone());
                }
                // The sagas taken out of the cache are dropped: they are reloaded next time.
                Vec::new()
            }
            Ok(outcome) => self.after_commit(work, key_followers, outcome),
        }
    }

    fn after_commit(
        &mut self,
        work: HashMap<SagaId, Work>,
        key_followers: Vec<(Request, SagaId)>,
        outcome: store::Outcome,
    ) -> Vec<Request> {
        let mut retry = Vec::new();
        let mut published = Vec::new();
        // Who holds each idempotency key started in this batch, for the followers.
        let mut holders: HashMap<SagaId, store::Existing> = HashMap::new();
        let owned = self.ownership.current();
        if !outcome.lost.is_empty() {
            // Fenced off: another orchestrator took these partitions. Nothing was written; the
            // inputs are applied again on fresh copies, as a non-owner's.
            tracing::warn!(partitions = ?outcome.lost, "commit fenced off: partition leases lost");
            self.ownership.lost(&outcome.lost);
        } else {
            self.metrics.conflicts(outcome.conflicted.len());
        }
        for (id, mut w) in work {
            if outcome.conflicted.contains(&id) {
                tracing::debug!(saga_id = %id, "version conflict; reloading");
                retry.extend(w.requests);
                continue;
            }
            if let Some(existing) = outcome.duplicates.get(&id) {
                // The idempotency key was already taken: nothing of this saga was written.
                for r in w.requests {
                    answer_duplicate(r, w.idempotency.as_ref(), existing);
                }
                holders.insert(id, existing.clone());
                continue;
            }
            if let Some(rows) = outcome.outbox.get(&id) {
                published.extend(rows.iter().cloned());
            }
            for (step, ok) in w.health.drain(..) {
                self.breakers.record(&step, id, ok);
            }
            for o in w.observed.drain(..) {
                match o {
                    Observed::Dispatch {
                        step,
                        phase,
                        attempt,
                        dispatch,
                    } => self.metrics.dispatched(
                        w.entry.saga_type,
                        &step,
                        phase.as_str(),
                        attempt,
                        dispatch,
                    ),
                    Observed::Reply {
                        step,
                        phase,
                        seconds,
                    } => self
                        .metrics
                        .replied(w.entry.saga_type, &step, phase.as_str(), seconds),
                }
            }
            let status = w.entry.saga.status();
            if w.base_version.is_none()
                && let Some(idem) = &w.idempotency
            {
                holders.insert(
                    id,
                    store::Existing {
                        id,
                        status,
                        request_hash: Some(idem.request_hash.clone()),
                    },
                );
            }
            for (request, answer) in w.requests.drain(..).zip(w.answers.drain(..)) {
                match (request, answer) {
                    (Request::Start { reply, .. }, Answer::Started(s)) => {
                        let _ = reply.send(Ok(s));
                    }
                    (Request::Apply { reply, .. }, Answer::Applied(a)) => {
                        let _ = reply.send(Ok(a));
                    }
                    _ => unreachable!("answers follow their requests"),
                }
            }
            if w.base_version.is_none() {
                self.metrics.started(1);
                runtime::telemetry::saga_started(
                    id.as_uuid(),
                    w.entry.saga_type,
                    &w.entry.correlation_id,
                    std::time::SystemTime::now(),
                );
            }
            if w.changed && status.is_terminal() {
                self.metrics.ended(status.as_str());
                self.watchers.ended(id, status);
            } else if !owned.holds(w.entry.partition) {
                // Another orchestrator's (or nobody's yet): not kept, it would go stale.
            } else {
                self.cache.insert(id, w.entry);
            }
        }
        for (r, first) in key_followers {
            match holders.get(&first) {
                Some(holder) => {
                    let idem = match &r {
                        Request::Start { new, .. } => new.idempotency.clone(),
                        Request::Apply { .. } => unreachable!("followers are starts"),
                    };
                    answer_duplicate(r, idem.as_ref(), holder);
                }
                // The first start failed (it was answered with the error): try again.
                None => retry.push(r),
            }
        }
        if !published.is_empty() {
            self.relay.publish(published);
        }
        self.trim_cache();
        retry
    }

    fn trim_cache(&mut self) {
        if self.cache.len() > self.cache_capacity {
            let excess = self.cache.len() - self.cache_capacity / 2;
            let victims: Vec<SagaId> = self.cache.keys().take(excess).copied().collect();
            for id in victims {
                self.cache.remove(&id);
            }
        }
    }

    fn start(&self, id: SagaId, new: &super::NewSaga, env: &Env) -> Result<Work, Error> {
        let saga_type = self
            .registry
            .get(new.saga_type.as_str())
            .ok_or_else(|| Error::UnknownType(new.saga_type.clone()))?;
        let (saga, effects) = saga_type
            .start(id, &new.request, env)
            .map_err(|e| Error::InvalidStart(e.to_string()))?;
        let entry = Entry {
            saga,
            saga_type: saga_type.name(),
            version: 1,
            correlation_id: new.correlation_id.clone(),
            projected: Vec::new(),
            projected_mark: None,
            dispatched_at: None,
            partition: self.ownership.partition_of(id),
        };
        let mut w = Work::new(entry, false);
        w.idempotency = new.idempotency.clone();
        w.secrets = new.secrets.clone();
        w.changed = true;
        w.record(
            &self.subjects,
            "started",
            new.request.to_string(),
            &effects,
            env,
        );
        Ok(w)
    }

    /// Read from the database every saga named by an input that the cache does not hold.
    /// Returns the sagas that exist but cannot be restored (an unknown type, a snapshot this
    /// build cannot read), with the reason: their inputs fail with [`Error::Corrupt`] rather
    /// than pass for inputs of an unknown saga.
    async fn load_missing(
        &mut self,
        requests: &[Request],
    ) -> Result<HashMap<SagaId, String>, Error> {
        let mut unreadable = HashMap::new();
        let missing: Vec<SagaId> = requests
            .iter()
            .filter_map(|r| match r {
                Request::Apply { id, .. } if !self.cache.contains_key(id) => Some(*id),
                _ => None,
            })
            .collect();
        if missing.is_empty() {
            return Ok(unreadable);
        }
        for row in store::load(&self.pool, &missing).await? {
            let id = row.id;
            let Some(t) = self.registry.get(row.saga_type.as_str()) else {
                tracing::error!(saga_id = %id, saga_type = %row.saga_type, "unknown saga type");
                unreadable.insert(id, format!("unknown saga type {:?}", row.saga_type));
                continue;
            };
            match t.restore(&row.snapshot) {
                Ok(saga) => {
                    self.cache.insert(
                        id,
                        Entry {
                            saga,
                            saga_type: t.name(),
                            version: row.version,
                            correlation_id: row.correlation_id,
                            projected: Vec::new(),
                            projected_mark: None,
                            dispatched_at: None,
                            partition: self.ownership.partition_of(id),
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(saga_id = %id, error = %e, "stored saga cannot be restored");
                    unreadable.insert(id, format!("its snapshot cannot be restored: {e}"));
                }
            }
        }
        Ok(unreadable)
    }
}

fn answer_duplicate(r: Request, idem: Option<&super::Idempotency>, existing: &store::Existing) {
    let Request::Start { reply, .. } = r else {
        unreachable!("only new sagas can collide on a key")
    };
    let same = idem.is_some_and(|i| existing.request_hash.as_deref() == Some(&i.request_hash[..]));
    let _ = reply.send(Ok(if same {
        Started::Existing {
            id: existing.id,
            status: existing.status,
        }
    } else {
        Started::KeyReused { id: existing.id }
    }));
}

impl Work {
    fn new(entry: Entry, exists: bool) -> Self {
        let base_version = exists.then_some(entry.version);
        Self {
            entry,
            base_version,
            events: Vec::new(),
            outbox: Vec::new(),
            timers: BTreeMap::new(),
            fired: Vec::new(),
            requests: Vec::new(),
            answers: Vec::new(),
            idempotency: None,
            secrets: Vec::new(),
            changed: false,
            health: Vec::new(),
            observed: Vec::new(),
        }
    }

    fn apply(
        &mut self,
        subjects: &Subjects,
        input: &Input,
        origin: &super::Origin,
        env: &Env,
    ) -> Applied {
        let id = self.entry.saga.id();
        if let Some(fired) = &origin.fired_timer {
            self.fired.push(fired.clone());
        }
        let correlation_id = origin
            .correlation_id
            .as_deref()
            .unwrap_or(&self.entry.correlation_id);
        let span = if runtime::telemetry::tracing_enabled() {
            // A span of the saga's trace per input applied.
            let span = tracing::info_span!("apply", saga_id = %id, correlation_id = %correlation_id,
                input = input.kind());
            runtime::telemetry::join_saga(&span, id.as_uuid());
            span
        } else {
            tracing::debug_span!("apply", saga_id = %id, correlation_id = %correlation_id)
        };
        let _span = span.entered();
        match self.entry.saga.apply(input, env) {
            Verdict::Ignored(why) => {
                // Logged at info, where the debug span above is off: the line names its saga
                // and correlation id itself.
                tracing::info!(saga_id = %id, correlation_id = %correlation_id,
                    input = input.kind(), reason = %why, "input ignored (stale or duplicate)");
                Applied::Ignored(why)
            }
            Verdict::Applied(effects) => {
                self.entry.version += 1;
                self.changed = true;
                if let Input::Reply(reply) = input {
                    self.observed.push(Observed::Reply {
                        step: reply.step.clone(),
                        phase: reply.phase,
                        seconds: self
                            .entry
                            .dispatched_at
                            .take()
                            .map(|t| t.elapsed().as_secs_f64()),
                    });
                }
                let text = serde_json::to_string(input).expect("inputs serialize");
                self.record(subjects, input.kind(), text, &effects, env);
                let status = self.entry.saga.status();
                tracing::debug!(
                    input = input.kind(),
                    state = self.entry.saga.state_name(),
                    status = status.as_str(),
                    "input applied"
                );
                Applied::Applied {
                    status,
                    state: self.entry.saga.state_name(),
                }
            }
        }
    }

    /// Turn a transition into rows: its event-log row, outbox rows and timer operations.
    fn record(
        &mut self,
        subjects: &Subjects,
        kind: &str,
        input: String,
        effects: &[Effect],
        env: &Env,
    ) {
        let id = self.entry.saga.id();
        for effect in effects {
            match effect {
                Effect::Dispatch(cmd) => {
                    self.entry.dispatched_at = Some(std::time::Instant::now());
                    self.observed.push(Observed::Dispatch {
                        step: cmd.step.clone(),
                        phase: cmd.phase,
                        attempt: cmd.attempt,
                        dispatch: cmd.dispatch,
                    });
                    self.outbox.push(OutboxRow {
                        saga_id: id,
                        msg_id: cmd.msg_id(),
                        subject: subjects.command(&cmd.service),
                        correlation_id: self.entry.correlation_id.clone(),
                        payload: serde_json::to_vec(&sagas::wire::Command {
                            partition: Some(self.entry.partition),
                            ..cmd.clone()
                        })
                        .expect("commands serialize"),
                    });
                }
                Effect::Emit(event) => {
                    // The machine does not know the correlation id; the event carries it.
                    let event = sagas::wire::Event {
                        correlation_id: Some(self.entry.correlation_id.clone()),
                        ..event.clone()
                    };
                    self.outbox.push(OutboxRow {
                        saga_id: id,
                        msg_id: event.id.to_string(),
                        subject: subjects.event(&event),
                        correlation_id: self.entry.correlation_id.clone(),
                        payload: serde_json::to_vec(&event).expect("events serialize"),
                    })
                }
                Effect::SetTimer { name, at, payload } => {
                    self.timers.insert(
                        name.clone(),
                        TimerOp::Set {
                            timer: serde_json::to_string(payload).expect("timers serialize"),
                            at: *at,
                        },
                    );
                }
                Effect::CancelTimer { name } => {
                    self.timers.insert(name.clone(), TimerOp::Cancel);
                }
                Effect::Health { step, ok } => self.health.push((step.clone(), *ok)),
            }
        }
        self.events.push(EventWrite {
            saga_id: id,
            seq: self.entry.version as i32,
            kind: kind.to_owned(),
            input,
            effects: serde_json::to_string(effects).expect("effects serialize"),
            state_after: self.entry.saga.state_name().to_owned(),
            at: env.now,
            blocked: (!env.blocked.is_empty())
                .then(|| serde_json::to_string(&env.blocked).expect("sets serialize")),
        });
    }
}

impl Batch {
    /// Turn the round's work into rows, moving what it recorded (the work keeps its entries
    /// and requests for after the commit).
    fn build(work: &mut HashMap<SagaId, Work>, now: chrono::DateTime<Utc>) -> Batch {
        let mut batch = Batch::default();
        for (id, w) in work.iter_mut() {
            // A fired timer is consumed, unless the transition set or cancelled its key anyway;
            // only if the saga's row was written or its version checked, since a timer that a
            // stale copy ignored may be the one the saga waits for.
            for f in std::mem::take(&mut w.fired) {
                if !w.timers.contains_key(&f.key) {
                    batch.timers.push(TimerWrite::Delete {
                        saga_id: *id,
                        key: f.key,
                        fire_at: Some(f.fire_at),
                    });
                }
            }
            if !w.changed {
                // Every input was ignored. That verdict holds only if our copy is current:
                // another orchestrator may have moved the saga on, and then the reply or timer
                // we ignored is the one it now waits for. The commit checks the version, and
                // a saga that fails the check is reloaded and its inputs applied again.
                if let Some(version) = w.base_version {
                    batch.checks.push((*id, version));
                }
                continue;
            }
            // The rows of the read model the transition changed; none when neither the saga's
            // status nor its data changed since they were last computed.
            let mark = w.entry.saga.revision().map(|r| (w.entry.saga.status(), r));
            let unchanged = mark.is_some() && mark == w.entry.projected_mark;
            w.entry.projected_mark = mark;
            let rows: Vec<(&'static str, String)> = if unchanged {
                w.entry.projected.clone()
            } else {
                w.entry
                    .saga
                    .projection()
                    .into_iter()
                    .map(|r| {
                        let text = serde_json::to_string(&r.row).expect("rows serialize");
                        (r.table, text)
                    })
                    .collect()
            };
            if rows != w.entry.projected {
                for (table, text) in &rows {
                    if !w
                        .entry
                        .projected
                        .iter()
                        .any(|(t, x)| t == table && x == text)
                    {
                        batch
                            .projections
                            .entry(table)
                            .or_default()
                            .push(text.clone());
                    }
                }
                w.entry.projected = rows;
            }
            let saga = &w.entry.saga;
            let status = saga.status();
            for (name, value) in std::mem::take(&mut w.secrets) {
                batch.secrets.push((*id, name, value));
            }
            if status.is_terminal() {
                batch.ended.push(*id);
            }
            match w.base_version {
                None => batch.new_sagas.push(NewSagaRow {
                    id: *id,
                    saga_type: w.entry.saga_type.to_owned(),
                    state: saga.state_name().to_owned(),
                    status: status.as_str().to_owned(),
                    snapshot: saga.snapshot_json(),
                    subject: saga.subject(),
                    parked_on: saga.parked_on().map(str::to_owned),
                    version: w.entry.version,
                    correlation_id: w.entry.correlation_id.clone(),
                    idempotency_scope: w
                        .idempotency
                        .as_ref()
                        .map(|i| i.scope.clone())
                        .unwrap_or_default(),
                    idempotency_key: w.idempotency.as_ref().map(|i| i.key.clone()),
                    request_hash: w.idempotency.as_ref().map(|i| i.request_hash.clone()),
                    at: now,
                }),
                Some(base) => batch.updates.push(UpdateRow {
                    id: *id,
                    old_version: base,
                    new_version: w.entry.version,
                    state: saga.state_name().to_owned(),
                    status: status.as_str().to_owned(),
                    snapshot: saga.snapshot_json(),
                    parked_on: saga.parked_on().map(str::to_owned),
                    at: now,
                }),
            }
            batch.events.append(&mut w.events);
            batch.outbox.append(&mut w.outbox);
            for (key, op) in std::mem::take(&mut w.timers) {
                batch.timers.push(match op {
                    TimerOp::Set { timer, at } => TimerWrite::Set {
                        saga_id: *id,
                        key,
                        at,
                        timer,
                    },
                    TimerOp::Cancel => TimerWrite::Delete {
                        saga_id: *id,
                        key,
                        fire_at: None,
                    },
                });
            }
        }
        batch
    }
}
