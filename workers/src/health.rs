//! A worker process's own HTTP listener for its operators and its orchestration platform
//! (settings section `health`: `address`, `port`; port 0 runs no listener):
//!
//! - `GET /healthz`: 200 while the process is up and serving HTTP (liveness).
//! - `GET /readyz`: 200 when PostgreSQL answers (for a kind of worker that uses it) and the
//!   JetStream consumer the process serves (its stream, for one without a consumer) can be
//!   read, each within 2 s; otherwise 503, an RFC 9457 problem naming what does not answer.
//!   A process that is still connecting at start-up is not ready.
//! - `GET /metrics`: Prometheus text (OpenMetrics, the official client `prometheus-client`).
//!
//! Every process of a pool has a listener of its own, so each is scraped and probed apart (a
//! deployment gives each its port, or runs each in its own network namespace).
//!
//! # Metrics
//!
//! Counted where a command is handled ([`crate::bus::serve_commands`]), labelled by `service`
//! (the pool):
//!
//! | name | type | what |
//! |---|---|---|
//! | `saga_worker_commands_total{service, outcome}` | counter | commands the handler answered or turned down, by `outcome`: `ok` (succeeded), `retryable` and `permanent` (failed replies), each once its reply is stored; `unavailable` (cannot tell now: handed back for a later delivery), `poison` (dead-lettered, nothing done) |
//! | `saga_worker_command_seconds{service}` | histogram | from a command's arrival to its reply stored (or its hand-back or dead letter) |
//! | `saga_worker_command_failures_total{service, reason}` | counter | what went wrong around the handler: `undecodable` and `misrouted` (dead-lettered), `reply_not_stored` (handed back), `ack_failed` (redelivered; answered again without a second effect) |
//! | `saga_worker_in_flight{service}` | gauge | commands this process holds now |
//! | `saga_worker_backlog{service}` | gauge | the pool's backlog at the scrape: `num_pending + num_ack_pending` of its durable consumer (every process of the pool reports the same pool-wide number) |
//! | `saga_worker_pending{service}` | gauge | `num_pending`: stored, not yet delivered to any process |
//! | `saga_worker_ack_pending{service}` | gauge | `num_ack_pending`: delivered, not yet acknowledged |
//!
//! The event subscribers (`notification`, `order`) report the backlog of their event consumer
//! under their own name as `service`. The backlog is read from the consumer's info at each
//! scrape, within a second; when that fails the three gauges are left out of the answer rather
//! than shown stale.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use runtime::problem::Problem;
use sagas::wire::ReplyOutcome;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Health as Settings;

/// How long a readiness check waits for PostgreSQL or JetStream.
const READY_WITHIN: Duration = Duration::from_secs(2);
/// How long a scrape waits for the consumer's info (the backlog).
const BACKLOG_WITHIN: Duration = Duration::from_secs(1);

/// Why the listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot listen for health and metrics on {addr} (health.address, health.port; \
         port 0 runs no listener): {source}"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("health.address is not an IP address: {0:?}")]
    Address(String),
}

type Labels = Vec<(&'static str, String)>;

/// How a command's handling ended, as `saga_worker_commands_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Retryable,
    Permanent,
    Unavailable,
    Poison,
}

impl Outcome {
    pub fn of(reply: &ReplyOutcome) -> Self {
        match reply {
            ReplyOutcome::Succeeded { .. } => Outcome::Ok,
            ReplyOutcome::Failed {
                retryable: true, ..
            } => Outcome::Retryable,
            ReplyOutcome::Failed {
                retryable: false, ..
            } => Outcome::Permanent,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retryable => "retryable",
            Outcome::Permanent => "permanent",
            Outcome::Unavailable => "unavailable",
            Outcome::Poison => "poison",
        }
    }
}

struct Inner {
    registry: Registry,
    commands: Family<Labels, Counter>,
    seconds: Family<Labels, Histogram, fn() -> Histogram>,
    failures: Family<Labels, Counter>,
    in_flight: Family<Labels, Gauge>,
    backlog: Family<Labels, Gauge>,
    pending: Family<Labels, Gauge>,
    ack_pending: Family<Labels, Gauge>,
}

