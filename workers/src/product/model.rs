//! The Product service's aggregates as the brief draws them, pure (no IO): a [`Product`] root
//! with its [`Variant`]s (each with its [`Inventory`] and attributes), attributes and images,
//! and a [`Category`] root with its attributes. Every rule of the model is enforced here, by
//! the methods that change it; the repository ([`super::repo`]) only loads and stores.
//!
//! A change records what it did as [`Change`]s (stock movements and domain events), which the
//! repository writes in the transaction that stores the aggregate.

use std::collections::BTreeMap;

use sagas::events::product::{PriceChanged, StockUpdated, movement};
use sagas::shop::{Money, OrderId, Sku};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A broken rule of the model: the change is refused and nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rule {
    #[error("a quantity of stock to move must be positive, got {0}")]
    NotPositive(i64),
    #[error("{available} available, {asked} asked")]
    Insufficient { available: i32, asked: i64 },
    #[error("{reserved} reserved, cannot release or consume {asked}")]
    NotReserved { reserved: i32, asked: i64 },
    #[error(
        "the stock would be {quantity} with {reserved} reserved: it may not go below what is reserved"
    )]
    BelowReserved { quantity: i64, reserved: i32 },
    #[error("the stock would exceed {max} units")]
    TooMuch { max: i32 },
    #[error("the variant {0} is inactive: its stock cannot be reserved")]
    Inactive(Sku),
    #[error("no variant {0} in this product")]
    NoVariant(Uuid),
    #[error("SKU {0} appears twice")]
    DuplicateSku(Sku),
    #[error("the variant {sku} holds {reserved} reserved units: release them first")]
    StillReserved { sku: Sku, reserved: i32 },
    #[error("a price must not be negative")]
    NegativePrice,
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Rule {
    Rule::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The most units one variant holds (stock is an `int4`).
pub const MAX_QUANTITY: i32 = 1_000_000_000;

/// A variant's stock (a value object): `available = quantity - reserved`, never negative,
/// and `reserved` never above `quantity`. Every operation returns the new value or the rule
/// it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    quantity: i32,
    reserved: i32,
}

impl Inventory {
    pub fn new(quantity: i64, reserved: i64) -> Result<Self, Rule> {
        if reserved < 0 {
            return Err(invalid("reserved", "must not be negative"));
        }
        let quantity_i32 = check_max(quantity)?;
        if quantity < reserved {
            return Err(Rule::BelowReserved {
                quantity,
                reserved: reserved as i32,
            });
        }
        Ok(Self {
            quantity: quantity_i32,
            reserved: reserved as i32,
        })
    }

    pub fn quantity(self) -> i32 {
        self.quantity
    }

    pub fn reserved(self) -> i32 {
        self.reserved
    }

    pub fn available(self) -> i32 {
        self.quantity - self.reserved
    }

    /// Hold `n` units for an order.
    pub fn reserve(self, n: i64) -> Result<Self, Rule> {
        positive(n)?;
        if n > i64::from(self.available()) {
            return Err(Rule::Insufficient {
                available: self.available(),
                asked: n,
            });
        }
        Ok(Self {
            reserved: self.reserved + n as i32,
            ..self
        })
    }

    /// Put `n` held units back.
    pub fn release(self, n: i64) -> Result<Self, Rule> {
        positive(n)?;
        self.held(n)?;
        Ok(Self {
            reserved: self.reserved - n as i32,
            ..self
        })
    }

    /// Sell `n` held units: they leave the stock and the reservation.
    pub fn consume(self, n: i64) -> Result<Self, Rule> {
        positive(n)?;
        self.held(n)?;
        Ok(Self {
            quantity: self.quantity - n as i32,
            reserved: self.reserved - n as i32,
        })
    }

