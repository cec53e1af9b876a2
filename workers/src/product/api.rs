// Problem (an HTTP error) is large by nature and built once per failed request.
#![allow(clippy::result_large_err)]

//! The Product service's REST API: products with their variants, categories, stock and
//! prices, with the conventions of the orchestrator's API (RFC 9457 problems, JSON objects
//! only, unknown fields refused, keyset pagination).
//!
//! Optimistic locking over HTTP: every product and category answers with an `ETag` of its
//! version (`"3"`), and every change (`PATCH`, `PUT`, `DELETE`, and `POST` under a product)
//! must send that ETag back in `If-Match`: a stale one is refused with 412, a missing one (or
//! `*`) with 428. The change is made with the root's row locked ([`repo::Products::lock`]),
//! so of two writers that read the same version one succeeds and the other gets 412: no
//! update is lost.
//!
//! Must never: change a product or category without a matching `If-Match`; answer 2xx before
//! the change, its stock movements and its events committed.

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use runtime::problem::{FieldError, JsonBody, PathPair, PathParam, Problem, parse_query};
use sagas::shop::{Money, Sku};
use sagas::wire::Subjects;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::model::{
    Attributes, Category, CategoryAttribute, Details, Image, NewVariant, Product, ProductStatus,
    Rule, Variant, VariantStatus,
};
use super::repo::{self, Categories, Products, UnitOfWork};

#[derive(Clone)]
pub struct Api {
    pool: PgPool,
    subjects: Subjects,
}

/// The correlation id header, as the orchestrator's API reads and answers it.
const CORRELATION: &str = "x-correlation-id";

/// What each of this service's problem types means; served at `/problems/<slug>`.
pub const CATALOGUE: &[(&str, &str)] = &[
    (
        "invalid-request",
        "A field of the body is missing, unknown, of the wrong type or breaks a rule of the model; `errors` names each by its JSON pointer. Nothing was written.",
    ),
    (
        "malformed-json",
        "The body is not valid JSON. Nothing was written.",
    ),
    (
        "unsupported-media-type",
        "The body must be sent as application/json.",
    ),
    ("not-found", "No such product, variant or category."),
    (
        "precondition-failed",
        "The If-Match header names a version that is no longer the current one: someone changed the resource since you read it. Read it again (its ETag), and apply your change to what you read. Nothing was written.",
    ),
    (
        "precondition-required",
        "A change must send If-Match with the ETag of the version it read (not `*`): changes made without one could overwrite another's. Nothing was written.",
    ),
    (
        "conflict",
        "The change conflicts with the stock or with other data: not enough available, units still reserved, a SKU or slug taken, products in a category. `detail` says which. Nothing was written.",
    ),
    (
        "invalid-query",
        "A query parameter is unknown or not valid.",
    ),
    ("invalid-path", "An id in the path is not a UUID."),
    ("unavailable", "The database did not answer; try again."),
];

impl Api {
    pub fn new(pool: PgPool, subjects: Subjects) -> Self {
        Self { pool, subjects }
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/products", get(list_products).post(create_product))
            .route(
                "/products/{id}",
                get(get_product)
                    .patch(update_product)
                    .delete(delete_product),
            )
            .route("/products/{id}/variants", axum::routing::post(add_variant))
            .route(
                "/products/{id}/variants/{variant}",
                axum::routing::patch(update_variant).delete(remove_variant),
            )
            .route(
                "/products/{id}/variants/{variant}/stock-adjustments",
                axum::routing::post(adjust_stock),
            )
            .route(
                "/products/{id}/variants/{variant}/price",
                axum::routing::put(change_price),
            )
            .route("/variants/{variant}/availability", get(availability))
            .route("/skus/{sku}/availability", get(availability_by_sku))
            .route("/skus", get(lookup_skus))
            .route("/categories", get(list_categories).post(create_category))
            .route(
                "/categories/{id}",
                get(get_category)
                    .patch(update_category)
                    .delete(delete_category),
            )
            .route(
                "/problems/{slug}",
                get(|PathParam(slug): PathParam| async move {
                    runtime::problem::describe_type(CATALOGUE, &slug)
                }),
            )
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self)
    }

    async fn begin(&self, headers: &HeaderMap) -> Result<UnitOfWork, Problem> {
        let correlation = headers
            .get(CORRELATION)
            .and_then(|v| v.to_str().ok())
            .filter(|v| (1..=128).contains(&v.len()) && !v.chars().any(char::is_control))
            .map_or_else(|| format!("product-api-{}", Uuid::now_v7()), str::to_owned);
        Ok(UnitOfWork::begin(&self.pool, &self.subjects, &correlation).await?)
    }

    /// Commit; the events it wrote are published by the next relay tick.
    async fn commit(&self, uow: UnitOfWork) -> Result<(), Problem> {
        uow.commit().await?;
        Ok(())
    }
}

