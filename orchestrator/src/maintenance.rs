//! Housekeeping of the orchestrator's queue-like tables. The outbox and the timers get a
//! row inserted and deleted (or replaced) per message and per step: thousands of dead rows a
//! second, which make every poll of them slower until they are vacuumed. Autovacuum may be off
//! or tuned for other tables, so the orchestrator vacuums them itself, often, and the saga
//! table now and then; `VACUUM (SKIP_LOCKED)` skips a table another process is vacuuming.

use tokio_util::sync::CancellationToken;

use crate::config;

/// Every `saga_every`-th pass also vacuums the saga table (larger, slower to bloat).
const SAGA_EVERY: u64 = 12;

pub async fn run(pool: sqlx::PgPool, interval_ms: u64, shutdown: CancellationToken) {
    if interval_ms == 0 {
        return;
    }
    let mut tick = tokio::time::interval(config::ms(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pass: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        pass += 1;
        let tables = if pass.is_multiple_of(SAGA_EVERY) {
            "orchestrator.outbox, orchestrator.timers, orchestrator.sagas"
        } else {
            "orchestrator.outbox, orchestrator.timers"
        };
        if let Err(e) = vacuum(&pool, tables).await {
            tracing::warn!(error = %e, "vacuum failed");
        }
    }
}

/// One pass, callable on its own.
pub async fn vacuum(pool: &sqlx::PgPool, tables: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "VACUUM (SKIP_LOCKED) {tables}"
    )))
    .execute(pool)
    .await?;
    Ok(())
}
