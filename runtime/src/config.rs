//! Layered settings: a process's built-in defaults (a TOML text), then a TOML file named by
//! `SAGA_CONFIG`, then environment variables `SAGA_<SECTION>__<KEY>`, then the conventional
//! variables the process names (`DATABASE_URL`, `NATS_URL`, ...). Unknown keys and values of
//! the wrong type stop the process at start-up with a message that names them; each process
//! range-checks its numbers with [`check_ranges`].
//!
//! Several processes share the `SAGA_` namespace: each reads the sections its defaults have (and
//! refuses unknown keys inside them) and leaves the others' alone, so one environment configures
//! them all. The sections every process has are defined here.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Load(#[from] ::config::ConfigError),
    #[error("configuration: {0}")]
    Invalid(String),
}

/// The top-level sections of a defaults text: its tables (every section has defaults, so the
/// list cannot drift from the settings).
pub fn sections(defaults: &str) -> Vec<&str> {
    defaults
        .lines()
        .filter_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'))
        .filter(|t| !t.contains('.'))
        .collect()
}

/// Load settings of type `T` from `defaults` and the environment `env`; `conventional` maps
/// variables such as `DATABASE_URL` to the keys they set (`database.url`).
pub fn load<T: DeserializeOwned>(
    defaults: &str,
    env: &BTreeMap<String, String>,
    conventional: &[(&str, &str)],
) -> Result<T, Error> {
    let mut builder = ::config::Config::builder().add_source(::config::File::from_str(
        defaults,
        ::config::FileFormat::Toml,
    ));
    if let Some(path) = env.get("SAGA_CONFIG") {
        builder = builder.add_source(::config::File::with_name(path).required(true));
    }
    let sections = sections(defaults);
    let saga_env: ::config::Map<String, String> = env
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
        ::config::Environment::with_prefix("SAGA")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(saga_env)),
    );
    for (var, key) in conventional {
        if let Some(v) = env.get(*var) {
            builder = builder.set_override(*key, v.as_str())?;
        }
    }
    Ok(builder.build()?.try_deserialize()?)
}

/// Every `(key, value, lowest, highest)` must hold, or the first that does not is named.
pub fn check_ranges(ranges: &[(String, i128, i128, i128)]) -> Result<(), Error> {
    for (key, value, lo, hi) in ranges {
        if !(lo..=hi).contains(&value) {
            return Err(Error::Invalid(format!(
                "{key} must be {lo} to {hi}, got {value}"
            )));
        }
    }
    Ok(())
}

/// `(key, value, lowest, highest)` for [`check_ranges`].
pub fn range(
    key: &str,
    value: impl TryInto<i128>,
    lo: i128,
    hi: i128,
) -> (String, i128, i128, i128) {
    (
        key.to_owned(),
        value.try_into().unwrap_or(i128::MAX),
        lo,
        hi,
    )
}

pub const HOUR_MS: i128 = 3_600_000;
pub const DAY_MS: i128 = 24 * HOUR_MS;

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
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

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// A secret (it may hold a password): never logged.
    pub url: String,
    pub max_connections: u32,
    /// Create the database when it does not exist (the orchestrator's setting; a worker leaves
    /// it to the orchestrator).
    #[serde(default)]
    pub create: bool,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("url", &"<redacted>")
            .field("max_connections", &self.max_connections)
            .field("create", &self.create)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nats {
    /// One server, or the servers of a cluster comma-separated (`nats://n1:4222,nats://n2:4222`):
    /// the client connects to one and moves to another when it goes away. A URL may hold
    /// credentials (`nats://user:password@host`, or `nats://token@host`): printed without them.
    pub url: String,
    /// Subject and stream prefix: several deployments (or tests) can share one server.
    pub prefix: String,
    /// JetStream stream replicas (the orchestrator declares the streams; 1 on one server).
    #[serde(default = "one")]
    pub replicas: usize,
    /// A user and password (both or neither), rather than in the URL. The password is a secret:
    /// never printed.
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub password: String,
    /// A file holding an nkey seed (`SU...`): the client signs the server's nonce with it.
    #[serde(default)]
    pub nkey_seed_file: String,
    /// A credentials file (a user JWT and its nkey seed, as `nsc` writes it).
    #[serde(default)]
    pub creds_file: String,
    /// PEM: the CA certificates the servers' certificates are checked against (rather than the
    /// system's).
    #[serde(default)]
    pub tls_ca_file: String,
    /// PEM: this client's certificate and its key (both or neither), for servers that verify
    /// their clients.
    #[serde(default)]
    pub tls_cert_file: String,
    #[serde(default)]
    pub tls_key_file: String,
    /// Speak TLS to the servers, or not connect at all. Implied by `tls_ca_file` and
    /// `tls_cert_file`, and by a `tls://` URL.
    #[serde(default)]
    pub tls_required: bool,
}

