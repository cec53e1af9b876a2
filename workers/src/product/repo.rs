//! The repositories of the Product and Category aggregates, and the unit of work they share:
//! the mapping between the model ([`super::model`]) and its tables, one transaction per unit
//! of work, optimistic locking on each root's version, and the changes an aggregate recorded
//! (stock movements, domain events) written in that same transaction. Domain events go to
//! `inventory.domain_events` (the aggregate's history) and to the services' outbox
//! (`events.outbox`, published by the relay).
//!
//! Locking: a product is loaded for a change with its row and its variants' rows locked
//! (variants in SKU order, as the reservation batches lock them), so the stock the model
//! checks is the stock it stores; the version then refuses a change made from an older read
//! (an HTTP client's `If-Match`). Stock movements of reservations do not move the version: a
//! checkout must not invalidate an editor's ETag.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sagas::events::{self, DomainEvent, product as ev};
use sagas::shop::{Currency, Line, Money, OrderId, Quantity, Sku};
use sagas::wire::{EventId, Subjects};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::model::{
    AttributeKind, Attributes, Category, CategoryAttribute, Change, Details, Image, Inventory,
    Product, ProductStatus, Rule, Variant, VariantStatus,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Rule(#[from] Rule),
    #[error("not found")]
    NotFound,
    /// The version read is not the version stored: someone changed it since.
    #[error("the {what} is at version {actual}, not {expected}: it changed since it was read")]
    Stale {
        what: &'static str,
        expected: i64,
        actual: i64,
    },
    /// The change conflicts with other data (a SKU or slug taken, a category with products).
    #[error("{0}")]
    Conflict(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// One transaction of the Product service: the changes of the aggregates saved in it, their
/// movements and events, all committed or none.
pub struct UnitOfWork {
    tx: Transaction<'static, Postgres>,
    subjects: Subjects,
    correlation_id: String,
    now: DateTime<Utc>,
    events: usize,
}

impl UnitOfWork {
    pub async fn begin(
        pool: &PgPool,
        subjects: &Subjects,
        correlation_id: &str,
    ) -> Result<Self, sqlx::Error> {
        Ok(Self {
            tx: pool.begin().await?,
            subjects: subjects.clone(),
            correlation_id: correlation_id.to_owned(),
            now: Utc::now(),
            events: 0,
        })
    }

    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Commit; the number of domain events it wrote (wake the relay when not zero).
    pub async fn commit(self) -> Result<usize, sqlx::Error> {
        self.tx.commit().await?;
        Ok(self.events)
    }

    /// Write `changes` of the aggregate `aggregate_id` (at `version` after them).
    async fn record(
        &mut self,
        aggregate: &str,
        aggregate_id: Uuid,
        version: i64,
        changes: Vec<Change>,
    ) -> Result<(), sqlx::Error> {
        for (n, change) in changes.into_iter().enumerate() {
            // Derived from the aggregate, its version and the change's place: a unit of work
            // retried after a rollback writes the same ids.
            let cause = Uuid::new_v5(&aggregate_id, format!("v{version}/{n}").as_bytes());
            let event = match change {
                Change::Movement {
                    sku,
                    kind,
                    quantity_delta,
                    reserved_delta,
                    order_id,
                    note,
                } => {
                    sqlx::query!(
                        "INSERT INTO inventory.stock_movements
                                (sku, kind, quantity_delta, reserved_delta, order_id, note, at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        sku.as_str(),
                        kind,
                        quantity_delta,
                        reserved_delta,
                        order_id.map(|o| o.as_uuid()),
                        note,
                        self.now,
                    )
                    .execute(&mut *self.tx)
                    .await?;
                    continue;
                }
                Change::Stock(e) => events::envelope(
                    &e,
                    EventId::derive_from(cause, ev::StockUpdated::NAME),
                    self.now,
                ),
                Change::Price(e) => events::envelope(
                    &e,
                    EventId::derive_from(cause, ev::PriceChanged::NAME),
                    self.now,
                ),
            };
            sqlx::query!(
                "INSERT INTO inventory.domain_events
                        (id, aggregate, aggregate_id, version, event_type, payload, correlation_id, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (id) DO NOTHING",
                event.id.as_uuid(),
                aggregate,
                aggregate_id,
                version,
                &event.name,
                serde_json::to_value(&event.body).expect("events serialize"),
                &self.correlation_id,
                self.now,
            )
            .execute(&mut *self.tx)
            .await?;
            runtime::outbox::write(&mut self.tx, &self.subjects, &event, &self.correlation_id)
                .await?;
            self.events += 1;
        }
        Ok(())
    }
}

fn conflict_on_unique(e: sqlx::Error, what: impl FnOnce(&str) -> String) -> Error {
    match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => {
            Error::Conflict(what(d.constraint().unwrap_or_default()))
        }
        sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
            Error::Conflict(what(d.constraint().unwrap_or_default()))
        }
        _ => Error::Database(e),
    }
}

fn currency(s: &str) -> Result<Currency, sqlx::Error> {
    Currency::parse(s).map_err(|e| sqlx::Error::Decode(format!("a stored currency: {e}").into()))
}

fn sku(s: &str) -> Result<Sku, sqlx::Error> {
    Sku::parse(s).map_err(|e| sqlx::Error::Decode(format!("a stored SKU: {e}").into()))
}

fn decode<T>(what: &str, value: &str, parse: fn(&str) -> Option<T>) -> Result<T, sqlx::Error> {
    parse(value).ok_or_else(|| sqlx::Error::Decode(format!("a stored {what}: {value:?}").into()))
}

/// The repository of the Product aggregate.
pub struct Products;

struct ProductRow {
    id: Uuid,
    name: String,
    description: String,
    status: String,
    category_id: Option<Uuid>,
    version: i64,
}

struct VariantRow {
    id: Uuid,
    product_id: Uuid,
    sku: String,
    name: String,
    price_minor: i64,
    currency: String,
    status: String,
    quantity: i32,
    reserved: i32,
}

impl Products {
    /// The product as stored, or `None`.
    pub async fn get(conn: &mut PgConnection, id: Uuid) -> Result<Option<Product>, sqlx::Error> {
        Ok(Self::load(conn, &[id], false).await?.pop())
    }

    /// The products of `ids` as stored, in that order (those that do not exist left out):
    /// a handful of statements whatever their number.
    pub async fn get_many(
        conn: &mut PgConnection,
        ids: &[Uuid],
    ) -> Result<Vec<Product>, sqlx::Error> {
        Self::load(conn, ids, false).await
    }

    /// The product as stored, its row and its variants' rows locked until the unit of work
    /// ends: load it this way to change it.
    pub async fn lock(uow: &mut UnitOfWork, id: Uuid) -> Result<Product, Error> {
        Self::load(uow.conn(), &[id], true)
            .await?
            .pop()
            .ok_or(Error::NotFound)
    }

    /// The product's id of the variant `variant_id`.
    pub async fn of_variant(
        conn: &mut PgConnection,
        variant_id: Uuid,
    ) -> Result<Option<Uuid>, sqlx::Error> {
        sqlx::query_scalar!(
            "SELECT product_id FROM inventory.variants WHERE id = $1",
            variant_id
        )
        .fetch_optional(conn)
        .await
    }

    async fn load(
        conn: &mut PgConnection,
        ids: &[Uuid],
        lock: bool,
    ) -> Result<Vec<Product>, sqlx::Error> {
        let rows = if lock {
            sqlx::query_as!(
                ProductRow,
                "SELECT id, name, description, status, category_id, version
                   FROM inventory.products WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                ids
            )
            .fetch_all(&mut *conn)
            .await?
        } else {
            sqlx::query_as!(
                ProductRow,
                "SELECT id, name, description, status, category_id, version
                   FROM inventory.products WHERE id = ANY($1)",
                ids
            )
            .fetch_all(&mut *conn)
            .await?
        };
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let mut attributes: HashMap<Uuid, Attributes> = HashMap::new();
        for r in sqlx::query!(
            "SELECT product_id, name, value FROM inventory.product_attributes
              WHERE product_id = ANY($1)",
            &found
        )
        .fetch_all(&mut *conn)
        .await?
        {
            attributes
                .entry(r.product_id)
                .or_default()
                .insert(r.name, r.value);
        }
        let mut images: HashMap<Uuid, Vec<Image>> = HashMap::new();
        for r in sqlx::query!(
            "SELECT product_id, url, alt FROM inventory.product_images
              WHERE product_id = ANY($1) ORDER BY product_id, position",
            &found
        )
        .fetch_all(&mut *conn)
        .await?
        {
            images.entry(r.product_id).or_default().push(Image {
                url: r.url,
                alt: r.alt,
            });
        }
        let variant_rows = if lock {
            sqlx::query_as!(
                VariantRow,
                "SELECT id, product_id, sku, name, price_minor, currency, status, quantity, reserved
                   FROM inventory.variants WHERE product_id = ANY($1) ORDER BY sku FOR UPDATE",
                &found
            )
            .fetch_all(&mut *conn)
            .await?
        } else {
            sqlx::query_as!(
                VariantRow,
                "SELECT id, product_id, sku, name, price_minor, currency, status, quantity, reserved
                   FROM inventory.variants WHERE product_id = ANY($1) ORDER BY sku",
                &found
            )
            .fetch_all(&mut *conn)
            .await?
        };
        let mut variant_attributes: HashMap<Uuid, Attributes> = HashMap::new();
        for r in sqlx::query!(
            "SELECT a.variant_id, a.name, a.value
               FROM inventory.variant_attributes a
               JOIN inventory.variants v ON v.id = a.variant_id
              WHERE v.product_id = ANY($1)",
            &found
        )
        .fetch_all(&mut *conn)
        .await?
        {
            variant_attributes
                .entry(r.variant_id)
                .or_default()
                .insert(r.name, r.value);
        }
        let mut variants: HashMap<Uuid, Vec<Variant>> = HashMap::new();
        for r in variant_rows {
            variants.entry(r.product_id).or_default().push(Variant {
                id: r.id,
                sku: sku(&r.sku)?,
                name: r.name,
                price: Money {
                    minor: r.price_minor,
                    currency: currency(&r.currency)?,
                },
                status: decode("variant status", &r.status, VariantStatus::parse)?,
                inventory: Inventory::new(i64::from(r.quantity), i64::from(r.reserved))
                    .map_err(|e| sqlx::Error::Decode(format!("a stored stock: {e}").into()))?,
                attributes: variant_attributes.remove(&r.id).unwrap_or_default(),
            });
        }
        let mut by_id: HashMap<Uuid, Product> = HashMap::with_capacity(rows.len());
        for row in rows {
            let details = Details {
                name: row.name,
                description: row.description,
                status: decode("product status", &row.status, ProductStatus::parse)?,
                category_id: row.category_id,
                attributes: attributes.remove(&row.id).unwrap_or_default(),
                images: images.remove(&row.id).unwrap_or_default(),
            };
            let variants = variants.remove(&row.id).unwrap_or_default();
            by_id.insert(
                row.id,
                Product::restore(row.id, details, variants, row.version),
            );
        }
        Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
    }

    /// Store a new product (version 1).
    pub async fn add(uow: &mut UnitOfWork, product: &mut Product) -> Result<(), Error> {
        let d = &product.details;
        sqlx::query!(
            "INSERT INTO inventory.products
                    (id, name, description, status, category_id, version, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 1, $6, $6)",
            product.id,
            &d.name,
            &d.description,
            d.status.as_str(),
            d.category_id,
            uow.now,
        )
        .execute(uow.conn())
        .await
        .map_err(|e| {
            conflict_on_unique(e, |c| match c {
                "products_pkey" => format!("a product {} exists", product.id),
                _ => "the category does not exist".to_owned(),
            })
        })?;
        product.version = 1;
        Self::write_children(uow, product, &[]).await?;
        let changes = product.take_changes();
        uow.record("product", product.id, 1, changes).await?;
        Ok(())
    }

    /// Store a changed product over the version it was loaded at (refused as stale
    /// otherwise), at the next version.
    pub async fn save(uow: &mut UnitOfWork, product: &mut Product) -> Result<(), Error> {
        let d = &product.details;
        let stored = sqlx::query_scalar!(
            "UPDATE inventory.products
                SET name = $3, description = $4, status = $5, category_id = $6,
                    version = version + 1, updated_at = $7
              WHERE id = $1 AND version = $2
             RETURNING version",
            product.id,
            product.version,
            &d.name,
            &d.description,
            d.status.as_str(),
            d.category_id,
            uow.now,
        )
        .fetch_optional(uow.conn())
        .await
        .map_err(|e| conflict_on_unique(e, |_| "the category does not exist".to_owned()))?;
        let Some(version) = stored else {
            let actual = sqlx::query_scalar!(
                "SELECT version FROM inventory.products WHERE id = $1",
                product.id
            )
            .fetch_optional(uow.conn())
            .await?;
            return Err(match actual {
                Some(actual) => Error::Stale {
                    what: "product",
                    expected: product.version,
                    actual,
                },
                None => Error::NotFound,
            });
        };
        let before: Vec<Uuid> = sqlx::query_scalar!(
            "SELECT id FROM inventory.variants WHERE product_id = $1",
            product.id
        )
        .fetch_all(uow.conn())
        .await?;
        Self::write_children(uow, product, &before).await?;
        product.version = version;
        let changes = product.take_changes();
        uow.record("product", product.id, version, changes).await?;
        Ok(())
    }

    /// Store the stock of a product locked in this unit of work ([`Products::lock`]) and the
    /// movements and events of its stock operations, without moving its version (reservations
    /// are not edits).
    pub async fn save_stock(uow: &mut UnitOfWork, product: &mut Product) -> Result<(), Error> {
        let changed: Vec<&Variant> = {
            let skus: Vec<&Sku> = product
                .changes()
                .iter()
                .filter_map(|c| match c {
                    Change::Movement { sku, .. } => Some(sku),
                    _ => None,
                })
                .collect();
            product
                .variants()
                .iter()
                .filter(|v| skus.contains(&&v.sku))
                .collect()
        };
        for v in changed {
            sqlx::query!(
                "UPDATE inventory.variants SET quantity = $2, reserved = $3, updated_at = $4
                  WHERE id = $1",
                v.id,
                v.inventory.quantity(),
                v.inventory.reserved(),
                uow.now,
            )
            .execute(uow.conn())
            .await?;
        }
        let changes = product.take_changes();
        uow.record("product", product.id, product.version, changes)
            .await?;
        Ok(())
    }

    /// Delete a product stored at `version` with its variants, attributes and images (the
    /// cascades); refused while a variant holds reserved units.
    pub async fn delete(uow: &mut UnitOfWork, id: Uuid, version: i64) -> Result<(), Error> {
        let product = Self::lock(uow, id).await?;
        if product.version != version {
            return Err(Error::Stale {
                what: "product",
                expected: version,
                actual: product.version,
            });
        }
        product.check_deletable()?;
        sqlx::query!("DELETE FROM inventory.products WHERE id = $1", id)
            .execute(uow.conn())
            .await?;
        Ok(())
    }

    /// Replace the attributes and images, and write the variants (`before`: the ids stored
    /// before this save; those no longer in the product are deleted).
    async fn write_children(
        uow: &mut UnitOfWork,
        product: &Product,
        before: &[Uuid],
    ) -> Result<(), Error> {
        let id = product.id;
        let d = &product.details;
        let (names, values): (Vec<String>, Vec<String>) = d
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .unzip();
        sqlx::query!(
            "DELETE FROM inventory.product_attributes WHERE product_id = $1",
            id
        )
        .execute(uow.conn())
        .await?;
        sqlx::query!(
            "INSERT INTO inventory.product_attributes (product_id, name, value)
             SELECT $1, * FROM unnest($2::text[], $3::text[])",
            id,
            &names,
            &values,
        )
        .execute(uow.conn())
        .await?;
        sqlx::query!(
            "DELETE FROM inventory.product_images WHERE product_id = $1",
            id
        )
        .execute(uow.conn())
        .await?;
        let urls: Vec<String> = d.images.iter().map(|i| i.url.clone()).collect();
        let alts: Vec<String> = d.images.iter().map(|i| i.alt.clone()).collect();
        sqlx::query!(
            "INSERT INTO inventory.product_images (product_id, position, url, alt)
             SELECT $1, (n - 1)::int4, u, a FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS t(u, a, n)",
            id,
            &urls,
            &alts,
        )
        .execute(uow.conn())
        .await?;
        let gone: Vec<Uuid> = before
            .iter()
            .filter(|b| product.variant(**b).is_none())
            .copied()
            .collect();
        sqlx::query!(
            "DELETE FROM inventory.variants WHERE product_id = $1 AND id = ANY($2)",
            id,
            &gone
        )
        .execute(uow.conn())
        .await?;
        // Every variant in one statement, and their attributes in two: a save costs the same
        // handful of statements whatever the number of variants.
        let vs = product.variants();
        let ids: Vec<Uuid> = vs.iter().map(|v| v.id).collect();
        let skus: Vec<String> = vs.iter().map(|v| v.sku.as_str().to_owned()).collect();
        let names: Vec<String> = vs.iter().map(|v| v.name.clone()).collect();
        let prices: Vec<i64> = vs.iter().map(|v| v.price.minor).collect();
        let currencies: Vec<String> = vs
            .iter()
            .map(|v| v.price.currency.as_str().to_owned())
            .collect();
        let statuses: Vec<String> = vs.iter().map(|v| v.status.as_str().to_owned()).collect();
        let quantities: Vec<i32> = vs.iter().map(|v| v.inventory.quantity()).collect();
        let reserved: Vec<i32> = vs.iter().map(|v| v.inventory.reserved()).collect();
        let written = sqlx::query!(
            "INSERT INTO inventory.variants
                    (id, sku, product_id, name, price_minor, currency, status, quantity, reserved, updated_at)
             SELECT u.id, u.sku, $1, u.name, u.price, u.currency, u.status, u.quantity, u.reserved, $10
               FROM unnest($2::uuid[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::text[],
                           $8::int4[], $9::int4[])
                    AS u(id, sku, name, price, currency, status, quantity, reserved)
             ON CONFLICT (id) DO UPDATE
                SET name = excluded.name, price_minor = excluded.price_minor,
                    currency = excluded.currency, status = excluded.status,
                    quantity = excluded.quantity, reserved = excluded.reserved,
                    updated_at = excluded.updated_at
              WHERE inventory.variants.product_id = excluded.product_id",
            id,
            &ids,
            &skus,
            &names,
            &prices,
            &currencies,
            &statuses,
            &quantities,
            &reserved,
            uow.now,
        )
        .execute(uow.conn())
        .await
        .map_err(|e| conflict_on_unique(e, |_| "a SKU of the product is taken".to_owned()))?;
        if written.rows_affected() != ids.len() as u64 {
            // An id of another product's variant: the WHERE above left it alone.
            return Err(Error::Conflict(
                "a variant id belongs to another product".to_owned(),
            ));
        }
        sqlx::query!(
            "DELETE FROM inventory.variant_attributes WHERE variant_id = ANY($1)",
            &ids
        )
        .execute(uow.conn())
        .await?;
        let (mut owners, mut names, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for v in vs {
            for (name, value) in &v.attributes {
                owners.push(v.id);
                names.push(name.clone());
                values.push(value.clone());
            }
        }
        sqlx::query!(
            "INSERT INTO inventory.variant_attributes (variant_id, name, value)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])",
            &owners,
            &names,
            &values,
        )
        .execute(uow.conn())
        .await?;
        Ok(())
    }
}

/// The repository of the Category aggregate.
pub struct Categories;

impl Categories {
    pub async fn get(conn: &mut PgConnection, id: Uuid) -> Result<Option<Category>, sqlx::Error> {
        let Some(row) = sqlx::query!(
            "SELECT parent_id, name, slug, version FROM inventory.categories WHERE id = $1",
            id
        )
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(None);
        };
        let mut attributes = Vec::new();
        for a in sqlx::query!(
            "SELECT name, kind, required FROM inventory.category_attributes
              WHERE category_id = $1 ORDER BY name",
            id
        )
        .fetch_all(&mut *conn)
        .await?
        {
            attributes.push(CategoryAttribute {
                name: a.name,
                kind: decode("attribute kind", &a.kind, AttributeKind::parse)?,
                required: a.required,
            });
        }
        Ok(Some(Category {
            id,
            parent_id: row.parent_id,
            name: row.name,
            slug: row.slug,
            attributes,
            version: row.version,
        }))
    }

    /// Store a new category (version 1).
    pub async fn add(uow: &mut UnitOfWork, category: &mut Category) -> Result<(), Error> {
        category.check()?;
        sqlx::query!(
            "INSERT INTO inventory.categories (id, parent_id, name, slug, version, created_at, updated_at)
             VALUES ($1, $2, $3, $4, 1, $5, $5)",
            category.id,
            category.parent_id,
            &category.name,
            &category.slug,
            uow.now,
        )
        .execute(uow.conn())
        .await
        .map_err(|e| {
            conflict_on_unique(e, |c| match c {
                "categories_slug_key" => format!("the slug {} is taken", category.slug),
                "categories_pkey" => format!("a category {} exists", category.id),
                _ => "the parent category does not exist".to_owned(),
            })
        })?;
        category.version = 1;
        Self::write_attributes(uow, category).await
    }

    /// Store a changed category over the version it was read at, at the next version. A
    /// category cannot move under itself or one of its sub-categories.
    pub async fn save(uow: &mut UnitOfWork, category: &mut Category) -> Result<(), Error> {
        category.check()?;
        if let Some(parent) = category.parent_id {
            let cycle = sqlx::query_scalar!(
                r#"WITH RECURSIVE up(id, parent_id) AS (
                       SELECT id, parent_id FROM inventory.categories WHERE id = $1
                       UNION
                       SELECT c.id, c.parent_id FROM inventory.categories c JOIN up ON c.id = up.parent_id
                   )
                   SELECT EXISTS (SELECT 1 FROM up WHERE id = $2) AS "cycle!""#,
                parent,
                category.id,
            )
            .fetch_one(uow.conn())
            .await?;
            if cycle {
                return Err(Rule::Invalid {
                    field: "parent_id".into(),
                    problem: "a category cannot move under itself or one of its sub-categories"
                        .into(),
                }
                .into());
            }
        }
        let stored = sqlx::query_scalar!(
            "UPDATE inventory.categories
                SET parent_id = $3, name = $4, slug = $5, version = version + 1, updated_at = $6
              WHERE id = $1 AND version = $2
             RETURNING version",
            category.id,
            category.version,
            category.parent_id,
            &category.name,
            &category.slug,
            uow.now,
        )
        .fetch_optional(uow.conn())
        .await
        .map_err(|e| {
            conflict_on_unique(e, |c| match c {
                "categories_slug_key" => format!("the slug {} is taken", category.slug),
                _ => "the parent category does not exist".to_owned(),
            })
        })?;
        let Some(version) = stored else {
            return Err(Self::missing(uow, category.id, category.version).await);
        };
        category.version = version;
        Self::write_attributes(uow, category).await
    }

    /// Delete a category stored at `version` and its sub-tree; refused while a product
    /// belongs to any of them.
    pub async fn delete(uow: &mut UnitOfWork, id: Uuid, version: i64) -> Result<(), Error> {
        let deleted = sqlx::query!(
            "DELETE FROM inventory.categories WHERE id = $1 AND version = $2",
            id,
            version
        )
        .execute(uow.conn())
        .await
        .map_err(|e| {
            conflict_on_unique(e, |_| {
                "products belong to the category or one of its sub-categories: move or delete them first"
                    .to_owned()
            })
        })?;
        if deleted.rows_affected() == 0 {
            return Err(Self::missing(uow, id, version).await);
        }
        Ok(())
    }

    async fn missing(uow: &mut UnitOfWork, id: Uuid, expected: i64) -> Error {
        match sqlx::query_scalar!("SELECT version FROM inventory.categories WHERE id = $1", id)
            .fetch_optional(uow.conn())
            .await
        {
            Ok(Some(actual)) => Error::Stale {
                what: "category",
                expected,
                actual,
            },
            Ok(None) => Error::NotFound,
            Err(e) => e.into(),
        }
    }

    async fn write_attributes(uow: &mut UnitOfWork, category: &Category) -> Result<(), Error> {
        sqlx::query!(
            "DELETE FROM inventory.category_attributes WHERE category_id = $1",
            category.id
        )
        .execute(uow.conn())
        .await?;
        let names: Vec<String> = category.attributes.iter().map(|a| a.name.clone()).collect();
        let kinds: Vec<String> = category
            .attributes
            .iter()
            .map(|a| a.kind.as_str().to_owned())
            .collect();
        let required: Vec<bool> = category.attributes.iter().map(|a| a.required).collect();
        sqlx::query!(
            "INSERT INTO inventory.category_attributes (category_id, name, kind, required)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bool[])",
            category.id,
            &names,
            &kinds,
            &required,
        )
        .execute(uow.conn())
        .await?;
        Ok(())
    }
}

/// The stock reservations of orders (`inventory.reservations`: one per order, its lines per
/// variant), the brief's `reserveStock` and what follows it. The saga's `reserve_stock` step
/// takes the same reservations in batches ([`crate::inventory`]); these are the one-at-a-time
/// domain operations, on the aggregate.
pub struct Reservations;

/// A reservation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: Uuid,
    pub order_id: OrderId,
    pub status: String,
    pub lines: Vec<Line>,
    pub expires_at: DateTime<Utc>,
}

impl Reservations {
    /// Hold `quantity` units of the variant `variant_id` for `order` until `expires_at`: a new
    /// reservation of the order, or one more line of its active one. The reservation's id.
    pub async fn reserve_stock(
        uow: &mut UnitOfWork,
        variant_id: Uuid,
        quantity: i64,
        order: OrderId,
        expires_at: DateTime<Utc>,
    ) -> Result<Uuid, Error> {
        let held = Self::lock_order(uow, order).await?;
        if let Some(h) = &held
            && h.status != "active"
        {
            return Err(Error::Conflict(format!(
                "the order's reservation is {}: it takes no more stock",
                h.status
            )));
        }
        let product_id = Products::of_variant(uow.conn(), variant_id)
            .await?
            .ok_or(Error::NotFound)?;
        let units = Quantity::new(quantity).map_err(|e| Rule::Invalid {
            field: "quantity".into(),
            problem: e.to_string(),
        })?;
        let mut product = Products::lock(uow, product_id).await?;
        let sku = product
            .variant(variant_id)
            .ok_or(Error::NotFound)?
            .sku
            .clone();
        product.reserve(variant_id, quantity, order)?;
        Products::save_stock(uow, &mut product).await?;
        let line = Line {
            sku,
            quantity: units,
        };
        let id = match held {
            Some(mut h) => {
                h.lines.push(line);
                sqlx::query!(
                    "UPDATE inventory.reservations
                        SET lines = $2, expires_at = $3, updated_at = $4
                      WHERE order_id = $1",
                    order.as_uuid(),
                    serde_json::to_value(&h.lines).expect("lines serialize"),
                    expires_at,
                    uow.now,
                )
                .execute(uow.conn())
                .await?;
                h.id
            }
            None => {
                let id = Uuid::now_v7();
                sqlx::query!(
                    "INSERT INTO inventory.reservations
                            (id, order_id, saga_id, status, lines, expires_at, created_at, updated_at)
                     VALUES ($1, $2, NULL, 'active', $3, $4, $5, $5)",
                    id,
                    order.as_uuid(),
                    serde_json::to_value([&line]).expect("lines serialize"),
                    expires_at,
                    uow.now,
                )
                .execute(uow.conn())
                .await?;
                id
            }
        };
        Ok(id)
    }

    /// Put the held units of the reservation `id` back (`expire`: because it ran out).
    pub async fn release(uow: &mut UnitOfWork, id: Uuid, expire: bool) -> Result<(), Error> {
        let kind = if expire {
            ev::movement::EXPIRE
        } else {
            ev::movement::RELEASE
        };
        let status = if expire { "expired" } else { "released" };
        Self::settle(uow, id, status, |p, v, q, o| p.release(v, q, o, kind)).await
    }

    /// The sale: consume the held units of the reservation `id`.
    pub async fn commit(uow: &mut UnitOfWork, id: Uuid) -> Result<(), Error> {
        Self::settle(uow, id, "consumed", Product::consume).await
    }

    async fn lock_order(
        uow: &mut UnitOfWork,
        order: OrderId,
    ) -> Result<Option<Reservation>, Error> {
        let row = sqlx::query!(
            "SELECT id, status, lines, expires_at FROM inventory.reservations
              WHERE order_id = $1 FOR UPDATE",
            order.as_uuid()
        )
        .fetch_optional(uow.conn())
        .await?;
        let Some(r) = row else { return Ok(None) };
        let id = match r.id {
            Some(id) => id,
            None => {
                // A reservation of a build before reservations had ids: it gets one.
                let id = Uuid::now_v7();
                sqlx::query!(
                    "UPDATE inventory.reservations SET id = $2 WHERE order_id = $1",
                    order.as_uuid(),
                    id
                )
                .execute(uow.conn())
                .await?;
                id
            }
        };
        Ok(Some(Reservation {
            id,
            order_id: order,
            status: r.status,
            lines: lines(r.lines)?,
            expires_at: r.expires_at,
        }))
    }

    async fn settle(
        uow: &mut UnitOfWork,
        id: Uuid,
        status: &str,
        op: impl Fn(&mut Product, Uuid, i64, OrderId) -> Result<Inventory, Rule>,
    ) -> Result<(), Error> {
        let row = sqlx::query!(
            "SELECT order_id, status, lines FROM inventory.reservations WHERE id = $1 FOR UPDATE",
            id
        )
        .fetch_optional(uow.conn())
        .await?
        .ok_or(Error::NotFound)?;
        if row.status == status {
            return Ok(());
        }
        if row.status != "active" {
            return Err(Error::Conflict(format!(
                "the reservation is {}, not active",
                row.status
            )));
        }
        let order = OrderId::from_uuid(row.order_id);
        let by_sku = crate::inventory::totals(&lines(row.lines)?);
        let skus: Vec<String> = by_sku.keys().cloned().collect();
        // The products in the order of their variants' SKUs, each locked once.
        let products: Vec<(String, Uuid, Uuid)> = sqlx::query!(
            "SELECT sku, id, product_id FROM inventory.variants WHERE sku = ANY($1) ORDER BY sku",
            &skus
        )
        .fetch_all(uow.conn())
        .await?
        .into_iter()
        .map(|r| (r.sku, r.id, r.product_id))
        .collect();
        let mut locked: BTreeMap<Uuid, Product> = BTreeMap::new();
        for (sku, variant, product_id) in products {
            if let std::collections::btree_map::Entry::Vacant(e) = locked.entry(product_id) {
                e.insert(Products::lock(uow, product_id).await?);
            }
            let product = locked.get_mut(&product_id).expect("locked above");
            op(product, variant, i64::from(by_sku[&sku]), order)?;
        }
        for product in locked.values_mut() {
            Products::save_stock(uow, product).await?;
        }
        sqlx::query!(
            "UPDATE inventory.reservations SET status = $2, updated_at = $3 WHERE id = $1",
            id,
            status,
            uow.now,
        )
        .execute(uow.conn())
        .await?;
        Ok(())
    }
}

fn lines(value: serde_json::Value) -> Result<Vec<Line>, Error> {
    serde_json::from_value(value)
        .map_err(|e| Error::Database(sqlx::Error::Decode(format!("stored lines: {e}").into())))
}
