//! Configuration: built-in defaults, then an optional TOML file (`SAGA_CONFIG=path`), then
//! environment variables `SAGA_<SECTION>__<KEY>` (e.g. `SAGA_HTTP__PORT=8080`), then the
//! conventional `DATABASE_URL` and `NATS_URL`. Unknown keys and out-of-range values are refused
//! at start-up with a message that names them.

use std::collections::BTreeMap;

use runtime::config::{self as shared, DAY_MS, HOUR_MS, range};
use sagas::policy::StepPolicyOverride;
use sagas::wire::Subjects;
use serde::Deserialize;

pub use runtime::config::{
    Database, Error, Log, LogFormat, Maintenance, Nats, Runtime, ms, without_credentials,
};

/// The defaults, also the reference of every setting (see the README).
pub const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub runtime: Runtime,
    pub http: Http,
    pub database: Database,
    pub nats: Nats,
    pub engine: Engine,
    pub partitions: Partitions,
    pub relay: Relay,
    pub replies: Replies,
    pub timers: Timers,
    pub breakers: Breakers,
    pub maintenance: Maintenance,
    pub checkout: Checkout,
    pub catalog: CatalogSettings,
    pub admin: Admin,
    #[serde(default)]
    pub sagas: Sagas,
    pub log: Log,
}

/// Which of the binary's saga types this process runs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sagas {
    /// Saga types of the binary not to run, comma-separated (the benchmark runs the checkout
    /// alone: `fulfilment`). A name the binary does not have is refused at start-up.
    #[serde(default)]
    pub disabled: String,
    /// Per type, per step policy overrides of the sagas domain events start (e.g.
    /// `[sagas.policies.fulfilment.dispatch] sla_ms = 3600000`). (The checkout's are
    /// `checkout.policies`: its start request comes over HTTP.)
    #[serde(default)]
    pub policies: BTreeMap<String, BTreeMap<String, StepPolicyOverride>>,
}

