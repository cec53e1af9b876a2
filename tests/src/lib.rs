//! The end-to-end harness: each test gets its own database and its own subject and stream
//! prefix, and runs the real binaries (orchestrator, workers, simulator) as separate processes
//! against the real PostgreSQL and NATS JetStream. Only the card processor and the carrier are
//! simulated.
//!
//! Waiting is always on a condition with a deadline, never a bare sleep.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod browser;
pub mod cluster;
pub mod courier;
pub mod drills;
pub mod handlers;
pub mod pgcluster;

use sagas::api::Registry;
use sagas::wire::SagaId;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The admin database URL the test databases are created from.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// Fails the test unless `event` matches the committed JSON Schema (`schemas/events/`) of its
/// source, type and version.
pub fn check_schema(event: &Value) {
    let (source, name, v) = (
        event["source"].as_str().unwrap_or_default(),
        event["type"].as_str().unwrap_or_default(),
        event["v"].as_u64().unwrap_or(1),
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas/events")
        .join(source)
        .join(format!("{name}.v{v}.json"));
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("no schema for {source}.{name} v{v}: {e}")),
    )
    .expect("a schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{source}.{name} does not match its schema: {errors:?}\n{event:#}"
    );
}

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A built binary of the workspace, next to this test's executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; deploy/test does)",
        path.display()
    );
    path
}

/// A free TCP port on loopback.
///
/// Drawn below the kernel's ephemeral range (32768 and up), where no outgoing connection of any
/// process takes it between this check and the server's bind (a port the kernel hands out for
/// port 0 is also the next client socket's, which made servers fail to bind now and then).
/// A port is handed out once per test process, so that two servers of one test (the nodes of
/// a cluster) never draw the same.
pub fn free_port() -> u16 {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(20_000..32_000);
        let mut given = GIVEN.lock().expect("ports handed out");
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000")
}

/// `url` naming database `db` instead (its parameters, e.g. `target_session_attrs`, kept).
fn with_database(url: &str, db: &str) -> String {
    let (url, query) = url.split_once('?').unwrap_or((url, ""));
    let (base, _) = url.rsplit_once('/').expect("a database URL has a path");
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{base}/{db}{query}")
}

/// The worker pools and other processes a test can start, stop and kill.
pub const WORKERS: [&str; 5] = ["inventory", "payment", "shipping", "notification", "order"];

/// How a test app is set up.
#[derive(Clone)]
pub struct Options {
    /// `real` or `noop` workers.
    pub mode: &'static str,
    /// Extra environment of the orchestrator (e.g. policy overrides).
    pub orchestrator_env: Vec<(String, String)>,
    /// Extra environment of the workers.
    pub worker_env: Vec<(String, String)>,
    /// Another NATS server than the shared one (fault tests run their own).
    pub nats_url: Option<String>,
    /// Which workers to start.
    pub workers: Vec<&'static str>,
    /// The orchestrator binary (the shop's, or the suite's `test-orchestrator`).
    pub orchestrator_binary: &'static str,
    /// The saga types that binary runs (for replaying their logs).
    pub registry: fn() -> Registry,
    /// Worker binaries of other services to start (configured like the shop's workers).
    pub extra_workers: Vec<&'static str>,
    /// SQL run on the test's database after the migrations (tables of the suite's own types).
    pub setup_sql: Option<&'static str>,
    /// Whether confirmed orders are fulfilled (the fulfilment saga runs): off for the tests of
    /// the checkout alone, which then see only its own effects.
    pub fulfilment: bool,
    /// Orchestrators started (on one database and subjects): `orchestrator`, then
    /// `orchestrator-2`, `orchestrator-3`, ... each on an API port of its own
    /// ([`App::base_of`]).
    pub orchestrators: usize,
    /// Processes started per worker pool (and per extra worker): `<worker>`, then
    /// `<worker>-2`, `<worker>-3`, ... ([`pool_member`]).
    pub pool_size: usize,
    /// Another PostgreSQL than the shared one: the URL of its admin database, which may be
    /// libpq's multi-host URL of a [`pgcluster::PgCluster`]. The test's database is created
    /// there, and the processes and [`App::pool`] connect through it (following the primary
    /// across a failover). Dropped with its server, not by the app.
    pub database: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: "real",
            orchestrator_env: Vec::new(),
            worker_env: Vec::new(),
            nats_url: None,
            workers: WORKERS.to_vec(),
            orchestrator_binary: "orchestrator",
            registry: sagas::shop_types,
            extra_workers: Vec::new(),
            setup_sql: None,
            fulfilment: false,
            orchestrators: 1,
            pool_size: 1,
            database: None,
        }
    }
}

impl Options {
    /// The orchestrator and the simulator only: sagas start and stay running.
    pub fn without_workers() -> Self {
        Self {
            workers: Vec::new(),
            ..Self::default()
        }
    }

    /// The suite's own orchestrator and `courier` worker, beside the shop's workers.
    pub fn with_courier() -> Self {
        Self {
            orchestrator_binary: "test-orchestrator",
            registry: courier::registry,
            extra_workers: vec!["courier-worker"],
            setup_sql: Some(courier::SCHEMA),
            ..Self::default()
        }
    }

    /// The shop with its fulfilment: confirmed orders are picked, handed to the carrier and
    /// delivered.
    pub fn with_fulfilment() -> Self {
        Self {
            fulfilment: true,
            ..Self::default()
        }
    }

    pub fn orchestrator(mut self, key: &str, value: &str) -> Self {
        self.orchestrator_env.push((key.into(), value.into()));
        self
    }
}

/// The name of the `i`th process (from 1) of a pool or of the orchestrators: `base` itself,
/// then `base-2`, `base-3`, ...
pub fn pool_member(base: &str, i: usize) -> String {
    if i <= 1 {
        base.to_owned()
    } else {
        format!("{base}-{i}")
    }
}

