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
//!
//! ## Pickup, delivery and callbacks
//!
//! A booked shipment is collected when the shop asks, and the carrier then reports on the
//! parcel by webhook, as its plan says:
//!
//! | request | body | answers |
//! |---------|------|---------|
//! | `POST /carrier/v1/shipments/{id}/pickup` | `{"callback_url": "http://…"}` | 200 `{"id", "tracking_number", "pickup": "scheduled"}` (the same to a repeated request, which schedules nothing more: the first callback URL is kept); 404 `no_such_shipment`; 409 `shipment_cancelled`; 422 `invalid` (not an http(s) URL) |
//! | `PUT /carrier/v1/shipments/{id}/plan` | a plan | 200 `{"id", "idempotency_key", "plan"}`; 404 `no_such_shipment`; 422 `invalid` |
//! | `PUT /carrier/v1/shipments/by-key/{key}/plan` | a plan | 200 `{"id", "idempotency_key", "plan"}` (`id` is `null` before the booking); 422 `invalid` |
//!
//! `{id}` is the carrier's id (`sh_…`). A pickup request goes through the carrier's behaviour
//! like its other calls; setting a plan is the test's control and does not. A plan set by key
//! before the booking is the shipment's once it is booked. The plan in force is the
//! shipment's own, else the carrier's (`plan` in `PUT /control/carrier`), else the defaults:
//!
//! ```json
//! {"dispatch_after_ms": 200, "deliver_after_ms": 300, "outcome": "delivered",
//!  "lost_reason": "damaged in transit", "duplicate": false}
//! ```
//!
//! Every field may be left out; `"dispatch_after_ms": null` means never dispatched, `outcome`
//! is `delivered`, `lost` or `never`, and delays are at most an hour. A plan is read when a
//! callback falls due, so a change counts for every callback not yet sent. After a pickup
//! request the carrier calls back `dispatched` `dispatch_after_ms` later, then `delivered` (or
//! `lost`, with `lost_reason`) `deliver_after_ms` after the `dispatched` callback was
//! acknowledged (and, with `duplicate`, sent again); nothing more once the shipment is
//! cancelled. A callback is
//! `POST {callback_url}` with
//!
//! ```json
//! {"event_id": "cb_…", "shipment_id": "sh_…", "tracking_number": "…",
//!  "kind": "dispatched" | "delivered" | "lost", "reason": "… (lost only)", "at": "<RFC 3339>"}
//! ```
//!
//! at least once: it is sent again, under the same `event_id`, until answered with a 2xx (every
//! 200 ms at first, backing off to 5 s, for at most 30 minutes; a 4xx other than 408 and 429
//! ends it), then once more when the plan says `duplicate`. A shipment's callbacks go one at a
//! time, in order, and one given up ends them. The ledger shows per shipment
//! `pickup_requested`, `callback_url`, `callbacks` (`event_id`, `kind`, `reason`, `at`,
//! `delivered`: answered with a 2xx, `attempts`, `gave_up`) and `plan`, and the plans set by
//! key before a booking under `shipment_plans`.
//!
//! It also stands in for the Cart service (outside this repository), as far as the Order
//! service needs it: `PUT /cart/v1/checkouts/{ref}` keeps the details of a checkout a cart
//! initiated (the body of a `POST /checkout`), `GET /cart/v1/checkouts/{ref}` reads them (404
//! when unknown). The `CheckoutInitiated` event names them by `checkout_ref`, so that the
//! event carries no personal data and no payment token.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

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
    /// The carrier's plan for shipments without one of their own (`None`: [`Plan::default`]).
    /// The processor has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
}

/// What becomes of a parcel once dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    #[default]
    Delivered,
    Lost,
    /// Neither: no callback after `dispatched`.
    Never,
}

/// The course of a shipment once its pickup was requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Plan {
    /// From the pickup request to the `dispatched` callback; `None`: never dispatched.
    pub dispatch_after_ms: Option<u64>,
    /// From the acknowledged `dispatched` callback to the `delivered` or `lost` one.
    pub deliver_after_ms: u64,
    pub outcome: Outcome,
    /// The reason a `lost` callback gives.
    pub lost_reason: String,
    /// Send every callback once more (same event id) after it was acknowledged.
    pub duplicate: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            dispatch_after_ms: Some(200),
            deliver_after_ms: 300,
            outcome: Outcome::Delivered,
            lost_reason: "damaged in transit".to_owned(),
            duplicate: false,
        }
    }
}

