//! Wiring a worker process: which consumers a kind of worker serves, in which mode.

use sagas::shop::{inventory, payment, shipping};
use sagas::wire::consumers;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::bus;
use crate::carrier_reports::Reports;
use crate::clients::{Carrier, Processor};
use crate::config::{self, Mode, Settings};
use crate::health::{Health, Source};
use crate::inventory::Inventory;
use crate::noop::Noop;
use crate::notification::Notification;
use crate::order::Orders;
use crate::payment::Payment;
use crate::product::api::Api as ProductApi;
use crate::shipping::Shipping;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Inventory,
    Payment,
    Shipping,
    Notification,
    /// The Order service's subscriber ([`crate::order`]).
    Order,
    /// The Product service's REST API ([`crate::product::api`]): products, variants,
    /// categories, stock and prices. Not a step pool: the `reserve_stock` step is `inventory`'s.
    Product,
}

impl Kind {
    fn service(self) -> Option<&'static str> {
        match self {
            Kind::Inventory => Some(inventory::SERVICE),
            Kind::Payment => Some(payment::SERVICE),
            Kind::Shipping => Some(shipping::SERVICE),
            Kind::Notification | Kind::Order | Kind::Product => None,
        }
    }

    /// The schemas this kind of worker writes.
    fn schemas(self) -> &'static [&'static str] {
        match self {
            Kind::Inventory => &["inventory"],
            // The inventory worker looks after the schema's tables.
            Kind::Product => &[],
            Kind::Payment => &["payments"],
            Kind::Shipping => &["shipping"],
            Kind::Notification => &["notifications"],
            Kind::Order => &[],
        }
    }

    /// What this kind of worker reads from JetStream: its pool's command consumer, a
    /// subscriber's event consumer, or (the Product service's API) only the events stream.
    fn source(self, subjects: &sagas::wire::Subjects) -> Source {
        let (stream, consumer) = match self {
            Kind::Inventory | Kind::Payment | Kind::Shipping => {
                let service = self.service().expect("a step pool has a service");
                ("COMMANDS", Some((consumers::commands(service), service)))
            }
            Kind::Notification => (
                "EVENTS",
                Some((consumers::NOTIFICATION_EVENTS, "notification")),
            ),
            Kind::Order => ("EVENTS", Some((consumers::ORDER_EVENTS, "order"))),
            Kind::Product => ("EVENTS", None),
        };
        Source {
            stream: subjects.stream(stream),
            consumer: consumer.map(|(c, s)| (c.to_owned(), s.to_owned())),
        }
    }
}

/// Connect to PostgreSQL (migrating if this process is the first up) and look after the
/// tables this kind of worker writes.
async fn connect_db(
    settings: &Settings,
    kind: Kind,
    health: &Health,
    shutdown: &CancellationToken,
) -> anyhow::Result<PgPool> {
    let name = format!("saga-worker-{kind:?}").to_lowercase();
    let pool = runtime::db::connect(&settings.database, &name).await?;
    health.set_pool(pool.clone());
    tokio::spawn(runtime::maintenance::run(
        pool.clone(),
        kind.schemas(),
        config::ms(settings.maintenance.vacuum_interval_ms),
        shutdown.clone(),
    ));
    Ok(pool)
}

/// Load a catalogue file into the Product service (`worker product --load FILE`).
pub async fn load_catalogue(settings: &Settings, file: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let catalogue: crate::product::seed::CatalogueFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid catalogue", file.display()))?;
    let pool = runtime::db::connect(&settings.database, "saga-worker-product").await?;
    let n = crate::product::seed::load(&pool, &catalogue, &settings.subjects()).await?;
    println!("loaded {n} variants from {}", file.display());
    Ok(())
}

