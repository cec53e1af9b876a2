//! The simulated third parties: a card processor and a carrier, outside the shop. They behave
//! like their real counterparts where it matters to the saga: they are idempotent per
//! idempotency key (a repeated request gets the first answer), they decline, fail and stall,
//! and they keep a ledger that tests read to prove that nothing happened twice.
//!
//! Behaviour is chosen per request by test tokens and addresses, and globally through
//! `PUT /control/{processor|carrier}`:
//!
//! | trigger                          | answer                                           |
//! |----------------------------------|--------------------------------------------------|
//! | token `tok_decline*`             | 402 `card_declined` (permanent)                  |
//! | token `tok_fail_transient*`      | 503 every time (retryable)                       |
//! | token `tok_flaky*`               | 503 the first time for a key, then success       |
//! | token `tok_hang*`                | no answer for `hang_ms`                          |
//! | shipping country `XX`            | 422 `address_undeliverable` (permanent)          |
//! | control `mode = "fail"`          | 503 to every call until set back to `normal`     |
//! | control `mode = "hang"`          | every call stalls until the mode changes         |
//! | control `failure_rate`, `latency_ms` | random 503s, added latency                   |
//!
//! Like a real party, it finishes what it started whether or not the caller is still waiting:
//! a call whose caller timed out still charges or books when its latency has passed. What a
//! caller can do about such a call is void its key (`POST …/by-key/{key}/void`): a charge or
//! booking already made is returned (to be undone), and none can be made under the key after.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Normal,
    Fail,
    Hang,
}

/// The behaviour of one simulated party.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Behaviour {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub latency_ms: u64,
    /// Probability (0 to 1) of a random 503.
    #[serde(default)]
    pub failure_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Charge {
    pub id: String,
    pub idempotency_key: String,
    pub amount_minor: i64,
    pub currency: String,
    /// The card, as a processor's dashboard shows it: its last four characters. The token
    /// itself is kept nowhere, so that no output of the system (this ledger included) holds
    /// one.
    pub card_last4: String,
    pub calls: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Refund {
    pub id: String,
    pub idempotency_key: String,
    pub charge_id: String,
    pub calls: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Shipment {
    pub id: String,
    pub idempotency_key: String,
    pub tracking_number: String,
    pub cancelled: bool,
    pub calls: u32,
}

#[derive(Default)]
struct Ledger {
    charges: HashMap<String, Charge>,
    declined: HashMap<String, u32>,
    flaky_seen: HashMap<String, u32>,
    refunds: HashMap<String, Refund>,
    shipments: HashMap<String, Shipment>,
    /// Keys voided before anything was made under them: no charge or booking ever will be.
    voided_charges: HashSet<String>,
    voided_shipments: HashSet<String>,
    /// Calls that reached the ledger, per key, whatever they answered (a test waits on them).
    charge_calls: HashMap<String, u32>,
    shipment_calls: HashMap<String, u32>,
}

/// Refused: the key was voided before anything was made under it.
fn voided(what: &str) -> Response {
    (
        StatusCode::CONFLICT,
        Json(json!({"code": "voided", "message": format!("this {what}'s idempotency key was voided")})),
    )
        .into_response()
}

/// Run a handler's work to its end even if the caller goes away, as a real party does.
async fn detached(work: impl std::future::Future<Output = Response> + Send + 'static) -> Response {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}

#[derive(Clone)]
pub struct Simulator {
    ledger: Arc<Mutex<Ledger>>,
    processor: Arc<watch::Sender<Behaviour>>,
    carrier: Arc<watch::Sender<Behaviour>>,
    hang: Duration,
}

impl Simulator {
    pub fn new(hang: Duration) -> Self {
        Self {
            ledger: Arc::default(),
            processor: Arc::new(watch::Sender::new(Behaviour::default())),
            carrier: Arc::new(watch::Sender::new(Behaviour::default())),
            hang,
        }
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/processor/v1/charges", post(charge))
            .route("/processor/v1/charges/by-key/{key}", get(charge_by_key))
            .route("/processor/v1/charges/by-key/{key}/void", post(void_charge))
            .route("/processor/v1/refunds", post(refund))
            .route("/carrier/v1/shipments", post(ship))
            .route("/carrier/v1/shipments/by-key/{key}", get(shipment_by_key))
            .route(
                "/carrier/v1/shipments/by-key/{key}/void",
                post(void_shipment),
            )
            .route("/carrier/v1/shipments/{id}/cancel", post(cancel_shipment))
            .route("/ledger", get(ledger))
            .route("/control", get(control))
            .route("/control/{party}", put(set_control))
            .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
            .with_state(self)
    }
}

fn unavailable(what: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(
            json!({"code": "unavailable", "message": format!("{what} is temporarily unavailable")}),
        ),
    )
        .into_response()
}

/// Apply the global behaviour: latency, then stall, fail or random failure.
async fn behave(sender: &watch::Sender<Behaviour>, hang: Duration, what: &str) -> Option<Response> {
    let b = sender.borrow().clone();
    if b.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(b.latency_ms)).await;
    }
    let mut rx = sender.subscribe();
    if rx.borrow().mode == Mode::Hang {
        // Stall until the mode changes (or the hang time runs out).
        let _ = tokio::time::timeout(hang, rx.wait_for(|b| b.mode != Mode::Hang)).await;
        return Some(unavailable(what));
    }
    if b.mode == Mode::Fail || (b.failure_rate > 0.0 && rand::random::<f64>() < b.failure_rate) {
        return Some(unavailable(what));
    }
    None
}

