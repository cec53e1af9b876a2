//! The catalogue as the checkout sees it: the price of each SKU, read from the Product
//! service's variants and cached briefly (prices change seldom; a checkout takes the price at
//! the moment it starts and keeps it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sagas::shop::{Currency, Money, Sku};
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

/// Load (or reload) a catalogue: products and variants are upserted; each variant's stock is
/// set so that `available` units can be sold, recorded as an `adjust` stock movement. All or
/// nothing: a variant out of range loads nothing.
pub async fn load(pool: &PgPool, file: &CatalogueFile) -> Result<usize, LoadError> {
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
            let before: Option<i32> = sqlx::query_scalar!(
                "SELECT quantity FROM inventory.variants WHERE sku = $1 FOR UPDATE",
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
            let delta = after - before.unwrap_or(0);
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
            variants += 1;
        }
    }
    tx.commit().await?;
    Ok(variants)
}