/// The longest delay a plan may set: an hour.
const MAX_PLAN_DELAY_MS: u64 = 3_600_000;

impl Plan {
    /// Why the plan cannot be (delays beyond [`MAX_PLAN_DELAY_MS`]), if it cannot.
    fn fault(&self) -> Option<String> {
        let delays = [self.dispatch_after_ms.unwrap_or(0), self.deliver_after_ms];
        delays
            .iter()
            .any(|&ms| ms > MAX_PLAN_DELAY_MS)
            .then(|| format!("plan delays are at most {MAX_PLAN_DELAY_MS} ms"))
    }
}

/// What a callback reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackKind {
    Dispatched,
    Delivered,
    Lost,
}

/// A callback, as the ledger shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Callback {
    pub event_id: String,
    pub kind: CallbackKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: String,
    /// Answered with a 2xx.
    pub delivered: bool,
    /// Requests sent, duplicates included.
    pub attempts: u32,
    /// Refused (a 4xx) or unanswered for too long: no more callbacks for the shipment.
    pub gave_up: bool,
}

/// A callback, as sent.
#[derive(Debug, Clone, Serialize)]
struct CallbackEvent {
    event_id: String,
    shipment_id: String,
    tracking_number: String,
    kind: CallbackKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    at: String,
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
    /// Whether the shop asked for the parcel to be collected.
    pub pickup_requested: bool,
    /// Where the carrier reports on the parcel: the first pickup request's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The callbacks so far, in order.
    pub callbacks: Vec<Callback>,
    /// The shipment's own plan, when one was set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
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
    /// Plans set by idempotency key before the shipment was booked.
    shipment_plans: HashMap<String, Plan>,
    /// The Cart service's initiated checkouts, by reference (kept out of `GET /ledger`: they
    /// hold personal data and payment tokens).
    checkouts: HashMap<String, Value>,
}

impl Ledger {
    fn shipment_mut(&mut self, id: &str) -> Option<&mut Shipment> {
        self.shipments.values_mut().find(|s| s.id == id)
    }
}

/// Refused: the key was voided before anything was made under it.
fn voided(what: &str) -> Response {
    (
        StatusCode::CONFLICT,
        Json(json!({"code": "voided", "message": format!("this {what}'s idempotency key was voided")})),
    )
        .into_response()
}

/// Refused: the request makes no sense.
fn invalid(message: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"code": "invalid", "message": message})),
    )
        .into_response()
}

fn no_such_shipment() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"code": "no_such_shipment", "message": "no such shipment"})),
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
    /// Bumped whenever a shipment's plan, cancellation or callbacks change.
    shipment_changes: Arc<watch::Sender<()>>,
    /// For callbacks.
    http: reqwest::Client,
}

