//! Configuration: built-in defaults, then an optional TOML file (`SAGA_CONFIG=path`), then
//! environment variables `SAGA_<SECTION>__<KEY>` (e.g. `SAGA_HTTP__PORT=8080`), then the
//! conventional `DATABASE_URL` and `NATS_URL`. Unknown keys and out-of-range values are refused
//! at start-up with a message that names them.

use std::collections::BTreeMap;
use std::time::Duration;

use sagas::policy::StepPolicyOverride;
use sagas::wire::Subjects;
use serde::Deserialize;

/// The defaults, also the reference of every setting (see the README).
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// The top-level sections of this process's settings: the tables of [`DEFAULTS`] (every
/// section has defaults, so this list cannot drift from the settings).
fn sections() -> Vec<&'static str> {
    DEFAULTS
        .lines()
        .filter_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'))
        .filter(|t| !t.contains('.'))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub runtime: Runtime,
    pub http: Http,
    pub database: Database,
    pub nats: Nats,
    pub engine: Engine,
    pub relay: Relay,
    pub replies: Replies,
    pub timers: Timers,
    pub breakers: Breakers,
    pub maintenance: Maintenance,
    pub checkout: Checkout,
    pub log: Log,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// 1: a current-thread runtime; N > 1: N worker threads; 0: one per core.
    pub threads: usize,
}

