//! The catalogue as the checkout sees it: the price of each SKU, read from the Product
//! service's variants and cached briefly (prices change seldom; a checkout takes the price at
//! the moment it starts and keeps it).
//!
//! [`load`] loads a catalogue file, and publishes each price it sets or changes as a
//! `product.PriceChanged` event, written to the services' outbox ([`runtime::outbox`]) in the
//! load's transaction.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use sagas::events::{self, DomainEvent, product};
use sagas::shop::{Currency, Money, Sku};
use sagas::wire::{EventId, Subjects};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

pub struct Catalog {
    pool: PgPool,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Money, Instant)>>,
}

impl Catalog {
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        Self {
            pool,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The unit price of each known SKU; unknown SKUs are absent from the map.
    pub async fn prices(&self, skus: &[Sku]) -> Result<HashMap<Sku, Money>, sqlx::Error> {
        let now = Instant::now();
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.cache.lock().expect("catalog cache lock");
            for sku in skus {
                match cache.get(sku.as_str()) {
                    Some((price, at)) if now.duration_since(*at) < self.ttl => {
                        found.insert(sku.clone(), price.clone());
                    }
                    _ => missing.push(sku.as_str().to_owned()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let rows = sqlx::query!(
            "SELECT sku, price_minor, currency FROM inventory.variants WHERE sku = ANY($1)",
            &missing,
        )
        .fetch_all(&self.pool)
        .await?;
        let mut cache = self.cache.lock().expect("catalog cache lock");
        for row in rows {
            let (Ok(parsed), Ok(currency)) = (Sku::parse(&row.sku), Currency::parse(&row.currency))
            else {
                tracing::error!(sku = row.sku, "catalogue row is invalid");
                continue;
            };
            let price = Money {
                minor: row.price_minor,
                currency,
            };
            cache.insert(row.sku, (price.clone(), now));
            found.insert(parsed, price);
        }
        Ok(found)
    }
}

/// A catalogue file: products with their variants.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueFile {
    pub products: Vec<ProductEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductEntry {
    pub id: Uuid,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub variants: Vec<VariantEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantEntry {
    pub sku: Sku,
    pub name: String,
    pub price: Money,
    /// Units available for sale after loading (on top of what is reserved).
    pub available: u32,
}

/// The most units a catalogue may make available for one variant (stock is an `int4`, and
/// what is reserved comes on top).
pub const MAX_AVAILABLE: u32 = 1_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Invalid(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// The correlation id of the events a catalogue load writes.
pub const LOAD_CORRELATION_ID: &str = "catalog-load";

/// Load (or reload) a catalogue: products and variants are upserted; each variant's stock is
/// set so that `available` units can be sold, recorded as an `adjust` stock movement. All or
/// nothing: a variant out of range loads nothing.
///
/// Each variant whose price (amount or currency) the load changes, or that is new, gets a
/// `product.PriceChanged` event on `subjects`, written to the outbox in the load's transaction
/// (correlation id [`LOAD_CORRELATION_ID`]); an unchanged price writes none, so loading the same
/// catalogue again writes nothing. The event's id is derived from the SKU, the new price and
/// the variant's `updated_at` before the load: a load retried after a rollback writes the same
/// event, and a price set back to an earlier one (10, 12, 10) is a new event, not a duplicate
/// of the first that JetStream or the outbox would drop.
pub async fn load(
    pool: &PgPool,
    file: &CatalogueFile,
    subjects: &Subjects,
) -> Result<usize, LoadError> {
    for v in file.products.iter().flat_map(|p| &p.variants) {
        if v.available > MAX_AVAILABLE {
            return Err(LoadError::Invalid(format!(
                "{}: available must be at most {MAX_AVAILABLE}, got {}",
                v.sku.as_str(),
                v.available
            )));
        }
        if v.price.minor < 0 {
            return Err(LoadError::Invalid(format!(
                "{}: the price must not be negative",
                v.sku.as_str()
            )));
        }
    }
    let now = Utc::now();
    let mut tx = pool.begin().await?;
    let mut variants = 0;
    for p in &file.products {
        sqlx::query!(
            "INSERT INTO inventory.products (id, name, description) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, description = excluded.description",
            p.id,
            &p.name,
            &p.description,
        )
        .execute(&mut *tx)
        .await?;
        for v in &p.variants {
            let available = v.available as i32;
            // Lock the row first, so that the stock it had and the stock it gets are read
            // under the same lock (a reservation consumed in between would make the audited
            // adjustment differ from the change).
            let before = sqlx::query!(
                "SELECT quantity, price_minor, currency, updated_at FROM inventory.variants
                  WHERE sku = $1 FOR UPDATE",
                v.sku.as_str(),
            )
            .fetch_optional(&mut *tx)
            .await?;
            let after: i32 = sqlx::query_scalar!(
                "INSERT INTO inventory.variants (sku, product_id, name, price_minor, currency, quantity, reserved)
                 VALUES ($1, $2, $3, $4, $5, $6, 0)
                 ON CONFLICT (sku) DO UPDATE
                    SET product_id = excluded.product_id, name = excluded.name,
                        price_minor = excluded.price_minor, currency = excluded.currency,
                        quantity = inventory.variants.reserved + $6, updated_at = now()
                 RETURNING quantity",
                v.sku.as_str(),
                p.id,
                &v.name,
                v.price.minor,
                v.price.currency.as_str(),
                available,
            )
            .fetch_one(&mut *tx)
            .await?;
            let delta = after - before.as_ref().map_or(0, |b| b.quantity);
            if delta != 0 {
                sqlx::query!(
                    "INSERT INTO inventory.stock_movements (sku, kind, quantity_delta, reserved_delta, note)
                     VALUES ($1, 'adjust', $2, 0, 'catalogue load')",
                    v.sku.as_str(),
                    delta,
                )
                .execute(&mut *tx)
                .await?;
            }
            let previous = before.as_ref().map(|b| {
                let price = Currency::parse(&b.currency).ok().map(|currency| Money {
                    minor: b.price_minor,
                    currency,
                });
                (price, b.updated_at)
            });
            let (previous, since) = match previous {
                Some((price, since)) => (price, Some(since)),
                None => (None, None),
            };
            if previous.as_ref() != Some(&v.price) {
                let event = price_changed(&v.sku, previous, v.price.clone(), since, now);
                runtime::outbox::write(&mut tx, subjects, &event, LOAD_CORRELATION_ID).await?;
            }
            variants += 1;
        }
    }
    tx.commit().await?;
    Ok(variants)
}

/// The `product.PriceChanged` event of `sku`'s price set to `price` (from `previous`, if it
/// had a valid one), by a load at `now` of a variant last updated at `since` (`None`: new).
fn price_changed(
    sku: &Sku,
    previous: Option<Money>,
    price: Money,
    since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> sagas::wire::Event {
    let since = since.map_or_else(
        || "new".to_owned(),
        |t| t.to_rfc3339_opts(SecondsFormat::Micros, true),
    );
    let cause = Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!(
            "price/{}/{}/{}/{since}",
            sku.as_str(),
            price.minor,
            price.currency.as_str()
        )
        .as_bytes(),
    );
    events::envelope(
        &product::PriceChanged {
            sku: sku.clone(),
            previous,
            price,
        },
        EventId::derive_from(cause, product::PriceChanged::NAME),
        now,
    )
}