fn command_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// A worker process's metrics. Cheap to clone; every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("saga_worker");
        let commands = Family::<Labels, Counter>::default();
        registry.register(
            "commands",
            "Commands handled, by service and outcome: ok, retryable, permanent, unavailable \
             (handed back for later), poison (dead-lettered)",
            commands.clone(),
        );
        let seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(command_histogram);
        registry.register(
            "command_seconds",
            "From a command's arrival to its reply stored, hand-back or dead letter",
            seconds.clone(),
        );
        let failures = Family::<Labels, Counter>::default();
        registry.register(
            "command_failures",
            "Commands that went wrong around the handler: undecodable, misrouted, \
             reply_not_stored, ack_failed",
            failures.clone(),
        );
        let in_flight = Family::<Labels, Gauge>::default();
        registry.register(
            "in_flight",
            "Commands this process holds now",
            in_flight.clone(),
        );
        let backlog = Family::<Labels, Gauge>::default();
        registry.register(
            "backlog",
            "The pool's backlog at the scrape: pending plus ack_pending of its durable consumer",
            backlog.clone(),
        );
        let pending = Family::<Labels, Gauge>::default();
        registry.register(
            "pending",
            "Messages of the pool's consumer not yet delivered, at the scrape",
            pending.clone(),
        );
        let ack_pending = Family::<Labels, Gauge>::default();
        registry.register(
            "ack_pending",
            "Messages of the pool's consumer delivered and not yet acknowledged, at the scrape",
            ack_pending.clone(),
        );
        Metrics(Arc::new(Inner {
            registry,
            commands,
            seconds,
            failures,
            in_flight,
            backlog,
            pending,
            ack_pending,
        }))
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.0.registry).expect("metrics encode");
        out
    }

    /// A command arrived: it counts as in flight until the returned guard is dropped (however
    /// its handling ends, a panic or a cancel included).
    pub fn arrived(&self, service: &str) -> InFlight {
        let gauge = self
            .0
            .in_flight
            .get_or_create(&vec![("service", service.to_owned())])
            .clone();
        gauge.inc();
        InFlight {
            gauge,
            since: Instant::now(),
        }
    }

    /// A command's handling ended with `outcome`, `guard.elapsed()` after it arrived.
    pub fn handled(&self, service: &str, outcome: Outcome, guard: &InFlight) {
        self.0
            .commands
            .get_or_create(&vec![
                ("service", service.to_owned()),
                ("outcome", outcome.as_str().to_owned()),
            ])
            .inc();
        self.0
            .seconds
            .get_or_create(&vec![("service", service.to_owned())])
            .observe(guard.since.elapsed().as_secs_f64());
    }

    /// Something went wrong around the handler (see the module's table for the reasons).
    pub fn failure(&self, service: &str, reason: &'static str) {
        self.0
            .failures
            .get_or_create(&vec![
                ("service", service.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    fn backlog(&self, service: &str, read: Option<(u64, usize)>) {
        let labels = vec![("service", service.to_owned())];
        match read {
            Some((pending, ack_pending)) => {
                let (p, a) = (pending as i64, ack_pending as i64);
                self.0.pending.get_or_create(&labels).set(p);
                self.0.ack_pending.get_or_create(&labels).set(a);
                self.0.backlog.get_or_create(&labels).set(p + a);
            }
            None => {
                self.0.pending.remove(&labels);
                self.0.ack_pending.remove(&labels);
                self.0.backlog.remove(&labels);
            }
        }
    }
}

/// A command in flight ([`Metrics::arrived`]).
pub struct InFlight {
    gauge: Gauge,
    since: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// What a process reads from JetStream: the durable consumer it serves, or only the stream.
#[derive(Debug, Clone)]
pub struct Source {
    /// The stream's name (`<PREFIX>_COMMANDS`, `<PREFIX>_EVENTS`).
    pub stream: String,
    /// The durable consumer, and the `service` its backlog is reported as.
    pub consumer: Option<(String, String)>,
}

struct Shared {
    metrics: Metrics,
    source: Source,
    needs_db: bool,
    pool: OnceLock<PgPool>,
    js: OnceLock<jetstream::Context>,
}

/// A process's health: its metrics and what its readiness checks, filled in as the process
/// connects. Cheap to clone.
#[derive(Clone)]
pub struct Health(Arc<Shared>);

impl Health {
    /// `needs_db`: the process works on PostgreSQL (a real worker), so it is not ready while
    /// PostgreSQL does not answer.
    pub fn new(source: Source, needs_db: bool) -> Self {
        Health(Arc::new(Shared {
            metrics: Metrics::new(),
            source,
            needs_db,
            pool: OnceLock::new(),
            js: OnceLock::new(),
        }))
    }

    pub fn metrics(&self) -> Metrics {
        self.0.metrics.clone()
    }

    /// The process is connected to PostgreSQL.
    pub fn set_pool(&self, pool: PgPool) {
        let _ = self.0.pool.set(pool);
    }

    /// The process is connected to JetStream.
    pub fn set_jetstream(&self, js: jetstream::Context) {
        let _ = self.0.js.set(js);
    }

    /// Bind the listener of `settings` (none when its port is 0) and serve it until
    /// `shutdown`, in a task of its own. Binding happens now, so that a port in use stops the
    /// process at start-up with an error that names the setting.
    pub async fn listen(
        &self,
        settings: &Settings,
        shutdown: CancellationToken,
    ) -> Result<Option<SocketAddr>, Error> {
        if settings.port == 0 {
            return Ok(None);
        }
        let ip: IpAddr = settings
            .address
            .parse()
            .map_err(|_| Error::Address(settings.address.clone()))?;
        let addr = SocketAddr::new(ip, settings.port());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let bound = listener.local_addr().unwrap_or(addr);
        tracing::info!(addr = %bound, "serving /healthz, /readyz and /metrics");
        let app = self.router();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the health listener stopped");
            }
        });
        Ok(Some(bound))
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    /// The consumer's `(num_pending, num_ack_pending)`, within `within`.
    async fn consumer_backlog(&self, within: Duration) -> Result<(u64, usize), &'static str> {
        let Some(js) = self.0.js.get() else {
            return Err("not connected to JetStream yet");
        };
        let Some((consumer, _)) = &self.0.source.consumer else {
            return Err("no consumer");
        };
        let read = async {
            // Getting the consumer reads its info: one request.
            let c: jetstream::consumer::PullConsumer = js
                .get_consumer_from_stream(consumer, &self.0.source.stream)
                .await
                .map_err(|_| "its consumer cannot be read")?;
            let info = c.cached_info();
            Ok::<_, &'static str>((info.num_pending, info.num_ack_pending))
        };
        tokio::time::timeout(within, read)
            .await
            .map_err(|_| "JetStream does not answer")?
    }
}

/// The process is up and serving HTTP.
async fn healthz() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Ready when PostgreSQL (if the process uses it) and its JetStream consumer (or stream) answer.
async fn readyz(State(health): State<Health>) -> Response {
    let shared = &health.0;
    if shared.needs_db {
        let Some(pool) = shared.pool.get() else {
            return Problem::unavailable("not connected to PostgreSQL yet").into_response();
        };
        let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool);
        if !matches!(tokio::time::timeout(READY_WITHIN, ping).await, Ok(Ok(_))) {
            return Problem::unavailable("PostgreSQL does not answer").into_response();
        }
    }
    let jetstream = if shared.source.consumer.is_some() {
        health.consumer_backlog(READY_WITHIN).await.map(|_| ())
    } else {
        match shared.js.get() {
            None => Err("not connected to JetStream yet"),
            Some(js) => {
                match tokio::time::timeout(READY_WITHIN, js.get_stream(&shared.source.stream)).await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(_)) => Err("its stream cannot be read"),
                    Err(_) => Err("JetStream does not answer"),
                }
            }
        }
    };
    if let Err(why) = jetstream {
        return Problem::unavailable(format!("JetStream: {why}")).into_response();
    }
    axum::Json(serde_json::json!({
        "status": "ready",
        "postgres": if shared.needs_db { "ok" } else { "unused" },
        "jetstream": "ok",
    }))
    .into_response()
}

