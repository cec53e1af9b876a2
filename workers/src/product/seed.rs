//! Seeding the Product service from a catalogue file (`worker product --load FILE`, the demo
//! catalogue, the suite's stock): categories, products with their attributes and images, and
//! variants with their prices and stock, through the repositories, so a load obeys the
//! model's rules and writes what any change writes (stock movements, `PriceChanged`,
//! `StockUpdated`) in one unit of work: all or nothing.
//!
//! A load sets what the file says and leaves the rest: a category is found by its slug, a
//! product by its id, a variant by its SKU; a variant's stock is set so that `available` units
//! can be sold (on top of what is reserved) with one `adjust` movement; a product that the load
//! does not change is not written (its version stays), so loading the same file again writes
//! nothing.

use std::collections::BTreeMap;

use sagas::shop::{Money, Sku};
use sagas::wire::Subjects;
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::model::{
    Attributes, Category, CategoryAttribute, Details, Image, NewVariant, Product, ProductStatus,
    VariantStatus,
};
use super::repo::{self, Categories, Products, UnitOfWork};

/// The correlation id of the events a load writes.
pub const LOAD_CORRELATION_ID: &str = "catalog-load";

/// The most units a catalogue may make available for one variant.
pub const MAX_AVAILABLE: u32 = 1_000_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueFile {
    /// Parents before their children.
    #[serde(default)]
    pub categories: Vec<CategoryEntry>,
    pub products: Vec<ProductEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryEntry {
    pub slug: String,
    pub name: String,
    /// The parent's slug.
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub attributes: Vec<CategoryAttribute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductEntry {
    pub id: Uuid,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The category's slug.
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub attributes: Attributes,
    #[serde(default)]
    pub images: Vec<Image>,
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
    #[serde(default)]
    pub attributes: Attributes,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Repository(#[from] repo::Error),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

fn invalid(what: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError::Invalid(format!("{what}: {e}"))
}

/// Load a catalogue; the number of variants it lists.
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
    }
    let mut uow = UnitOfWork::begin(pool, subjects, LOAD_CORRELATION_ID).await?;
    let mut slugs: BTreeMap<String, Uuid> = BTreeMap::new();
    for c in &file.categories {
        let parent_id = match &c.parent {
            None => None,
            Some(p) => Some(*slugs.get(p).ok_or_else(|| {
                LoadError::Invalid(format!(
                    "category {}: its parent {p} is not listed before it",
                    c.slug
                ))
            })?),
        };
        let existing: Option<Uuid> = sqlx::query_scalar!(
            "SELECT id FROM inventory.categories WHERE slug = $1",
            &c.slug
        )
        .fetch_optional(uow.conn())
        .await?;
        let id = match existing {
            Some(id) => {
                let mut stored = Categories::get(uow.conn(), id)
                    .await?
                    .ok_or(repo::Error::NotFound)?;
                let wanted = Category {
                    parent_id,
                    name: c.name.clone(),
                    attributes: c.attributes.clone(),
                    ..stored.clone()
                };
                if wanted != stored {
                    stored = wanted;
                    Categories::save(&mut uow, &mut stored)
                        .await
                        .map_err(|e| invalid(&format!("category {}", c.slug), e))?;
                }
                id
            }
            None => {
                let mut new = Category {
                    id: Uuid::now_v7(),
                    parent_id,
                    name: c.name.clone(),
                    slug: c.slug.clone(),
                    attributes: c.attributes.clone(),
                    version: 0,
                };
                Categories::add(&mut uow, &mut new)
                    .await
                    .map_err(|e| invalid(&format!("category {}", c.slug), e))?;
                new.id
            }
        };
        slugs.insert(c.slug.clone(), id);
    }
    let mut variants = 0;
    for p in &file.products {
        let what = format!("product {}", p.id);
        let category_id = match &p.category {
            None => None,
            Some(slug) => Some(match slugs.get(slug) {
                Some(id) => *id,
                None => {
                    sqlx::query_scalar!("SELECT id FROM inventory.categories WHERE slug = $1", slug)
                        .fetch_optional(uow.conn())
                        .await?
                        .ok_or_else(|| invalid(&what, format!("no category {slug}")))?
                }
            }),
        };
        let details = Details {
            name: p.name.clone(),
            description: p.description.clone(),
            status: ProductStatus::Active,
            category_id,
            attributes: p.attributes.clone(),
            images: p.images.clone(),
        };
        let exists = sqlx::query_scalar!("SELECT id FROM inventory.products WHERE id = $1", p.id)
            .fetch_optional(uow.conn())
            .await?
            .is_some();
        if exists {
            let mut product = Products::lock(&mut uow, p.id).await?;
            let before = product.clone();
            if product.details != details {
                product.update(details).map_err(|e| invalid(&what, e))?;
            }
            for v in &p.variants {
                let found = product.variants().iter().find(|o| o.sku == v.sku).map(|o| {
                    (
                        o.id,
                        o.inventory.available(),
                        o.name.clone(),
                        o.attributes.clone(),
                    )
                });
                match found {
                    Some((id, available, name, attributes)) => {
                        if name != v.name || attributes != v.attributes {
                            product
                                .update_variant(
                                    id,
                                    v.name.clone(),
                                    VariantStatus::Active,
                                    v.attributes.clone(),
                                )
                                .map_err(|e| invalid(v.sku.as_str(), e))?;
                        }
                        product
                            .change_price(id, v.price.clone())
                            .map_err(|e| invalid(v.sku.as_str(), e))?;
                        let delta = i64::from(v.available) - i64::from(available);
                        if delta != 0 {
                            product
                                .adjust_stock(id, delta, Some("catalogue load".into()))
                                .map_err(|e| invalid(v.sku.as_str(), e))?;
                        }
                    }
                    None => product
                        .add_variant(Uuid::now_v7(), new_variant(v))
                        .map_err(|e| invalid(v.sku.as_str(), e))?,
                }
                variants += 1;
            }
            if product != before {
                check_category(&mut uow, &product, &what).await?;
                Products::save(&mut uow, &mut product)
                    .await
                    .map_err(|e| invalid(&what, e))?;
            }
        } else {
            let new = p
                .variants
                .iter()
                .map(|v| (Uuid::now_v7(), new_variant(v)))
                .collect();
            let mut product = Product::create(p.id, details, new).map_err(|e| invalid(&what, e))?;
            check_category(&mut uow, &product, &what).await?;
            Products::add(&mut uow, &mut product)
                .await
                .map_err(|e| invalid(&what, e))?;
            variants += p.variants.len();
        }
    }
    uow.commit().await?;
    Ok(variants)
}

/// The product's attributes as its category asks.
async fn check_category(
    uow: &mut UnitOfWork,
    product: &Product,
    what: &str,
) -> Result<(), LoadError> {
    let Some(id) = product.details.category_id else {
        return Ok(());
    };
    let category = Categories::get(uow.conn(), id)
        .await?
        .ok_or(repo::Error::NotFound)?;
    category
        .check_product(&product.details.attributes)
        .map_err(|e| invalid(what, e))
}

fn new_variant(v: &VariantEntry) -> NewVariant {
    NewVariant {
        sku: v.sku.clone(),
        name: v.name.clone(),
        price: v.price.clone(),
        quantity: i64::from(v.available),
        status: VariantStatus::Active,
        attributes: v.attributes.clone(),
    }
}
