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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nats {
    pub url: String,
    /// Subject and stream prefix: several deployments (or tests) can share one server.
    pub prefix: String,
    /// JetStream stream replicas (1 on a single server).
    pub replicas: usize,
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
    /// Consecutive failures (retryable failures or deadlines) of a step that open its breaker.
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
        if self.runtime.threads > 1024 {
            return bad(format!(
                "runtime.threads must be 0 (one per core) to 1024, got {}",
                self.runtime.threads
            ));
        }
        if self.engine.shards == 0 || self.engine.shards > 64 {
            return bad(format!(
                "engine.shards must be 1 to 64, got {}",
                self.engine.shards
            ));
        }
        if self.engine.max_batch == 0 {
            return bad("engine.max_batch must be at least 1".into());
        }
        if self.engine.pipeline == 0 || self.engine.pipeline > 16 {
            return bad(format!(
                "engine.pipeline must be 1 to 16, got {}",
                self.engine.pipeline
            ));
        }
        if self.database.max_connections < 2 {
            return bad("database.max_connections must be at least 2".into());
        }
        if self.http.max_body_bytes < 1024 {
            return bad("http.max_body_bytes must be at least 1024".into());
        }
        if self.breakers.failure_threshold == 0
            || self.breakers.open_initial_ms == 0
            || self.breakers.open_max_ms < self.breakers.open_initial_ms
            || self.breakers.unpark_interval_ms == 0
        {
            return bad("breakers: failure_threshold and open_initial_ms must be positive, open_max_ms >= open_initial_ms, unpark_interval_ms positive".into());
        }
        if self.checkout.max_lines == 0 {
            return bad("checkout.max_lines must be at least 1".into());
        }
        if self.checkout.reservation_hold_seconds == 0 {
            return bad("checkout.reservation_hold_seconds must be at least 1".into());
        }
        if self.replies.concurrency == 0 || self.relay.max_batch == 0 || self.timers.max_batch < 1 {
            return bad(
                "replies.concurrency, relay.max_batch and timers.max_batch must be positive".into(),
            );
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
