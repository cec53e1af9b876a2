//! Building the application from its settings, and running it until it is told to stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use backon::{ExponentialBuilder, Retryable};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::breakers::Breakers;
use crate::catalog::Catalog;
use crate::config::{self, Settings};
use crate::engine::Engine;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::relay::Relay;
use crate::replies::ReplyConsumer;
use crate::timers::TimerLoop;
use crate::topology::Topology;
use crate::unpark::Unparker;

/// A built orchestrator, bound to its port, not yet serving.
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: AppState,
    relay: Relay,
    shards: Vec<JoinHandle<()>>,
}

impl Application {
    /// Build an orchestrator that runs the saga types of `registry` (the shop's:
    /// [`sagas::shop_types`]).
    pub async fn build(
        settings: Settings,
        registry: sagas::api::Registry,
    ) -> anyhow::Result<Application> {
        let settings = Arc::new(settings);
        let pool = runtime::db::connect(&settings.database, "saga-orchestrator").await?;
        let (_client, js) = runtime::nats::connect(&settings.nats, "orchestrator").await?;
        let topology = Topology::new(
            settings.subjects(),
            settings.nats.replicas,
            config::ms(settings.replies.ack_wait_ms),
            settings.replies.max_deliver,
            &registry,
            settings.partitions.count,
        );
        // Right after a NATS restart the connection may be up before JetStream answers: retry
        // for a while, as for the connection itself, rather than exit.
        (|| topology.declare(&js))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(15),
            )
            .notify(|e: &crate::topology::Error, d| {
                tracing::warn!(error = %e, "JetStream not ready; retrying in {d:?}")
            })
            .await
            .context("cannot declare the JetStream streams and consumers (is JetStream enabled?)")?;
        crate::partitions::prepare(&pool, settings.partitions.count)
            .await
            .context("cannot prepare the partitions")?;
        let ownership = crate::partitions::Ownership::new(settings.partitions.count);
        let metrics = Metrics::new();
        let breakers = Arc::new(Breakers::new(
            &registry.steps(),
            &settings.breakers,
            metrics.clone(),
        ));
        let (relay_handle, relay) = Relay::new(
            js.clone(),
            pool.clone(),
            settings.relay.clone(),
            metrics.clone(),
        );
        let (engine, shards) = Engine::spawn(
            pool.clone(),
            registry.clone(),
            settings.subjects(),
            relay_handle,
            breakers.clone(),
            metrics.clone(),
            &settings.engine,
            ownership,
        );
        let listener = TcpListener::bind((settings.http.host.as_str(), settings.http.port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}:{}",
                    settings.http.host, settings.http.port
                )
            })?;
        let port = listener.local_addr()?.port();
        let catalog = Arc::new(Catalog::new(&settings.catalog));
        let dead_letters = crate::dead_letters::DeadLetters::new(
            js.clone(),
            settings.subjects(),
            topology.stream_name(crate::topology::streams::DEAD_LETTERS),
        );
        let auth = Arc::new(
            crate::http::auth::Auth::new(&settings.admin)
                .map_err(|e| anyhow::anyhow!("invalid configuration: admin: {e}"))?,
        );
        if auth.dev_mode() {
            tracing::warn!(
                "admin.auth = \"disabled\": the dashboard and the admin API answer anyone as an operator; for development only"
            );
        }
        Ok(Application {
            listener,
            port,
            state: AppState {
                engine,
                registry: Arc::new(registry),
                pool,
                js,
                topology,
                catalog,
                breakers,
                metrics,
                settings,
                auth,
                dead_letters,
            },
            relay,
            shards,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pool(&self) -> &PgPool {
        &self.state.pool
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.state.js
    }

    /// Serve until `shutdown` is cancelled, then stop in order: stop taking HTTP requests and
    /// replies, finish those in hand, let the engine commit what is queued, and flush the
    /// outbox. Nothing accepted is lost: what is not finished is redelivered or rescanned by
    /// the next start.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Application {
            listener,
            port,
            state,
            relay,
            shards,
        } = self;
        let relay = relay.spawn();
        let replies = ReplyConsumer::new(
            state.engine.clone(),
            state.js.clone(),
            state.topology.clone(),
            state.settings.replies.concurrency,
            state.metrics.clone(),
        );
        let replies = tokio::spawn(replies.run(shutdown.clone()));
        // The inboxes of the partitions this process holds, started and stopped as their
        // leases come and go; on shutdown the keeper stops them and hands the leases over.
        let partitions = {
            let settings = &state.settings;
            let per_partition =
                (settings.replies.concurrency / settings.partitions.count as usize).max(32);
            let (engine, js, topology, metrics) = (
                state.engine.clone(),
                state.js.clone(),
                state.topology.clone(),
                state.metrics.clone(),
            );
            let spawn: crate::partitions::SpawnConsumer = Box::new(move |p, token| {
                let consumer = ReplyConsumer::new(
                    engine.clone(),
                    js.clone(),
                    topology.clone(),
                    per_partition,
                    metrics.clone(),
                )
                .for_partition(p);
                tokio::spawn(consumer.run(token))
            });
            let keeper = crate::partitions::LeaseKeeper::new(
                state.pool.clone(),
                state.engine.ownership().clone(),
                config::ms(settings.partitions.lease_ms),
                spawn,
                state.metrics.clone(),
            );
            let (first, taken) = tokio::sync::oneshot::channel();
            let keeper = tokio::spawn(keeper.run(shutdown.clone(), first));
            // Serve once the first round took what is free: a lone orchestrator then holds
            // every partition, and the sagas it starts are its own from the first.
            let _ = tokio::time::timeout(config::ms(settings.partitions.lease_ms), taken).await;
            keeper
        };
        let signals = crate::signals::SignalConsumer::new(
            state.engine.clone(),
            state.pool.clone(),
            state.js.clone(),
            state.topology.clone(),
            state.settings.replies.concurrency,
            state.metrics.clone(),
        );
        let signals = tokio::spawn(signals.run(shutdown.clone()));
        let starts = crate::starts::StartConsumer::new(
            state.engine.clone(),
            state.pool.clone(),
            state.settings.sagas.policies.clone(),
            state.registry.clone(),
            state.js.clone(),
            state.topology.clone(),
            state.settings.replies.concurrency,
            state.metrics.clone(),
        );
        let starts = tokio::spawn(starts.run(shutdown.clone()));
        let timers = TimerLoop::new(
            state.pool.clone(),
            state.engine.clone(),
            state.settings.timers.clone(),
            state.metrics.clone(),
        );
        let timers = tokio::spawn(timers.run(shutdown.clone()));
        let unparker = Unparker::new(
            state.pool.clone(),
            state.engine.clone(),
            state.breakers.clone(),
            state.metrics.clone(),
            state.settings.breakers.unpark_interval_ms,
        );
        let unparker = tokio::spawn(unparker.run(shutdown.clone()));
        let maintenance = tokio::spawn(runtime::maintenance::run(
            state.pool.clone(),
            &["orchestrator"],
            config::ms(state.settings.maintenance.vacuum_interval_ms),
            shutdown.clone(),
        ));
        // Long polls answer at once when the process stops, instead of holding the graceful
        // shutdown for up to `http.max_wait_seconds`.
        let release = {
            let (engine, shutdown) = (state.engine.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                engine.release_waiters();
            })
        };
        tracing::info!(port, "orchestrator serving");
        let app = http::router(state);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("HTTP server failed")?;
        tracing::info!("HTTP stopped; finishing replies and timers in hand");
        release.await.ok();
        replies.await.ok();
        partitions.await.ok();
        signals.await.ok();
        starts.await.ok();
        timers.await.ok();
        unparker.await.ok();
        maintenance.await.ok();
        // Every engine handle is gone now: the shards commit what is queued and stop, which
        // drops the relay's hand-off, which makes the relay flush and stop.
        for shard in shards {
            shard.await.ok();
        }
        relay.await.ok();
        tracing::info!("orchestrator stopped");
        Ok(())
    }
}