    /// Change the units on hand by `delta` (a delivery, a count): never below what is held.
    pub fn adjust(self, delta: i64) -> Result<Self, Rule> {
        if delta == 0 {
            return Err(invalid("delta", "must not be zero"));
        }
        let quantity = i64::from(self.quantity) + delta;
        if quantity < i64::from(self.reserved) {
            return Err(Rule::BelowReserved {
                quantity,
                reserved: self.reserved,
            });
        }
        Ok(Self {
            quantity: check_max(quantity)?,
            ..self
        })
    }

    fn held(self, n: i64) -> Result<(), Rule> {
        if n > i64::from(self.reserved) {
            return Err(Rule::NotReserved {
                reserved: self.reserved,
                asked: n,
            });
        }
        Ok(())
    }
}

fn positive(n: i64) -> Result<(), Rule> {
    if n <= 0 {
        return Err(Rule::NotPositive(n));
    }
    Ok(())
}

fn check_max(quantity: i64) -> Result<i32, Rule> {
    if quantity > i64::from(MAX_QUANTITY) {
        return Err(Rule::TooMuch { max: MAX_QUANTITY });
    }
    if quantity < 0 {
        return Err(invalid("quantity", "must not be negative"));
    }
    Ok(quantity as i32)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductStatus {
    Draft,
    Active,
    Archived,
}

impl ProductStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Active => "active",
            Self::Archived => "archived",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "draft" => Self::Draft,
            "active" => Self::Active,
            "archived" => Self::Archived,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VariantStatus {
    Active,
    Inactive,
}

impl VariantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Inactive => "inactive",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => Self::Active,
            "inactive" => Self::Inactive,
            _ => return None,
        })
    }
}

/// Attributes (value objects): name -> value, names unique.
pub type Attributes = BTreeMap<String, String>;

/// An image of a product (a value object), in its display order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub url: String,
    #[serde(default)]
    pub alt: String,
}

/// A variant of a product (an entity): its own id and SKU, a price, its stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub id: Uuid,
    pub sku: Sku,
    pub name: String,
    pub price: Money,
    pub status: VariantStatus,
    pub inventory: Inventory,
    pub attributes: Attributes,
}

/// What a change did besides the aggregate's own fields: written by the repository in the
/// same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An audited stock movement of a variant (one for every change of quantity or reserved).
    Movement {
        sku: Sku,
        kind: &'static str,
        quantity_delta: i32,
        reserved_delta: i32,
        order_id: Option<OrderId>,
        note: Option<String>,
    },
    Stock(StockUpdated),
    Price(PriceChanged),
}

/// The fields of a new variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVariant {
    pub sku: Sku,
    pub name: String,
    pub price: Money,
    pub quantity: i64,
    pub status: VariantStatus,
    pub attributes: Attributes,
}

/// The descriptive fields of a product (everything but its variants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Details {
    pub name: String,
    pub description: String,
    pub status: ProductStatus,
    pub category_id: Option<Uuid>,
    pub attributes: Attributes,
    pub images: Vec<Image>,
}

/// The Product aggregate root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: Uuid,
    pub details: Details,
    /// In SKU order.
    variants: Vec<Variant>,
    /// The version this copy was loaded at (0: never stored); the repository stores it only
    /// over that same version.
    pub version: i64,
    changes: Vec<Change>,
}

pub const MAX_NAME: usize = 200;
pub const MAX_TEXT: usize = 10_000;
pub const MAX_ATTRIBUTES: usize = 100;
pub const MAX_IMAGES: usize = 50;
pub const MAX_VARIANTS: usize = 500;

/// A one-line text of the model, by the rules every stored text follows ([`runtime::text`]).
fn check_text(field: &str, value: &str, max: usize, required: bool) -> Result<(), Rule> {
    runtime::text::check(value, max, !required).map_err(|why| invalid(field, why))
}

fn check_attributes(field: &str, attributes: &Attributes) -> Result<(), Rule> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(invalid(
            field,
            format!("at most {MAX_ATTRIBUTES} attributes"),
        ));
    }
    for (name, value) in attributes {
        check_text(&format!("{field}/{name}"), name, 64, true)?;
        check_text(&format!("{field}/{name}"), value, 1000, false)?;
    }
    Ok(())
}