impl Simulator {
    pub fn new(hang: Duration) -> Self {
        Self {
            ledger: Arc::default(),
            processor: Arc::new(watch::Sender::new(Behaviour::default())),
            carrier: Arc::new(watch::Sender::new(Behaviour::default())),
            hang,
            shipment_changes: Arc::new(watch::Sender::new(())),
            http: reqwest::Client::builder()
                .timeout(CALLBACK_TIMEOUT)
                .build()
                .expect("an HTTP client builds"),
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
            .route(
                "/carrier/v1/shipments/by-key/{key}/plan",
                put(set_plan_by_key),
            )
            .route("/carrier/v1/shipments/{id}/cancel", post(cancel_shipment))
            .route("/carrier/v1/shipments/{id}/pickup", post(pickup))
            .route("/carrier/v1/shipments/{id}/plan", put(set_shipment_plan))
            .route(
                "/cart/v1/checkouts/{reference}",
                put(put_checkout).get(get_checkout),
            )
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
    let mut guard = sim.ledger.lock().expect("ledger lock");
    let l = &mut *guard;
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
                pickup_requested: false,
                callback_url: None,
                callbacks: Vec::new(),
                plan: l.shipment_plans.remove(&req.idempotency_key),
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
    let answer = {
        let mut l = sim.ledger.lock().expect("ledger lock");
        let Some(s) = l.shipment_mut(&id) else {
            return no_such_shipment();
        };
        s.cancelled = true;
        json!({"id": s.id, "status": "cancelled"})
    };
    // A parcel waiting for its next callback gets none.
    sim.shipment_changed();
    (StatusCode::OK, Json(answer)).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PickupRequest {
    callback_url: String,
}

async fn pickup(
    State(sim): State<Simulator>,
    Path(id): Path<String>,
    Json(req): Json<PickupRequest>,
) -> Response {
    detached(schedule_pickup(sim, id, req)).await
}

fn is_http_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
}

/// Collect a shipment: the first request for it sets the parcel on its course (see
/// [`carry`]); a repeated one gets the same answer and changes nothing.
async fn schedule_pickup(sim: Simulator, id: String, req: PickupRequest) -> Response {
    if let Some(r) = behave(&sim.carrier, sim.hang, "the carrier").await {
        return r;
    }
    if !is_http_url(&req.callback_url) {
        return invalid("callback_url must be an http(s) URL");
    }
    let (answer, first) = {
        let mut l = sim.ledger.lock().expect("ledger lock");
        let Some(s) = l.shipment_mut(&id) else {
            return no_such_shipment();
        };
        if s.cancelled {
            return (
                StatusCode::CONFLICT,
                Json(
                    json!({"code": "shipment_cancelled", "message": "the shipment was cancelled"}),
                ),
            )
                .into_response();
        }
        let first = !s.pickup_requested;
        if first {
            s.pickup_requested = true;
            s.callback_url = Some(req.callback_url);
        }
        let answer =
            json!({"id": s.id, "tracking_number": s.tracking_number, "pickup": "scheduled"});
        (answer, first)
    };
    if first {
        sim.shipment_changed();
        tokio::spawn(carry(sim, id));
    }
    (StatusCode::OK, Json(answer)).into_response()
}

/// Set the plan of a booked shipment (the test's control: no behaviour applies).
async fn set_shipment_plan(
    State(sim): State<Simulator>,
    Path(id): Path<String>,
    Json(plan): Json<Plan>,
) -> Response {
    if let Some(why) = plan.fault() {
        return invalid(&why);
    }
    let answer = {
        let mut l = sim.ledger.lock().expect("ledger lock");
        let Some(s) = l.shipment_mut(&id) else {
            return no_such_shipment();
        };
        s.plan = Some(plan.clone());
        json!({"id": s.id, "idempotency_key": s.idempotency_key, "plan": plan})
    };
    sim.shipment_changed();
    (StatusCode::OK, Json(answer)).into_response()
}

/// Set the plan of the shipment booked under a key, or to be (kept until it is booked).
async fn set_plan_by_key(
    State(sim): State<Simulator>,
    Path(key): Path<String>,
    Json(plan): Json<Plan>,
) -> Response {
    if let Some(why) = plan.fault() {
        return invalid(&why);
    }
    let answer = {
        let mut guard = sim.ledger.lock().expect("ledger lock");
        let l = &mut *guard;
        let id = match l.shipments.get_mut(&key) {
            Some(s) => {
                s.plan = Some(plan.clone());
                Some(s.id.clone())
            }
            None => {
                l.shipment_plans.insert(key.clone(), plan.clone());
                None
            }
        };
        json!({"id": id, "idempotency_key": key, "plan": plan})
    };
    sim.shipment_changed();
    (StatusCode::OK, Json(answer)).into_response()
}

/// How long the carrier waits for an answer to a callback.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The first pause before a callback is sent again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a callback is sent again before the carrier gives up on it.
const GIVE_UP_AFTER: Duration = Duration::from_secs(30 * 60);

/// How sending a callback ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Acknowledged,
    /// A 4xx other than 408 and 429.
    Refused,
    /// Not acknowledged within [`GIVE_UP_AFTER`].
    TimedOut,
}

/// Carry a collected parcel: report its dispatch, then its delivery or loss, as its plan says,
/// each callback once the one before was acknowledged.
async fn carry(sim: Simulator, id: String) {
    let Some(plan) = sim
        .wait_due(&id, Instant::now(), |p| p.dispatch_after_ms)
        .await
    else {
        return;
    };
    if !sim
        .call_back(&id, CallbackKind::Dispatched, None, plan.duplicate)
        .await
    {
        return;
    }
    let delivery = |p: &Plan| (p.outcome != Outcome::Never).then_some(p.deliver_after_ms);
    let Some(plan) = sim.wait_due(&id, Instant::now(), delivery).await else {
        return;
    };
    let (kind, reason) = match plan.outcome {
        Outcome::Lost => (CallbackKind::Lost, Some(plan.lost_reason)),
        Outcome::Delivered | Outcome::Never => (CallbackKind::Delivered, None),
    };
    sim.call_back(&id, kind, reason, plan.duplicate).await;
}

impl Simulator {
    /// Wake whoever waits on a shipment (see [`Simulator::wait_due`]).
    fn shipment_changed(&self) {
        self.shipment_changes.send_replace(());
    }

