//! `POST /checkout`: validate the order, price it from the catalogue, start its saga.

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sagas::checkout::{self, PricedLine};
use sagas::shop::{Address, Customer, Line, OrderId, Quantity, Sku};
use sagas::wire::SagaId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::input::{self, text};
use super::problem::{FieldError, JsonBody, Problem};
use super::{AppState, CorrelationId};
use crate::engine::{Idempotency, NewSaga, Started};

/// The request body, as loose as JSON allows; [`validate`] turns it into domain types and
/// names every invalid field.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    pub customer: CustomerBody,
    pub items: Vec<ItemBody>,
    pub payment_token: String,
    pub shipping_address: AddressBody,
}

#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerBody {
    pub id: String,
    pub email: String,
}

#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemBody {
    pub sku: String,
    pub quantity: i64,
}

#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressBody {
    pub name: String,
    pub line1: String,
    #[serde(default)]
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Accepted {
    #[schemars(with = "uuid::Uuid")]
    pub saga_id: SagaId,
    pub order_id: String,
    pub status: &'static str,
    pub status_url: String,
}

/// A validated checkout, before pricing.
struct Valid {
    customer: Customer,
    lines: Vec<Line>,
    payment_token: String,
    address: Address,
}

fn validate(req: &CheckoutRequest, max_lines: usize) -> Result<Valid, Problem> {
    let mut errors = Vec::new();
    let customer = Customer {
        id: text(&mut errors, "/customer/id", &req.customer.id, 128),
        email: input::email(&mut errors, "/customer/email", &req.customer.email),
    };
    if req.items.is_empty() {
        errors.push(FieldError::new("/items", "the cart is empty"));
    } else if req.items.len() > max_lines {
        errors.push(FieldError::new(
            "/items",
            format!(
                "at most {max_lines} lines per order, got {}",
                req.items.len()
            ),
        ));
    }
    let mut lines: Vec<Line> = Vec::with_capacity(req.items.len());
    for (i, item) in req.items.iter().enumerate() {
        let sku = Sku::parse(&item.sku)
            .map_err(|e| errors.push(FieldError::new(format!("/items/{i}/sku"), e.0)))
            .ok();
        let quantity = Quantity::new(item.quantity)
            .map_err(|e| errors.push(FieldError::new(format!("/items/{i}/quantity"), e.0)))
            .ok();
        if let (Some(sku), Some(quantity)) = (sku, quantity) {
            if lines.iter().any(|l| l.sku == sku) {
                errors.push(FieldError::new(
                    format!("/items/{i}/sku"),
                    format!("{sku} appears twice; put the whole quantity on one line"),
                ));
            } else {
                lines.push(Line { sku, quantity });
            }
        }
    }
    let payment_token = text(&mut errors, "/payment_token", &req.payment_token, 256);
    let a = &req.shipping_address;
    let address = Address {
        name: text(&mut errors, "/shipping_address/name", &a.name, 200),
        line1: text(&mut errors, "/shipping_address/line1", &a.line1, 200),
        line2: input::optional_text(
            &mut errors,
            "/shipping_address/line2",
            a.line2.as_deref(),
            200,
        ),
        city: text(&mut errors, "/shipping_address/city", &a.city, 100),
        postal_code: text(
            &mut errors,
            "/shipping_address/postal_code",
            &a.postal_code,
            20,
        ),
        country: a.country.trim().to_owned(),
    };
    if address.country.len() != 2 || !address.country.bytes().all(|b| b.is_ascii_uppercase()) {
        // Also refuses any control character: only two capitals pass.
        errors.push(FieldError::new(
            "/shipping_address/country",
            "must be an ISO 3166-1 alpha-2 code such as ES",
        ));
    }
    if errors.is_empty() {
        Ok(Valid {
            customer,
            lines,
            payment_token,
            address,
        })
    } else {
        Err(Problem::invalid(errors))
    }
}

/// The client's `Idempotency-Key`: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    input::token_header(headers, "Idempotency-Key", 255)
}

