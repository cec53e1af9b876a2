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

use sagas::wire::SagaId;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The admin database URL the test databases are created from.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
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
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a database URL has a path");
    format!("{base}/{db}")
}

/// The worker pools and other processes a test can start, stop and kill.
pub const WORKERS: [&str; 4] = ["inventory", "payment", "shipping", "notification"];

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
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: "real",
            orchestrator_env: Vec::new(),
            worker_env: Vec::new(),
            nats_url: None,
            workers: WORKERS.to_vec(),
        }
    }
}

impl Options {
    pub fn orchestrator(mut self, key: &str, value: &str) -> Self {
        self.orchestrator_env.push((key.into(), value.into()));
        self
    }
}

/// The stock a test starts with: plenty of A and B, two of SCARCE.
pub const CATALOGUE: &[(&str, i64, u32)] =
    &[("A", 1500, 1000), ("B", 900, 1000), ("SCARCE", 9900, 2)];

pub struct App {
    pub name: String,
    pub base: String,
    pub sim: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub logs: PathBuf,
    pub nats_url: String,
    db_url: String,
    http_port: u16,
    sim_port: u16,
    options: Options,
    processes: BTreeMap<String, Child>,
}

impl App {
    pub async fn spawn() -> App {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> App {
        let name = format!("t{}", &uuid::Uuid::now_v7().simple().to_string()[12..]);
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("the admin database is reachable (is PostgreSQL up? deploy/test starts it)");
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
        orchestrator::db::MIGRATOR
            .run(&pool)
            .await
            .expect("migrations apply");
        seed(&pool).await;
        let logs = std::env::current_exe()
            .expect("exe")
            .parent()
            .and_then(|d| d.parent())
            .expect("target dir")
            .join("e2e-logs")
            .join(&name);
        std::fs::create_dir_all(&logs).expect("log dir");
        let http_port = free_port();
        let sim_port = free_port();
        let nats_url = options.nats_url.clone().unwrap_or_else(nats_url);
        let mut app = App {
            base: format!("http://127.0.0.1:{http_port}"),
            sim: format!("http://127.0.0.1:{sim_port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            name,
            pool,
            logs,
            nats_url,
            db_url,
            http_port,
            sim_port,
            options,
            processes: BTreeMap::new(),
        };
        app.start("simulator");
        app.start("orchestrator");
        app.wait_ready(Duration::from_secs(30)).await;
        for w in app.options.workers.clone() {
            app.start(w);
        }
        app
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

    /// Start (or start again) one process: `orchestrator`, `simulator` or a worker.
    pub fn start(&mut self, name: &str) {
        let mut cmd = match name {
            "simulator" => {
                let mut c = Command::new(binary("simulator"));
                c.args(["--port", &self.sim_port.to_string()]);
                c
            }
            "orchestrator" => {
                let mut c = Command::new(binary("orchestrator"));
                c.envs(self.common_env());
                c.env("SAGA_HTTP__PORT", self.http_port.to_string());
                c.envs(self.options.orchestrator_env.clone());
                c
            }
            worker => {
                assert!(WORKERS.contains(&worker), "unknown process {worker}");
                let mut c = Command::new(binary("worker"));
                c.arg(worker);
                c.envs(self.common_env());
                c.env("SAGA_WORKER__MODE", self.options.mode);
                c.env("SAGA_WORKER__CONCURRENCY", "32");
                c.env("PROCESSOR_URL", &self.sim);
                c.env("CARRIER_URL", &self.sim);
                c.envs(self.options.worker_env.clone());
                c
            }
        };
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

    pub fn is_running(&mut self, name: &str) -> bool {
        self.processes
            .get_mut(name)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await
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
        self.http
            .get(format!("{}/sagas/{id}", self.base))
            .send()
            .await
            .expect("GET /sagas/{id}")
            .json()
            .await
            .expect("json")
    }

    /// Wait until the saga is terminal; fails the test with its last state otherwise.
    pub async fn wait_terminal(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.saga(id).await;
            if matches!(
                s["status"].as_str(),
                Some("completed" | "compensated" | "failed")
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

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
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
            let replayed = orchestrator::engine::replay(&record.saga_type, id, &events)
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
                    for role in ["COMMANDS", "REPLIES", "EVENTS", "DEAD_LETTERS"] {
                        let _ = js.delete_stream(format!("{prefix}_{role}")).await;
                    }
                }
            });
        })
        .join();
    }
}

async fn seed(pool: &PgPool) {
    let products = json!({
        "products": [{
            "id": "0192a000-0000-7000-8000-0000000000aa",
            "name": "Test product",
            "variants": CATALOGUE.iter().map(|(sku, price, available)| json!({
                "sku": sku, "name": sku, "price": {"minor": price, "currency": "EUR"}, "available": available
            })).collect::<Vec<_>>()
        }]
    });
    let file: orchestrator::catalog::CatalogueFile =
        serde_json::from_value(products).expect("catalogue");
    orchestrator::catalog::load(pool, &file)
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