impl Details {
    pub fn check(&self) -> Result<(), Rule> {
        check_text("name", &self.name, MAX_NAME, true)?;
        runtime::text::check_multiline(&self.description, MAX_TEXT, true)
            .map_err(|why| invalid("description", why))?;
        check_attributes("attributes", &self.attributes)?;
        if self.images.len() > MAX_IMAGES {
            return Err(invalid("images", format!("at most {MAX_IMAGES} images")));
        }
        for (i, image) in self.images.iter().enumerate() {
            let url = image.url.as_str();
            if !(url.starts_with("https://") || url.starts_with("http://") || url.starts_with('/'))
            {
                return Err(invalid(
                    format!("images/{i}/url"),
                    "an http(s) URL or an absolute path",
                ));
            }
            check_text(&format!("images/{i}/url"), url, 2000, true)?;
            check_text(&format!("images/{i}/alt"), &image.alt, 500, false)?;
        }
        Ok(())
    }
}

impl NewVariant {
    fn check(&self, at: usize) -> Result<(), Rule> {
        check_text(&format!("variants/{at}/name"), &self.name, MAX_NAME, true)?;
        if self.price.minor < 0 {
            return Err(Rule::NegativePrice);
        }
        check_attributes(&format!("variants/{at}/attributes"), &self.attributes)?;
        Inventory::new(self.quantity, 0)?;
        Ok(())
    }
}

impl Product {
    /// A new product with its variants. Each variant's price is a `PriceChanged` (from none)
    /// and its initial stock an `adjust` movement.
    pub fn create(
        id: Uuid,
        details: Details,
        variants: Vec<(Uuid, NewVariant)>,
    ) -> Result<Self, Rule> {
        details.check()?;
        let mut product = Self {
            id,
            details,
            variants: Vec::new(),
            version: 0,
            changes: Vec::new(),
        };
        for (variant_id, v) in variants {
            product.add_variant(variant_id, v)?;
        }
        Ok(product)
    }

    /// A product as stored, with no changes pending.
    pub fn restore(id: Uuid, details: Details, variants: Vec<Variant>, version: i64) -> Self {
        Self {
            id,
            details,
            variants,
            version,
            changes: Vec::new(),
        }
    }

    pub fn variants(&self) -> &[Variant] {
        &self.variants
    }

    pub fn variant(&self, id: Uuid) -> Option<&Variant> {
        self.variants.iter().find(|v| v.id == id)
    }

    /// The changes made since it was created or restored, oldest first.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Replace the descriptive fields.
    pub fn update(&mut self, details: Details) -> Result<(), Rule> {
        details.check()?;
        self.details = details;
        Ok(())
    }

    pub fn add_variant(&mut self, id: Uuid, v: NewVariant) -> Result<(), Rule> {
        if self.variants.len() >= MAX_VARIANTS {
            return Err(invalid(
                "variants",
                format!("at most {MAX_VARIANTS} variants"),
            ));
        }
        v.check(self.variants.len())?;
        if self.variants.iter().any(|o| o.sku == v.sku) {
            return Err(Rule::DuplicateSku(v.sku));
        }
        if self.variants.iter().any(|o| o.id == id) {
            return Err(invalid(
                "variants",
                format!("variant id {id} appears twice"),
            ));
        }
        let inventory = Inventory::new(0, 0)?;
        // Variants are kept in SKU order, the order they are stored and locked in.
        let at = self.variants.partition_point(|o| o.sku < v.sku);
        self.variants.insert(
            at,
            Variant {
                id,
                sku: v.sku.clone(),
                name: v.name,
                price: v.price.clone(),
                status: v.status,
                inventory,
                attributes: v.attributes,
            },
        );
        self.changes.push(Change::Price(PriceChanged {
            sku: v.sku,
            previous: None,
            price: v.price,
        }));
        if v.quantity > 0 {
            self.adjust_stock(id, v.quantity, Some("initial stock".into()))?;
        }
        Ok(())
    }

