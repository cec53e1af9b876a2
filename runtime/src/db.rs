//! PostgreSQL: connect (creating the database if asked), retrying while it starts, and apply
//! the migrations of every service (under sqlx's migration lock, so whichever process starts
//! first applies them).
//!
//! `database.url` may name several hosts, as libpq's URLs do
//! (`postgres://user@h1:5432,h2:5432/db?target_session_attrs=read-write`, [`hosts`]): the pool
//! then connects to the first host that is a primary and follows the primary across a failover
//! ([`follow`]). A URL of one host is used as it is. TLS is the URL's too (`sslmode`,
//! `sslrootcert`).

mod follow;
pub mod hosts;

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
    /// A multi-host URL that cannot be read (the message names what, never the credentials).
    #[error("{0}")]
    Hosts(String),
    #[error("cannot reach PostgreSQL: {0}")]
    Connect(sqlx::Error),
    /// No host of a multi-host URL fits (what each said).
    #[error("cannot reach PostgreSQL: {0}")]
    NoHost(String),
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

/// The process's own settings on the connect options of a host.
fn tune(options: PgConnectOptions, application_name: &str) -> PgConnectOptions {
    // Generic plans: every statement of these processes is keyed (ids, `= ANY`, `unnest` joins
    // on primary keys), so one plan serves every execution. Left to choose, PostgreSQL planned
    // the engine's one-statement commit afresh most of the time (the row estimates of a custom
    // plan, knowing each array's length, always look cheaper), and planning it cost as much as
    // running it (BENCHMARKS.md). The tables' growth is followed all the same: the ANALYZE of
    // `maintenance` invalidates the cached plans. Vacuuming the saga table takes a second or
    // two by design: only statements slower than that are worth a warning.
    options
        .application_name(application_name)
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(5))
        .options([("plan_cache_mode", "force_generic_plan")])
}

/// Create the database of `url` (one host's) unless it exists, retrying while PostgreSQL
/// starts.
async fn create(url: &str) -> Result<(), Error> {
    (|| async {
        if !Postgres::database_exists(url).await?
            && let Err(e) = Postgres::create_database(url).await
        {
            // Another process may have created it in between.
            if !Postgres::database_exists(url).await? {
                return Err(e);
            }
        }
        Ok(())
    })
    .retry(retry())
    .notify(
        |e: &sqlx::Error, d| tracing::warn!(error = %e, "PostgreSQL not ready; retrying in {d:?}"),
    )
    .await
    .map_err(Error::Connect)
}

fn pool_options(settings: &config::Database) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
}

/// Connect as `application_name` (so that an operator, or a fault test, can tell the sessions
/// of each process apart), retrying for a while, and migrate.
pub async fn connect(settings: &config::Database, application_name: &str) -> Result<PgPool, Error> {
    let pool = match hosts::parse(&settings.url).map_err(Error::Hosts)? {
        hosts::Target::Single => connect_single(settings, application_name).await?,
        hosts::Target::Hosts { hosts, attrs } => {
            connect_following(settings, application_name, hosts, attrs).await?
        }
    };
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

async fn connect_single(
    settings: &config::Database,
    application_name: &str,
) -> Result<PgPool, Error> {
    let options: PgConnectOptions = settings.url.parse().map_err(Error::Url)?;
    let options = tune(options, application_name);
    if settings.create {
        create(&settings.url).await?;
    }
    (|| pool_options(settings).connect_with(options.clone()))
        .retry(retry())
        .notify(|e: &sqlx::Error, d| {
            tracing::warn!(error = %e, "PostgreSQL not ready; retrying in {d:?}")
        })
        .await
        .map_err(Error::Connect)
}

/// Connect to the first host that fits, and follow the hosts from then on (until the pool is
/// closed; a process's pool lives as long as the process).
async fn connect_following(
    settings: &config::Database,
    application_name: &str,
    hosts: Vec<hosts::Host>,
    attrs: hosts::Attrs,
) -> Result<PgPool, Error> {
    let options = hosts
        .iter()
        .map(|h| {
            h.url()
                .parse::<PgConnectOptions>()
                .map(|o| tune(o, application_name))
                .map_err(|e| Error::Hosts(format!("database.url: host {}: {e}", h.addr)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if settings.create {
        // The database may not exist yet: find the primary through its maintenance database,
        // and create it there (a standby follows).
        let maintenance = options
            .iter()
            .map(|o| o.clone().database("postgres"))
            .collect();
        let probe = follow::Follower::new(hosts.clone(), maintenance, attrs);
        let (primary, _) = (|| async { probe.find().await })
            .retry(retry())
            .notify(|e: &String, d| tracing::warn!(error = %e, "PostgreSQL not ready; retrying in {d:?}"))
            .await
            .map_err(Error::NoHost)?;
        create(hosts[primary].url()).await?;
    }
    let follower = follow::Follower::new(hosts, options, attrs);
    let found = (|| async {
        let (i, conn) = follower.find().await?;
        Ok::<_, String>((i, conn))
    })
    .retry(retry())
    .notify(|e: &String, d| tracing::warn!(error = %e, "PostgreSQL not ready; retrying in {d:?}"))
    .await
    .map_err(Error::NoHost)?;
    let (first, conn) = found;
    follower.start_at(first);
    tracing::info!(host = %follower.current().addr, "PostgreSQL: connected to the host that fits");
    let pool = (|| {
        follower
            .hooks(pool_options(settings))
            .connect_with(follower.current_options())
    })
    .retry(retry())
    .notify(
        |e: &sqlx::Error, d| tracing::warn!(error = %e, "PostgreSQL not ready; retrying in {d:?}"),
    )
    .await
    .map_err(Error::Connect)?;
    tokio::spawn(follower.run(pool.clone(), conn));
    Ok(pool)
}
