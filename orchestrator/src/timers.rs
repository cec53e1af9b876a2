//! The timer loop: fires due durable timers as inputs. It knows a timer by its saga and name
//! only (a step's deadline or backoff, a signal's SLA, whatever a saga type sets): what a
//! timer means is for the saga's machine to say.
//!
//! An orchestrator fires the timers of the partitions it holds (`crate::partitions`): their
//! sagas are its own. Due rows are claimed with `FOR UPDATE SKIP LOCKED` and leased for a
//! while, so that even while a partition changes hands two orchestrators never fire the same
//! timer at once. The commit that applies the
//! fired timer removes its row (or the transition re-arms it). If an orchestrator dies between
//! claim and commit, the lease runs out and another one fires the timer; a timer fired twice
//! is harmless, because the machine fences the timers it gets (a step's by step and attempt).

use futures::future::join_all;
use sagas::api::{FiredTimer as Due, Input};
use sagas::wire::SagaId;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::engine::{Engine, FiredTimer, Origin};
use crate::metrics::Metrics;

pub struct TimerLoop {
    pool: PgPool,
    engine: Engine,
    settings: config::Timers,
    metrics: Metrics,
}

impl TimerLoop {
    pub fn new(pool: PgPool, engine: Engine, settings: config::Timers, metrics: Metrics) -> Self {
        Self {
            pool,
            engine,
            settings,
            metrics,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let every = config::ms(self.settings.poll_interval_ms);
        runtime::shutdown::every(every, &shutdown, || async {
            // A full batch means more are due: keep going without waiting for the next tick.
            loop {
                match self.fire_due().await {
                    Ok(n) if n as i64 >= self.settings.max_batch && !shutdown.is_cancelled() => {
                        continue;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "timer loop could not claim timers");
                        break;
                    }
                }
            }
        })
        .await;
        tracing::info!("timer loop stopped");
    }

    /// Claim the timers due now and feed them to their sagas. Returns how many were claimed.
    /// One step of the loop, callable on its own.
    pub async fn fire_due(&self) -> Result<usize, sqlx::Error> {
        let now = chrono::Utc::now();
        let lease = now + config::ms(self.settings.lease_ms);
        let ownership = self.engine.ownership();
        let owned = ownership.held();
        if owned.is_empty() {
            return Ok(0);
        }
        let rows = sqlx::query!(
            "UPDATE orchestrator.timers t SET leased_until = $2
               FROM (SELECT saga_id, key FROM orchestrator.timers
                      WHERE fire_at <= $1 AND (leased_until IS NULL OR leased_until < $1)
                        AND orchestrator.saga_partition(saga_id, $4) = ANY($5::int4[])
                      ORDER BY fire_at LIMIT $3
                      FOR UPDATE SKIP LOCKED) due
              WHERE t.saga_id = due.saga_id AND t.key = due.key
          RETURNING t.saga_id, t.key, t.fire_at, t.timer",
            now,
            lease,
            self.settings.max_batch,
            ownership.count() as i32,
            &owned,
        )
        .fetch_all(&self.pool)
        .await?;
        let claimed = rows.len();
        self.metrics.timers_fired(claimed);
        let fired = rows.into_iter().filter_map(|row| {
            let saga = SagaId::from_uuid(row.saga_id);
            let (key, fire_at) = (row.key, row.fire_at);
            match row.timer {
                serde_json::Value::Object(payload) => Some((
                    saga,
                    Due {
                        name: key.clone(),
                        payload,
                    },
                    FiredTimer { key, fire_at },
                )),
                other => {
                    // Left leased: it comes back after the lease, and the error is logged again.
                    tracing::error!(saga_id = %saga, key, timer = %other, "stored timer is not an object");
                    None
                }
            }
        });
        join_all(fired.map(|(saga, timer, fired)| async move {
            let origin = Origin {
                fired_timer: Some(fired),
                ..Default::default()
            };
            match self.engine.apply(saga, Input::TimerFired(timer), origin).await {
                Ok(_) => {}
                Err(e @ crate::engine::Error::Corrupt { .. }) => {
                    tracing::error!(saga_id = %saga, error = %e, "timer of a saga that cannot be restored; it fires again after its lease");
                }
                Err(e) => {
                    tracing::warn!(saga_id = %saga, error = %e, "timer not applied; it fires again after its lease");
                }
            }
        }))
        .await;
        Ok(claimed)
    }
}