    /// Change a variant's name, status and attributes (not its SKU, price or stock: those
    /// have operations of their own).
    pub fn update_variant(
        &mut self,
        id: Uuid,
        name: String,
        status: VariantStatus,
        attributes: Attributes,
    ) -> Result<(), Rule> {
        check_text("name", &name, MAX_NAME, true)?;
        check_attributes("attributes", &attributes)?;
        let v = self.variant_mut(id)?;
        v.name = name;
        v.status = status;
        v.attributes = attributes;
        Ok(())
    }

    /// Remove a variant that holds no reserved units.
    pub fn remove_variant(&mut self, id: Uuid) -> Result<Variant, Rule> {
        let at = self
            .variants
            .iter()
            .position(|v| v.id == id)
            .ok_or(Rule::NoVariant(id))?;
        let v = &self.variants[at];
        if v.inventory.reserved() > 0 {
            return Err(Rule::StillReserved {
                sku: v.sku.clone(),
                reserved: v.inventory.reserved(),
            });
        }
        Ok(self.variants.remove(at))
    }

    /// Every variant's reserved units, to refuse deleting a product that holds some.
    pub fn check_deletable(&self) -> Result<(), Rule> {
        match self.variants.iter().find(|v| v.inventory.reserved() > 0) {
            Some(v) => Err(Rule::StillReserved {
                sku: v.sku.clone(),
                reserved: v.inventory.reserved(),
            }),
            None => Ok(()),
        }
    }

    /// Set a variant's price; a `PriceChanged` when it differs.
    pub fn change_price(&mut self, id: Uuid, price: Money) -> Result<bool, Rule> {
        if price.minor < 0 {
            return Err(Rule::NegativePrice);
        }
        let v = self.variant_mut(id)?;
        if v.price == price {
            return Ok(false);
        }
        let previous = std::mem::replace(&mut v.price, price.clone());
        let sku = v.sku.clone();
        self.changes.push(Change::Price(PriceChanged {
            sku,
            previous: Some(previous),
            price,
        }));
        Ok(true)
    }

    /// Change a variant's units on hand by `delta` (an `adjust` movement).
    pub fn adjust_stock(
        &mut self,
        id: Uuid,
        delta: i64,
        note: Option<String>,
    ) -> Result<Inventory, Rule> {
        if let Some(n) = &note {
            check_text("note", n, 500, false)?;
        }
        self.move_stock(id, movement::ADJUST, None, note, |i| i.adjust(delta))
    }

    /// Hold `quantity` units of an active variant for `order`.
    pub fn reserve(&mut self, id: Uuid, quantity: i64, order: OrderId) -> Result<Inventory, Rule> {
        let v = self.variant(id).ok_or(Rule::NoVariant(id))?;
        if v.status != VariantStatus::Active {
            return Err(Rule::Inactive(v.sku.clone()));
        }
        self.move_stock(id, movement::RESERVE, Some(order), None, |i| {
            i.reserve(quantity)
        })
    }

    /// Put back `quantity` units held for `order` (`kind`: `release`, or `expire` when the
    /// hold ran out).
    pub fn release(
        &mut self,
        id: Uuid,
        quantity: i64,
        order: OrderId,
        kind: &'static str,
    ) -> Result<Inventory, Rule> {
        debug_assert!(kind == movement::RELEASE || kind == movement::EXPIRE);
        self.move_stock(id, kind, Some(order), None, |i| i.release(quantity))
    }

    /// Sell `quantity` units held for `order`.
    pub fn consume(&mut self, id: Uuid, quantity: i64, order: OrderId) -> Result<Inventory, Rule> {
        self.move_stock(id, movement::CONSUME, Some(order), None, |i| {
            i.consume(quantity)
        })
    }

    fn variant_mut(&mut self, id: Uuid) -> Result<&mut Variant, Rule> {
        self.variants
            .iter_mut()
            .find(|v| v.id == id)
            .ok_or(Rule::NoVariant(id))
    }

