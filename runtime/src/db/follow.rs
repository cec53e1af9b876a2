//! Following the primary of a multi-host `database.url` across a failover.
//!
//! The pool connects to one host at a time (its connect options name it). A [`Follower`] keeps
//! a connection of its own to that host and asks it every second whether it still is what it
//! must be (`pg_is_in_recovery()`); when it is gone or has become a standby, the follower asks
//! every host, the current one first and then the others in the URL's order, and points the
//! pool at the first that fits ([`sqlx::Pool::set_connect_options`]). Asking the current host
//! first keeps a pool from moving back to an old primary that came back on its own.
//!
//! Must never: hand out a connection to a standby when a primary is asked for. Every new
//! connection is checked (`after_connect`: refused if it is in recovery, and the follower is
//! woken), and connections made before the pool moved are closed instead of handed out
//! (`before_acquire`), so nothing written goes to a host the pool left.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::Notify;

use super::hosts::{Attrs, Host};

/// How often the current host is asked whether it still fits.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a host has to answer (connect and query) before it counts as gone.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Follower {
    hosts: Vec<Host>,
    /// The connect options of each host (the process's own settings applied).
    options: Vec<PgConnectOptions>,
    attrs: Attrs,
    /// The host the pool connects to.
    current: AtomicUsize,
    /// When the pool last moved: a connection older than that was made to the host it left.
    moved_at: Mutex<Option<Instant>>,
    /// Woken when a new connection found a standby.
    wake: Notify,
}

/// Why a host cannot be used now.
enum Unfit {
    Unreachable(String),
    Standby,
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::Unreachable(e) => f.write_str(e),
            Unfit::Standby => f.write_str("a standby (in recovery)"),
        }
    }
}

impl Follower {
    pub fn new(hosts: Vec<Host>, options: Vec<PgConnectOptions>, attrs: Attrs) -> Arc<Self> {
        Arc::new(Self {
            hosts,
            options,
            attrs,
            current: AtomicUsize::new(0),
            moved_at: Mutex::new(None),
            wake: Notify::new(),
        })
    }

    /// Start with host `i` (before the pool exists).
    pub fn start_at(&self, i: usize) {
        self.current.store(i, Ordering::Relaxed);
    }

    pub fn current(&self) -> &Host {
        &self.hosts[self.current.load(Ordering::Relaxed)]
    }

    pub fn current_options(&self) -> PgConnectOptions {
        self.options[self.current.load(Ordering::Relaxed)].clone()
    }

    /// The pool's hooks: refuse a standby (when a primary is asked for), and connections made
    /// before the pool moved.
    pub fn hooks(self: &Arc<Self>, pool: PgPoolOptions) -> PgPoolOptions {
        let after = self.clone();
        let before = self.clone();
        pool.after_connect(move |conn, _| {
            let follower = after.clone();
            async move {
                if follower.attrs == Attrs::ReadWrite && in_recovery(conn).await? {
                    follower.wake.notify_one();
                    return Err(sqlx::Error::Configuration(
                        "refused a connection to a standby: database.url asks for a primary \
                         (target_session_attrs=read-write)"
                            .into(),
                    ));
                }
                Ok(())
            }
            .boxed()
        })
        .before_acquire(move |_, meta| {
            let moved_at = *before.moved_at.lock().expect("moved_at lock");
            let fresh = moved_at.is_none_or(|at| meta.age < at.elapsed());
            async move { Ok(fresh) }.boxed()
        })
    }

    /// Ask `i` whether it fits; on success the connection it answered on.
    async fn probe(&self, i: usize) -> Result<PgConnection, Unfit> {
        let ask = async {
            let mut conn = self.options[i].connect().await?;
            let standby = in_recovery(&mut conn).await?;
            Ok::<_, sqlx::Error>((conn, standby))
        };
        match tokio::time::timeout(PROBE_TIMEOUT, ask).await {
            Err(_) => Err(Unfit::Unreachable("no answer in time".into())),
            Ok(Err(e)) => Err(Unfit::Unreachable(e.to_string())),
            Ok(Ok((conn, true))) if self.attrs == Attrs::ReadWrite => {
                let _ = conn.close().await;
                Err(Unfit::Standby)
            }
            Ok(Ok((conn, _))) => Ok(conn),
        }
    }

    /// The first host that fits, the current one first, then the others in the URL's order; or
    /// what each said.
    pub async fn find(&self) -> Result<(usize, PgConnection), String> {
        let current = self.current.load(Ordering::Relaxed);
        let order = std::iter::once(current).chain((0..self.hosts.len()).filter(|&i| i != current));
        let mut said = Vec::new();
        for i in order {
            match self.probe(i).await {
                Ok(conn) => return Ok((i, conn)),
                Err(why) => said.push(format!("{}: {why}", self.hosts[i].addr)),
            }
        }
        Err(format!(
            "no host of database.url {}: {}",
            match self.attrs {
                Attrs::ReadWrite => "is a primary",
                Attrs::Any => "answers",
            },
            said.join("; ")
        ))
    }

    /// Point the pool at host `i`.
    fn move_to(&self, pool: &PgPool, i: usize) {
        let from = self.current.swap(i, Ordering::Relaxed);
        if from == i {
            return;
        }
        pool.set_connect_options(self.options[i].clone());
        *self.moved_at.lock().expect("moved_at lock") = Some(Instant::now());
        tracing::warn!(
            from = %self.hosts[from].addr,
            to = %self.hosts[i].addr,
            "PostgreSQL: the pool moved to another host"
        );
    }

    /// Follow the hosts until the pool is closed; `conn` is a connection to the current host.
    pub async fn run(self: Arc<Self>, pool: PgPool, conn: PgConnection) {
        let mut watch = Some(conn);
        let mut lost_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = pool.close_event() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            if let Some(conn) = watch.as_mut() {
                let fits = match tokio::time::timeout(PROBE_TIMEOUT, in_recovery(conn)).await {
                    Ok(Ok(standby)) => !(standby && self.attrs == Attrs::ReadWrite),
                    _ => false,
                };
                if fits {
                    continue;
                }
            }
            watch = None;
            match self.find().await {
                Ok((i, conn)) => {
                    self.move_to(&pool, i);
                    if let Some(since) = lost_since.take() {
                        tracing::info!(host = %self.hosts[i].addr, after = ?since.elapsed(),
                            "PostgreSQL: a host fits again");
                    }
                    watch = Some(conn);
                }
                Err(e) => {
                    if lost_since.is_none() {
                        tracing::warn!(error = %e, "PostgreSQL: looking for a host that fits");
                        lost_since = Some(Instant::now());
                    }
                }
            }
        }
        if let Some(conn) = watch {
            let _ = conn.close().await;
        }
    }
}

async fn in_recovery(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(conn)
        .await
}
