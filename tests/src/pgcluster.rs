//! A PostgreSQL primary and its synchronous standby of the test's own, to fail over: a test
//! kills the primary ([`PgCluster::kill_primary`]) and promotes the standby
//! ([`PgCluster::promote_standby`]), and shows what the processes connected through a
//! multi-host URL ([`PgCluster::url_multi`]) do. The shared PostgreSQL on 5432 is never touched.
//!
//! Replication is synchronous (`synchronous_standby_names = '*'`): a commit is acknowledged only
//! once the standby has flushed it, so the promoted standby has every acknowledged commit.
//!
//! The servers run as the `postgres` user (PostgreSQL refuses root: a test running as root
//! runs `initdb`, `pg_ctl` and `pg_basebackup` through `runuser`), from the binaries of
//! `PG_BINDIR` or of the newest `/usr/lib/postgresql/<version>/bin`, in a temporary directory
//! that is removed with both servers when the cluster is dropped.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use crate::free_port;

struct Server {
    port: u16,
    data: PathBuf,
    log: PathBuf,
    running: bool,
}

pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    primary: Server,
    standby: Server,
}

/// Where `initdb` and `pg_ctl` are.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return dir.into();
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    // Else whatever PATH has.
    found.pop().map(|(_, bin)| bin).unwrap_or_default()
}

/// `program` run as the `postgres` user when this process is root.
fn as_postgres(program: &Path) -> Command {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Run `command` to its end; panic with its output if it fails.
fn run(mut command: Command, what: &str) {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgCluster {
    /// Start a primary and a standby that replicates from it synchronously, each on a free
    /// port of loopback; ready when the primary sees the standby as its synchronous standby.
    pub async fn start() -> PgCluster {
        let dir = std::env::temp_dir().join(format!("saga-pg-{}", uuid::Uuid::now_v7().simple()));
        // Made by the user that runs the servers, so that they can write in it.
        let mut mkdir = as_postgres(Path::new("mkdir"));
        mkdir.arg("-p").arg(&dir);
        run(mkdir, "mkdir");
        let server = |name: &str| Server {
            port: free_port(),
            data: dir.join(name),
            log: dir.join(format!("{name}.log")),
            running: false,
        };
        let mut cluster = PgCluster {
            bin: bin_dir(),
            primary: server("primary"),
            standby: server("standby"),
            dir,
        };
        cluster.init_primary();
        cluster.init_standby();
        cluster.wait_sync(Duration::from_secs(60)).await;
        cluster
    }

    fn tool(&self, name: &str) -> Command {
        as_postgres(&self.bin.join(name))
    }

    fn append_conf(data: &Path, lines: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("postgresql.conf");
        writeln!(f, "\n# PgCluster\n{lines}").expect("postgresql.conf");
    }

    fn pg_ctl_start(&self, server: &Server) {
        let mut c = self.tool("pg_ctl");
        c.arg("-D")
            .arg(&server.data)
            .arg("-l")
            .arg(&server.log)
            .args(["-w", "-t", "60", "start"]);
        run(c, &format!("pg_ctl start (see {})", server.log.display()));
    }

    fn init_primary(&mut self) {
        let mut c = self.tool("initdb");
        c.arg("-D").arg(&self.primary.data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(c, "initdb");
        Self::append_conf(
            &self.primary.data,
            &format!(
                "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
                 wal_level = replica\nmax_wal_senders = 5\nsynchronous_standby_names = '*'\n\
                 synchronous_commit = on\nmax_connections = 100\nshared_buffers = 16MB",
                self.primary.port,
                self.dir.display()
            ),
        );
        self.pg_ctl_start(&self.primary);
        self.primary.running = true;
    }

    fn init_standby(&mut self) {
        let mut c = self.tool("pg_basebackup");
        c.args(["-h", "127.0.0.1", "-p", &self.primary.port.to_string()])
            .args(["-U", "postgres", "-X", "stream", "-R", "-c", "fast", "-D"])
            .arg(&self.standby.data);
        run(c, "pg_basebackup");
        // Its own port; and, once promoted, a primary that does not wait for a standby it
        // does not have.
        Self::append_conf(
            &self.standby.data,
            &format!(
                "port = {}\nsynchronous_standby_names = ''",
                self.standby.port
            ),
        );
        self.pg_ctl_start(&self.standby);
        self.standby.running = true;
    }

    async fn wait_sync(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(mut conn) =
                PgConnection::connect(&self.url(self.primary.port, "postgres")).await
                && let Ok(1) = sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                )
                .fetch_one(&mut conn)
                .await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby did not become synchronous; see {}",
                self.standby.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The URL of one server, as user `postgres` (trusted), database `db`.
    pub fn url(&self, port: u16, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{db}")
    }

    /// libpq's multi-host URL of both servers, the primary first, asking for a primary
    /// (`target_session_attrs=read-write`).
    pub fn url_multi(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
            self.primary.port, self.standby.port
        )
    }

    /// The port of the server started as the primary (it stays its port after a failover).
    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    /// The port of the server started as the standby.
    pub fn standby_port(&self) -> u16 {
        self.standby.port
    }

    /// Create database `name` on the primary (the standby replicates it).
    pub async fn create_database(&self, name: &str) {
        let mut conn = PgConnection::connect(&self.url(self.primary.port, "postgres"))
            .await
            .expect("the primary");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("create database");
    }

    fn stop(&self, server: &Server) {
        let mut c = self.tool("pg_ctl");
        c.arg("-D")
            .arg(&server.data)
            .args(["-m", "immediate", "-w", "stop"]);
        run(c, "pg_ctl stop");
    }

    /// Stop the primary at once, as a crash would (`pg_ctl stop -m immediate`: no checkpoint,
    /// sessions cut).
    pub fn kill_primary(&mut self) {
        if self.primary.running {
            self.stop(&self.primary);
            self.primary.running = false;
        }
    }

    /// Promote the standby; returns once it takes writes.
    pub async fn promote_standby(&mut self) {
        let mut c = self.tool("pg_ctl");
        c.arg("-D")
            .arg(&self.standby.data)
            .args(["-w", "-t", "60", "promote"]);
        run(c, "pg_ctl promote");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut conn) =
                PgConnection::connect(&self.url(self.standby.port, "postgres")).await
                && let Ok(false) = sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()")
                    .fetch_one(&mut conn)
                    .await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby was not promoted; see {}",
                self.standby.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        for server in [&self.primary, &self.standby] {
            if server.running {
                let mut c = self.tool("pg_ctl");
                c.arg("-D")
                    .arg(&server.data)
                    .args(["-m", "immediate", "-w", "stop"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                let _ = c.status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