    /// The plan in force for a shipment, and whether it was cancelled; `None` if unknown.
    fn course(&self, id: &str) -> Option<(Plan, bool)> {
        let default = self.carrier.borrow().plan.clone();
        let l = self.ledger.lock().expect("ledger lock");
        let s = l.shipments.values().find(|s| s.id == id)?;
        Some((s.plan.clone().or(default).unwrap_or_default(), s.cancelled))
    }

    /// Wait until a shipment's next callback is due, `delay` (of the plan in force, `None`:
    /// never) after `since`; the plan is read again whenever a plan changes. Returns the plan
    /// in force then, or `None` if the shipment was cancelled first.
    async fn wait_due(
        &self,
        id: &str,
        since: Instant,
        delay: impl Fn(&Plan) -> Option<u64>,
    ) -> Option<Plan> {
        loop {
            // Subscribed before reading, so that no change is missed.
            let mut shipments = self.shipment_changes.subscribe();
            let mut carrier = self.carrier.subscribe();
            let (plan, cancelled) = self.course(id)?;
            if cancelled {
                return None;
            }
            let due = delay(&plan).map(|ms| since + Duration::from_millis(ms));
            if due.is_some_and(|d| d <= Instant::now()) {
                return Some(plan);
            }
            let at_due = async {
                match due {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = at_due => {}
                changed = shipments.changed() => changed.ok()?,
                changed = carrier.changed() => changed.ok()?,
            }
        }
    }

    /// Send a shipment's next callback until acknowledged, then once more if `duplicate`.
    /// Whether it was acknowledged (and the next may follow).
    async fn call_back(
        &self,
        id: &str,
        kind: CallbackKind,
        reason: Option<String>,
        duplicate: bool,
    ) -> bool {
        let Some((url, index, event)) = self.record_callback(id, kind, reason) else {
            return false;
        };
        if self.deliver(id, index, &url, &event).await != Delivery::Acknowledged {
            self.update_callback(id, index, |c| c.gave_up = true);
            return false;
        }
        if duplicate {
            self.deliver(id, index, &url, &event).await;
        }
        true
    }

    /// Enter a new callback in a shipment's ledger: where to send it, its place and itself.
    fn record_callback(
        &self,
        id: &str,
        kind: CallbackKind,
        reason: Option<String>,
    ) -> Option<(String, usize, CallbackEvent)> {
        let recorded = {
            let mut l = self.ledger.lock().expect("ledger lock");
            let s = l.shipment_mut(id)?;
            let url = s.callback_url.clone()?;
            let event = CallbackEvent {
                event_id: format!("cb_{}", uuid::Uuid::now_v7().simple()),
                shipment_id: s.id.clone(),
                tracking_number: s.tracking_number.clone(),
                kind,
                reason,
                at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            };
            s.callbacks.push(Callback {
                event_id: event.event_id.clone(),
                kind,
                reason: event.reason.clone(),
                at: event.at.clone(),
                delivered: false,
                attempts: 0,
                gave_up: false,
            });
            (url, s.callbacks.len() - 1, event)
        };
        self.shipment_changed();
        Some(recorded)
    }

    /// Change a callback in the ledger.
    fn update_callback(&self, id: &str, index: usize, change: impl FnOnce(&mut Callback)) {
        {
            let mut l = self.ledger.lock().expect("ledger lock");
            if let Some(c) = l.shipment_mut(id).and_then(|s| s.callbacks.get_mut(index)) {
                change(c);
            }
        }
        self.shipment_changed();
    }

    /// Send a callback until it is answered with a 2xx, refused or too old.
    async fn deliver(&self, id: &str, index: usize, url: &str, event: &CallbackEvent) -> Delivery {
        let started = Instant::now();
        let mut pause = RETRY_FIRST;
        loop {
            self.update_callback(id, index, |c| c.attempts += 1);
            let event_id = event.event_id.as_str();
            match self.http.post(url).json(event).send().await {
                Ok(r) if r.status().is_success() => {
                    self.update_callback(id, index, |c| c.delivered = true);
                    return Delivery::Acknowledged;
                }
                Ok(r) if is_refusal(r.status()) => {
                    let status = r.status().as_u16();
                    tracing::warn!(url, event_id, status, "callback refused: not sent again");
                    return Delivery::Refused;
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    tracing::debug!(url, event_id, status, "callback not acknowledged");
                }
                Err(e) => tracing::debug!(url, event_id, error = %e, "callback failed"),
            }
            if started.elapsed() + pause > GIVE_UP_AFTER {
                tracing::warn!(
                    url,
                    event_id,
                    "callback unacknowledged for 30 minutes: given up"
                );
                return Delivery::TimedOut;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
    }
}

/// A callback answer that says sending it again is pointless.
fn is_refusal(status: reqwest::StatusCode) -> bool {
    status.is_client_error()
        && status != reqwest::StatusCode::REQUEST_TIMEOUT
        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
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
        "shipment_plans": l.shipment_plans,
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
        return invalid("failure_rate must be between 0 and 1");
    }
    if let Some(plan) = &b.plan {
        if party == "processor" {
            return invalid("only the carrier has a plan");
        }
        if let Some(why) = plan.fault() {
            return invalid(&why);
        }
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

/// The Cart service keeps the details of a checkout a cart initiated.
async fn put_checkout(
    State(sim): State<Simulator>,
    Path(reference): Path<String>,
    Json(details): Json<Value>,
) -> Response {
    if !details.is_object() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"code": "invalid", "message": "a checkout is a JSON object"})),
        )
            .into_response();
    }
    let mut l = sim.ledger.lock().expect("ledger lock");
    l.checkouts.insert(reference, details);
    StatusCode::NO_CONTENT.into_response()
}