fn one() -> usize {
    1
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("Nats")
            .field("url", &without_credentials(&self.url))
            .field("prefix", &self.prefix)
            .field("replicas", &self.replicas)
            .field("user", &self.user)
            .field("password", &secret(&self.password))
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

impl Nats {
    pub fn subjects(&self) -> Result<sagas::wire::Subjects, Error> {
        sagas::wire::Subjects::new(&self.prefix)
            .map_err(|e| Error::Invalid(format!("nats.prefix: {e}")))
    }

    /// The prefix, the server list, the credentials and the TLS files (each file readable and
    /// holding what it should): what is wrong stops the process at start-up, named.
    pub fn validate(&self) -> Result<(), Error> {
        self.subjects()?;
        crate::nats::plan(self).map(|_| ()).map_err(Error::Invalid)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    /// How often the process checks the tables it writes and vacuums or analyzes the ones that
    /// need it by autovacuum's rules (0: never; leave it to autovacuum).
    pub vacuum_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info,orchestrator=debug`. `RUST_LOG` wins when set.
    pub level: String,
}

impl Log {
    pub fn validate(&self) -> Result<(), Error> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| {
                Error::Invalid(format!(
                    "log.level {:?} is not a tracing filter: {e}",
                    self.level
                ))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A URL, or a list of them (NATS servers, libpq's hosts), with the user information
/// (`user:password@`) of each replaced, for printing. Where it is not clear where the user
/// information ends, more is replaced rather than less.
pub fn without_credentials(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    // A bare `user:password@host` has its authority at the start.
    let mut at_authority = !url.contains("://");
    loop {
        if !at_authority {
            let Some(i) = rest.find("://") else {
                out.push_str(rest);
                return out;
            };
            out.push_str(&rest[..i + 3]);
            rest = &rest[i + 3..];
        }
        at_authority = false;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            out.push_str("<redacted>");
            rest = &rest[at..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for (url, printed) in [
            (
                "nats://a:s3cret@n1:4222,nats://b:s3cret@n2:4222",
                "nats://<redacted>@n1:4222,nats://<redacted>@n2:4222",
            ),
            (
                "nats://n1:4222,nats://b:s3cret@n2:4222",
                "nats://n1:4222,nats://<redacted>@n2:4222",
            ),
            ("nats://a:s3,cret@n1", "nats://<redacted>@n1"),
            ("nats://a:s3@cret@n1", "nats://<redacted>@n1"),
            ("a:s3cret@n1:4222", "<redacted>@n1:4222"),
            (
                "postgres://ada:s3cret@h1:5432,h2:5433/db?target_session_attrs=read-write",
                "postgres://<redacted>@h1:5432,h2:5433/db?target_session_attrs=read-write",
            ),
            ("postgres://h1/db?x=a@b", "postgres://h1/db?x=a@b"),
        ] {
            assert_eq!(without_credentials(url), printed, "{url}");
        }
    }

    #[test]
    fn ranges_name_the_key() {
        assert!(check_ranges(&[range("a.b", 3, 1, 5)]).is_ok());
        let e = check_ranges(&[range("a.b", 3, 1, 5), range("c.d", 0, 1, 5)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.d must be 1 to 5, got 0"), "{e}");
        let e = check_ranges(&[range("e", u64::MAX, 0, 10)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("e must be 0 to 10"), "{e}");
    }
}

/// Helpers for the tests of a process's settings, which load from an environment of their own.
pub mod testing {
    use std::collections::BTreeMap;
    use std::fmt::{Debug, Display};

    /// An environment of exactly these variables.
    pub fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Each `(variable, value, named)`, set alone, makes `load` fail with an error that says
    /// `named`.
    pub fn assert_refused<T: Debug, E: Display>(
        load: impl Fn(BTreeMap<String, String>) -> Result<T, E>,
        cases: &[(&str, &str, &str)],
    ) {
        for (key, value, named) in cases {
            match load(env(&[(key, value)])) {
                Ok(settings) => panic!("{key}={value} was accepted: {settings:?}"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains(named),
                        "{key}={value}: {e} does not name {named}"
                    );
                }
            }
        }
    }
}
