//! Housekeeping of the tables a process writes: every interval, vacuum or analyze the ones
//! that need it by autovacuum's rules (`public.maintenance_due`, migration 0005), whatever
//! autovacuum does. The outbox and the timers churn (a row in and out per message and per
//! step), the saga table grows from empty: without VACUUM their polls slow down, and without
//! ANALYZE the plans of the prepared statements made while a table was small (sequential
//! scans) are never replaced as it grows. `SKIP_LOCKED` skips a table another process is busy
//! with.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Run until `shutdown`; `interval` zero: never (leave it to autovacuum).
pub async fn run(
    pool: PgPool,
    schemas: &'static [&'static str],
    interval: Duration,
    shutdown: CancellationToken,
) {
    if interval.is_zero() {
        return;
    }
    crate::shutdown::every(interval, &shutdown, || async {
        if let Err(e) = pass(&pool, schemas).await {
            tracing::warn!(error = %e, ?schemas, "table maintenance failed");
        }
    })
    .await;
}

/// One pass over the tables of `schemas`: vacuum and analyze the ones that need it. Returns
/// how many it worked on.
pub async fn pass(pool: &PgPool, schemas: &[&str]) -> Result<usize, sqlx::Error> {
    let schemas: Vec<String> = schemas.iter().map(|s| (*s).to_owned()).collect();
    // A function's columns may be NULL as far as PostgreSQL tells; these never are (a quoted
    // name, and comparisons of counters that are never NULL).
    let due = sqlx::query!(
        r#"SELECT table_name AS "table_name!", needs_vacuum AS "needs_vacuum!",
                  needs_analyze AS "needs_analyze!"
             FROM public.maintenance_due($1)
            WHERE needs_vacuum OR needs_analyze"#,
        &schemas,
    )
    .fetch_all(pool)
    .await?;
    if due.is_empty() {
        return Ok(0);
    }
    // Throttled as autovacuum is (its default cost delay, with the default cost limit of 200):
    // a VACUUM of a table that has grown large then spreads its work over a few seconds instead
    // of taking a core for a second or more at once, which stalled the hot path behind it.
    // These commands go as they are (the simple protocol), not through the query macros: the
    // VACUUM or ANALYZE and its table are chosen at run time, and none of them binds or reads
    // anything a macro could check.
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql("SET vacuum_cost_delay = '2ms'")
        .execute(&mut *conn)
        .await?;
    for d in &due {
        let table = &d.table_name;
        let command = match (d.needs_vacuum, d.needs_analyze) {
            // One core: parallel index vacuuming would take both of a small machine's cores
            // from the hot path at once (autovacuum does not vacuum in parallel either).
            (true, true) => "VACUUM (ANALYZE, SKIP_LOCKED, PARALLEL 0)",
            (true, false) => "VACUUM (SKIP_LOCKED, PARALLEL 0)",
            _ => "ANALYZE (SKIP_LOCKED)",
        };
        tracing::debug!(table = %table, command, "table maintenance");
        // `table` was quoted by format('%I.%I') in PostgreSQL.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{command} {table}")))
            .execute(&mut *conn)
            .await?;
    }
    sqlx::raw_sql("RESET vacuum_cost_delay")
        .execute(&mut *conn)
        .await?;
    Ok(due.len())
}