impl Runtime {
    pub fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        if self.threads == 1 {
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
        }
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if self.threads > 1 {
            builder.worker_threads(self.threads);
        }
        builder.enable_all().build()
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

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// A secret (it may hold a password): never logged.
    pub url: String,
    pub max_connections: u32,
    /// Create the database when it does not exist.
    pub create: bool,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("url", &"<redacted>")
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nats {
    /// May hold credentials (`nats://user:password@host`): printed without them.
    pub url: String,
    /// Subject and stream prefix: several deployments (or tests) can share one server.
    pub prefix: String,
    /// JetStream stream replicas (1 on a single server).
    pub replicas: usize,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("url", &without_credentials(&self.url))
            .field("prefix", &self.prefix)
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// A URL with its user information (`user:password@`) replaced, for printing.
pub fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    /// How often the orchestrator's tables are checked and vacuumed or analyzed where
    /// autovacuum's rules say so (0: never; leave it to autovacuum).
    pub vacuum_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkout {
    pub max_lines: usize,
    pub reservation_hold_seconds: u32,
    /// How long a catalogue price stays cached.
    pub catalog_ttl_ms: u64,
    /// Per-step policy overrides, e.g. `[checkout.policies.charge_payment.forward] max_attempts = 5`.
    #[serde(default)]
    pub policies: BTreeMap<String, StepPolicyOverride>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info,orchestrator=debug`. `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Load from the defaults, `SAGA_CONFIG`, `SAGA_*` and the conventional variables.
    pub fn load() -> Result<Self, Error> {
        Self::load_from(std::env::vars().collect())
    }

    /// Load from the given environment (a test passes its own).
    pub fn load_from(env: BTreeMap<String, String>) -> Result<Self, Error> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = env.get("SAGA_CONFIG") {
            builder = builder.add_source(config::File::with_name(path).required(true));
        }
        // Several processes share the SAGA_ namespace: each reads its own sections (and
        // refuses unknown keys inside them) and leaves the others' alone.
        let sections = sections();
        let saga_env: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| {
                let Some(rest) = k.strip_prefix("SAGA_") else {
                    return false;
                };
                let section = rest.split("__").next().unwrap_or("").to_ascii_lowercase();
                sections.contains(&section.as_str())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("SAGA")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(saga_env)),
        );
        if let Some(url) = env.get("DATABASE_URL") {
            builder = builder.set_override("database.url", url.as_str())?;
        }
        if let Some(url) = env.get("NATS_URL") {
            builder = builder.set_override("nats.url", url.as_str())?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Invalid(m));
        Subjects::new(&self.nats.prefix)
            .map_err(|e| Error::Invalid(format!("nats.prefix: {e}")))?;
        const HOUR: u64 = 3_600_000;
        const DAY: u64 = 24 * HOUR;
        let (e, r, t, b) = (&self.engine, &self.relay, &self.timers, &self.breakers);
        // Every number, with the range in which the process works; outside it a setting
        // would panic a loop (an interval of 0) or overflow a time (a day's worth of years).
        let ranges: [(&str, i128, i128, i128); 26] = [
            ("runtime.threads", self.runtime.threads as i128, 0, 1024),
            (
                "http.max_body_bytes",
                self.http.max_body_bytes as i128,
                1024,
                64 << 20,
            ),
            (
                "http.max_wait_seconds",
                self.http.max_wait_seconds as i128,
                0,
                3600,
            ),
            (
                "database.max_connections",
                self.database.max_connections as i128,
                2,
                1000,
            ),
            ("nats.replicas", self.nats.replicas as i128, 1, 5),
            ("engine.shards", e.shards as i128, 1, 64),
            ("engine.max_batch", e.max_batch as i128, 1, 100_000),
            ("engine.pipeline", e.pipeline as i128, 1, 16),
            (
                "engine.cache_capacity",
                e.cache_capacity as i128,
                0,
                10_000_000,
            ),
            (
                "relay.scan_interval_ms",
                r.scan_interval_ms as i128,
                1,
                HOUR as i128,
            ),
            (
                "relay.scan_grace_ms",
                r.scan_grace_ms as i128,
                0,
                HOUR as i128,
            ),
            ("relay.max_batch", r.max_batch as i128, 1, 100_000),
            (
                "replies.concurrency",
                self.replies.concurrency as i128,
                1,
                100_000,
            ),
            (
                "replies.ack_wait_ms",
                self.replies.ack_wait_ms as i128,
                100,
                HOUR as i128,
            ),
            (
                "timers.poll_interval_ms",
                t.poll_interval_ms as i128,
                1,
                60_000,
            ),
            ("timers.max_batch", t.max_batch as i128, 1, 100_000),
            ("timers.lease_ms", t.lease_ms as i128, 1000, HOUR as i128),
            (
                "breakers.failure_threshold",
                b.failure_threshold as i128,
                1,
                10_000,
            ),
            (
                "breakers.open_initial_ms",
                b.open_initial_ms as i128,
                1,
                DAY as i128,
            ),
            (
                "breakers.open_max_ms",
                b.open_max_ms as i128,
                b.open_initial_ms as i128,
                DAY as i128,
            ),
            (
                "breakers.probe_timeout_ms",
                b.probe_timeout_ms as i128,
                1,
                DAY as i128,
            ),
            (
                "breakers.unpark_interval_ms",
                b.unpark_interval_ms as i128,
                1,
                HOUR as i128,
            ),
            (
                "maintenance.vacuum_interval_ms",
                self.maintenance.vacuum_interval_ms as i128,
                0,
                DAY as i128,
            ),
            (
                "checkout.max_lines",
                self.checkout.max_lines as i128,
                1,
                1000,
            ),
            (
                "checkout.reservation_hold_seconds",
                self.checkout.reservation_hold_seconds as i128,
                1,
                7 * 86_400,
            ),
            (
                "checkout.catalog_ttl_ms",
                self.checkout.catalog_ttl_ms as i128,
                0,
                HOUR as i128,
            ),
        ];
        for (key, value, lo, hi) in ranges {
            if !(lo..=hi).contains(&value) {
                return bad(format!("{key} must be {lo} to {hi}, got {value}"));
            }
        }
        // JetStream wants more deliveries than the consumer's four backoff steps.
        let max_deliver = self.replies.max_deliver;
        if max_deliver != -1 && !(5..=100_000).contains(&max_deliver) {
            return bad(format!(
                "replies.max_deliver must be -1 (no limit) or 5 to 100000, got {max_deliver}"
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return bad(format!(
                "log.level {:?} is not a tracing filter: {e}",
                self.log.level
            ));
        }
        let steps: Vec<&str> = <sagas::checkout::Checkout as sagas::stepwise::Definition>::steps()
            .iter()
            .map(|s| s.name)
            .collect();
        for (step, o) in &self.checkout.policies {
            let Some(def) = <sagas::checkout::Checkout as sagas::stepwise::Definition>::steps()
                .iter()
                .find(|s| s.name == step)
            else {
                return bad(format!(
                    "checkout.policies.{step}: no such step (steps: {})",
                    steps.join(", ")
                ));
            };
            o.forward
                .apply(&def.policy.forward)
                .validate(&format!("checkout.policies.{step}.forward"))
                .and_then(|()| {
                    o.compensation
                        .apply(&def.policy.compensation)
                        .validate(&format!("checkout.policies.{step}.compensation"))
                })
                .map_err(|e| Error::Invalid(e.0))?;
        }
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

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn credentials_are_not_printed() {
        assert_eq!(
            without_credentials("nats://ada:s3cret@nats.local:4222"),
            "nats://<redacted>@nats.local:4222"
        );
        assert_eq!(
            without_credentials("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
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
        let e = Settings::load_from(env(&[("SAGA_HTTP__PORT", "http")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
        let e = Settings::load_from(env(&[("SAGA_HTTP__PROT", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("prot"), "{e}");
        let e = Settings::load_from(env(&[("SAGA_NATS__PREFIX", "a.b")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats.prefix"), "{e}");
        let e = Settings::load_from(env(&[(
            "SAGA_CHECKOUT__POLICIES__NOPE__FORWARD__MAX_ATTEMPTS",
            "1",
        )]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("no such step"), "{e}");
        let e = Settings::load_from(env(&[(
            "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__MAX_ATTEMPTS",
            "0",
        )]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_attempts"), "{e}");
        for (key, value, named) in [
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
        ] {
            let e = Settings::load_from(env(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{key}={value}: {e}");
        }
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
        let s = super::sections();
        for name in [
            "http", "database", "nats", "engine", "relay", "replies", "timers", "breakers",
            "checkout", "log",
        ] {
            assert!(s.contains(&name), "{name} missing from {s:?}");
        }
    }
}