#[derive(Debug, Deserialize)]
struct ChargeRequest {
    idempotency_key: String,
    amount_minor: i64,
    currency: String,
    token: String,
}

async fn charge(State(sim): State<Simulator>, Json(req): Json<ChargeRequest>) -> Response {
    detached(make_charge(sim, req)).await
}

async fn make_charge(sim: Simulator, req: ChargeRequest) -> Response {
    if let Some(r) = behave(&sim.processor, sim.hang, "the processor").await {
        return r;
    }
    if req.token.starts_with("tok_hang") {
        tokio::time::sleep(sim.hang).await;
        return unavailable("the processor");
    }
    if req.token.starts_with("tok_fail_transient") {
        return unavailable("the processor");
    }
    let mut l = sim.ledger.lock().expect("ledger lock");
    *l.charge_calls
        .entry(req.idempotency_key.clone())
        .or_default() += 1;
    if l.voided_charges.contains(&req.idempotency_key) {
        return voided("charge");
    }
    if req.token.starts_with("tok_flaky") {
        let seen = l.flaky_seen.entry(req.idempotency_key.clone()).or_default();
        *seen += 1;
        if *seen == 1 {
            return unavailable("the processor");
        }
    }
    if req.token.starts_with("tok_decline") {
        *l.declined.entry(req.idempotency_key.clone()).or_default() += 1;
        return (
            StatusCode::PAYMENT_REQUIRED,
            Json(json!({"code": "card_declined", "message": "the card was declined"})),
        )
            .into_response();
    }
    let c = l
        .charges
        .entry(req.idempotency_key.clone())
        .or_insert_with(|| Charge {
            id: format!("ch_{}", uuid::Uuid::now_v7().simple()),
            idempotency_key: req.idempotency_key.clone(),
            amount_minor: req.amount_minor,
            currency: req.currency.clone(),
            card_last4: req
                .token
                .chars()
                .rev()
                .take(4)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect(),
            calls: 0,
        });
    c.calls += 1;
    (
        StatusCode::OK,
        Json(json!({"id": c.id, "status": "succeeded"})),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"code": "not_found", "message": format!("no such {what}")})),
    )
        .into_response()
}

/// Whether a charge exists for a key, without creating one (what a worker asks when it cannot
/// know whether an earlier call went through).
async fn charge_by_key(State(sim): State<Simulator>, Path(key): Path<String>) -> Response {
    if let Some(r) = behave(&sim.processor, sim.hang, "the processor").await {
        return r;
    }
    let l = sim.ledger.lock().expect("ledger lock");
    match l.charges.get(&key) {
        Some(c) => (
            StatusCode::OK,
            Json(json!({"id": c.id, "status": "succeeded"})),
        )
            .into_response(),
        None => not_found("charge"),
    }
}

/// Void a charge's key: the charge made under it, if one was (`"charged"`, to be refunded),
/// or a promise that none will be (`"voided"`).
async fn void_charge(State(sim): State<Simulator>, Path(key): Path<String>) -> Response {
    if let Some(r) = behave(&sim.processor, sim.hang, "the processor").await {
        return r;
    }
    let mut l = sim.ledger.lock().expect("ledger lock");
    let answer = match l.charges.get(&key) {
        Some(c) => json!({"status": "charged", "id": c.id}),
        None => {
            l.voided_charges.insert(key);
            json!({"status": "voided"})
        }
    };
    (StatusCode::OK, Json(answer)).into_response()
}

/// Void a shipment's key: the booking made under it, if one was (`"booked"`, to be
/// cancelled), or a promise that none will be (`"voided"`).
async fn void_shipment(State(sim): State<Simulator>, Path(key): Path<String>) -> Response {
    if let Some(r) = behave(&sim.carrier, sim.hang, "the carrier").await {
        return r;
    }
    let mut l = sim.ledger.lock().expect("ledger lock");
    let answer = match l.shipments.get(&key) {
        Some(s) => json!({"status": "booked", "id": s.id, "tracking_number": s.tracking_number}),
        None => {
            l.voided_shipments.insert(key);
            json!({"status": "voided"})
        }
    };
    (StatusCode::OK, Json(answer)).into_response()
}