fn problem(e: repo::Error) -> Problem {
    match e {
        repo::Error::Rule(rule) => rule_problem(rule),
        repo::Error::NotFound => Problem::not_found("no such product, variant or category"),
        repo::Error::Stale {
            what,
            expected,
            actual,
        } => Problem::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition-failed",
            "The resource changed since it was read",
            format!("the {what} is at version {actual}, If-Match named {expected}: read it again"),
        )
        .with_extra(json!({ "current_etag": etag(actual) })),
        repo::Error::Conflict(detail) => conflict(detail),
        repo::Error::Database(e) => e.into(),
    }
}

fn conflict(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
}

fn rule_problem(rule: Rule) -> Problem {
    match rule {
        Rule::Invalid { field, problem } => {
            Problem::invalid(vec![FieldError::new(format!("/{field}"), problem)])
        }
        Rule::NegativePrice => Problem::invalid(vec![FieldError::new(
            "/price/minor",
            "must not be negative",
        )]),
        Rule::NotPositive(_) | Rule::TooMuch { .. } => {
            Problem::invalid(vec![FieldError::new("", rule.to_string())])
        }
        Rule::DuplicateSku(_) => {
            Problem::invalid(vec![FieldError::new("/variants", rule.to_string())])
        }
        Rule::NoVariant(_) => Problem::not_found(rule.to_string()),
        Rule::Insufficient { .. }
        | Rule::NotReserved { .. }
        | Rule::BelowReserved { .. }
        | Rule::Inactive(_)
        | Rule::StillReserved { .. } => conflict(rule.to_string()),
    }
}

fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// The version an `If-Match` names: 428 without one (or with `*`), 412 when it is not a
/// version of this service's (it cannot match).
fn if_match(headers: &HeaderMap) -> Result<i64, Problem> {
    let required = |detail: &str| {
        Problem::new(
            StatusCode::PRECONDITION_REQUIRED,
            "precondition-required",
            "If-Match is required",
            detail.to_owned(),
        )
    };
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Err(required(
            "send If-Match with the ETag of the version you read",
        ));
    };
    let value = value.to_str().unwrap_or_default().trim();
    if value == "*" {
        return Err(required(
            "If-Match: * would overwrite whatever is there: name the ETag you read",
        ));
    }
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            Problem::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition-failed",
                "The resource changed since it was read",
                format!("If-Match {value:?} is not an ETag of this resource"),
            )
        })
}

/// Check `If-Match` against the version of what was locked.
fn matches(what: &'static str, expected: i64, actual: i64) -> Result<(), Problem> {
    if expected != actual {
        return Err(problem(repo::Error::Stale {
            what,
            expected,
            actual,
        }));
    }
    Ok(())
}

fn uuid(segment: &str, name: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(segment).map_err(|_| {
        Problem::bad_request(
            "invalid-path",
            "Invalid path",
            format!("the {name} id in the path is not a UUID: {segment:?}"),
        )
    })
}

fn with_etag(status: StatusCode, version: i64, body: Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag(version)) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

#[derive(Serialize)]
struct VariantView<'a> {
    id: Uuid,
    sku: &'a Sku,
    name: &'a str,
    price: &'a Money,
    status: VariantStatus,
    quantity: i32,
    reserved: i32,
    available: i32,
    attributes: &'a Attributes,
}