/// A process name split into what it runs and its place in its pool: `payment-2` is
/// (`payment`, 2), `payment` (`payment`, 1). `orchestrator-b` is (`orchestrator-b`, 1).
fn pool_of(name: &str) -> (&str, usize) {
    match name.rsplit_once('-') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            match n.parse::<usize>() {
                Ok(i) if i >= 2 => (base, i),
                _ => (name, 1),
            }
        }
        _ => (name, 1),
    }
}

/// The stock a test starts with: plenty of A and B, two of SCARCE, twenty of RARE.
pub const CATALOGUE: &[(&str, i64, u32)] = &[
    ("A", 1500, 1000),
    ("B", 900, 1000),
    ("SCARCE", 9900, 2),
    ("RARE", 4900, 20),
];

/// The API token the suite's client sends: an operator's (`admin.tokens`).
pub const OPERATOR_TOKEN: &str = "e2e-operator-token-0123456789abcdef";
/// A viewer's token, for the tests of roles.
pub const VIEWER_TOKEN: &str = "e2e-viewer-token-0123456789abcdef";

/// `admin.tokens` naming the suite's two tokens by their SHA-256.
pub fn admin_tokens() -> String {
    use orchestrator::http::auth::{hex, sha256};
    format!(
        "e2e:operator:{},e2e-viewer:viewer:{}",
        hex(&sha256(OPERATOR_TOKEN.as_bytes())),
        hex(&sha256(VIEWER_TOKEN.as_bytes()))
    )
}

/// A client of the orchestrator's API that sends `token` (none: an anonymous one).
pub fn client(token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("a header value"),
        );
    }
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub struct App {
    pub name: String,
    pub base: String,
    /// The API of a second orchestrator (`orchestrator-b`), when a test starts one.
    pub base_b: String,
    pub sim: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub logs: PathBuf,
    pub nats_url: String,
    db_url: String,
    http_port: u16,
    http_port_b: u16,
    sim_port: u16,
    /// The shipping worker's listener for the carrier's reports.
    callback_port: u16,
    /// The Product service's API (worker `product`).
    pub product_port: u16,
    /// The API ports of the orchestrators after the first (`orchestrator-2`, ...) and the
    /// health ports of the worker processes (`SAGA_HEALTH__PORT`), by process name.
    ports: BTreeMap<String, u16>,
    /// The carrier's callback ports of the shipping processes after the first.
    callback_ports: BTreeMap<String, u16>,
    options: Options,
    processes: BTreeMap<String, Child>,
}

