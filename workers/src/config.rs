//! Worker configuration: built-in defaults, then `SAGA_CONFIG`, then `SAGA_<SECTION>__<KEY>`,
//! then `DATABASE_URL`, `NATS_URL`, `PROCESSOR_URL`, `CARRIER_URL` and `CART_URL`.

use std::collections::BTreeMap;

use runtime::config::{self as shared, DAY_MS, HOUR_MS, range};
use sagas::wire::Subjects;
use serde::Deserialize;

pub use runtime::config::{Database, Error, Log, LogFormat, Maintenance, Nats, Runtime, ms};

pub const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub runtime: Runtime,
    pub worker: Worker,
    pub database: Database,
    pub maintenance: Maintenance,
    pub nats: Nats,
    pub processor: Remote,
    pub carrier: Remote,
    pub inventory: Inventory,
    pub product: Product,
    pub callbacks: Callbacks,
    pub order: Order,
    pub health: Health,
    #[serde(default)]
    pub faults: Faults,
    pub log: Log,
}

/// The process's own listener for `/healthz`, `/readyz` and `/metrics` ([`crate::health`]).
/// Every process of a pool needs a port of its own (or a network namespace of its own).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// An IP address to listen on (`0.0.0.0`: every interface).
    pub address: String,
    /// 0: no listener. Checked to be at most 65535.
    pub port: u32,
}

impl Health {
    /// The port, checked at load.
    pub fn port(&self) -> u16 {
        u16::try_from(self.port).expect("health.port is checked at load")
    }
}

/// Fault injection, for tests and drills only: off by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Acknowledge the first `swallow` commands this process receives without doing anything
    /// or replying, as a worker that lost them would.
    #[serde(default)]
    pub swallow: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Real,
    Noop,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Worker {
    pub mode: Mode,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remote {
    pub url: String,
    pub timeout_ms: u64,
    /// A call that has not answered after this long gets a `pending` row, written while it
    /// goes on, so that a slow call is on record (0: write `pending` before every call). A
    /// call that answers sooner is recorded once, with its result.
    pub record_pending_after_ms: u64,
    /// Consecutive unavailable answers that open the breaker in front of the party.
    pub breaker_failures: u32,
    /// How long it stays open the first time; doubled (with jitter) up to the max.
    pub breaker_open_ms: u64,
    pub breaker_open_max_ms: u64,
}

/// The Order service's subscriber: where it starts the checkouts carts initiate, and where it
/// reads their details.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    /// The orchestrator's API (`POST /checkout`).
    pub api_url: String,
    /// The Cart service's API (the simulator in development). Also set by `CART_URL`.
    pub cart_url: String,
    pub timeout_ms: u64,
}

/// Where the shipping service takes the carrier's reports (`POST /carrier/reports`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Callbacks {
    pub host: String,
    pub port: u16,
    /// The base URL the carrier reaches that listener at (given to it with each pick-up).
    pub public_url: String,
    /// How often the outbox of the service's events is scanned for what was not published.
    pub relay_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub expiry_sweep_interval_ms: u64,
}

/// Where the Product service's REST API listens ([`crate::product::api`], worker `product`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    pub api_host: String,
    pub api_port: u16,
}

impl Settings {
    pub fn load() -> Result<Self, Error> {
        Self::load_from(std::env::vars().collect())
    }

    pub fn load_from(env: BTreeMap<String, String>) -> Result<Self, Error> {
        let s: Settings = shared::load(
            DEFAULTS,
            &env,
            &[
                ("DATABASE_URL", "database.url"),
                ("NATS_URL", "nats.url"),
                ("PROCESSOR_URL", "processor.url"),
                ("CARRIER_URL", "carrier.url"),
                ("CART_URL", "order.cart_url"),
            ],
        )?;
        s.nats.validate()?;
        s.log.validate()?;
        // Every number, with the range in which the process works (an interval of 0 would
        // panic its loop, a day's worth of years overflow a time).
        let mut ranges = vec![
            range("runtime.threads", s.runtime.threads, 0, 1024),
            range("worker.concurrency", s.worker.concurrency, 1, 10_000),
            range(
                "database.max_connections",
                s.database.max_connections,
                1,
                1000,
            ),
            range(
                "maintenance.vacuum_interval_ms",
                s.maintenance.vacuum_interval_ms,
                0,
                DAY_MS,
            ),
            range("order.timeout_ms", s.order.timeout_ms, 1, HOUR_MS),
            range("health.port", s.health.port, 0, i128::from(u16::MAX)),
            range(
                "callbacks.relay_interval_ms",
                s.callbacks.relay_interval_ms,
                1,
                HOUR_MS,
            ),
            range(
                "inventory.expiry_sweep_interval_ms",
                s.inventory.expiry_sweep_interval_ms,
                1,
                HOUR_MS,
            ),
        ];
        let remotes = [("processor", &s.processor), ("carrier", &s.carrier)];
        for (name, r) in remotes {
            ranges.extend([
                range(&format!("{name}.timeout_ms"), r.timeout_ms, 1, HOUR_MS),
                range(
                    &format!("{name}.breaker_failures"),
                    r.breaker_failures,
                    1,
                    10_000,
                ),
                range(
                    &format!("{name}.breaker_open_ms"),
                    r.breaker_open_ms,
                    1,
                    DAY_MS,
                ),
                range(
                    &format!("{name}.breaker_open_max_ms"),
                    r.breaker_open_max_ms,
                    i128::from(r.breaker_open_ms),
                    DAY_MS,
                ),
            ]);
        }
        shared::check_ranges(&ranges)?;
        for (key, url) in [
            ("order.api_url", &s.order.api_url),
            ("order.cart_url", &s.order.cart_url),
        ] {
            if reqwest::Url::parse(url).is_err() {
                return Err(Error::Invalid(format!("{key} is not a URL: {url:?}")));
            }
        }
        if s.health.address.parse::<std::net::IpAddr>().is_err() {
            return Err(Error::Invalid(format!(
                "health.address is not an IP address: {:?}",
                s.health.address
            )));
        }
        if reqwest::Url::parse(&s.callbacks.public_url).is_err() {
            return Err(Error::Invalid(format!(
                "callbacks.public_url is not a URL: {:?}",
                s.callbacks.public_url
            )));
        }
        for (name, r) in remotes {
            if reqwest::Url::parse(&r.url).is_err() {
                return Err(Error::Invalid(format!(
                    "{name}.url is not a URL: {:?}",
                    r.url
                )));
            }
            if r.record_pending_after_ms >= r.timeout_ms {
                return Err(Error::Invalid(format!(
                    "{name}.record_pending_after_ms must be below {name}.timeout_ms ({}), got {}",
                    r.timeout_ms, r.record_pending_after_ms
                )));
            }
        }
        Ok(s)
    }