    fn move_stock(
        &mut self,
        id: Uuid,
        kind: &'static str,
        order_id: Option<OrderId>,
        note: Option<String>,
        op: impl FnOnce(Inventory) -> Result<Inventory, Rule>,
    ) -> Result<Inventory, Rule> {
        let v = self.variant_mut(id)?;
        let before = v.inventory;
        let after = op(before)?;
        v.inventory = after;
        let sku = v.sku.clone();
        self.changes.push(Change::Movement {
            sku: sku.clone(),
            kind,
            quantity_delta: after.quantity - before.quantity,
            reserved_delta: after.reserved - before.reserved,
            order_id,
            note,
        });
        self.changes.push(Change::Stock(StockUpdated {
            sku,
            quantity: i64::from(after.quantity),
            reserved: i64::from(after.reserved),
            available: i64::from(after.available()),
            movement: kind.to_owned(),
            order_id,
        }));
        Ok(after)
    }
}

/// An attribute a category's products describe themselves with (a value object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryAttribute {
    pub name: String,
    pub kind: AttributeKind,
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttributeKind {
    Text,
    Number,
    Boolean,
}

impl AttributeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Number => "number",
            Self::Boolean => "boolean",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "text" => Self::Text,
            "number" => Self::Number,
            "boolean" => Self::Boolean,
            _ => return None,
        })
    }

    fn accepts(self, value: &str) -> bool {
        match self {
            Self::Text => true,
            Self::Number => value.parse::<f64>().is_ok_and(f64::is_finite),
            Self::Boolean => matches!(value, "true" | "false"),
        }
    }
}

/// The Category aggregate root: a node of the category tree (its sub-categories are
/// categories whose parent it is: deleting it deletes them) and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Category {
    pub id: Uuid,
    pub parent_id: Option<Uuid>,
    pub name: String,
    pub slug: String,
    pub attributes: Vec<CategoryAttribute>,
    pub version: i64,
}