/// Prometheus text; the backlog is read from the consumer's info now.
async fn metrics(State(health): State<Health>) -> Response {
    if let Some((_, service)) = &health.0.source.consumer {
        let read = health.consumer_backlog(BACKLOG_WITHIN).await.ok();
        health.0.metrics.backlog(service, read);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.0.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_named_in_the_docs_are_rendered() {
        let m = Metrics::new();
        let guard = m.arrived("payment");
        m.handled("payment", Outcome::Ok, &guard);
        m.failure("payment", "reply_not_stored");
        m.backlog("payment", Some((3, 2)));
        let text = m.render();
        for line in [
            r#"saga_worker_commands_total{service="payment",outcome="ok"} 1"#,
            r#"saga_worker_command_failures_total{service="payment",reason="reply_not_stored"} 1"#,
            r#"saga_worker_in_flight{service="payment"} 1"#,
            r#"saga_worker_backlog{service="payment"} 5"#,
            r#"saga_worker_pending{service="payment"} 3"#,
            r#"saga_worker_ack_pending{service="payment"} 2"#,
            r#"saga_worker_command_seconds_count{service="payment"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        drop(guard);
        m.backlog("payment", None);
        let text = m.render();
        assert!(text.contains(r#"saga_worker_in_flight{service="payment"} 0"#));
        assert!(!text.contains("saga_worker_backlog{"), "{text}");
    }
}
