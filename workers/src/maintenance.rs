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
    if due.is_empty() {
        return Ok(0);
    }
    // Throttled as autovacuum is (its default cost delay, with the default cost limit of 200):
    // a VACUUM of a table that has grown large then spreads its work over a few seconds instead
    // of taking a core for a second or more at once, which stalled the hot path behind it.
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql("SET vacuum_cost_delay = '2ms'")
        .execute(&mut *conn)
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
            .execute(&mut *conn)
            .await?;
    }
    sqlx::raw_sql("RESET vacuum_cost_delay")
        .execute(&mut *conn)
        .await?;
    Ok(due.len())
}
