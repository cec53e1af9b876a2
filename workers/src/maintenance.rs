//! Housekeeping of the tables a worker writes: every interval, vacuum or analyze the ones that
//! need it by autovacuum's rules (`public.maintenance_due`, migration 0005), whatever
//! autovacuum does. Without it, with autovacuum off, the plans of the prepared statements
//! made while a table was nearly empty (sequential scans) are never replaced as it grows.

use std::time::Duration;

use sqlx::PgPool;

/// Run until the process exits; `interval` zero: never (leave it to autovacuum).
pub async fn run(pool: PgPool, schema: &'static str, interval: Duration) {
    if interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = pass(&pool, schema).await {
            tracing::warn!(error = %e, schema, "table maintenance failed");
        }
    }
}

/// One pass over the tables of `schema`. Returns how many it worked on.
pub async fn pass(pool: &PgPool, schema: &str) -> Result<usize, sqlx::Error> {
    let due: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT table_name, needs_vacuum, needs_analyze FROM public.maintenance_due(ARRAY[$1])
          WHERE needs_vacuum OR needs_analyze",
    )
    .bind(schema)
    .fetch_all(pool)
    .await?;
    for (table, vacuum, analyze) in &due {
        let options = match (vacuum, analyze) {
            // One core: parallel index vacuuming would take both of a small machine's cores
            // from the hot path at once (autovacuum does not vacuum in parallel either).
            (true, true) => "VACUUM (ANALYZE, SKIP_LOCKED, PARALLEL 0)",
            (true, false) => "VACUUM (SKIP_LOCKED, PARALLEL 0)",
            _ => "ANALYZE (SKIP_LOCKED)",
        };
        // `table` was quoted by format('%I.%I') in PostgreSQL.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{options} {table}")))
            .execute(pool)
            .await?;
    }
    Ok(due.len())
}