/// The checkout of a valid order, priced from the catalogue: its order id, its start request
/// for the engine, and the payment token (a secret of the saga, never in the request). The
/// problem names every invalid field. (`POST /checkout` and the Order service's
/// `CheckoutInitiated` start checkouts through here.)
pub async fn start_request(
    state: &AppState,
    request: &CheckoutRequest,
) -> Result<(OrderId, serde_json::Value, String), Problem> {
    let valid = validate(request, state.settings.checkout.max_lines)?;
    let skus: Vec<Sku> = valid.lines.iter().map(|l| l.sku.clone()).collect();
    let listings = state
        .catalog
        .listings(&skus)
        .await
        .map_err(|e| Problem::unavailable(e.to_string()))?;
    let mut errors = Vec::new();
    let mut priced = Vec::with_capacity(valid.lines.len());
    for (i, line) in valid.lines.into_iter().enumerate() {
        match listings.get(&line.sku) {
            Some(l) if l.for_sale => priced.push(PricedLine {
                line,
                unit_price: l.price.clone(),
            }),
            Some(_) => errors.push(FieldError::new(
                format!("/items/{i}/sku"),
                format!("{} is not for sale", line.sku),
            )),
            None => errors.push(FieldError::new(
                format!("/items/{i}/sku"),
                format!("unknown SKU {}", line.sku),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(Problem::invalid(errors));
    }
    if priced
        .iter()
        .any(|l| l.unit_price.currency != priced[0].unit_price.currency)
    {
        return Err(Problem::invalid(vec![FieldError::new(
            "/items",
            "the items are priced in different currencies; place one order per currency",
        )]));
    }
    let order_id = OrderId::from_uuid(uuid::Uuid::now_v7());
    let start = checkout::Start {
        order_id,
        customer: valid.customer,
        lines: priced,
        payment_token_hint: checkout::token_hint(&valid.payment_token),
        shipping_address: valid.address,
        reservation_hold_seconds: state.settings.checkout.reservation_hold_seconds,
    };
    let mut start = serde_json::to_value(&start).expect("start requests serialize");
    if !state.settings.checkout.policies.is_empty() {
        start["policies"] =
            serde_json::to_value(&state.settings.checkout.policies).expect("policies serialize");
    }
    Ok((order_id, start, valid.payment_token))
}

pub async fn create(
    State(state): State<AppState>,
    Extension(CorrelationId(correlation_id)): Extension<CorrelationId>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CheckoutRequest>,
) -> Result<Response, Problem> {
    let received = std::time::SystemTime::now();
    let key = idempotency_key(&headers)?;
    let wait = super::wait::preference(&headers, state.settings.http.max_wait_seconds)?;
    let (order_id, start, payment_token) = start_request(&state, &request).await?;
    let idempotency = key.map(|key| Idempotency {
        // A key is the customer's own: another customer's same key is another request, and
        // a replay or a conflict never shows one customer another's saga.
        scope: format!("customer:{}", request.customer.id.trim()),
        key,
        // The digest of the request as received (canonical JSON of the parsed body).
        request_hash: Sha256::digest(serde_json::to_vec(&request).expect("requests serialize"))
            .to_vec(),
    });
    let (started, watch) = state
        .engine
        .start_watched(
            NewSaga {
                saga_type: checkout::NAME.to_owned(),
                request: start,
                correlation_id: correlation_id.clone(),
                idempotency,
                secrets: vec![(checkout::PAYMENT_TOKEN.to_owned(), payment_token)],
            },
            wait.is_some(),
        )
        .await?;
    let (id, mut status, order_id, replayed) = match started {
        Started::Created { id, status } => {
            // The request is the first span of the saga's trace (when traces are exported).
            runtime::telemetry::saga_span(
                id.as_uuid(),
                "POST /checkout",
                received,
                vec![opentelemetry::KeyValue::new(
                    "correlation_id",
                    correlation_id.clone(),
                )],
            );
            (id, status, order_id.to_string(), false)
        }
        Started::Existing { id, status } => {
            let order = super::sagas::order_id_of(&state.pool, id).await?;
            (id, status, order.unwrap_or_default(), true)
        }
        Started::KeyReused { .. } => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
                "this Idempotency-Key was already used by this customer with a different request; use a new key for a new request",
            ));
        }
    };
    if let Some(seconds) = wait
        && !status.is_terminal()
    {
        // The saga exists now, whatever happens while we wait: a failed wait is answered as
        // an accepted checkout (202), never as an error that would make the client place it
        // again.
        match state
            .engine
            .wait_ended(
                &state.pool,
                id,
                std::time::Duration::from_secs(seconds),
                watch,
            )
            .await
        {
            Ok(Some(ended)) => status = ended,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(saga_id = %id, error = %e, "could not wait for the outcome; answering 202")
            }
        }
    }
    let status_url = format!("/sagas/{id}");
    let body = Accepted {
        saga_id: id,
        order_id,
        status: status.as_str(),
        status_url: status_url.clone(),
    };
    // With `Prefer: wait`, a saga that ended in time is answered as done (200), with its
    // outcome; otherwise the request is accepted (202) and the saga goes on.
    let code = if status.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut response = (code, axum::Json(body)).into_response();
    let h = response.headers_mut();
    if let Some(seconds) = wait {
        h.insert("preference-applied", super::wait::applied(seconds));
    }
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&status_url).expect("a path is a header value"),
    );
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CheckoutRequest {
        serde_json::from_value(serde_json::json!({
            "customer": {"id": "c-1", "email": "ada@example.com"},
            "items": [{"sku": "MUG", "quantity": 2}],
            "payment_token": "tok_visa",
            "shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "Madrid",
                                 "postal_code": "28001", "country": "ES"}
        }))
        .unwrap()
    }

    fn pointers(r: &CheckoutRequest) -> Vec<String> {
        match validate(r, 50) {
            Ok(_) => vec![],
            Err(p) => p
                .errors
                .iter()
                .map(|e| e.pointer.clone().unwrap_or_default())
                .collect(),
        }
    }

    #[test]
    fn a_good_request_validates() {
        assert!(pointers(&request()).is_empty());
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut r = request();
        r.items.clear();
        assert_eq!(pointers(&r), ["/items"]);
        for (q, ok) in [(0, false), (-1, false), (1_000_000, false), (1000, true)] {
            let mut r = request();
            r.items[0].quantity = q;
            assert_eq!(pointers(&r).is_empty(), ok, "quantity {q}");
        }
        let mut r = request();
        r.items.push(ItemBody {
            sku: "MUG".into(),
            quantity: 1,
        });
        assert_eq!(pointers(&r), ["/items/1/sku"]);
        let mut r = request();
        r.customer.email = "nope".into();
        r.shipping_address.country = "Spain".into();
        r.payment_token = " ".into();
        assert_eq!(
            pointers(&r),
            [
                "/customer/email",
                "/payment_token",
                "/shipping_address/country"
            ]
        );
    }
}
