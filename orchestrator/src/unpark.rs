//! The unparker: resumes sagas parked on a step once its breaker lets calls through, sends the
//! single probe of a half-open breaker, and applies the operators' breaker overrides.
//!
//! It works from the database (`sagas.parked_on`), not from memory, so sagas parked by an
//! orchestrator that died are resumed by the others, and a restarted orchestrator (whose
//! breakers start closed) resumes everything that was parked.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::join_all;
use sagas::api::Input;
use sagas::wire::SagaId;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::breakers::{Breakers, Force};
use crate::config;
use crate::engine::{Applied, Engine, Origin};
use crate::metrics::Metrics;

pub struct Unparker {
    pool: PgPool,
    engine: Engine,
    breakers: Arc<Breakers>,
    metrics: Metrics,
    interval_ms: u64,
}

const BATCH: i64 = 500;

impl Unparker {
    pub fn new(
        pool: PgPool,
        engine: Engine,
        breakers: Arc<Breakers>,
        metrics: Metrics,
        interval_ms: u64,
    ) -> Self {
        Self {
            pool,
            engine,
            breakers,
            metrics,
            interval_ms,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        runtime::shutdown::every(config::ms(self.interval_ms), &shutdown, || async {
            if let Err(e) = self.step().await {
                tracing::warn!(error = %e, "unparker could not run");
            }
        })
        .await;
        tracing::info!("unparker stopped");
    }

    /// One pass: read overrides, resume what may go, probe what is half-open.
    pub async fn step(&self) -> Result<usize, sqlx::Error> {
        self.breakers.set_forced(load_overrides(&self.pool).await?);
        let blocked = self.breakers.blocked();
        let mut resumed = 0;
        for step in self.breakers.steps() {
            if !blocked.contains(step) {
                loop {
                    let ids = self.parked(step, BATCH).await?;
                    let n = self.resume(step, &ids, false).await;
                    resumed += n;
                    if (ids.len() as i64) < BATCH || n == 0 {
                        break;
                    }
                }
            } else if self.breakers.claim_probe(step) {
                let ids = self.parked(step, 1).await?;
                if ids.is_empty() || self.resume(step, &ids, true).await == 0 {
                    self.breakers.release_probe(step);
                } else {
                    tracing::info!(step, saga_id = %ids[0], "half-open breaker: saga resumed as the probe");
                    resumed += 1;
                }
            }
        }
        Ok(resumed)
    }

    async fn parked(&self, step: &str, limit: i64) -> Result<Vec<SagaId>, sqlx::Error> {
        // The sagas of the partitions this orchestrator holds: its breaker saw their replies.
        let ownership = self.engine.ownership();
        let owned = ownership.held();
        let ids = sqlx::query_scalar!(
            // Oldest first, in the order of the index `sagas_parked (parked_on, created_at)`:
            // a page is read from the index, not sorted out of every saga parked on the step
            // (an outage can park hundreds of thousands).
            "SELECT id FROM orchestrator.sagas
              WHERE parked_on = $1 AND orchestrator.saga_partition(id, $3) = ANY($4::int4[])
              ORDER BY created_at LIMIT $2",
            step,
            limit,
            ownership.count() as i32,
            &owned,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(SagaId::from_uuid).collect())
    }

    /// Resume sagas; returns how many went on.
    async fn resume(&self, step: &str, ids: &[SagaId], probe: bool) -> usize {
        let results = join_all(ids.iter().map(|&id| {
            let origin = Origin {
                unblock: probe.then(|| step.to_owned()),
                ..Default::default()
            };
            self.engine.apply(
                id,
                Input::Resume {
                    step: step.to_owned(),
                },
                origin,
            )
        }))
        .await;
        let n = results
            .iter()
            .filter(|r| matches!(r, Ok(Applied::Applied { .. })))
            .count();
        if n > 0 {
            self.metrics.resumed(step, n);
            tracing::info!(step, resumed = n, "parked sagas resumed");
        }
        n
    }
}

pub async fn load_overrides(pool: &PgPool) -> Result<BTreeMap<String, Force>, sqlx::Error> {
    let rows = sqlx::query!("SELECT step, force FROM orchestrator.breaker_overrides")
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| Some((r.step, Force::parse(&r.force)?)))
        .collect())
}