impl App {
    pub async fn spawn() -> App {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> App {
        let name = format!("t{}", &uuid::Uuid::now_v7().simple().to_string()[12..]);
        let (db_url, pool) = match &options.database {
            // Created, and followed across a failover, as the processes do.
            Some(admin) => {
                // Created on whichever host is the primary, as the orchestrator does.
                let db_url = with_database(admin, &name);
                let settings = runtime::config::Database {
                    url: db_url.clone(),
                    max_connections: 4,
                    create: true,
                };
                let pool = runtime::db::connect(&settings, "e2e")
                    .await
                    .expect("the test database is created on the test's PostgreSQL");
                (db_url, pool)
            }
            None => {
                let admin = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&admin_url())
                    .await
                    .expect(
                        "the admin database is reachable (is PostgreSQL up? deploy/test starts it)",
                    );
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await
                    .expect("create the test database");
                admin.close().await;
                let db_url = with_database(&admin_url(), &name);
                let pool = PgPoolOptions::new()
                    .max_connections(4)
                    .connect(&db_url)
                    .await
                    .expect("the test database is reachable");
                (db_url, pool)
            }
        };
        runtime::db::MIGRATOR
            .run(&pool)
            .await
            .expect("migrations apply");
        seed(&pool, &name).await;
        if let Some(sql) = options.setup_sql {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&pool)
                .await
                .expect("the test's own tables");
        }
        let logs = std::env::current_exe()
            .expect("exe")
            .parent()
            .and_then(|d| d.parent())
            .expect("target dir")
            .join("e2e-logs")
            .join(&name);
        std::fs::create_dir_all(&logs).expect("log dir");
        let http_port = free_port();
        let http_port_b = free_port();
        let sim_port = free_port();
        let callback_port = free_port();
        let product_port = free_port();
        let nats_url = options.nats_url.clone().unwrap_or_else(nats_url);
        let mut app = App {
            base: format!("http://127.0.0.1:{http_port}"),
            base_b: format!("http://127.0.0.1:{http_port_b}"),
            sim: format!("http://127.0.0.1:{sim_port}"),
            http: client(Some(OPERATOR_TOKEN)),
            name,
            pool,
            logs,
            nats_url,
            db_url,
            http_port,
            http_port_b,
            sim_port,
            callback_port,
            product_port,
            ports: BTreeMap::new(),
            callback_ports: BTreeMap::new(),
            options,
            processes: BTreeMap::new(),
        };
        app.start("simulator");
        // The Product service prices checkouts: it runs in every test, workers or not.
        app.start_product().await;
        app.start_orchestrator("orchestrator").await;
        for i in 2..=app.options.orchestrators {
            app.start_orchestrator(&pool_member("orchestrator", i))
                .await;
        }
        let pools = [
            app.options.workers.clone(),
            app.options.extra_workers.clone(),
        ]
        .concat();
        for w in pools {
            for i in 1..=app.options.pool_size.max(1) {
                app.start(&pool_member(w, i));
            }
        }
        app
    }

    /// The URL of this test's database.
    pub fn database_url(&self) -> &str {
        &self.db_url
    }

    /// The API base URL of an orchestrator: `orchestrator` ([`App::base`]), `orchestrator-b`
    /// ([`App::base_b`]) or `orchestrator-N`.
    pub fn base_of(&self, name: &str) -> String {
        match name {
            "orchestrator" => self.base.clone(),
            "orchestrator-b" => self.base_b.clone(),
            other => {
                let port = self
                    .ports
                    .get(other)
                    .unwrap_or_else(|| panic!("{other} is not an orchestrator this app started"));
                format!("http://127.0.0.1:{port}")
            }
        }
    }

    /// The base URL of a worker process's health listener (`/healthz`, `/readyz`,
    /// `/metrics`), e.g. `payment-2`'s. Each start of the process takes a new port: read it
    /// after [`App::start`].
    pub fn health_url(&self, name: &str) -> String {
        let port = self
            .ports
            .get(name)
            .filter(|_| !pool_of(name).0.starts_with("orchestrator"))
            .unwrap_or_else(|| panic!("{name} is not a worker process this app started"));
        format!("http://127.0.0.1:{port}")
    }

    fn common_env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.db_url.clone()),
            ("NATS_URL".into(), self.nats_url.clone()),
            ("SAGA_NATS__PREFIX".into(), self.name.clone()),
            ("SAGA_DATABASE__MAX_CONNECTIONS".into(), "4".into()),
            ("SAGA_LOG__FORMAT".into(), "json".into()),
            (
                "RUST_LOG".into(),
                "info,orchestrator=debug,workers=debug".into(),
            ),
        ]
    }

    /// Start (or start again) one process: `orchestrator`, `orchestrator-b` (a second one on
    /// the same database and subjects, serving [`App::base_b`]), `orchestrator-N` (serving
    /// [`App::base_of`]), `simulator` or a worker process (`payment`, `payment-2`, ...: each
    /// with a health listener of its own, [`App::health_url`]).
    pub fn start(&mut self, name: &str) {
        self.start_with(name, &[]);
    }

    /// [`App::start`] with `env` over the process's environment (e.g. another `DATABASE_URL`
    /// for this process alone).
    pub fn start_with(&mut self, name: &str, env: &[(&str, &str)]) {
        let (kind, _) = pool_of(name);
        let mut cmd = match kind {
            "simulator" => {
                let mut c = Command::new(binary("simulator"));
                c.args(["--port", &self.sim_port.to_string()]);
                c
            }
            "orchestrator" | "orchestrator-b" => {
                let port = match name {
                    "orchestrator" => self.http_port,
                    "orchestrator-b" => self.http_port_b,
                    other => *self.ports.entry(other.to_owned()).or_insert_with(free_port),
                };
                let mut c = Command::new(binary(self.options.orchestrator_binary));
                c.envs(self.common_env());
                c.env("SAGA_HTTP__PORT", port.to_string());
                c.env("SAGA_ADMIN__TOKENS", admin_tokens());
                c.env(
                    "PRODUCT_URL",
                    format!("http://127.0.0.1:{}", self.product_port),
                );
                if !self.options.fulfilment {
                    c.env("SAGA_SAGAS__DISABLED", "fulfilment");
                }
                c.envs(self.options.orchestrator_env.clone());
                c
            }
            worker => {
                // A new port at each start: one found free may have been taken meanwhile.
                let health_port = free_port();
                self.ports.insert(name.to_owned(), health_port);
                // The shipping processes after the first take the carrier's reports on ports of
                // their own (kept across restarts: the carrier has the URL).
                let callback_port = if name == worker {
                    self.callback_port
                } else {
                    *self
                        .callback_ports
                        .entry(name.to_owned())
                        .or_insert_with(free_port)
                };
                let mut c = if self.options.extra_workers.contains(&worker) {
                    Command::new(binary(worker))
                } else {
                    assert!(
                        WORKERS.contains(&worker) || worker == "product",
                        "unknown process {worker}"
                    );
                    let mut c = Command::new(binary("worker"));
                    c.arg(worker);
                    c
                };
                c.envs(self.common_env());
                c.env("SAGA_WORKER__MODE", self.options.mode);
                c.env("SAGA_WORKER__CONCURRENCY", "32");
                c.env("PROCESSOR_URL", &self.sim);
                c.env("CARRIER_URL", &self.sim);
                c.env("CART_URL", &self.sim);
                c.env("SAGA_ORDER__API_URL", &self.base);
                c.env("SAGA_CALLBACKS__PORT", callback_port.to_string());
                c.env("SAGA_PRODUCT__API_PORT", self.product_port.to_string());
                c.env(
                    "SAGA_CALLBACKS__PUBLIC_URL",
                    format!("http://127.0.0.1:{callback_port}"),
                );
                c.env("SAGA_HEALTH__PORT", health_port.to_string());
                c.envs(self.options.worker_env.clone());
                c
            }
        };
        cmd.envs(env.iter().copied());
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))
            .expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        if let Some(mut old) = self.processes.insert(name.to_owned(), child) {
            let _ = old.kill();
            let _ = old.wait();
        }
    }

    /// SIGKILL a process, as a crash would.
    pub fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.processes.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM a process and wait for it to exit; returns its exit code.
    pub async fn terminate(&mut self, name: &str, within: Duration) -> Option<i32> {
        let mut child = self.processes.remove(name)?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} did not stop within {within:?} after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Run the orchestrator binary once with this app's environment, as an operator would
    /// (e.g. `catalog load <file>`), and return what it printed and how it exited.
    pub async fn orchestrator_command(&self, args: &[&str]) -> std::process::Output {
        self.command_of("orchestrator", args).await
    }

    /// Run the worker binary with `args` (e.g. `product --load FILE`) to its end.
    pub async fn worker_command(&self, args: &[&str]) -> std::process::Output {
        self.command_of("worker", args).await
    }

    /// Run one of the binaries with `args` and the app's environment, to its end.
    async fn command_of(&self, binary_name: &str, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(binary(binary_name))
            .args(args)
            .envs(self.common_env())
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {binary_name} {args:?}: {e}"))
    }

    /// SIGSTOP a process: it stalls (holds its connections, answers nothing) until
    /// [`App::resume`], as a process stuck in a long pause would.
    pub fn pause(&mut self, name: &str) {
        self.signal(name, "-STOP");
    }

    /// SIGCONT a process [`App::pause`] stopped.
    pub fn resume(&mut self, name: &str) {
        self.signal(name, "-CONT");
    }

    fn signal(&mut self, name: &str, signal: &str) {
        if let Some(child) = self.processes.get(name) {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill {signal} {name}");
        }
    }

    pub fn is_running(&mut self, name: &str) -> bool {
        self.processes
            .get_mut(name)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Start an orchestrator (`orchestrator` or `orchestrator-N`) and wait until it is ready.
    /// Its port was free when the test took it, but another process (another test's, or a
    /// browser's driver) may bind it first: then the orchestrator exits at once, and it starts
    /// again on a new port.
    pub async fn start_orchestrator(&mut self, name: &str) {
        for _ in 0..10 {
            self.start(name);
            let deadline = Instant::now() + Duration::from_secs(30);
            let base = self.base_of(name);
            loop {
                if let Ok(r) = self.http.get(format!("{base}/readyz")).send().await
                    && r.status().is_success()
                {
                    return;
                }
                if !self.is_running(name) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name} not ready within 30 s; logs in {}",
                    self.logs.display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match name {
                "orchestrator" => {
                    self.http_port = free_port();
                    self.base = format!("http://127.0.0.1:{}", self.http_port);
                }
                "orchestrator-b" => {
                    self.http_port_b = free_port();
                    self.base_b = format!("http://127.0.0.1:{}", self.http_port_b);
                }
                other => {
                    self.ports.insert(other.to_owned(), free_port());
                }
            }
        }
        panic!(
            "the orchestrator could not start; logs in {}",
            self.logs.display()
        );
    }

    pub async fn wait_ready(&self, within: Duration) {
        self.wait_ready_at(&self.base, within).await
    }

    /// Wait until the orchestrator serving `base` is ready.
    pub async fn wait_ready_at(&self, base: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = self.http.get(format!("{base}/readyz")).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "orchestrator not ready within {within:?}; logs in {}",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The base URL of the Product service's API (worker `product`), once it answers.
    pub async fn product_api(&self, within: Duration) -> String {
        let base = format!("http://127.0.0.1:{}", self.product_port);
        let deadline = Instant::now() + within;
        loop {
            if self.product_answers(&base).await {
                return base;
            }
            assert!(
                Instant::now() < deadline,
                "the Product service's API did not answer within {within:?}; logs in {}",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the Product service (not some other process on its port) answers at `base`.
    async fn product_answers(&self, base: &str) -> bool {
        match self.http.get(format!("{base}/skus?sku=A")).send().await {
            Ok(r) if r.status().is_success() => r
                .json::<Value>()
                .await
                .is_ok_and(|v| v.get("variants").is_some()),
            _ => false,
        }
    }

    /// Start the Product service on a port of its own: a port found free can be taken by
    /// another test's process (or an outgoing connection) before the service binds it; then
    /// it exits, and it is started again on another. Before the orchestrator starts, which is
    /// given its address.
    async fn start_product(&mut self) {
        for _ in 0..10 {
            self.start("product");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if self
                    .product_answers(&format!("http://127.0.0.1:{}", self.product_port))
                    .await
                {
                    return;
                }
                if !self.is_running("product") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the Product service did not answer within 30 s; logs in {}",
                    self.logs.display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.product_port = free_port();
        }
        panic!(
            "the Product service could not bind a port; logs in {}",
            self.logs.display()
        );
    }

    /// The fulfilment saga of an order, once its `OrderConfirmed` started it.
    pub async fn fulfilment_of(&self, order_id: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let id: Option<uuid::Uuid> = sqlx::query_scalar(
                "SELECT id FROM orchestrator.sagas WHERE saga_type = 'fulfilment' AND subject = $1",
            )
            .bind(order_id)
            .fetch_optional(&self.pool)
            .await
            .expect("a query of the sagas");
            if let Some(id) = id {
                return id.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no fulfilment for order {order_id} within {within:?}; logs in {}",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Tell the simulated carrier how to treat the order's shipment (by the shop's key for it,
    /// before it is booked): e.g. `{"outcome": "lost"}`.
    pub async fn plan_shipment(&self, order_id: &str, plan: &Value) {
        let r = self
            .http
            .put(format!(
                "{}/carrier/v1/shipments/by-key/shipment:{order_id}/plan",
                self.sim
            ))
            .json(plan)
            .send()
            .await
            .expect("PUT the carrier's plan");
        assert!(
            r.status().is_success(),
            "{}",
            r.text().await.unwrap_or_default()
        );
    }

    /// `POST /checkout`, with an optional idempotency key.
    pub async fn checkout(&self, body: &Value, key: Option<&str>) -> reqwest::Response {
        let mut req = self.http.post(format!("{}/checkout", self.base)).json(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.expect("POST /checkout")
    }

    /// Place a checkout that must be accepted; returns its saga id.
    pub async fn place(&self, body: &Value) -> String {
        let r = self.checkout(body, None).await;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, 202, "checkout refused: {text}");
        serde_json::from_str::<Value>(&text).expect("json")["saga_id"]
            .as_str()
            .expect("saga_id")
            .to_owned()
    }

    pub async fn saga(&self, id: &str) -> Value {
        self.get_json(&format!("/sagas/{id}")).await
    }

    /// `GET` a path of the orchestrator's API and read its JSON answer.
    pub async fn get_json(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Wait until the saga is terminal; fails the test with its last state otherwise.
    pub async fn wait_terminal(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.saga(id).await;
            if matches!(
                s["status"].as_str(),
                Some("completed" | "compensated" | "failed" | "resolved")
            ) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "saga {id} not terminal within {within:?}: {} / {}; logs in {}",
                s["status"],
                s["state"],
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Wait until `sql` (one bigint column) returns `expected`.
    pub async fn wait_for(&self, sql: &str, expected: i64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.count(sql).await;
            if got == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{sql}` is {got}, expected {expected} within {within:?}; logs in {}",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The value of metric `name` (with its labels, or summed over them) on the `/metrics`
    /// of the process at `base`.
    pub async fn metric(&self, base: &str, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Every event published on this app's events stream so far, each checked against its
    /// committed JSON Schema ([`check_schema`]).
    pub async fn published_events(&self) -> Vec<Value> {
        let client = async_nats::connect(&self.nats_url).await.expect("NATS");
        let js = async_nats::jetstream::new(client);
        let mut stream = js
            .get_stream(format!("{}_EVENTS", self.name.to_uppercase()))
            .await
            .expect("the events stream");
        let last = stream
            .info()
            .await
            .expect("stream info")
            .state
            .last_sequence;
        let mut events = Vec::new();
        for seq in 1..=last {
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue;
            };
            let event: Value = serde_json::from_slice(&m.payload).expect("an event is JSON");
            check_schema(&event);
            events.push(event);
        }
        events
    }

    /// The simulator's ledger: what the processor and the carrier actually did.
    pub async fn ledger(&self) -> Value {
        self.http
            .get(format!("{}/ledger", self.sim))
            .send()
            .await
            .expect("ledger")
            .json()
            .await
            .expect("json")
    }

    /// Change how the simulated processor or carrier behaves.
    pub async fn control(&self, party: &str, behaviour: Value) {
        let r = self
            .http
            .put(format!("{}/control/{party}", self.sim))
            .json(&behaviour)
            .send()
            .await
            .expect("control");
        assert!(r.status().is_success(), "control {party}: {}", r.status());
    }

    /// Replay every saga's event log through its machine and compare with the stored snapshot.
    pub async fn assert_logs_replay(&self) {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM orchestrator.sagas")
            .fetch_all(&self.pool)
            .await
            .expect("sagas");
        for id in ids {
            let id = SagaId::from_uuid(id);
            let (record, events) = orchestrator::engine::load_record(&self.pool, id)
                .await
                .expect("load")
                .expect("exists");
            let replayed = orchestrator::engine::replay(
                &(self.options.registry)(),
                &record.saga_type,
                id,
                &events,
            )
            .unwrap_or_else(|e| panic!("saga {id}: {e}"));
            assert_eq!(
                replayed, record.snapshot,
                "saga {id}: replay differs from the stored snapshot"
            );
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.processes) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A database on the test's own server goes with that server.
        if self.options.database.is_some() {
            return;
        }
        // `E2E_KEEP_DB=1` keeps the database of a test, for a look after it failed.
        if std::env::var_os("E2E_KEEP_DB").is_some() {
            eprintln!("kept the database {}", self.name);
            return;
        }
        // Clean up the database and the streams, on a thread of its own (we may be inside the
        // test's runtime).
        let (name, nats) = (self.name.clone(), self.nats_url.clone());
        let shared_nats = self.options.nats_url.is_none();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(admin) = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&admin_url())
                    .await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&admin)
                    .await;
                }
                if shared_nats && let Ok(client) = async_nats::connect(&nats).await {
                    let js = async_nats::jetstream::new(client);
                    let prefix = name.to_ascii_uppercase();
                    for role in ["COMMANDS", "REPLIES", "EVENTS", "DEAD_LETTERS", "SIGNALS"] {
                        let _ = js.delete_stream(format!("{prefix}_{role}")).await;
                    }
                }
            });
        })
        .join();
    }
}

/// Load the test catalogue; its `PriceChanged` events go to the app's subjects (`prefix`).
async fn seed(pool: &PgPool, prefix: &str) {
    let products = json!({
        "products": [{
            "id": "0192a000-0000-7000-8000-0000000000aa",
            "name": "Test product",
            "variants": CATALOGUE.iter().map(|(sku, price, available)| json!({
                "sku": sku, "name": sku, "price": {"minor": price, "currency": "EUR"}, "available": available
            })).collect::<Vec<_>>()
        }]
    });
    let file: workers::product::seed::CatalogueFile =
        serde_json::from_value(products).expect("catalogue");
    let subjects = sagas::wire::Subjects::new(prefix).expect("the app's prefix");
    workers::product::seed::load(pool, &file, &subjects)
        .await
        .expect("catalogue loads");
}

/// A checkout body.
pub fn order(items: &[(&str, i64)], token: &str) -> Value {
    json!({
        "customer": {"id": "cust-1", "email": "ada@example.com"},
        "items": items.iter().map(|(sku, q)| json!({"sku": sku, "quantity": q})).collect::<Vec<_>>(),
        "payment_token": token,
        "shipping_address": {"name": "Ada Lovelace", "line1": "1 Main St", "city": "Madrid",
                             "postal_code": "28001", "country": "ES"}
    })
}

/// A nats-server of the test's own, on a free port with its own store, that the test can kill
/// and restart (the shared one must never be stopped).
pub struct Nats {
    pub port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// The configuration file it also reads ([`Nats::start_with_config`]).
    config: Option<PathBuf>,
}

fn nats_server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return p.into();
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("nats-server");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("/usr/sbin/nats-server")
}

impl Nats {
    pub async fn start() -> Nats {
        Self::start_from(None).await
    }

    /// A server that also reads `extra_conf` (nats-server's configuration syntax: a `tls`
    /// block, `authorization`...) from a file; the listen address and JetStream are as
    /// [`Nats::start`]'s.
    pub async fn start_with_config(extra_conf: &str) -> Nats {
        Self::start_from(Some(extra_conf)).await
    }

    async fn start_from(extra_conf: Option<&str>) -> Nats {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "saga-nats-{port}-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).expect("nats store dir");
        let log = dir.join("nats-server.log");
        let config = extra_conf.map(|conf| {
            let path = dir.join("nats.conf");
            std::fs::write(&path, conf).expect("nats config");
            path
        });
        let mut nats = Nats {
            port,
            dir,
            log,
            child: None,
            config,
        };
        nats.spawn().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(nats_server_binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.join("store"))
            .args(
                self.config
                    .iter()
                    .flat_map(|c| [PathBuf::from("-c"), c.clone()]),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("nats-server starts (install it: deploy/test does)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL the server, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill it and start it again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A checkout placed by [`place_many`].
#[derive(Debug, Clone)]
pub struct Placed {
    pub index: usize,
    pub saga_id: String,
}

/// Place `n` checkouts with `concurrency` clients, each with its own Idempotency-Key, retrying
/// a checkout (same key, so never twice) until it is accepted: the orchestrator may be down.
/// A checkout whose answer is a problem (4xx) is retried too, until the deadline; none is
/// expected.
pub async fn place_many(
    base: String,
    n: usize,
    concurrency: usize,
    body: impl Fn(usize) -> Value + Send + Sync + 'static,
    within: Duration,
) -> Vec<Placed> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let body = std::sync::Arc::new(body);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let run = uuid::Uuid::now_v7().simple().to_string();
    let deadline = Instant::now() + within;
    let clients = (0..concurrency).map(|_| {
        let (http, body, next, base, run) = (
            http.clone(),
            body.clone(),
            next.clone(),
            base.to_owned(),
            run.clone(),
        );
        tokio::spawn(async move {
            let mut placed = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return placed;
                }
                loop {
                    let r = http
                        .post(format!("{base}/checkout"))
                        .header("Idempotency-Key", format!("{run}-{i}"))
                        .json(&body(i))
                        .send()
                        .await;
                    // 202, or 200 when a retry finds the saga already ended (the first
                    // answer was lost with an orchestrator that was killed).
                    if let Ok(r) = r
                        && matches!(r.status().as_u16(), 200 | 202)
                        && let Ok(v) = r.json::<Value>().await
                    {
                        placed.push(Placed {
                            index: i,
                            saga_id: v["saga_id"].as_str().unwrap_or_default().to_owned(),
                        });
                        break;
                    }
                    assert!(Instant::now() < deadline, "checkout {i} never accepted");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    });
    let mut all = Vec::new();
    for c in futures::future::join_all(clients).await {
        all.extend(c.expect("client task"));
    }
    all.sort_by_key(|p| p.index);
    all
}

impl App {
    /// Wait until every saga ended, then check that nothing was lost or done twice:
    /// - every completed saga kept exactly one charge, one consumed reservation, one shipment;
    /// - every compensated saga kept no charge, holds no stock, keeps no shipment;
    /// - stock is never sold twice: each completed order's units left the stock through its
    ///   own reservation (its movements add up to minus its lines), a compensated order's
    ///   movements add up to nothing, no order holds stock, and no SKU sold more than it had;
    /// - the third parties agree, counted per saga: the processor kept exactly one charge of
    ///   each completed saga and refunded none, kept none of a compensated saga's, refunded no
    ///   charge twice; the carrier kept exactly one shipment per confirmed order, none of a
    ///   cancelled one;
    /// - each SKU's stock is its start value minus the completed orders, nothing reserved, and
    ///   its audited movements add up to it;
    /// - every saga's event log replays to its snapshot.
    pub async fn assert_invariants(&self, expected_sagas: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut open = self
                .count("SELECT count(*) FROM orchestrator.sagas WHERE status NOT IN ('completed', 'compensated', 'failed')")
                .await;
            if self.options.fulfilment {
                // A confirmed order whose fulfilment has not started yet: it will.
                open += self
                    .count(
                        "SELECT count(*) FROM orders.orders o WHERE o.status = 'confirmed' AND NOT EXISTS
                           (SELECT 1 FROM orchestrator.sagas s
                             WHERE s.saga_type = 'fulfilment' AND s.subject = o.id::text)",
                    )
                    .await;
            }
            if open == 0 {
                break;
            }
            if Instant::now() > deadline {
                let stuck: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT id::text, status, state FROM orchestrator.sagas
                      WHERE status NOT IN ('completed', 'compensated', 'failed') LIMIT 5",
                )
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
                panic!(
                    "{open} sagas not terminal within {within:?}, e.g. {stuck:?}; logs in {}",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            self.count("SELECT count(*) FROM orchestrator.sagas WHERE saga_type <> 'fulfilment'")
                .await,
            expected_sagas as i64,
            "sagas (besides the fulfilments)"
        );
        if self.options.fulfilment {
            assert_eq!(
                self.count(
                    "SELECT count(*) FROM orders.orders o WHERE o.status = 'confirmed' AND 1 <>
                       (SELECT count(*) FROM orchestrator.sagas s
                         WHERE s.saga_type = 'fulfilment' AND s.subject = o.id::text)"
                )
                .await,
                0,
                "a confirmed order without exactly one fulfilment"
            );
        }
        assert_eq!(
            self.count(
                "SELECT count(*) FROM orchestrator.sagas WHERE status = 'failed' AND saga_type <> 'fulfilment'"
            )
            .await,
            0,
            "failed sagas (a fulfilment's are cases, checked below)"
        );
        let checks = [
            ("completed without exactly one kept charge (nor a fulfilment that refunded it)",
             "SELECT count(*) FROM orders.orders o WHERE o.status = 'confirmed' AND 1 <>
                (SELECT count(*) FROM payments.charges c WHERE c.saga_id = o.saga_id
                    AND c.status = CASE WHEN EXISTS (SELECT 1 FROM orders.fulfilments f
                                                      WHERE f.order_id = o.id AND f.refunded)
                                        THEN 'refunded' ELSE 'succeeded' END)"),
            ("completed without a consumed reservation (picked, or restocked by its fulfilment)",
             "SELECT count(*) FROM orders.orders o WHERE o.status = 'confirmed' AND NOT EXISTS
                (SELECT 1 FROM inventory.reservations r WHERE r.order_id = o.id
                    AND r.status = ANY(CASE WHEN EXISTS (SELECT 1 FROM orders.fulfilments f
                                                          WHERE f.order_id = o.id AND f.restocked)
                                            THEN ARRAY['restocked'] ELSE ARRAY['consumed', 'picked'] END))"),
            ("completed without exactly one shipment (kept, or cancelled by its fulfilment before dispatch)",
             "SELECT count(*) FROM orders.orders o WHERE o.status = 'confirmed' AND 1 <>
                (SELECT count(*) FROM shipping.shipments s WHERE s.order_id = o.id
                    AND s.status = CASE WHEN EXISTS (SELECT 1 FROM orders.fulfilments f
                                                      WHERE f.order_id = o.id AND f.dispatched_at IS NULL
                                                        AND f.status IN ('cancelled', 'needs_attention'))
                                        THEN 'cancelled' ELSE 'created' END)"),
            ("a fulfilment that gave the stock back more or less than once",
             "SELECT count(*) FROM orders.fulfilments f JOIN orders.order_lines l ON l.order_id = f.order_id
               WHERE (SELECT count(*) FROM inventory.stock_movements m
                       WHERE m.order_id = f.order_id AND m.sku = l.sku AND m.kind = 'restock')
                     <> CASE WHEN f.restocked THEN 1 ELSE 0 END"),
            ("a fulfilment refunded more or less than once",
             "SELECT count(*) FROM orders.fulfilments f JOIN orders.orders o ON o.id = f.order_id
               WHERE (SELECT count(*) FROM payments.refunds r JOIN payments.charges c ON c.id = r.charge_id
                       WHERE c.saga_id = o.saga_id) <> CASE WHEN f.refunded THEN 1 ELSE 0 END"),
            ("a fulfilment that ended without its outcome: delivered, or undone (cancelled), or a case that refunded",
             "SELECT count(*) FROM orders.fulfilments f JOIN orchestrator.sagas s ON s.id = f.saga_id
               WHERE NOT ((s.status = 'completed' AND f.status = 'delivered' AND NOT f.refunded AND NOT f.restocked
                            AND f.delivered_at IS NOT NULL)
                       OR (s.status = 'compensated' AND f.status = 'cancelled' AND f.refunded AND f.restocked)
                       OR (s.status = 'failed' AND f.status = 'needs_attention' AND f.case_reason IS NOT NULL
                            AND f.refunded AND f.restocked = (f.dispatched_at IS NULL)))"),
            ("a cancelled fulfilment whose shipment is left",
             "SELECT count(*) FROM orders.fulfilments f JOIN shipping.shipments s ON s.order_id = f.order_id
               WHERE f.status = 'cancelled' AND s.status <> 'cancelled'"),
            ("compensated but a charge is kept",
             "SELECT count(*) FROM orders.orders o JOIN payments.charges c ON c.saga_id = o.saga_id
               WHERE o.status = 'cancelled' AND c.status IN ('succeeded', 'pending')"),
            ("compensated but stock is held",
             "SELECT count(*) FROM orders.orders o JOIN inventory.reservations r ON r.order_id = o.id
               WHERE o.status = 'cancelled' AND r.status IN ('active', 'consumed')"),
            ("compensated but a shipment is kept",
             "SELECT count(*) FROM orders.orders o JOIN shipping.shipments s ON s.order_id = o.id
               WHERE o.status = 'cancelled' AND s.status IN ('created', 'pending')"),
            ("a refund without its charge refunded",
             "SELECT count(*) FROM payments.refunds f JOIN payments.charges c ON c.id = f.charge_id
               WHERE c.status <> 'refunded'"),
            ("a completed order whose units did not leave the stock through its own reservation (or came back once)",
             "SELECT count(*) FROM orders.order_lines l JOIN orders.orders o ON o.id = l.order_id
               WHERE o.status = 'confirmed'
                 AND CASE WHEN EXISTS (SELECT 1 FROM orders.fulfilments f WHERE f.order_id = o.id AND f.restocked)
                          THEN 0 ELSE -l.quantity END <>
                 (SELECT coalesce(sum(m.quantity_delta), 0) FROM inventory.stock_movements m
                   WHERE m.order_id = o.id AND m.sku = l.sku)"),
            ("a compensated order whose stock movements do not add up to nothing",
             "SELECT count(*) FROM orders.orders o WHERE o.status = 'cancelled' AND EXISTS
                (SELECT 1 FROM inventory.stock_movements m WHERE m.order_id = o.id
                  GROUP BY m.sku HAVING sum(m.quantity_delta) <> 0)"),
            ("an ended order that still holds stock",
             "SELECT count(*) FROM (SELECT m.order_id, m.sku FROM inventory.stock_movements m
                 WHERE m.order_id IS NOT NULL GROUP BY m.order_id, m.sku
                HAVING sum(m.reserved_delta) <> 0) held"),
        ];
        for (what, sql) in checks {
            assert_eq!(self.count(sql).await, 0, "{what}");
        }
        // What the processor and the carrier did, from their own ledger.
        let statuses: BTreeMap<String, String> = sqlx::query_as::<_, (String, String)>(
            "SELECT id::text, status FROM orchestrator.sagas WHERE saga_type = 'checkout'",
        )
        .fetch_all(&self.pool)
        .await
        .expect("statuses")
        .into_iter()
        .collect();
        let orders: BTreeMap<String, String> =
            sqlx::query_as::<_, (String, String)>("SELECT id::text, status FROM orders.orders")
                .fetch_all(&self.pool)
                .await
                .expect("orders")
                .into_iter()
                .collect();
        // Checkouts whose fulfilment refunded them, and orders whose shipment it cancelled.
        let refunded_later: std::collections::BTreeSet<String> = sqlx::query_scalar::<_, String>(
            "SELECT o.saga_id::text FROM orders.fulfilments f JOIN orders.orders o ON o.id = f.order_id
              WHERE f.refunded",
        )
        .fetch_all(&self.pool)
        .await
        .expect("refunded fulfilments")
        .into_iter()
        .collect();
        let cancelled_later: std::collections::BTreeSet<String> = sqlx::query_scalar::<_, String>(
            "SELECT f.order_id::text FROM orders.fulfilments f JOIN shipping.shipments s ON s.order_id = f.order_id
              WHERE s.status = 'cancelled'",
        )
        .fetch_all(&self.pool)
        .await
        .expect("cancelled shipments")
        .into_iter()
        .collect();
        let ledger = self.ledger().await;
        // Counted per saga rather than collected in a set: a second charge of one saga (under
        // another key) or a second refund of one charge must not pass unnoticed.
        let charge_sagas: BTreeMap<&str, &str> = ledger["charges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let key = c["idempotency_key"].as_str().unwrap();
                (c["id"].as_str().unwrap(), key.split(':').next().unwrap())
            })
            .collect();
        let mut refunds_of: BTreeMap<&str, usize> = BTreeMap::new();
        for r in ledger["refunds"].as_array().unwrap() {
            let charge = r["charge_id"].as_str().unwrap();
            let key = r["idempotency_key"].as_str().unwrap();
            let saga = charge_sagas
                .get(charge)
                .unwrap_or_else(|| panic!("refund {key} of a charge the ledger does not hold"));
            assert_eq!(
                key.split(':').next(),
                Some(*saga),
                "refund {key} is of another saga's charge"
            );
            *refunds_of.entry(charge).or_default() += 1;
        }
        for (charge, refunds) in &refunds_of {
            assert_eq!(*refunds, 1, "charge {charge} refunded {refunds} times");
        }
        // Per saga: (charges kept, charges refunded) at the processor.
        let mut charges: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (charge, saga) in &charge_sagas {
            let counts = charges.entry(*saga).or_default();
            if refunds_of.contains_key(charge) {
                counts.1 += 1;
            } else {
                counts.0 += 1;
            }
        }
        for saga in charges.keys() {
            assert!(
                statuses.contains_key(*saga),
                "processor charge for saga {saga}, which does not exist"
            );
        }
        // Per order: (shipments kept, shipments cancelled) at the carrier.
        let mut shipments: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for s in ledger["shipments"].as_array().unwrap() {
            let order = s["idempotency_key"]
                .as_str()
                .unwrap()
                .trim_start_matches("shipment:");
            assert!(
                orders.contains_key(order),
                "carrier shipment for order {order}, which does not exist"
            );
            let counts = shipments.entry(order).or_default();
            if s["cancelled"].as_bool().unwrap() {
                counts.1 += 1;
            } else {
                counts.0 += 1;
            }
        }
        for (saga, status) in &statuses {
            let (kept, refunded) = charges.get(saga.as_str()).copied().unwrap_or_default();
            match status.as_str() {
                "completed" => assert_eq!(
                    (kept, refunded),
                    if refunded_later.contains(saga) {
                        (0, 1)
                    } else {
                        (1, 0)
                    },
                    "completed saga {saga}: (kept, refunded) charges at the processor"
                ),
                // A declined card was never charged; a charge that was made is refunded, once.
                "compensated" => assert!(
                    kept == 0 && refunded <= 1,
                    "compensated saga {saga}: {kept} charges kept, {refunded} refunded at the processor"
                ),
                other => panic!("saga {saga} ended {other}"),
            }
        }
        for (order, status) in &orders {
            let (kept, cancelled) = shipments.get(order.as_str()).copied().unwrap_or_default();
            match status.as_str() {
                "confirmed" => assert_eq!(
                    (kept, cancelled),
                    if cancelled_later.contains(order) {
                        (0, 1)
                    } else {
                        (1, 0)
                    },
                    "confirmed order {order}: (kept, cancelled) shipments at the carrier"
                ),
                "cancelled" => assert!(
                    kept == 0 && cancelled <= 1,
                    "cancelled order {order}: {kept} shipments kept, {cancelled} cancelled at the carrier"
                ),
                other => panic!("order {order} is {other}"),
            }
        }
        // Stock: start minus what confirmed orders took, nothing reserved, movements add up.
        for (sku, _, start) in CATALOGUE {
            let sold = self
                .count(&format!(
                    "SELECT coalesce(sum(l.quantity), 0)::bigint FROM orders.order_lines l
                       JOIN orders.orders o ON o.id = l.order_id WHERE o.status = 'confirmed' AND l.sku = '{sku}'
                        AND NOT EXISTS (SELECT 1 FROM orders.fulfilments f WHERE f.order_id = o.id AND f.restocked)"
                ))
                .await;
            let q = self
                .count(&format!(
                    "SELECT quantity::bigint FROM inventory.variants WHERE sku = '{sku}'"
                ))
                .await;
            let r = self
                .count(&format!(
                    "SELECT reserved::bigint FROM inventory.variants WHERE sku = '{sku}'"
                ))
                .await;
            let audited = self
                .count(&format!("SELECT coalesce(sum(quantity_delta), 0)::bigint FROM inventory.stock_movements WHERE sku = '{sku}'"))
                .await;
            let audited_reserved = self
                .count(&format!("SELECT coalesce(sum(reserved_delta), 0)::bigint FROM inventory.stock_movements WHERE sku = '{sku}'"))
                .await;
            assert!(
                sold <= *start as i64,
                "{sku}: completed orders hold {sold} units of a stock of {start}"
            );
            assert_eq!((q, r), (*start as i64 - sold, 0), "stock of {sku}");
            assert_eq!(
                (audited, audited_reserved),
                (q, r),
                "movements of {sku} add up"
            );
        }
        self.assert_logs_replay().await;
    }

    /// Terminate the orchestrator's PostgreSQL sessions, as a database failover would.
    pub async fn terminate_orchestrator_sessions(&self) -> i64 {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'saga-orchestrator'",
        )
        .fetch_one(&self.pool)
        .await
        .expect("terminate")
    }
}
