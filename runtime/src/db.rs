//! PostgreSQL: connect (creating the database if asked), retrying while it starts, and apply
//! the migrations of every service (under sqlx's migration lock, so whichever process starts
//! first applies them).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, Postgres};

use crate::config;

/// The schema of every service.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database.url is not a PostgreSQL URL: {0}")]
    Url(sqlx::Error),
    #[error("cannot reach PostgreSQL: {0}")]
    Connect(sqlx::Error),
    #[error("cannot apply the migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// How connecting is retried while a service starts: for about half a minute.
pub fn retry() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(15)
}

/// Connect as `application_name` (so that an operator, or a fault test, can tell the sessions
/// of each process apart), retrying for a while, and migrate.
pub async fn connect(settings: &config::Database, application_name: &str) -> Result<PgPool, Error> {
    let options: PgConnectOptions = settings.url.parse().map_err(Error::Url)?;
    // Generic plans: every statement of these processes is keyed (ids, `= ANY`, `unnest` joins
    // on primary keys), so one plan serves every execution. Left to choose, PostgreSQL planned
    // the engine's one-statement commit afresh most of the time (the row estimates of a custom
    // plan, knowing each array's length, always look cheaper), and planning it cost as much as
    // running it (BENCHMARKS.md). The tables' growth is followed all the same: the ANALYZE of
    // `maintenance` invalidates the cached plans. Vacuuming the saga table takes a second or
    // two by design: only statements slower than that are worth a warning.
    let options = options
        .application_name(application_name)
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(5))
        .options([("plan_cache_mode", "force_generic_plan")]);
    if settings.create {
        (|| async {
            if !Postgres::database_exists(&settings.url).await?
                && let Err(e) = Postgres::create_database(&settings.url).await
            {
                // Another process may have created it in between.
                if !Postgres::database_exists(&settings.url).await? {
                    return Err(e);
                }
            }
            Ok(())
        })
        .retry(retry())
        .notify(|e: &sqlx::Error, d| {
            tracing::warn!(error = %e, "PostgreSQL not ready; retrying in {d:?}")
        })
        .await
        .map_err(Error::Connect)?;
    }
    let pool = (|| async {
        PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
    })
    .retry(retry())
    .notify(
        |e: &sqlx::Error, d| tracing::warn!(error = %e, "PostgreSQL not ready; retrying in {d:?}"),
    )
    .await
    .map_err(Error::Connect)?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}