fn variant_view(v: &Variant) -> VariantView<'_> {
    VariantView {
        id: v.id,
        sku: &v.sku,
        name: &v.name,
        price: &v.price,
        status: v.status,
        quantity: v.inventory.quantity(),
        reserved: v.inventory.reserved(),
        available: v.inventory.available(),
        attributes: &v.attributes,
    }
}

fn product_view(p: &Product) -> Value {
    let d = &p.details;
    json!({
        "id": p.id,
        "name": d.name,
        "description": d.description,
        "status": d.status,
        "category_id": d.category_id,
        "attributes": d.attributes,
        "images": d.images,
        "variants": p.variants().iter().map(variant_view).collect::<Vec<_>>(),
        "version": p.version,
    })
}

fn category_view(c: &Category, children: &[Uuid]) -> Value {
    json!({
        "id": c.id,
        "parent_id": c.parent_id,
        "name": c.name,
        "slug": c.slug,
        "attributes": c.attributes,
        "children": children,
        "version": c.version,
    })
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct VariantInput {
    #[serde(default)]
    id: Option<Uuid>,
    sku: Sku,
    name: String,
    price: Money,
    #[serde(default)]
    quantity: u32,
    #[serde(default = "active_variant")]
    status: VariantStatus,
    #[serde(default)]
    attributes: Attributes,
}

fn active_variant() -> VariantStatus {
    VariantStatus::Active
}

fn active_product() -> ProductStatus {
    ProductStatus::Active
}

impl VariantInput {
    fn split(self) -> (Uuid, NewVariant) {
        (
            self.id.unwrap_or_else(Uuid::now_v7),
            NewVariant {
                sku: self.sku,
                name: self.name,
                price: self.price,
                quantity: i64::from(self.quantity),
                status: self.status,
                attributes: self.attributes,
            },
        )
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NewProductInput {
    #[serde(default)]
    id: Option<Uuid>,
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default = "active_product")]
    status: ProductStatus,
    #[serde(default)]
    category_id: Option<Uuid>,
    #[serde(default)]
    attributes: Attributes,
    #[serde(default)]
    images: Vec<Image>,
    #[serde(default)]
    variants: Vec<VariantInput>,
}

/// A partial update: absent fields keep their value; `category_id: null` takes the product
/// out of its category.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ProductPatch {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    status: Option<ProductStatus>,
    #[serde(default, with = "double_option")]
    category_id: Option<Option<Uuid>>,
    #[serde(default)]
    attributes: Option<Attributes>,
    #[serde(default)]
    images: Option<Vec<Image>>,
}

/// `Option<Option<T>>` that tells an absent field (`None`) from `null` (`Some(None)`).
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }

    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }
}

/// The product's attributes checked against its category's (422 naming the category when it
/// does not exist).
async fn check_category(uow: &mut UnitOfWork, details: &Details) -> Result<(), Problem> {
    let Some(id) = details.category_id else {
        return Ok(());
    };
    let category = Categories::get(uow.conn(), id).await?.ok_or_else(|| {
        Problem::invalid(vec![FieldError::new(
            "/category_id",
            format!("no category {id}"),
        )])
    })?;
    category
        .check_product(&details.attributes)
        .map_err(rule_problem)
}