impl Category {
    pub fn check(&self) -> Result<(), Rule> {
        check_text("name", &self.name, MAX_NAME, true)?;
        let slug_ok =
            !self.slug.is_empty()
                && self.slug.len() <= 64
                && self.slug.bytes().enumerate().all(|(i, b)| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && b == b'-')
                });
        if !slug_ok {
            return Err(invalid(
                "slug",
                "1 to 64 lowercase letters, digits and '-', not starting with '-'",
            ));
        }
        if self.parent_id == Some(self.id) {
            return Err(invalid("parent_id", "a category cannot be its own parent"));
        }
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err(invalid(
                "attributes",
                format!("at most {MAX_ATTRIBUTES} attributes"),
            ));
        }
        for (i, a) in self.attributes.iter().enumerate() {
            check_text(&format!("attributes/{i}/name"), &a.name, 64, true)?;
            if self.attributes[..i].iter().any(|b| b.name == a.name) {
                return Err(invalid(
                    format!("attributes/{i}/name"),
                    format!("{} appears twice", a.name),
                ));
            }
        }
        Ok(())
    }

    /// Whether a product's attributes describe it as this category asks: every required
    /// attribute present, every known one of its kind.
    pub fn check_product(&self, attributes: &Attributes) -> Result<(), Rule> {
        for a in &self.attributes {
            match attributes.get(&a.name) {
                None if a.required => {
                    return Err(invalid(
                        format!("attributes/{}", a.name),
                        format!("required by the category {}", self.slug),
                    ));
                }
                Some(value) if !a.kind.accepts(value) => {
                    return Err(invalid(
                        format!("attributes/{}", a.name),
                        format!("must be a {}", a.kind.as_str()),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagas::shop::Currency;

    fn eur(minor: i64) -> Money {
        Money {
            minor,
            currency: Currency::parse("EUR").unwrap(),
        }
    }

    fn inv(q: i64, r: i64) -> Inventory {
        Inventory::new(q, r).unwrap()
    }

    #[test]
    fn inventory_rules_as_a_table() {
        type Op = fn(Inventory, i64) -> Result<Inventory, Rule>;
        let reserve: Op = Inventory::reserve;
        let release: Op = Inventory::release;
        let consume: Op = Inventory::consume;
        let adjust: Op = Inventory::adjust;
        // (name, before (quantity, reserved), op, n, after or the rule broken)
        type Row = (&'static str, (i64, i64), Op, i64, Result<(i32, i32), Rule>);
        let table: &[Row] = &[
            ("reserve what is there", (5, 0), reserve, 5, Ok((5, 5))),
            (
                "reserve one too many",
                (5, 2),
                reserve,
                4,
                Err(Rule::Insufficient {
                    available: 3,
                    asked: 4,
                }),
            ),
            (
                "reserve nothing",
                (5, 0),
                reserve,
                0,
                Err(Rule::NotPositive(0)),
            ),
            (
                "reserve a negative",
                (5, 0),
                reserve,
                -1,
                Err(Rule::NotPositive(-1)),
            ),
            ("release what is held", (5, 3), release, 3, Ok((5, 0))),
            (
                "release more than held",
                (5, 3),
                release,
                4,
                Err(Rule::NotReserved {
                    reserved: 3,
                    asked: 4,
                }),
            ),
            ("consume what is held", (5, 3), consume, 2, Ok((3, 1))),
            (
                "consume more than held",
                (5, 1),
                consume,
                2,
                Err(Rule::NotReserved {
                    reserved: 1,
                    asked: 2,
                }),
            ),
            ("adjust up", (5, 3), adjust, 10, Ok((15, 3))),
            (
                "adjust down to what is held",
                (5, 3),
                adjust,
                -2,
                Ok((3, 3)),
            ),
            (
                "adjust below what is held",
                (5, 3),
                adjust,
                -3,
                Err(Rule::BelowReserved {
                    quantity: 2,
                    reserved: 3,
                }),
            ),
            (
                "adjust past the maximum",
                (5, 0),
                adjust,
                i64::from(MAX_QUANTITY),
                Err(Rule::TooMuch { max: MAX_QUANTITY }),
            ),
        ];
        for (name, (q, r), op, n, want) in table {
            let got = op(inv(*q, *r), *n).map(|i| (i.quantity(), i.reserved()));
            assert_eq!(&got, want, "{name}");
            if let Ok((q, r)) = got {
                assert!(q >= r && q - r >= 0, "{name}: available never negative");
            }
        }
    }

    #[test]
    fn inventory_refuses_impossible_levels() {
        assert_eq!(
            Inventory::new(2, 3),
            Err(Rule::BelowReserved {
                quantity: 2,
                reserved: 3
            })
        );
        assert!(Inventory::new(-1, 0).is_err());
        assert!(Inventory::new(3, -1).is_err());
        assert_eq!(inv(7, 3).available(), 4);
    }

    fn details(name: &str) -> Details {
        Details {
            name: name.into(),
            description: String::new(),
            status: ProductStatus::Active,
            category_id: None,
            attributes: Attributes::new(),
            images: vec![],
        }
    }

    fn variant(sku: &str, quantity: i64) -> NewVariant {
        NewVariant {
            sku: Sku::parse(sku).unwrap(),
            name: sku.into(),
            price: eur(1000),
            quantity,
            status: VariantStatus::Active,
            attributes: Attributes::new(),
        }
    }

    #[test]
    fn a_new_product_prices_and_stocks_each_variant_once() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let p = Product::create(
            Uuid::now_v7(),
            details("Tee"),
            vec![(a, variant("TEE-S", 4)), (b, variant("TEE-M", 0))],
        )
        .unwrap();
        let prices = p
            .changes()
            .iter()
            .filter(|c| matches!(c, Change::Price(_)))
            .count();
        let stock: Vec<_> = p
            .changes()
            .iter()
            .filter_map(|c| match c {
                Change::Stock(s) => {
                    Some((s.sku.as_str().to_owned(), s.quantity, s.movement.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(prices, 2);
        // No movement for a variant created empty.
        assert_eq!(stock, vec![("TEE-S".to_owned(), 4, "adjust".to_owned())]);
        assert_eq!(p.variant(a).unwrap().inventory.available(), 4);
    }

    #[test]
    fn product_rules_as_a_table() {
        let id = Uuid::now_v7();
        let fresh = || {
            Product::create(
                Uuid::now_v7(),
                details("Tee"),
                vec![(id, variant("TEE-S", 2))],
            )
            .unwrap()
        };
        type Case = (
            &'static str,
            fn(&mut Product, Uuid) -> Result<(), Rule>,
            Option<fn(&Rule) -> bool>,
        );
        let table: &[Case] = &[
            (
                "a duplicate SKU",
                |p, _| p.add_variant(Uuid::now_v7(), variant("TEE-S", 0)),
                Some(|e| matches!(e, Rule::DuplicateSku(_))),
            ),
            (
                "a second SKU",
                |p, _| p.add_variant(Uuid::now_v7(), variant("TEE-M", 0)),
                None,
            ),
            (
                "reserve an inactive variant",
                |p, v| {
                    p.update_variant(v, "S".into(), VariantStatus::Inactive, Attributes::new())?;
                    p.reserve(v, 1, OrderId::from_uuid(Uuid::now_v7()))
                        .map(drop)
                },
                Some(|e| matches!(e, Rule::Inactive(_))),
            ),
            (
                "reserve an unknown variant",
                |p, _| {
                    p.reserve(Uuid::now_v7(), 1, OrderId::from_uuid(Uuid::now_v7()))
                        .map(drop)
                },
                Some(|e| matches!(e, Rule::NoVariant(_))),
            ),
            (
                "remove a variant with reserved units",
                |p, v| {
                    p.reserve(v, 1, OrderId::from_uuid(Uuid::now_v7()))?;
                    p.remove_variant(v).map(drop)
                },
                Some(|e| matches!(e, Rule::StillReserved { .. })),
            ),
            (
                "delete a product with reserved units",
                |p, v| {
                    p.reserve(v, 2, OrderId::from_uuid(Uuid::now_v7()))?;
                    p.check_deletable()
                },
                Some(|e| matches!(e, Rule::StillReserved { .. })),
            ),
            (
                "a negative price",
                |p, v| p.change_price(v, eur(-1)).map(drop),
                Some(|e| *e == Rule::NegativePrice),
            ),
            (
                "an empty name",
                |p, _| p.update(details(" ")),
                Some(|e| matches!(e, Rule::Invalid { .. })),
            ),
            (
                "a control character",
                |p, _| p.update(details("Tee\u{0}")),
                Some(|e| matches!(e, Rule::Invalid { .. })),
            ),
            (
                "a text direction override",
                |p, _| p.update(details("Tee\u{202E}")),
                Some(|e| matches!(e, Rule::Invalid { .. })),
            ),
            (
                "an image that is not a URL",
                |p, _| {
                    let mut d = details("Tee");
                    d.images.push(Image {
                        url: "javascript:alert(1)".into(),
                        alt: String::new(),
                    });
                    p.update(d)
                },
                Some(|e| matches!(e, Rule::Invalid { .. })),
            ),
        ];
        for (name, change, refused) in table {
            let mut p = fresh();
            let before = p.clone();
            let got = change(&mut p, id);
            match (refused, &got) {
                (None, Ok(())) => {}
                (Some(is), Err(e)) if is(e) => {}
                _ => panic!("{name}: got {got:?}"),
            }
            // Cases that are one refused operation (not a reservation first).
            if refused.is_some() && !name.contains("reserve") {
                assert_eq!(p, before, "{name}: a refused change changes nothing");
            }
        }
    }

    #[test]
    fn a_price_change_is_an_event_only_when_the_price_changes() {
        let v = Uuid::now_v7();
        let mut p = Product::create(
            Uuid::now_v7(),
            details("Tee"),
            vec![(v, variant("TEE-S", 0))],
        )
        .unwrap();
        p.take_changes();
        assert_eq!(p.change_price(v, eur(1000)), Ok(false));
        assert!(p.changes().is_empty());
        assert_eq!(p.change_price(v, eur(1200)), Ok(true));
        assert_eq!(
            p.take_changes(),
            vec![Change::Price(PriceChanged {
                sku: Sku::parse("TEE-S").unwrap(),
                previous: Some(eur(1000)),
                price: eur(1200),
            })]
        );
    }

    #[test]
    fn every_stock_change_is_a_movement_and_an_event() {
        let v = Uuid::now_v7();
        let order = OrderId::from_uuid(Uuid::now_v7());
        let mut p = Product::create(
            Uuid::now_v7(),
            details("Tee"),
            vec![(v, variant("TEE-S", 5))],
        )
        .unwrap();
        p.take_changes();
        p.reserve(v, 3, order).unwrap();
        p.release(v, 1, order, movement::EXPIRE).unwrap();
        p.consume(v, 2, order).unwrap();
        p.adjust_stock(v, 4, Some("delivery".into())).unwrap();
        let moves: Vec<(&str, i32, i32)> = p
            .changes()
            .iter()
            .filter_map(|c| match c {
                Change::Movement {
                    kind,
                    quantity_delta,
                    reserved_delta,
                    ..
                } => Some((*kind, *quantity_delta, *reserved_delta)),
                _ => None,
            })
            .collect();
        assert_eq!(
            moves,
            vec![
                ("reserve", 0, 3),
                ("expire", 0, -1),
                ("consume", -2, -2),
                ("adjust", 4, 0)
            ]
        );
        let events = p
            .changes()
            .iter()
            .filter(|c| matches!(c, Change::Stock(_)))
            .count();
        assert_eq!(events, moves.len());
        assert_eq!(p.variant(v).unwrap().inventory, inv(7, 0));
    }

    #[test]
    fn category_rules_as_a_table() {
        let ok = Category {
            id: Uuid::now_v7(),
            parent_id: None,
            name: "Shirts".into(),
            slug: "shirts".into(),
            attributes: vec![CategoryAttribute {
                name: "size".into(),
                kind: AttributeKind::Text,
                required: true,
            }],
            version: 0,
        };
        assert_eq!(ok.check(), Ok(()));
        let bad: Vec<(&str, Category)> = vec![
            (
                "an upper-case slug",
                Category {
                    slug: "Shirts".into(),
                    ..ok.clone()
                },
            ),
            (
                "a slug starting with -",
                Category {
                    slug: "-s".into(),
                    ..ok.clone()
                },
            ),
            (
                "its own parent",
                Category {
                    parent_id: Some(ok.id),
                    ..ok.clone()
                },
            ),
            (
                "an empty name",
                Category {
                    name: String::new(),
                    ..ok.clone()
                },
            ),
            (
                "an attribute twice",
                Category {
                    attributes: vec![ok.attributes[0].clone(), ok.attributes[0].clone()],
                    ..ok.clone()
                },
            ),
        ];
        for (name, c) in bad {
            assert!(matches!(c.check(), Err(Rule::Invalid { .. })), "{name}");
        }
        let mut attrs = Attributes::new();
        assert!(
            ok.check_product(&attrs).is_err(),
            "a required attribute missing"
        );
        attrs.insert("size".into(), "M".into());
        assert_eq!(ok.check_product(&attrs), Ok(()));
        let numeric = Category {
            attributes: vec![CategoryAttribute {
                name: "weight".into(),
                kind: AttributeKind::Number,
                required: false,
            }],
            ..ok.clone()
        };
        attrs.insert("weight".into(), "heavy".into());
        assert!(
            numeric.check_product(&attrs).is_err(),
            "a number that is not one"
        );
        attrs.insert("weight".into(), "0.5".into());
        assert_eq!(numeric.check_product(&attrs), Ok(()));
    }
}