impl Sagas {
    pub fn disabled(&self) -> Vec<&str> {
        self.disabled
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    pub host: String,
    pub port: u16,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// The longest `Prefer: wait` / `?wait` a client may ask for.
    pub max_wait_seconds: u64,
}

/// Who may use the dashboard and the admin API (`[admin]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `required`: every dashboard page and admin endpoint needs a login or a token.
    /// `disabled`: nobody logs in and everyone is an operator; for development only, and every
    /// page says so.
    pub auth: AuthMode,
    /// API tokens, comma-separated `name:role:sha256`, where `role` is `viewer` or `operator`
    /// and `sha256` the hex SHA-256 of the token (`orchestrator admin token` makes one): the
    /// configuration never holds a token itself.
    pub tokens: String,
    /// How long a dashboard login lasts.
    pub session_ttl_seconds: u64,
    /// Send the session cookie only over HTTPS (set it behind TLS).
    pub secure_cookie: bool,
    /// Where a saga's trace is seen (Jaeger, Tempo...), `{trace_id}` replaced by its trace id
    /// (the saga id's 32 hex digits): the dashboard links it. Empty: no link.
    pub trace_url: String,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .tokens
            .split(',')
            .filter_map(|t| t.split(':').next())
            .filter(|n| !n.trim().is_empty())
            .collect();
        f.debug_struct("Admin")
            .field("auth", &self.auth)
            .field("tokens", &names)
            .field("session_ttl_seconds", &self.session_ttl_seconds)
            .field("secure_cookie", &self.secure_cookie)
            .field("trace_url", &self.trace_url)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    Required,
    Disabled,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Engine {
    /// Sagas are partitioned over this many single-writer shards, each committing batches.
    pub shards: usize,
    /// At most this many inputs are applied in one transaction.
    pub max_batch: usize,
    /// Transactions a shard may have committing at once (under heavy load; each holds other
    /// sagas).
    pub pipeline: usize,
    /// Live sagas kept in memory per shard, to skip reading them back.
    pub cache_capacity: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    /// How often committed-but-unpublished outbox rows are looked for (after a crash, or when a
    /// publish failed).
    pub scan_interval_ms: u64,
    /// Rows younger than this are left to the in-process hand-off.
    pub scan_grace_ms: u64,
    pub max_batch: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replies {
    /// Replies being applied at once.
    pub concurrency: usize,
    /// JetStream redelivers an unacknowledged reply after this long.
    pub ack_wait_ms: u64,
    pub max_deliver: i64,
}

/// How orchestrators divide the sagas (`crate::partitions`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partitions {
    /// Sagas hash to this many partitions, each owned by one orchestrator at a time. Fixed once
    /// chosen: a start with another count than the database's is refused. More partitions than
    /// orchestrators lets them spread evenly (16 serve up to 16 orchestrators).
    pub count: u32,
    /// A partition's lease lasts this long unless renewed (every quarter of it): a crashed
    /// orchestrator's partitions move to the others within about this long.
    pub lease_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timers {
    pub poll_interval_ms: u64,
    pub max_batch: i64,
    /// A claimed timer that was not applied within this long is claimed again.
    pub lease_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Breakers {
    /// Consecutive failures (retryable failures or deadlines) of a step, each from a different
    /// saga, that open its breaker.
    pub failure_threshold: u32,
    /// How long a breaker stays open the first time; doubled (with jitter) up to the max.
    pub open_initial_ms: u64,
    pub open_max_ms: u64,
    /// A half-open probe whose outcome does not come within this long is sent again.
    pub probe_timeout_ms: u64,
    /// How often parked sagas are looked at (and operator overrides read).
    pub unpark_interval_ms: u64,
}

/// Where checkouts are validated and priced: the Product service's API (`GET /skus`), behind
/// a timeout and a circuit breaker, its answers cached for `ttl_ms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSettings {
    /// The Product service's base URL. Also set by `PRODUCT_URL`.
    pub url: String,
    /// How long a SKU's price is used before it is asked again: the longest a price change
    /// goes unseen by new checkouts.
    pub ttl_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failed lookups that open the breaker; while open, checkouts whose SKUs are
    /// not cached are refused at once (503) instead of waiting on a service that is down.
    pub breaker_failures: u32,
    pub breaker_open_ms: u64,
    pub breaker_open_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkout {
    pub max_lines: usize,
    pub reservation_hold_seconds: u32,
    /// Per-step policy overrides, e.g. `[checkout.policies.charge_payment.forward] max_attempts = 5`.
    #[serde(default)]
    pub policies: BTreeMap<String, StepPolicyOverride>,
}

impl Settings {
    /// Load from the defaults, `SAGA_CONFIG`, `SAGA_*` and the conventional variables.
    pub fn load() -> Result<Self, Error> {
        Self::load_from(std::env::vars().collect())
    }

    /// Load from the given environment (a test passes its own).
    pub fn load_from(env: BTreeMap<String, String>) -> Result<Self, Error> {
        let settings: Settings = shared::load(
            DEFAULTS,
            &env,
            &[
                ("DATABASE_URL", "database.url"),
                ("NATS_URL", "nats.url"),
                ("PRODUCT_URL", "catalog.url"),
            ],
        )?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Invalid(m));
        self.nats.validate()?;
        self.log.validate()?;
        let (e, r, t, b) = (&self.engine, &self.relay, &self.timers, &self.breakers);
        // Every number, with the range in which the process works; outside it a setting
        // would panic a loop (an interval of 0) or overflow a time (a day's worth of years).
        shared::check_ranges(&[
            range("runtime.threads", self.runtime.threads, 0, 1024),
            range(
                "http.max_body_bytes",
                self.http.max_body_bytes,
                1024,
                64 << 20,
            ),
            range("http.max_wait_seconds", self.http.max_wait_seconds, 0, 3600),
            range(
                "database.max_connections",
                self.database.max_connections,
                2,
                1000,
            ),
            range("nats.replicas", self.nats.replicas, 1, 5),
            range("engine.shards", e.shards, 1, 64),
            range("engine.max_batch", e.max_batch, 1, 100_000),
            range("engine.pipeline", e.pipeline, 1, 16),
            range("engine.cache_capacity", e.cache_capacity, 0, 10_000_000),
            range("partitions.count", self.partitions.count, 1, 1024),
            range(
                "partitions.lease_ms",
                self.partitions.lease_ms,
                1000,
                HOUR_MS,
            ),
            range("relay.scan_interval_ms", r.scan_interval_ms, 1, HOUR_MS),
            range("relay.scan_grace_ms", r.scan_grace_ms, 0, HOUR_MS),
            range("relay.max_batch", r.max_batch, 1, 100_000),
            range("replies.concurrency", self.replies.concurrency, 1, 100_000),
            range(
                "replies.ack_wait_ms",
                self.replies.ack_wait_ms,
                100,
                HOUR_MS,
            ),
            range("timers.poll_interval_ms", t.poll_interval_ms, 1, 60_000),
            range("timers.max_batch", t.max_batch, 1, 100_000),
            range("timers.lease_ms", t.lease_ms, 1000, HOUR_MS),
            range("breakers.failure_threshold", b.failure_threshold, 1, 10_000),
            range("breakers.open_initial_ms", b.open_initial_ms, 1, DAY_MS),
            range(
                "breakers.open_max_ms",
                b.open_max_ms,
                i128::from(b.open_initial_ms),
                DAY_MS,
            ),
            range("breakers.probe_timeout_ms", b.probe_timeout_ms, 1, DAY_MS),
            range(
                "breakers.unpark_interval_ms",
                b.unpark_interval_ms,
                1,
                HOUR_MS,
            ),
            range(
                "maintenance.vacuum_interval_ms",
                self.maintenance.vacuum_interval_ms,
                0,
                DAY_MS,
            ),
            range("checkout.max_lines", self.checkout.max_lines, 1, 1000),
            range(
                "admin.session_ttl_seconds",
                self.admin.session_ttl_seconds,
                60,
                30 * 86_400,
            ),
            range(
                "checkout.reservation_hold_seconds",
                self.checkout.reservation_hold_seconds,
                1,
                7 * 86_400,
            ),
            range("catalog.ttl_ms", self.catalog.ttl_ms, 0, HOUR_MS),
            range("catalog.timeout_ms", self.catalog.timeout_ms, 1, HOUR_MS),
            range(
                "catalog.breaker_failures",
                self.catalog.breaker_failures,
                1,
                10_000,
            ),
            range(
                "catalog.breaker_open_ms",
                self.catalog.breaker_open_ms,
                1,
                DAY_MS,
            ),
            range(
                "catalog.breaker_open_max_ms",
                self.catalog.breaker_open_max_ms,
                i128::from(self.catalog.breaker_open_ms),
                DAY_MS,
            ),
        ])?;
        // JetStream wants more deliveries than the consumer's four backoff steps.
        let max_deliver = self.replies.max_deliver;
        if max_deliver != -1 && !(5..=100_000).contains(&max_deliver) {
            return bad(format!(
                "replies.max_deliver must be -1 (no limit) or 5 to 100000, got {max_deliver}"
            ));
        }
        crate::http::auth::parse_tokens(&self.admin.tokens)
            .map_err(|e| Error::Invalid(format!("admin.tokens: {e}")))?;
        sagas::stepwise::validate_overrides::<sagas::checkout::Checkout>(&self.checkout.policies)
            .map_err(|e| Error::Invalid(format!("checkout.policies: {e}")))?;
        sagas::checkout::check_hold(
            self.checkout.reservation_hold_seconds,
            &self.checkout.policies,
        )
        .map_err(|e| Error::Invalid(format!("checkout.reservation_hold_seconds: {e}")))?;
        Ok(())
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
    fn credentials_are_not_printed() {
        let s = Settings::load_from(env(&[
            ("NATS_URL", "nats://ada:s3cret@h:4222"),
            ("DATABASE_URL", "postgres://ada:s3cret@h/db"),
        ]))
        .unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn defaults_load() {
        let s = Settings::load_from(env(&[])).unwrap();
        assert_eq!(s.http.port, 8080);
        assert_eq!(s.nats.prefix, "shop");
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let s = Settings::load_from(env(&[
            ("SAGA_HTTP__PORT", "9999"),
            (
                "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__MAX_ATTEMPTS",
                "5",
            ),
            ("DATABASE_URL", "postgres://x@y/z"),
        ]))
        .unwrap();
        assert_eq!(s.http.port, 9999);
        assert_eq!(
            s.checkout.policies["charge_payment"].forward.max_attempts,
            Some(5)
        );
        assert_eq!(s.database.url, "postgres://x@y/z");
    }

    #[test]
    fn bad_values_are_named() {
        assert_refused(
            Settings::load_from,
            &[
                ("SAGA_HTTP__PORT", "http", "port"),
                ("SAGA_HTTP__PROT", "1", "prot"),
                ("SAGA_ADMIN__AUTH", "maybe", "auth"),
                ("SAGA_ADMIN__TOKENS", "ops:root:abc", "admin.tokens"),
                (
                    "SAGA_ADMIN__SESSION_TTL_SECONDS",
                    "1",
                    "admin.session_ttl_seconds",
                ),
                ("SAGA_NATS__PREFIX", "a.b", "nats.prefix"),
                (
                    "SAGA_CHECKOUT__POLICIES__NOPE__FORWARD__MAX_ATTEMPTS",
                    "1",
                    "unknown step",
                ),
                (
                    "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__MAX_ATTEMPTS",
                    "0",
                    "max_attempts",
                ),
                (
                    "SAGA_RELAY__SCAN_INTERVAL_MS",
                    "0",
                    "relay.scan_interval_ms",
                ),
                (
                    "SAGA_TIMERS__POLL_INTERVAL_MS",
                    "0",
                    "timers.poll_interval_ms",
                ),
                (
                    "SAGA_HTTP__MAX_WAIT_SECONDS",
                    "99999999999",
                    "http.max_wait_seconds",
                ),
                (
                    "SAGA_BREAKERS__OPEN_MAX_MS",
                    "18446744073709551615",
                    "breakers.open_max_ms",
                ),
                ("SAGA_REPLIES__MAX_DELIVER", "3", "replies.max_deliver"),
                ("SAGA_LOG__LEVEL", "info,=[", "log.level"),
                (
                    "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__BACKOFF_MAX_MS",
                    "18446744073709551615",
                    "backoff",
                ),
            ],
        );
        assert!(Settings::load_from(env(&[("SAGA_REPLIES__MAX_DELIVER", "-1")])).is_ok());
    }

    #[test]
    fn a_hold_shorter_than_a_step_in_flight_is_refused() {
        // The charge may be in flight for 2 x 15 s by default: a 40 s hold cannot be renewed
        // ahead of it (30 s plus 10 s of slack).
        let e = Settings::load_from(env(&[("SAGA_CHECKOUT__RESERVATION_HOLD_SECONDS", "40")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checkout.reservation_hold_seconds") && e.contains("charge_payment"),
            "{e}"
        );
        // Short deadlines make a short hold fine.
        let mut short = vec![("SAGA_CHECKOUT__RESERVATION_HOLD_SECONDS", "8")];
        short.extend([
            (
                "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__DEADLINE_MS",
                "2000",
            ),
            (
                "SAGA_CHECKOUT__POLICIES__CREATE_SHIPMENT__FORWARD__DEADLINE_MS",
                "2000",
            ),
        ]);
        assert!(Settings::load_from(env(&short)).is_ok());
        short[1].1 = "3000";
        assert!(Settings::load_from(env(&short)).is_err());
    }
}

#[cfg(test)]
mod section_tests {
    #[test]
    fn every_section_has_defaults() {
        let s = runtime::config::sections(super::DEFAULTS);
        for name in [
            "http", "database", "nats", "engine", "relay", "replies", "timers", "breakers",
            "checkout", "log",
        ] {
            assert!(s.contains(&name), "{name} missing from {s:?}");
        }
    }
}
