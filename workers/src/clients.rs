//! Clients of the third parties outside the shop: the card processor and the carrier. Every
//! call carries an idempotency key, so a retried call is answered with the first result.

use std::time::Duration;

use runtime::breaker::Breaker;
use serde::Deserialize;
use serde_json::json;

/// How a third-party call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// A definitive no (card declined, address undeliverable): retrying changes nothing.
    #[error("{code}: {message}")]
    Refused { code: String, message: String },
    /// Down, overloaded, timed out or unreachable: another attempt may succeed.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
}

#[derive(Clone)]
struct Remote {
    http: reqwest::Client,
    base: String,
    name: &'static str,
    /// Consecutive unavailability, for as many different callers, opens it; while open, calls
    /// fail fast (retryable) instead of piling up on a party that is down.
    breaker: Breaker,
    /// The callers (idempotency keys) that found the party unavailable since its last answer:
    /// each counts once, so one caller whose own call keeps failing (a card the processor
    /// keeps refusing with a 503) cannot open the breaker for everybody.
    failing: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Remote {
    fn new(name: &'static str, settings: &crate::config::Remote) -> Self {
        let (base, timeout) = (
            settings.url.as_str(),
            Duration::from_millis(settings.timeout_ms),
        );
        Self {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("an HTTP client builds"),
            base: base.trim_end_matches('/').to_owned(),
            name,
            breaker: runtime::breaker::consecutive_failures(
                settings.breaker_failures,
                settings.breaker_open_ms,
                settings.breaker_open_max_ms,
            ),
            failing: Default::default(),
        }
    }

    /// Run a call of `caller` through the breaker: only unavailability counts against the
    /// party, once per caller until the party answers someone.
    async fn guarded<T, F>(&self, caller: &str, call: F) -> Result<T, CallError>
    where
        F: std::future::Future<Output = Result<T, CallError>>,
    {
        if !self.breaker.is_call_permitted() {
            return Err(CallError::Unavailable(format!(
                "{} circuit open",
                self.name
            )));
        }
        let result = call.await;
        let mut failing = self.failing.lock().expect("breaker lock");
        match &result {
            Err(CallError::Unavailable(_)) => {
                if failing.insert(caller.to_owned()) {
                    self.breaker.on_error();
                    if !self.breaker.is_call_permitted() {
                        // Open: a new streak starts when it lets calls through again.
                        failing.clear();
                    }
                }
            }
            _ => {
                failing.clear();
                self.breaker.on_success();
            }
        }
        result
    }

    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        caller: &str,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, CallError> {
        self.guarded(caller, self.post_unguarded(path, body)).await
    }

    async fn post_unguarded<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, CallError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| CallError::Unavailable(format!("{}: {e}", self.name)))?;
        let status = response.status();
        if status.is_success() {
            return response.json::<T>().await.map_err(|e| {
                CallError::Unavailable(format!("{}: unreadable answer: {e}", self.name))
            });
        }
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(CallError::Unavailable(format!(
                "{} answered {status}",
                self.name
            )));
        }
        match response.json::<ErrorBody>().await {
            Ok(e) => Err(CallError::Refused {
                code: e.code,
                message: e.message,
            }),
            Err(_) => Err(CallError::Refused {
                code: format!("http_{}", status.as_u16()),
                message: format!("{} answered {status}", self.name),
            }),
        }
    }
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

/// The answer to voiding a key: what was made under it, if anything.
#[derive(Deserialize)]
struct Voided {
    status: String,
    id: Option<String>,
}

#[derive(Deserialize)]
struct ShipmentCreated {
    id: String,
    tracking_number: String,
}

/// The card processor.
#[derive(Clone)]
pub struct Processor(Remote);

impl Processor {
    pub fn new(settings: &crate::config::Remote) -> Self {
        Self(Remote::new("the card processor", settings))
    }

    /// Charge the card; returns the processor's charge id.
    pub async fn charge(
        &self,
        key: &str,
        amount_minor: i64,
        currency: &str,
        token: &str,
    ) -> Result<String, CallError> {
        let body = json!({"idempotency_key": key, "amount_minor": amount_minor, "currency": currency, "token": token});
        self.0
            .post::<Created>(key, "/processor/v1/charges", body)
            .await
            .map(|c| c.id)
    }

    /// Void `key` at the processor: the charge already made under it (`Some`, to be
    /// refunded), or `None`, and then no charge can be made under the key any more. This is
    /// what makes a compensation final while a charge may still be in flight (a call that
    /// timed out here can still go through there).
    pub async fn void_charge(&self, key: &str) -> Result<Option<String>, CallError> {
        let v: Voided = self
            .0
            .post(
                key,
                &format!("/processor/v1/charges/by-key/{key}/void"),
                json!({}),
            )
            .await?;
        Ok(v.id.filter(|_| v.status == "charged"))
    }

    /// Refund a charge in full; returns the processor's refund id.
    pub async fn refund(&self, key: &str, charge_ref: &str) -> Result<String, CallError> {
        let body = json!({"idempotency_key": key, "charge_id": charge_ref});
        self.0
            .post::<Created>(key, "/processor/v1/refunds", body)
            .await
            .map(|c| c.id)
    }
}

/// The carrier.
#[derive(Clone)]
pub struct Carrier(Remote);

impl Carrier {
    pub fn new(settings: &crate::config::Remote) -> Self {
        Self(Remote::new("the carrier", settings))
    }

    /// Book a shipment; returns the carrier's id and tracking number.
    pub async fn ship(&self, key: &str, country: &str) -> Result<(String, String), CallError> {
        let body = json!({"idempotency_key": key, "country": country});
        self.0
            .post::<ShipmentCreated>(key, "/carrier/v1/shipments", body)
            .await
            .map(|s| (s.id, s.tracking_number))
    }

    /// Void `key` at the carrier: the shipment already booked under it (`Some`, to be
    /// cancelled), or `None`, and then none can be booked under the key any more.
    pub async fn void_shipment(&self, key: &str) -> Result<Option<String>, CallError> {
        let v: Voided = self
            .0
            .post(
                key,
                &format!("/carrier/v1/shipments/by-key/{key}/void"),
                json!({}),
            )
            .await?;
        Ok(v.id.filter(|_| v.status == "booked"))
    }

    pub async fn cancel(&self, carrier_ref: &str) -> Result<(), CallError> {
        self.0
            .post::<serde_json::Value>(
                carrier_ref,
                &format!("/carrier/v1/shipments/{carrier_ref}/cancel"),
                json!({}),
            )
            .await
            .map(|_| ())
    }

    /// Ask the carrier to collect a booked shipment; it then reports the parcel's dispatch and
    /// delivery (or loss) to `callback_url`. Idempotent per shipment (a repeated request keeps
    /// the first callback URL); returns the tracking number. A cancelled shipment is refused
    /// (`shipment_cancelled`), an unknown one too (`no_such_shipment`).
    pub async fn request_pickup(
        &self,
        carrier_ref: &str,
        callback_url: &str,
    ) -> Result<String, CallError> {
        self.0
            .post::<ShipmentCreated>(
                carrier_ref,
                &format!("/carrier/v1/shipments/{carrier_ref}/pickup"),
                json!({"callback_url": callback_url}),
            )
            .await
            .map(|s| s.tracking_number)
    }
}
