//! Worker configuration: built-in defaults, then `SAGA_CONFIG`, then `SAGA_<SECTION>__<KEY>`,
//! then `DATABASE_URL`, `NATS_URL`, `PROCESSOR_URL` and `CARRIER_URL`.

use std::collections::BTreeMap;
use std::time::Duration;

use sagas::wire::Subjects;
use serde::Deserialize;

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
    pub worker: Worker,
    pub database: Database,
    pub maintenance: Maintenance,
    pub nats: Nats,
    pub processor: Remote,
    pub carrier: Remote,
    pub inventory: Inventory,
    #[serde(default)]
    pub faults: Faults,
    pub log: Log,
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

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub url: String,
    pub max_connections: u32,
    /// The orchestrator's `database.create` (it creates the database): accepted and ignored,
    /// so that one environment configures every process.
    #[serde(default, rename = "create")]
    _orchestrators_create: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    /// How often the worker checks its tables and vacuums or analyzes the ones that need it
    /// (0: never; leave it to autovacuum).
    pub vacuum_interval_ms: u64,
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
    pub prefix: String,
    /// The orchestrator's `nats.replicas` (it declares the streams): accepted and ignored.
    #[serde(default, rename = "replicas")]
    _orchestrators_replicas: Option<serde::de::IgnoredAny>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub expiry_sweep_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub format: LogFormat,
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
    pub fn load() -> Result<Self, Error> {
        Self::load_from(std::env::vars().collect())
    }

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
        for (var, key) in [
            ("DATABASE_URL", "database.url"),
            ("NATS_URL", "nats.url"),
            ("PROCESSOR_URL", "processor.url"),
            ("CARRIER_URL", "carrier.url"),
        ] {
            if let Some(v) = env.get(var) {
                builder = builder.set_override(key, v.as_str())?;
            }
        }
        let s: Settings = builder.build()?.try_deserialize()?;
        Subjects::new(&s.nats.prefix).map_err(|e| Error::Invalid(format!("nats.prefix: {e}")))?;
        const HOUR: i128 = 3_600_000;
        const DAY: i128 = 24 * HOUR;
        // Every number, with the range in which the process works (an interval of 0 would
        // panic its loop, a day's worth of years overflow a time).
        let ranges: [(&str, i128, i128, i128); 5] = [
            ("runtime.threads", s.runtime.threads as i128, 0, 1024),
            (
                "worker.concurrency",
                s.worker.concurrency as i128,
                1,
                10_000,
            ),
            (
                "database.max_connections",
                s.database.max_connections as i128,
                1,
                1000,
            ),
            (
                "maintenance.vacuum_interval_ms",
                s.maintenance.vacuum_interval_ms as i128,
                0,
                DAY,
            ),
            (
                "inventory.expiry_sweep_interval_ms",
                s.inventory.expiry_sweep_interval_ms as i128,
                1,
                HOUR,
            ),
        ];
        let remotes = [("processor", &s.processor), ("carrier", &s.carrier)];
        let remote_ranges = remotes.iter().flat_map(|(name, r)| {
            [
                (format!("{name}.timeout_ms"), r.timeout_ms as i128, 1, HOUR),
                (
                    format!("{name}.breaker_failures"),
                    r.breaker_failures as i128,
                    1,
                    10_000,
                ),
                (
                    format!("{name}.breaker_open_ms"),
                    r.breaker_open_ms as i128,
                    1,
                    DAY,
                ),
                (
                    format!("{name}.breaker_open_max_ms"),
                    r.breaker_open_max_ms as i128,
                    r.breaker_open_ms as i128,
                    DAY,
                ),
            ]
        });
        for (key, value, lo, hi) in ranges
            .into_iter()
            .map(|(k, v, lo, hi)| (k.to_owned(), v, lo, hi))
            .chain(remote_ranges)
        {
            if !(lo..=hi).contains(&value) {
                return Err(Error::Invalid(format!(
                    "{key} must be {lo} to {hi}, got {value}"
                )));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&s.log.level) {
            return Err(Error::Invalid(format!(
                "log.level {:?} is not a tracing filter: {e}",
                s.log.level
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
        let e = Settings::load_from(env(&[("SAGA_WORKER__MODE", "fast")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode") || e.contains("fast"), "{e}");
        let e = Settings::load_from(env(&[("SAGA_WORKER__CONCURRENCY", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("concurrency"), "{e}");
        let e = Settings::load_from(env(&[("CARRIER_URL", "not a url")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("carrier.url"), "{e}");
        let e = Settings::load_from(env(&[("SAGA_PROCESSOR__RECORD_PENDING_AFTER_MS", "5000")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("processor.record_pending_after_ms"), "{e}");
        for (key, value, named) in [
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
        ] {
            let e = Settings::load_from(env(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{key}={value}: {e}");
        }
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