async fn create_product(
    State(api): State<Api>,
    headers: HeaderMap,
    JsonBody(input): JsonBody<NewProductInput>,
) -> Result<Response, Problem> {
    let details = Details {
        name: input.name,
        description: input.description,
        status: input.status,
        category_id: input.category_id,
        attributes: input.attributes,
        images: input.images,
    };
    let id = input.id.unwrap_or_else(Uuid::now_v7);
    let variants = input
        .variants
        .into_iter()
        .map(VariantInput::split)
        .collect();
    let mut product = Product::create(id, details, variants).map_err(rule_problem)?;
    let mut uow = api.begin(&headers).await?;
    check_category(&mut uow, &product.details).await?;
    Products::add(&mut uow, &mut product)
        .await
        .map_err(problem)?;
    api.commit(uow).await?;
    let mut response = with_etag(StatusCode::CREATED, product.version, product_view(&product));
    if let Ok(v) = HeaderValue::from_str(&format!("/products/{id}")) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

async fn get_product(
    State(api): State<Api>,
    PathParam(id): PathParam,
) -> Result<Response, Problem> {
    let id = uuid(&id, "product")?;
    let mut conn = api.pool.acquire().await?;
    let product = Products::get(&mut conn, id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no product {id}")))?;
    Ok(with_etag(
        StatusCode::OK,
        product.version,
        product_view(&product),
    ))
}

/// Lock the product `id`, check `If-Match`, apply `change`, save, commit: the new version.
async fn change_product(
    api: &Api,
    headers: &HeaderMap,
    id: &str,
    change: impl FnOnce(&mut Product) -> Result<(), Problem>,
) -> Result<Product, Problem> {
    let id = uuid(id, "product")?;
    let expected = if_match(headers)?;
    let mut uow = api.begin(headers).await?;
    let mut product = Products::lock(&mut uow, id).await.map_err(problem)?;
    matches("product", expected, product.version)?;
    let category_before = product.details.category_id;
    let attributes_before = product.details.attributes.clone();
    change(&mut product)?;
    if product.details.category_id != category_before
        || product.details.attributes != attributes_before
    {
        check_category(&mut uow, &product.details).await?;
    }
    Products::save(&mut uow, &mut product)
        .await
        .map_err(problem)?;
    api.commit(uow).await?;
    Ok(product)
}

async fn update_product(
    State(api): State<Api>,
    PathParam(id): PathParam,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<ProductPatch>,
) -> Result<Response, Problem> {
    let product = change_product(&api, &headers, &id, |p| {
        let mut d = p.details.clone();
        if let Some(v) = patch.name {
            d.name = v;
        }
        if let Some(v) = patch.description {
            d.description = v;
        }
        if let Some(v) = patch.status {
            d.status = v;
        }
        if let Some(v) = patch.category_id {
            d.category_id = v;
        }
        if let Some(v) = patch.attributes {
            d.attributes = v;
        }
        if let Some(v) = patch.images {
            d.images = v;
        }
        p.update(d).map_err(rule_problem)
    })
    .await?;
    Ok(with_etag(
        StatusCode::OK,
        product.version,
        product_view(&product),
    ))
}

async fn delete_product(
    State(api): State<Api>,
    PathParam(id): PathParam,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = uuid(&id, "product")?;
    let expected = if_match(&headers)?;
    let mut uow = api.begin(&headers).await?;
    Products::delete(&mut uow, id, expected)
        .await
        .map_err(problem)?;
    api.commit(uow).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn add_variant(
    State(api): State<Api>,
    PathParam(id): PathParam,
    headers: HeaderMap,
    JsonBody(input): JsonBody<VariantInput>,
) -> Result<Response, Problem> {
    let (variant_id, new) = input.split();
    let product = change_product(&api, &headers, &id, |p| {
        p.add_variant(variant_id, new).map_err(rule_problem)
    })
    .await?;
    Ok(with_etag(
        StatusCode::CREATED,
        product.version,
        product_view(&product),
    ))
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct VariantPatch {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    status: Option<VariantStatus>,
    #[serde(default)]
    attributes: Option<Attributes>,
}

async fn update_variant(
    State(api): State<Api>,
    PathPair(id, variant): PathPair,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<VariantPatch>,
) -> Result<Response, Problem> {
    let variant = uuid(&variant, "variant")?;
    let product = change_product(&api, &headers, &id, |p| {
        let v = p
            .variant(variant)
            .ok_or_else(|| Problem::not_found(format!("no variant {variant} in this product")))?
            .clone();
        p.update_variant(
            variant,
            patch.name.unwrap_or(v.name),
            patch.status.unwrap_or(v.status),
            patch.attributes.unwrap_or(v.attributes),
        )
        .map_err(rule_problem)
    })
    .await?;
    Ok(with_etag(
        StatusCode::OK,
        product.version,
        product_view(&product),
    ))
}

async fn remove_variant(
    State(api): State<Api>,
    PathPair(id, variant): PathPair,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let variant = uuid(&variant, "variant")?;
    let product = change_product(&api, &headers, &id, |p| {
        p.remove_variant(variant).map(drop).map_err(rule_problem)
    })
    .await?;
    Ok(with_etag(
        StatusCode::OK,
        product.version,
        product_view(&product),
    ))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Adjustment {
    /// Units added (a delivery) or removed (a count that found fewer).
    delta: i32,
    #[serde(default)]
    note: Option<String>,
}

async fn adjust_stock(
    State(api): State<Api>,
    PathPair(id, variant): PathPair,
    headers: HeaderMap,
    JsonBody(input): JsonBody<Adjustment>,
) -> Result<Response, Problem> {
    let variant = uuid(&variant, "variant")?;
    let product = change_product(&api, &headers, &id, |p| {
        p.adjust_stock(variant, i64::from(input.delta), input.note)
            .map(drop)
            .map_err(|e| match e {
                Rule::Invalid { field, problem } if field == "delta" => {
                    Problem::invalid(vec![FieldError::new("/delta", problem)])
                }
                other => rule_problem(other),
            })
    })
    .await?;
    Ok(with_etag(
        StatusCode::OK,
        product.version,
        product_view(&product),
    ))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PriceInput {
    price: Money,
}

async fn change_price(
    State(api): State<Api>,
    PathPair(id, variant): PathPair,
    headers: HeaderMap,
    JsonBody(input): JsonBody<PriceInput>,
) -> Result<Response, Problem> {
    let variant = uuid(&variant, "variant")?;
    let product = change_product(&api, &headers, &id, |p| {
        p.change_price(variant, input.price)
            .map(drop)
            .map_err(rule_problem)
    })
    .await?;
    Ok(with_etag(
        StatusCode::OK,
        product.version,
        product_view(&product),
    ))
}

/// The brief's real-time query: a variant's stock now.
async fn availability(
    State(api): State<Api>,
    PathParam(variant): PathParam,
) -> Result<Response, Problem> {
    let variant = uuid(&variant, "variant")?;
    let row = sqlx::query!(
        "SELECT id, sku, status, quantity, reserved FROM inventory.variants WHERE id = $1",
        variant
    )
    .fetch_optional(&api.pool)
    .await?
    .ok_or_else(|| Problem::not_found(format!("no variant {variant}")))?;
    Ok(axum::Json(json!({
        "variant_id": row.id,
        "sku": row.sku,
        "status": row.status,
        "quantity": row.quantity,
        "reserved": row.reserved,
        "available": row.quantity - row.reserved,
    }))
    .into_response())
}

async fn availability_by_sku(
    State(api): State<Api>,
    PathParam(sku): PathParam,
) -> Result<Response, Problem> {
    let sku = Sku::parse(&sku)
        .map_err(|e| Problem::bad_request("invalid-path", "Invalid path", e.to_string()))?;
    let id = sqlx::query_scalar!(
        "SELECT id FROM inventory.variants WHERE sku = $1",
        sku.as_str()
    )
    .fetch_optional(&api.pool)
    .await?
    .ok_or_else(|| Problem::not_found(format!("no variant with SKU {sku}")))?;
    availability(State(api), PathParam(id.to_string())).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SkuQuery {
    /// Comma-separated SKUs (a SKU has no comma).
    sku: Option<String>,
}

/// The most SKUs one lookup names.
pub const MAX_LOOKUP: usize = 100;

/// The checkout's lookup (`GET /skus?sku=A,B`): each known SKU's variant, price, stock and
/// whether it is for sale (the variant and its product active). Unknown SKUs are left out.
async fn lookup_skus(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, Problem> {
    let q: SkuQuery = parse_query(raw.as_deref())?;
    let Some(list) = q.sku.filter(|l| !l.is_empty()) else {
        return Err(Problem::bad_query(
            "sku",
            "name one SKU or more, comma-separated",
        ));
    };
    let mut skus = Vec::new();
    for s in list.split(',') {
        let sku = Sku::parse(s).map_err(|e| Problem::bad_query("sku", e.to_string()))?;
        skus.push(sku.as_str().to_owned());
    }
    if skus.len() > MAX_LOOKUP {
        return Err(Problem::bad_query(
            "sku",
            format!("at most {MAX_LOOKUP} SKUs per lookup"),
        ));
    }
    let rows = sqlx::query!(
        r#"SELECT v.sku, v.id, v.product_id, v.price_minor, v.currency, v.quantity, v.reserved,
                  v.status = 'active' AND p.status = 'active' AS "for_sale!"
             FROM inventory.variants v JOIN inventory.products p ON p.id = v.product_id
            WHERE v.sku = ANY($1)"#,
        &skus
    )
    .fetch_all(&api.pool)
    .await?;
    let variants: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({
                "sku": r.sku,
                "variant_id": r.id,
                "product_id": r.product_id,
                "price": {"minor": r.price_minor, "currency": r.currency},
                "for_sale": r.for_sale,
                "available": r.quantity - r.reserved,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "variants": variants })).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductQuery {
    category: Option<String>,
    status: Option<String>,
    /// `name:value`: products with that attribute.
    attribute: Option<String>,
    in_stock: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

const MAX_PAGE: i64 = 100;

fn page_limit(limit: Option<&str>) -> Result<i64, Problem> {
    match limit {
        None => Ok(20),
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                Problem::bad_query("limit", format!("a whole number from 1 to {MAX_PAGE}"))
            }),
    }
}

fn query_uuid(name: &str, value: Option<&str>) -> Result<Option<Uuid>, Problem> {
    value
        .map(|v| Uuid::parse_str(v).map_err(|_| Problem::bad_query(name, "not a UUID")))
        .transpose()
}

/// Products in id order, filtered by category (its sub-categories included), status,
/// attribute and stock; `next` is the `after` of the next page.
async fn list_products(
    State(api): State<Api>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let q: ProductQuery = parse_query(raw.as_deref())?;
    let limit = page_limit(q.limit.as_deref())?;
    let category = query_uuid("category", q.category.as_deref())?;
    let after = query_uuid("after", q.after.as_deref())?;
    if let Some(s) = &q.status
        && ProductStatus::parse(s).is_none()
    {
        return Err(Problem::bad_query("status", "draft, active or archived"));
    }
    let (attr_name, attr_value) = match &q.attribute {
        None => (None, None),
        Some(a) => match a.split_once(':') {
            Some((n, v)) if !n.is_empty() => (Some(n.to_owned()), Some(v.to_owned())),
            _ => return Err(Problem::bad_query("attribute", "name:value")),
        },
    };
    let in_stock = match q.in_stock.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Problem::bad_query("in_stock", "true or false")),
    };
    let ids: Vec<Uuid> = sqlx::query_scalar!(
        r#"WITH RECURSIVE tree(id) AS (
               SELECT id FROM inventory.categories WHERE id = $1
               UNION
               SELECT c.id FROM inventory.categories c JOIN tree ON c.parent_id = tree.id
           )
           SELECT p.id FROM inventory.products p
            WHERE ($1::uuid IS NULL OR p.category_id IN (SELECT id FROM tree))
              AND ($2::text IS NULL OR p.status = $2)
              AND ($3::text IS NULL OR EXISTS (
                    SELECT 1 FROM inventory.product_attributes a
                     WHERE a.product_id = p.id AND a.name = $3 AND a.value = $4))
              AND (NOT $5 OR EXISTS (
                    SELECT 1 FROM inventory.variants v
                     WHERE v.product_id = p.id AND v.status = 'active' AND v.quantity > v.reserved))
              AND ($6::uuid IS NULL OR p.id > $6)
            ORDER BY p.id
            LIMIT $7"#,
        category,
        q.status,
        attr_name,
        attr_value,
        in_stock,
        after,
        limit + 1,
    )
    .fetch_all(&api.pool)
    .await?;
    let more = ids.len() as i64 > limit;
    let page = &ids[..ids.len().min(limit as usize)];
    let mut conn = api.pool.acquire().await?;
    // A product deleted between the two reads is left out of the page.
    let products: Vec<Value> = Products::get_many(&mut conn, page)
        .await?
        .iter()
        .map(product_view)
        .collect();
    let next = more.then(|| ids[limit as usize - 1]);
    Ok(axum::Json(json!({ "products": products, "next": next })).into_response())
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NewCategoryInput {
    #[serde(default)]
    id: Option<Uuid>,
    #[serde(default)]
    parent_id: Option<Uuid>,
    name: String,
    slug: String,
    #[serde(default)]
    attributes: Vec<CategoryAttribute>,
}

async fn create_category(
    State(api): State<Api>,
    headers: HeaderMap,
    JsonBody(input): JsonBody<NewCategoryInput>,
) -> Result<Response, Problem> {
    let mut category = Category {
        id: input.id.unwrap_or_else(Uuid::now_v7),
        parent_id: input.parent_id,
        name: input.name,
        slug: input.slug,
        attributes: input.attributes,
        version: 0,
    };
    let mut uow = api.begin(&headers).await?;
    Categories::add(&mut uow, &mut category)
        .await
        .map_err(problem)?;
    api.commit(uow).await?;
    let mut response = with_etag(
        StatusCode::CREATED,
        category.version,
        category_view(&category, &[]),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/categories/{}", category.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

async fn children(pool: &PgPool, id: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT id FROM inventory.categories WHERE parent_id = $1 ORDER BY name, id",
        id
    )
    .fetch_all(pool)
    .await
}

async fn get_category(
    State(api): State<Api>,
    PathParam(id): PathParam,
) -> Result<Response, Problem> {
    let id = uuid(&id, "category")?;
    let mut conn = api.pool.acquire().await?;
    let category = Categories::get(&mut conn, id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no category {id}")))?;
    drop(conn);
    let children = children(&api.pool, id).await?;
    Ok(with_etag(
        StatusCode::OK,
        category.version,
        category_view(&category, &children),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoryQuery {
    /// Only the sub-categories of this one; `root` for the top of the tree.
    parent: Option<String>,
}

async fn list_categories(
    State(api): State<Api>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let q: CategoryQuery = parse_query(raw.as_deref())?;
    let (all, parent) = match q.parent.as_deref() {
        None => (true, None),
        Some("root") => (false, None),
        Some(p) => (false, query_uuid("parent", Some(p))?),
    };
    let rows = sqlx::query!(
        "SELECT id, parent_id, name, slug, version FROM inventory.categories
          WHERE $1 OR parent_id IS NOT DISTINCT FROM $2
          ORDER BY name, id LIMIT 1000",
        all,
        parent,
    )
    .fetch_all(&api.pool)
    .await?;
    let categories: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({"id": r.id, "parent_id": r.parent_id, "name": r.name, "slug": r.slug, "version": r.version})
        })
        .collect();
    Ok(axum::Json(json!({ "categories": categories })).into_response())
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CategoryPatch {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    slug: Option<String>,
    #[serde(default, with = "double_option")]
    parent_id: Option<Option<Uuid>>,
    #[serde(default)]
    attributes: Option<Vec<CategoryAttribute>>,
}

async fn update_category(
    State(api): State<Api>,
    PathParam(id): PathParam,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<CategoryPatch>,
) -> Result<Response, Problem> {
    let id = uuid(&id, "category")?;
    let expected = if_match(&headers)?;
    let mut uow = api.begin(&headers).await?;
    let mut category = Categories::get(uow.conn(), id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no category {id}")))?;
    // The stored version, not the one read: the save is refused unless they match.
    category.version = expected;
    if let Some(v) = patch.name {
        category.name = v;
    }
    if let Some(v) = patch.slug {
        category.slug = v;
    }
    if let Some(v) = patch.parent_id {
        category.parent_id = v;
    }
    if let Some(v) = patch.attributes {
        category.attributes = v;
    }
    Categories::save(&mut uow, &mut category)
        .await
        .map_err(problem)?;
    api.commit(uow).await?;
    let children = children(&api.pool, id).await?;
    Ok(with_etag(
        StatusCode::OK,
        category.version,
        category_view(&category, &children),
    ))
}

async fn delete_category(
    State(api): State<Api>,
    PathParam(id): PathParam,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = uuid(&id, "category")?;
    let expected = if_match(&headers)?;
    let mut uow = api.begin(&headers).await?;
    Categories::delete(&mut uow, id, expected)
        .await
        .map_err(problem)?;
    api.commit(uow).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
