//! Wiring a worker process: which consumers a kind of worker serves, in which mode.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sagas::wire::{Service, consumers};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use crate::bus;
use crate::clients::{Carrier, Processor};
use crate::config::{self, Mode, Settings};
use crate::inventory::Inventory;
use crate::noop::Noop;
use crate::notification::Notification;
use crate::payment::Payment;
use crate::shipping::Shipping;

/// The schema; applied (idempotently, under sqlx's lock) by whichever process starts first.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Inventory,
    Payment,
    Shipping,
    Notification,
}

impl Kind {
    fn service(self) -> Option<Service> {
        match self {
            Kind::Inventory => Some(Service::Inventory),
            Kind::Payment => Some(Service::Payment),
            Kind::Shipping => Some(Service::Shipping),
            Kind::Notification => None,
        }
    }

    /// The schema this kind of worker writes.
    fn schema(self) -> &'static str {
        match self {
            Kind::Inventory => "inventory",
            Kind::Payment => "payments",
            Kind::Shipping => "shipping",
            Kind::Notification => "notifications",
        }
    }
}

async fn connect_db(settings: &Settings, kind: Kind) -> anyhow::Result<PgPool> {
    let maintenance = config::ms(settings.maintenance.vacuum_interval_ms);
    let settings = &settings.database;
    let options: sqlx::postgres::PgConnectOptions = settings.url.parse()?;
    // Generic plans, as in the orchestrator (orchestrator/src/db.rs): every statement here is
    // keyed, and PostgreSQL would otherwise plan most executions afresh. The tables' growth is
    // followed all the same: the ANALYZE of `maintenance.rs` invalidates the cached plans.
    let options = options
        .application_name(&format!("saga-worker-{kind:?}").to_lowercase())
        .options([("plan_cache_mode", "force_generic_plan")]);
    let pool = (|| async {
        PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
    })
    .retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(15),
    )
    .notify(
        |e: &sqlx::Error, d| tracing::warn!(error = %e, "PostgreSQL not ready; retrying in {d:?}"),
    )
    .await?;
    MIGRATOR.run(&pool).await?;
    tokio::spawn(crate::maintenance::run(
        pool.clone(),
        kind.schema(),
        maintenance,
    ));
    Ok(pool)
}

/// Run a worker of `kind` until `shutdown`.
pub async fn run(
    kind: Kind,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = format!("{kind:?}-worker").to_lowercase();
    let js = bus::connect(&settings.nats.url, &name).await?;
    let subjects = settings.subjects();
    let n = settings.worker.concurrency;
    tracing::info!(worker = %name, mode = ?settings.worker.mode, concurrency = n, "worker starting");
    match (kind.service(), settings.worker.mode) {
        (Some(service), Mode::Noop) => {
            bus::serve_commands(
                js,
                subjects,
                service,
                Noop,
                n,
                settings.faults.clone(),
                shutdown,
            )
            .await;
        }
        (None, Mode::Noop) => {
            // Nothing to notify about in the noop variant: events are acknowledged and dropped.
            bus::serve_events(
                js,
                subjects,
                consumers::NOTIFICATION_EVENTS,
                n,
                shutdown,
                |_| async { Ok(()) },
            )
            .await;
        }
        (Some(Service::Inventory), Mode::Real) => {
            let inventory = Inventory::new(connect_db(&settings, kind).await?);
            let sweeper = inventory.clone();
            tokio::join!(
                bus::serve_commands(
                    js,
                    subjects,
                    Service::Inventory,
                    inventory,
                    n,
                    settings.faults.clone(),
                    shutdown.clone()
                ),
                sweeper.expire_loop(
                    config::ms(settings.inventory.expiry_sweep_interval_ms),
                    shutdown
                ),
            );
        }
        (Some(Service::Payment), Mode::Real) => {
            let processor = Processor::new(&settings.processor);
            let payment = Payment::new(
                connect_db(&settings, kind).await?,
                processor,
                config::ms(settings.processor.record_pending_after_ms),
            );
            bus::serve_commands(
                js,
                subjects,
                Service::Payment,
                payment,
                n,
                settings.faults.clone(),
                shutdown,
            )
            .await;
        }
        (Some(Service::Shipping), Mode::Real) => {
            let carrier = Carrier::new(&settings.carrier);
            let shipping = Shipping::new(
                connect_db(&settings, kind).await?,
                carrier,
                config::ms(settings.carrier.record_pending_after_ms),
            );
            bus::serve_commands(
                js,
                subjects,
                Service::Shipping,
                shipping,
                n,
                settings.faults.clone(),
                shutdown,
            )
            .await;
        }
        (None, Mode::Real) => {
            let notification = Notification::new(connect_db(&settings, kind).await?);
            bus::serve_events(
                js,
                subjects,
                consumers::NOTIFICATION_EVENTS,
                n,
                shutdown,
                |e| {
                    let notification = notification.clone();
                    async move { notification.on_event(&e).await }
                },
            )
            .await;
        }
    }
    tracing::info!(worker = %name, "worker stopped");
    Ok(())
}

/// Install the log subscriber.
pub fn init_logging(settings: &config::Log) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        config::LogFormat::Text => builder.with_target(false).try_init(),
    };
}

/// Cancel `token` on SIGTERM or Ctrl-C.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("stop requested");
        token.cancel();
    });
}