async fn shipment_by_key(State(sim): State<Simulator>, Path(key): Path<String>) -> Response {
    if let Some(r) = behave(&sim.carrier, sim.hang, "the carrier").await {
        return r;
    }
    let l = sim.ledger.lock().expect("ledger lock");
    match l.shipments.get(&key) {
        Some(s) => (
            StatusCode::OK,
            Json(json!({"id": s.id, "tracking_number": s.tracking_number})),
        )
            .into_response(),
        None => not_found("shipment"),
    }
}

#[derive(Debug, Deserialize)]
struct RefundRequest {
    idempotency_key: String,
    charge_id: String,
}

async fn refund(State(sim): State<Simulator>, Json(req): Json<RefundRequest>) -> Response {
    if let Some(r) = behave(&sim.processor, sim.hang, "the processor").await {
        return r;
    }
    let mut l = sim.ledger.lock().expect("ledger lock");
    if !l.charges.values().any(|c| c.id == req.charge_id) {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"code": "no_such_charge", "message": "no such charge"})),
        )
            .into_response();
    }
    let r = l
        .refunds
        .entry(req.idempotency_key.clone())
        .or_insert_with(|| Refund {
            id: format!("re_{}", uuid::Uuid::now_v7().simple()),
            idempotency_key: req.idempotency_key.clone(),
            charge_id: req.charge_id.clone(),
            calls: 0,
        });
    r.calls += 1;
    (
        StatusCode::OK,
        Json(json!({"id": r.id, "status": "succeeded"})),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct ShipRequest {
    idempotency_key: String,
    country: String,
}

async fn ship(State(sim): State<Simulator>, Json(req): Json<ShipRequest>) -> Response {
    detached(book(sim, req)).await
}

async fn book(sim: Simulator, req: ShipRequest) -> Response {
    if let Some(r) = behave(&sim.carrier, sim.hang, "the carrier").await {
        return r;
    }
    if req.country == "XX" {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"code": "address_undeliverable", "message": "we do not deliver there"})),
        )
            .into_response();
    }
    let mut l = sim.ledger.lock().expect("ledger lock");
    *l.shipment_calls
        .entry(req.idempotency_key.clone())
        .or_default() += 1;
    if l.voided_shipments.contains(&req.idempotency_key) {
        return voided("shipment");
    }
    let s = l
        .shipments
        .entry(req.idempotency_key.clone())
        .or_insert_with(|| {
            let id = uuid::Uuid::now_v7().simple().to_string();
            Shipment {
                tracking_number: format!("TRK{}", &id[20..]).to_uppercase(),
                id: format!("sh_{id}"),
                idempotency_key: req.idempotency_key.clone(),
                cancelled: false,
                calls: 0,
            }
        });
    s.calls += 1;
    (
        StatusCode::OK,
        Json(json!({"id": s.id, "tracking_number": s.tracking_number})),
    )
        .into_response()
}

async fn cancel_shipment(State(sim): State<Simulator>, Path(id): Path<String>) -> Response {
    if let Some(r) = behave(&sim.carrier, sim.hang, "the carrier").await {
        return r;
    }
    let mut l = sim.ledger.lock().expect("ledger lock");
    match l.shipments.values_mut().find(|s| s.id == id) {
        Some(s) => {
            s.cancelled = true;
            (
                StatusCode::OK,
                Json(json!({"id": s.id, "status": "cancelled"})),
            )
                .into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"code": "no_such_shipment", "message": "no such shipment"})),
        )
            .into_response(),
    }
}

async fn ledger(State(sim): State<Simulator>) -> Response {
    let l = sim.ledger.lock().expect("ledger lock");
    Json(json!({
        "charges": l.charges.values().collect::<Vec<_>>(),
        "declined": l.declined,
        "refunds": l.refunds.values().collect::<Vec<_>>(),
        "shipments": l.shipments.values().collect::<Vec<_>>(),
        "voided_charges": l.voided_charges,
        "voided_shipments": l.voided_shipments,
        "charge_calls": l.charge_calls,
        "shipment_calls": l.shipment_calls,
    }))
    .into_response()
}

async fn control(State(sim): State<Simulator>) -> Response {
    Json(json!({
        "processor": *sim.processor.borrow(),
        "carrier": *sim.carrier.borrow(),
    }))
    .into_response()
}

async fn set_control(
    State(sim): State<Simulator>,
    Path(party): Path<String>,
    Json(b): Json<Behaviour>,
) -> Response {
    if !(0.0..=1.0).contains(&b.failure_rate) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"code": "invalid", "message": "failure_rate must be between 0 and 1"})),
        )
            .into_response();
    }
    let sender = match party.as_str() {
        "processor" => &sim.processor,
        "carrier" => &sim.carrier,
        _ => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"code": "not_found", "message": "parties: processor, carrier"})),
            )
                .into_response();
        }
    };
    tracing::info!(party, behaviour = ?b, "simulator behaviour changed");
    sender.send_replace(b.clone());
    Json(b).into_response()
}
