//! The catalogue as the checkout sees it ([`Catalog`]): the price of each SKU and whether it
//! is for sale, asked of the Product service over its API and cached briefly (a checkout takes
//! the price at the moment it starts and keeps it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use runtime::breaker::Breaker;
use sagas::shop::{Money, Sku};
use serde::Deserialize;

/// Why a lookup could not answer: the checkout is refused (503), nothing written.
#[derive(Debug, thiserror::Error)]
#[error("the Product service cannot price the order now: {0}")]
pub struct Unavailable(pub String);

/// A SKU as the Product service answers it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Listing {
    pub sku: Sku,
    pub price: Money,
    /// The variant and its product are active.
    pub for_sale: bool,
}

#[derive(Deserialize)]
struct Lookup {
    variants: Vec<Listing>,
}

/// The catalogue as the checkout sees it: each SKU's price and whether it is for sale, asked
/// of the Product service (`GET /skus?sku=...`) with a timeout and behind a circuit breaker,
/// and kept for `ttl` (also that a SKU is unknown). A price change reaches new checkouts
/// within `ttl`; when the service cannot answer, a SKU whose answer is older than that is not
/// priced at all: the checkout is refused, never priced from an old answer.
pub struct Catalog {
    http: reqwest::Client,
    base: String,
    ttl: Duration,
    breaker: Breaker,
    cache: Mutex<HashMap<String, (Option<Listing>, Instant)>>,
}

impl Catalog {
    pub fn new(settings: &crate::config::CatalogSettings) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_millis(settings.timeout_ms))
                .build()
                .expect("an HTTP client builds"),
            base: settings.url.trim_end_matches('/').to_owned(),
            ttl: Duration::from_millis(settings.ttl_ms),
            breaker: runtime::breaker::consecutive_failures(
                settings.breaker_failures,
                settings.breaker_open_ms,
                settings.breaker_open_max_ms,
            ),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Each known SKU's listing; unknown SKUs are absent from the map.
    pub async fn listings(&self, skus: &[Sku]) -> Result<HashMap<Sku, Listing>, Unavailable> {
        let now = Instant::now();
        let mut found = HashMap::new();
        let mut missing: Vec<&str> = Vec::new();
        {
            let cache = self.cache.lock().expect("catalog cache lock");
            for sku in skus {
                match cache.get(sku.as_str()) {
                    Some((listing, at)) if now.duration_since(*at) < self.ttl => {
                        if let Some(l) = listing {
                            found.insert(sku.clone(), l.clone());
                        }
                    }
                    _ => missing.push(sku.as_str()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        missing.sort_unstable();
        missing.dedup();
        let answer = self.lookup(&missing).await?;
        let mut cache = self.cache.lock().expect("catalog cache lock");
        for sku in missing {
            let listing = answer.iter().find(|l| l.sku.as_str() == sku).cloned();
            if let Some(l) = &listing {
                found.insert(l.sku.clone(), l.clone());
            }
            cache.insert(sku.to_owned(), (listing, now));
        }
        Ok(found)
    }

    async fn lookup(&self, skus: &[&str]) -> Result<Vec<Listing>, Unavailable> {
        if !self.breaker.is_call_permitted() {
            return Err(Unavailable("its circuit breaker is open".into()));
        }
        let url = format!("{}/skus?sku={}", self.base, skus.join(","));
        let result = async {
            let response = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| Unavailable(e.to_string()))?;
            if !response.status().is_success() {
                return Err(Unavailable(format!("it answered {}", response.status())));
            }
            response
                .json::<Lookup>()
                .await
                .map(|l| l.variants)
                .map_err(|e| Unavailable(format!("its answer cannot be read: {e}")))
        }
        .await;
        match &result {
            Ok(_) => self.breaker.on_success(),
            Err(e) => {
                tracing::warn!(error = %e, "catalogue lookup failed");
                self.breaker.on_error();
            }
        }
        result
    }
}