    pub fn subjects(&self) -> Subjects {
        Subjects::new(&self.nats.prefix).expect("validated at load")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::config::testing::{assert_refused, env};

    #[test]
    fn defaults_and_overrides() {
        let s = Settings::load_from(env(&[
            ("SAGA_WORKER__MODE", "noop"),
            ("PROCESSOR_URL", "http://x:1"),
        ]))
        .unwrap();
        assert_eq!(s.worker.mode, Mode::Noop);
        assert_eq!(s.processor.url, "http://x:1");
    }

    #[test]
    fn bad_values_are_named() {
        assert_refused(
            Settings::load_from,
            &[
                ("SAGA_WORKER__MODE", "fast", "fast"),
                ("SAGA_WORKER__CONCURRENCY", "0", "concurrency"),
                ("CARRIER_URL", "not a url", "carrier.url"),
                (
                    "SAGA_CALLBACKS__PUBLIC_URL",
                    "nowhere",
                    "callbacks.public_url",
                ),
                (
                    "SAGA_CALLBACKS__RELAY_INTERVAL_MS",
                    "0",
                    "callbacks.relay_interval_ms",
                ),
                (
                    "SAGA_PROCESSOR__RECORD_PENDING_AFTER_MS",
                    "5000",
                    "processor.record_pending_after_ms",
                ),
                (
                    "SAGA_INVENTORY__EXPIRY_SWEEP_INTERVAL_MS",
                    "0",
                    "inventory.expiry_sweep_interval_ms",
                ),
                (
                    "SAGA_CARRIER__BREAKER_OPEN_MAX_MS",
                    "18446744073709551615",
                    "carrier.breaker_open_max_ms",
                ),
                (
                    "SAGA_PROCESSOR__BREAKER_FAILURES",
                    "0",
                    "processor.breaker_failures",
                ),
                ("SAGA_LOG__LEVEL", "info,=[", "log.level"),
            ],
        );
    }

    #[test]
    fn the_health_listener_is_configured_and_checked() {
        let s = Settings::load_from(env(&[])).unwrap();
        assert_eq!(
            (s.health.address.as_str(), s.health.port()),
            ("0.0.0.0", 9100)
        );
        let s = Settings::load_from(env(&[
            ("SAGA_HEALTH__PORT", "0"),
            ("SAGA_HEALTH__ADDRESS", "127.0.0.1"),
        ]))
        .unwrap();
        assert_eq!(
            (s.health.address.as_str(), s.health.port()),
            ("127.0.0.1", 0)
        );
        assert_refused(
            Settings::load_from,
            &[
                (
                    "SAGA_HEALTH__PORT",
                    "65536",
                    "health.port must be 0 to 65535",
                ),
                ("SAGA_HEALTH__PORT", "-1", "health.port"),
                ("SAGA_HEALTH__ADDRESS", "localhost:9100", "health.address"),
                ("SAGA_HEALTH__ADDRESS", "", "health.address"),
            ],
        );
    }
}

#[cfg(test)]
mod fault_tests {
    use super::*;

    #[test]
    fn faults_are_read_from_the_environment() {
        let env: BTreeMap<String, String> =
            [("SAGA_FAULTS__SWALLOW".to_string(), "2".to_string())].into();
        assert_eq!(Settings::load_from(env).unwrap().faults.swallow, 2);
    }
}