/// The details of a checkout a cart initiated, for the Order service.
async fn get_checkout(State(sim): State<Simulator>, Path(reference): Path<String>) -> Response {
    let l = sim.ledger.lock().expect("ledger lock");
    match l.checkouts.get(&reference) {
        Some(details) => Json(details.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"code": "no_such_checkout", "message": "no such checkout"})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use tokio::sync::mpsc;

    /// How long a test waits for anything before failing.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// Serve `router` on a free local port; its base URL.
    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
        format!("http://{addr}")
    }

    /// A callback receiver: its URL, and every callback it gets. It answers the statuses of
    /// `answers` in turn, then 200.
    async fn receiver(answers: &[u16]) -> (String, mpsc::UnboundedReceiver<Value>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(
            answers.to_vec(),
        )));
        let receive = move |Json(event): Json<Value>| {
            let (tx, answers) = (tx.clone(), answers.clone());
            async move {
                let status = answers.lock().expect("answers").pop_front().unwrap_or(200);
                let _ = tx.send(event);
                StatusCode::from_u16(status).expect("status")
            }
        };
        let url = serve(Router::new().route("/cb", post(receive))).await;
        (format!("{url}/cb"), rx)
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
        tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("a callback in time")
            .expect("receiver open")
    }

    struct Harness {
        sim: Simulator,
        base: String,
        http: reqwest::Client,
    }

    impl Harness {
        async fn new() -> Self {
            let sim = Simulator::new(Duration::from_secs(1));
            let base = serve(sim.clone().router()).await;
            Self {
                sim,
                base,
                http: reqwest::Client::new(),
            }
        }

        async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
            let r = self
                .http
                .request(method, format!("{}{path}", self.base))
                .json(&body)
                .send()
                .await
                .expect("simulator answers");
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }

        async fn post(&self, path: &str, body: Value) -> (u16, Value) {
            self.call(reqwest::Method::POST, path, body).await
        }

        async fn put(&self, path: &str, body: Value) -> (u16, Value) {
            self.call(reqwest::Method::PUT, path, body).await
        }

        /// Book a shipment; its carrier id and tracking number.
        async fn book(&self, key: &str) -> (String, String) {
            let (status, s) = self
                .post(
                    "/carrier/v1/shipments",
                    json!({"idempotency_key": key, "country": "FR"}),
                )
                .await;
            assert_eq!(status, 200, "{s}");
            (
                s["id"].as_str().expect("id").to_owned(),
                s["tracking_number"].as_str().expect("tracking").to_owned(),
            )
        }

        /// Wait until the shipment with carrier id `id` satisfies `done`.
        async fn until(&self, id: &str, done: impl Fn(&Shipment) -> bool) -> Shipment {
            let wait = async {
                loop {
                    let mut changes = self.sim.shipment_changes.subscribe();
                    let shipment = {
                        let l = self.sim.ledger.lock().expect("ledger lock");
                        l.shipments.values().find(|s| s.id == id).cloned()
                    };
                    if let Some(s) = shipment.filter(|s| done(s)) {
                        return s;
                    }
                    changes.changed().await.expect("simulator alive");
                }
            };
            tokio::time::timeout(PATIENCE, wait).await.expect("in time")
        }
    }

    #[tokio::test]
    async fn a_collected_parcel_is_dispatched_then_delivered() {
        let h = Harness::new().await;
        let (url, mut rx) = receiver(&[]).await;
        let (id, tracking) = h.book("k1").await;
        let (status, _) = h
            .put(
                &format!("/carrier/v1/shipments/{id}/plan"),
                json!({"dispatch_after_ms": 0, "deliver_after_ms": 0}),
            )
            .await;
        assert_eq!(status, 200);
        let pickup = format!("/carrier/v1/shipments/{id}/pickup");
        let (status, answer) = h.post(&pickup, json!({"callback_url": url})).await;
        assert_eq!(status, 200);
        assert_eq!(
            answer,
            json!({"id": id, "tracking_number": tracking, "pickup": "scheduled"})
        );

        let dispatched = next(&mut rx).await;
        assert_eq!(dispatched["kind"], "dispatched");
        assert_eq!(dispatched["shipment_id"], id.as_str());
        assert_eq!(dispatched["tracking_number"], tracking.as_str());
        assert!(dispatched.get("reason").is_none(), "{dispatched}");
        let event_id = dispatched["event_id"].as_str().expect("event id");
        assert!(event_id.starts_with("cb_"), "{event_id}");
        chrono::DateTime::parse_from_rfc3339(dispatched["at"].as_str().expect("at"))
            .expect("an RFC 3339 time");
        let delivered = next(&mut rx).await;
        assert_eq!(delivered["kind"], "delivered");
        assert_ne!(delivered["event_id"], dispatched["event_id"]);

        // Asked again (elsewhere): the same answer, and nothing new scheduled.
        let (status, again) = h
            .post(
                &pickup,
                json!({"callback_url": "http://127.0.0.1:9/elsewhere"}),
            )
            .await;
        assert_eq!((status, again), (200, answer));
        let s = h
            .until(&id, |s| {
                s.callbacks.len() == 2 && s.callbacks.iter().all(|c| c.delivered)
            })
            .await;
        assert!(s.pickup_requested);
        assert_eq!(s.callback_url.as_deref(), Some(url.as_str()));
        assert_eq!(s.callbacks.len(), 2);
        assert!(s.callbacks.iter().all(|c| c.attempts == 1 && !c.gave_up));
        assert!(s.plan.is_some());
    }

    #[tokio::test]
    async fn a_plan_set_by_key_before_the_booking_loses_the_parcel_and_repeats_callbacks() {
        let h = Harness::new().await;
        let (url, mut rx) = receiver(&[]).await;
        let plan = json!({"dispatch_after_ms": 0, "deliver_after_ms": 0, "outcome": "lost",
            "lost_reason": "eaten by the dog", "duplicate": true});
        let (status, answer) = h
            .put("/carrier/v1/shipments/by-key/k2/plan", plan.clone())
            .await;
        assert_eq!(status, 200);
        assert_eq!(answer["id"], Value::Null);
        let (id, _) = h.book("k2").await;
        let (status, _) = h
            .post(
                &format!("/carrier/v1/shipments/{id}/pickup"),
                json!({"callback_url": url}),
            )
            .await;
        assert_eq!(status, 200);

        let kinds: Vec<Value> = [
            next(&mut rx).await,
            next(&mut rx).await,
            next(&mut rx).await,
            next(&mut rx).await,
        ]
        .into();
        assert_eq!(kinds[0], kinds[1], "the dispatched callback, twice");
        assert_eq!(kinds[0]["kind"], "dispatched");
        assert_eq!(kinds[2], kinds[3], "the lost callback, twice");
        assert_eq!(kinds[2]["kind"], "lost");
        assert_eq!(kinds[2]["reason"], "eaten by the dog");
        let s = h
            .until(&id, |s| {
                s.callbacks.len() == 2 && s.callbacks.iter().all(|c| c.attempts == 2)
            })
            .await;
        assert_eq!(serde_json::to_value(&s.plan).expect("json"), plan);
        let ledger = h.call(reqwest::Method::GET, "/ledger", Value::Null).await.1;
        assert_eq!(
            ledger["shipment_plans"],
            json!({}),
            "applied at the booking"
        );
    }

    #[tokio::test]
    async fn an_unacknowledged_callback_is_sent_again_under_the_same_event_id() {
        let h = Harness::new().await;
        let (url, mut rx) = receiver(&[503, 429]).await;
        let (id, _) = h.book("k3").await;
        h.put(
            &format!("/carrier/v1/shipments/{id}/plan"),
            json!({"dispatch_after_ms": 0, "outcome": "never"}),
        )
        .await;
        h.post(
            &format!("/carrier/v1/shipments/{id}/pickup"),
            json!({"callback_url": url}),
        )
        .await;
        let tries = [
            next(&mut rx).await,
            next(&mut rx).await,
            next(&mut rx).await,
        ];
        assert!(tries.iter().all(|t| *t == tries[0]), "{tries:?}");
        let s = h
            .until(&id, |s| s.callbacks.first().is_some_and(|c| c.delivered))
            .await;
        assert_eq!(s.callbacks[0].attempts, 3);
    }

    #[tokio::test]
    async fn a_refused_callback_ends_the_callbacks() {
        let h = Harness::new().await;
        let (url, mut rx) = receiver(&[404]).await;
        let (id, _) = h.book("k4").await;
        h.put(
            &format!("/carrier/v1/shipments/{id}/plan"),
            json!({"dispatch_after_ms": 0, "deliver_after_ms": 0}),
        )
        .await;
        h.post(
            &format!("/carrier/v1/shipments/{id}/pickup"),
            json!({"callback_url": url}),
        )
        .await;
        assert_eq!(next(&mut rx).await["kind"], "dispatched");
        let s = h
            .until(&id, |s| s.callbacks.first().is_some_and(|c| c.gave_up))
            .await;
        assert_eq!(s.callbacks.len(), 1);
        assert_eq!(
            (s.callbacks[0].attempts, s.callbacks[0].delivered),
            (1, false)
        );
    }

    #[tokio::test]
    async fn a_cancellation_or_a_new_plan_ends_the_wait_for_a_callback() {
        let h = Harness::new().await;
        let never = json!({"dispatch_after_ms": null});
        let wait = |id: String| {
            let sim = h.sim.clone();
            tokio::spawn(async move {
                sim.wait_due(&id, Instant::now(), |p| p.dispatch_after_ms)
                    .await
            })
        };

        let (id, _) = h.book("k5").await;
        h.put(&format!("/carrier/v1/shipments/{id}/plan"), never.clone())
            .await;
        let waiting = wait(id.clone());
        h.put(
            &format!("/carrier/v1/shipments/{id}/plan"),
            json!({"dispatch_after_ms": 0}),
        )
        .await;
        let due = tokio::time::timeout(PATIENCE, waiting)
            .await
            .expect("in time")
            .expect("joins");
        assert_eq!(due.and_then(|p| p.dispatch_after_ms), Some(0));

        let (id, _) = h.book("k6").await;
        h.put(&format!("/carrier/v1/shipments/{id}/plan"), never)
            .await;
        let waiting = wait(id.clone());
        let (status, _) = h
            .post(&format!("/carrier/v1/shipments/{id}/cancel"), json!({}))
            .await;
        assert_eq!(status, 200);
        let due = tokio::time::timeout(PATIENCE, waiting)
            .await
            .expect("in time")
            .expect("joins");
        assert_eq!(due, None);
    }

    #[tokio::test]
    async fn pickups_and_plans_that_cannot_be() {
        let h = Harness::new().await;
        let cb = json!({"callback_url": "http://127.0.0.1:9/cb"});
        let (status, body) = h
            .post("/carrier/v1/shipments/sh_nope/pickup", cb.clone())
            .await;
        assert_eq!((status, &body["code"]), (404, &json!("no_such_shipment")));
        let (status, body) = h.put("/carrier/v1/shipments/sh_nope/plan", json!({})).await;
        assert_eq!((status, &body["code"]), (404, &json!("no_such_shipment")));

        let (id, _) = h.book("k7").await;
        let pickup = format!("/carrier/v1/shipments/{id}/pickup");
        let (status, body) = h.post(&pickup, json!({"callback_url": "ftp://x"})).await;
        assert_eq!((status, &body["code"]), (422, &json!("invalid")));
        let (status, _) = h
            .post(&pickup, json!({"callback_url": "http://x", "extra": 1}))
            .await;
        assert_eq!(status, 422);
        let plan = format!("/carrier/v1/shipments/{id}/plan");
        let (status, body) = h.put(&plan, json!({"deliver_after_ms": 3_600_001})).await;
        assert_eq!((status, &body["code"]), (422, &json!("invalid")));
        let (status, _) = h
            .put(
                &plan,
                json!({"dispatch_after_ms": 3_600_000, "deliver_after_ms": 3_600_000}),
            )
            .await;
        assert_eq!(status, 200);
        let (status, _) = h.put(&plan, json!({"outcome": "stolen"})).await;
        assert_eq!(status, 422);
        let (status, _) = h.put(&plan, json!({"colour": "red"})).await;
        assert_eq!(status, 422);

        h.post(&format!("/carrier/v1/shipments/{id}/cancel"), json!({}))
            .await;
        let (status, body) = h.post(&pickup, cb).await;
        assert_eq!((status, &body["code"]), (409, &json!("shipment_cancelled")));
    }

    #[tokio::test]
    async fn the_carrier_control_carries_a_default_plan() {
        let h = Harness::new().await;
        let (status, _) = h
            .put("/control/carrier", json!({"plan": {"deliver_after_ms": 5}}))
            .await;
        assert_eq!(status, 200);
        let control = h
            .call(reqwest::Method::GET, "/control", Value::Null)
            .await
            .1;
        let mut expected = serde_json::to_value(Plan::default()).expect("json");
        expected["deliver_after_ms"] = json!(5);
        assert_eq!(control["carrier"]["plan"], expected);
        assert!(control["processor"].get("plan").is_none(), "{control}");
        let (status, _) = h
            .put(
                "/control/carrier",
                json!({"plan": {"dispatch_after_ms": 3_600_001}}),
            )
            .await;
        assert_eq!(status, 422);
        let (status, _) = h.put("/control/processor", json!({"plan": {}})).await;
        assert_eq!(status, 422);
        let (status, _) = h
            .put(
                "/control/processor",
                json!({"mode": "fail", "latency_ms": 1}),
            )
            .await;
        assert_eq!(status, 200);
    }
}