/// Run a worker of `kind` until `shutdown`.
pub async fn run(
    kind: Kind,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = format!("{kind:?}-worker").to_lowercase();
    let subjects = settings.subjects();
    // Listening first: the process is live (and says it is not ready) while it connects.
    let needs_db = settings.worker.mode == Mode::Real || kind == Kind::Product;
    let health = Health::new(kind.source(&subjects), needs_db);
    health.listen(&settings.health, shutdown.clone()).await?;
    let metrics = health.metrics();
    let (_client, js) = runtime::nats::connect(&settings.nats, &name).await?;
    health.set_jetstream(js.clone());
    let n = settings.worker.concurrency;
    tracing::info!(worker = %name, mode = ?settings.worker.mode, concurrency = n, "worker starting");
    if kind == Kind::Product {
        // The Product service's API, in either mode (the benchmark's checkouts are priced
        // through it too). Its commits' events are published by the services' relays (the
        // inventory, payment and shipping workers run one; any publishes any row).
        let pool = connect_db(&settings, kind, &health, &shutdown).await?;
        let p = &settings.product;
        let listener = tokio::net::TcpListener::bind((p.api_host.as_str(), p.api_port))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen for the Product service's API on {}:{}: {e}",
                    p.api_host,
                    p.api_port
                )
            })?;
        tracing::info!(addr = %listener.local_addr()?, "serving the Product service's API");
        let api = ProductApi::new(pool, subjects);
        axum::serve(listener, api.router())
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await?;
        tracing::info!(worker = %name, "worker stopped");
        return Ok(());
    }
    match (kind.service(), settings.worker.mode) {
        (Some(service), Mode::Noop) => {
            bus::serve_commands(
                js,
                subjects,
                service,
                Noop { service },
                n,
                settings.faults.clone(),
                metrics,
                shutdown,
            )
            .await;
        }
        (None, Mode::Noop) if kind == Kind::Order => {
            bus::serve_events(
                js,
                subjects,
                consumers::ORDER_EVENTS,
                n,
                shutdown,
                |_| async { Ok(()) },
            )
            .await;
        }
        (None, Mode::Real) if kind == Kind::Order => {
            let o = &settings.order;
            let orders = Orders::new(
                connect_db(&settings, kind, &health, &shutdown).await?,
                o.api_url.clone(),
                o.cart_url.clone(),
                config::ms(o.timeout_ms),
            );
            bus::serve_events(js, subjects, consumers::ORDER_EVENTS, n, shutdown, |e| {
                let orders = orders.clone();
                async move { orders.on_event(&e).await }
            })
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
        (Some(inventory::SERVICE), Mode::Real) => {
            let pool = connect_db(&settings, kind, &health, &shutdown).await?;
            let relay = runtime::outbox::Relay::new(pool.clone(), js.clone());
            let stock = Inventory::new(pool).with_events(subjects.clone());
            let sweeper = stock.clone();
            tokio::join!(
                relay.run(
                    config::ms(settings.callbacks.relay_interval_ms),
                    shutdown.clone()
                ),
                bus::serve_commands(
                    js,
                    subjects,
                    inventory::SERVICE,
                    stock,
                    n,
                    settings.faults.clone(),
                    metrics,
                    shutdown.clone()
                ),
                sweeper.expire_loop(
                    config::ms(settings.inventory.expiry_sweep_interval_ms),
                    shutdown
                ),
            );
        }
        (Some(payment::SERVICE), Mode::Real) => {
            let processor = Processor::new(&settings.processor);
            let pool = connect_db(&settings, kind, &health, &shutdown).await?;
            let relay = runtime::outbox::Relay::new(pool.clone(), js.clone());
            let payments = Payment::publishing(
                pool,
                processor,
                config::ms(settings.processor.record_pending_after_ms),
                Some(subjects.clone()),
            );
            tokio::join!(
                bus::serve_commands(
                    js,
                    subjects,
                    payment::SERVICE,
                    payments,
                    n,
                    settings.faults.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                ),
                relay.run(config::ms(settings.callbacks.relay_interval_ms), shutdown),
            );
        }
        (Some(shipping::SERVICE), Mode::Real) => {
            let carrier = Carrier::new(&settings.carrier);
            let pool = connect_db(&settings, kind, &health, &shutdown).await?;
            let cb = &settings.callbacks;
            let relay = runtime::outbox::Relay::new(pool.clone(), js.clone());
            let reports = Reports::new(pool.clone(), subjects.clone(), relay.waker());
            let listener = tokio::net::TcpListener::bind((cb.host.as_str(), cb.port))
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot listen for carrier reports on {}:{}: {e}",
                        cb.host,
                        cb.port
                    )
                })?;
            let url = format!("{}/carrier/reports", cb.public_url.trim_end_matches('/'));
            tracing::info!(%url, "taking the carrier's reports");
            let shipments = Shipping::new(
                pool,
                carrier,
                config::ms(settings.carrier.record_pending_after_ms),
            )
            .with_callbacks(url);
            let stopped = shutdown.clone();
            let (_, _, served) = tokio::join!(
                bus::serve_commands(
                    js,
                    subjects,
                    shipping::SERVICE,
                    shipments,
                    n,
                    settings.faults.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                ),
                relay.run(config::ms(cb.relay_interval_ms), shutdown.clone()),
                axum::serve(listener, reports.router())
                    .with_graceful_shutdown(async move { stopped.cancelled().await }),
            );
            served?;
        }
        (Some(other), Mode::Real) => anyhow::bail!("no real worker for the {other} service"),
        (None, Mode::Real) => {
            let notification =
                Notification::new(connect_db(&settings, kind, &health, &shutdown).await?);
            bus::serve_events(
                js,
                subjects,
                consumers::NOTIFICATION_EVENTS,
                n,
                shutdown,
                |e| {
                    let notification = notification.clone();
                    async move { Ok(notification.on_event(&e).await?) }
                },
            )
            .await;
        }
    }
    tracing::info!(worker = %name, "worker stopped");
    Ok(())
}
