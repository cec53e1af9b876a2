//! Prometheus metrics (OpenMetrics text at `GET /metrics`), with the official client.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::breakers;

type Labels = Vec<(&'static str, String)>;

struct Inner {
    registry: Registry,
    inputs: Family<Labels, Counter>,
    sagas_started: Counter,
    sagas_ended: Family<Labels, Counter>,
    batch_inputs: Histogram,
    commit_seconds: Histogram,
    commits_failed: Counter,
    version_conflicts: Counter,
    partitions_owned: Gauge,
    partition_changes: Family<Labels, Counter>,
    published: Counter,
    publish_failures: Counter,
    outbox_rescued: Counter,
    dead_letters: Family<Labels, Counter>,
    timers_fired: Counter,
    breaker_state: Family<Labels, Gauge>,
    breaker_opened: Family<Labels, Counter>,
    resumed: Family<Labels, Counter>,
    dispatches: Family<Labels, Counter>,
    step_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    replies: Family<Labels, Counter>,
    pool_backlog: Family<Labels, Gauge>,
    outbox_rows: Gauge,
    outbox_oldest_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

fn step_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Cheap to clone; every part of the orchestrator records into the same registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("saga");
        let inputs = Family::<Labels, Counter>::default();
        registry.register(
            "inputs",
            "Inputs fed to sagas, by kind and verdict",
            inputs.clone(),
        );
        let sagas_started = Counter::default();
        registry.register("started", "Sagas started", sagas_started.clone());
        let sagas_ended = Family::<Labels, Counter>::default();
        registry.register(
            "ended",
            "Sagas that reached a terminal status",
            sagas_ended.clone(),
        );
        let batch_inputs = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "engine_batch_inputs",
            "Inputs applied per engine transaction",
            batch_inputs.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "engine_commit_seconds",
            "Time to write and commit one batch",
            commit_seconds.clone(),
        );
        let commits_failed = Counter::default();
        registry.register(
            "engine_commits_failed",
            "Batches whose transaction failed",
            commits_failed.clone(),
        );
        let partitions_owned = Gauge::default();
        registry.register(
            "partitions_owned",
            "Partitions whose lease this orchestrator holds",
            partitions_owned.clone(),
        );
        let partition_changes = Family::<Labels, Counter>::default();
        registry.register(
            "partition_changes",
            "Partition leases acquired, released (handed over) and lost (taken after expiry)",
            partition_changes.clone(),
        );
        let version_conflicts = Counter::default();
        registry.register(
            "engine_version_conflicts",
            "Sagas re-applied after losing an optimistic-lock race",
            version_conflicts.clone(),
        );
        let published = Counter::default();
        registry.register(
            "relay_published",
            "Outbox messages acknowledged by JetStream",
            published.clone(),
        );
        let publish_failures = Counter::default();
        registry.register(
            "relay_publish_failures",
            "Outbox messages JetStream did not acknowledge (retried)",
            publish_failures.clone(),
        );
        let outbox_rescued = Counter::default();
        registry.register(
            "relay_rescued",
            "Outbox rows published by the recovery scan",
            outbox_rescued.clone(),
        );
        let dead_letters = Family::<Labels, Counter>::default();
        registry.register(
            "dead_letters",
            "Messages set aside on the dead-letter subject",
            dead_letters.clone(),
        );
        let timers_fired = Counter::default();
        registry.register(
            "timers_fired",
            "Durable timers claimed and fed to their sagas",
            timers_fired.clone(),
        );
        let breaker_state = Family::<Labels, Gauge>::default();
        registry.register(
            "breaker_state",
            "Circuit breaker state per step: 0 closed, 1 half-open, 2 open",
            breaker_state.clone(),
        );
        let breaker_opened = Family::<Labels, Counter>::default();
        registry.register(
            "breaker_opened",
            "Times a step's circuit breaker opened",
            breaker_opened.clone(),
        );
        let resumed = Family::<Labels, Counter>::default();
        registry.register("resumed", "Parked sagas resumed, per step", resumed.clone());
        let dispatches = Family::<Labels, Counter>::default();
        registry.register(
            "step_dispatches",
            "Commands dispatched, per saga type, step and phase (forward or compensation), and \
             kind: first (a step's first attempt), retry (a later attempt, after a failure or \
             an operator's retry) or redispatch (the same attempt sent again after its deadline)",
            dispatches.clone(),
        );
        let step_seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(step_histogram);
        registry.register(
            "step_seconds",
            "From a command's dispatch to the commit of its reply, per saga type, step and phase \
             (replies to commands this process dispatched)",
            step_seconds.clone(),
        );
        let replies = Family::<Labels, Counter>::default();
        registry.register(
            "step_replies",
            "Replies applied, per saga type, step and phase",
            replies.clone(),
        );
        let pool_backlog = Family::<Labels, Gauge>::default();
        registry.register(
            "pool_backlog",
            "Each worker pool's command backlog at the last scrape: pending (not yet delivered) \
             and ack_pending (delivered, not yet acknowledged)",
            pool_backlog.clone(),
        );
        let outbox_rows = Gauge::default();
        registry.register(
            "outbox_rows",
            "Committed messages not yet acknowledged by JetStream, at the last scrape",
            outbox_rows.clone(),
        );
        let outbox_oldest_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "outbox_lag_seconds",
            "Age of the oldest committed message not yet acknowledged by JetStream, at the last \
             scrape (0 when there is none)",
            outbox_oldest_seconds.clone(),
        );
        Metrics(Arc::new(Inner {
            registry,
            inputs,
            sagas_started,
            sagas_ended,
            batch_inputs,
            commit_seconds,
            commits_failed,
            version_conflicts,
            partitions_owned,
            partition_changes,
            published,
            publish_failures,
            outbox_rescued,
            dead_letters,
            timers_fired,
            breaker_state,
            breaker_opened,
            resumed,
            dispatches,
            step_seconds,
            replies,
            pool_backlog,
            outbox_rows,
            outbox_oldest_seconds,
        }))
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.0.registry).expect("metrics encode");
        out
    }

    pub fn input(&self, kind: &str, applied: bool) {
        let verdict = if applied { "applied" } else { "ignored" };
        self.0
            .inputs
            .get_or_create(&vec![
                ("kind", kind.to_owned()),
                ("verdict", verdict.to_owned()),
            ])
            .inc();
    }

    pub fn started(&self, n: u64) {
        self.0.sagas_started.inc_by(n);
    }

    pub fn ended(&self, status: &str) {
        self.0
            .sagas_ended
            .get_or_create(&vec![("status", status.to_owned())])
            .inc();
    }

    pub fn batch(&self, inputs: usize, seconds: f64) {
        self.0.batch_inputs.observe(inputs as f64);
        self.0.commit_seconds.observe(seconds);
    }

    pub fn commit_failed(&self) {
        self.0.commits_failed.inc();
    }

    pub fn partitions_owned(&self, n: usize) {
        self.0.partitions_owned.set(n as i64);
    }

    pub fn partition_change(&self, change: &'static str) {
        self.0
            .partition_changes
            .get_or_create(&vec![("change", change.to_owned())])
            .inc();
    }

    pub fn conflicts(&self, n: usize) {
        self.0.version_conflicts.inc_by(n as u64);
    }

    pub fn published(&self, ok: usize, failed: usize, rescued: bool) {
        self.0.published.inc_by(ok as u64);
        self.0.publish_failures.inc_by(failed as u64);
        if rescued {
            self.0.outbox_rescued.inc_by(ok as u64);
        }
    }

    pub fn dead_letter(&self, origin: &str) {
        self.0
            .dead_letters
            .get_or_create(&vec![("origin", origin.to_owned())])
            .inc();
    }

    pub fn timers_fired(&self, n: usize) {
        self.0.timers_fired.inc_by(n as u64);
    }

    pub fn breaker_state(&self, step: &str, state: breakers::State) {
        self.0
            .breaker_state
            .get_or_create(&vec![("step", step.to_owned())])
            .set(state as i64);
    }

    pub fn breaker_opened(&self, step: &str) {
        self.0
            .breaker_opened
            .get_or_create(&vec![("step", step.to_owned())])
            .inc();
    }

    /// A command was dispatched (committed to the outbox).
    pub fn dispatched(
        &self,
        saga_type: &str,
        step: &str,
        phase: &str,
        attempt: u32,
        dispatch: u32,
    ) {
        let kind = if dispatch > 0 {
            "redispatch"
        } else if attempt > 1 {
            "retry"
        } else {
            "first"
        };
        self.0
            .dispatches
            .get_or_create(&vec![
                ("type", saga_type.to_owned()),
                ("step", step.to_owned()),
                ("phase", phase.to_owned()),
                ("kind", kind.to_owned()),
            ])
            .inc();
    }

    /// A reply was applied; `seconds` since its command's dispatch, when this process knows.
    pub fn replied(&self, saga_type: &str, step: &str, phase: &str, seconds: Option<f64>) {
        let labels = vec![
            ("type", saga_type.to_owned()),
            ("step", step.to_owned()),
            ("phase", phase.to_owned()),
        ];
        if let Some(s) = seconds {
            self.0.step_seconds.get_or_create(&labels).observe(s);
        }
        self.0.replies.get_or_create(&labels).inc();
    }

    /// A pool's backlog, read from its consumer at a scrape.
    pub fn pool_backlog(&self, pool: &str, pending: u64, ack_pending: u64) {
        for (kind, n) in [("pending", pending), ("ack_pending", ack_pending)] {
            self.0
                .pool_backlog
                .get_or_create(&vec![("pool", pool.to_owned()), ("kind", kind.to_owned())])
                .set(n as i64);
        }
    }

    /// The outbox at a scrape: its rows and the age of the oldest.
    pub fn outbox(&self, rows: i64, oldest_seconds: f64) {
        self.0.outbox_rows.set(rows);
        self.0.outbox_oldest_seconds.set(oldest_seconds);
    }

    pub fn resumed(&self, step: &str, n: usize) {
        self.0
            .resumed
            .get_or_create(&vec![("step", step.to_owned())])
            .inc_by(n as u64);
    }
}
