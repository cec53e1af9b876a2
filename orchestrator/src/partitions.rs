//! Partition ownership: how several orchestrators divide the sagas.
//!
//! Sagas hash to a fixed number of partitions ([`sagas::wire::partition_of`]). Each partition
//! has a lease row in `orchestrator.partition_leases` (migration 0021); the orchestrator that
//! holds it consumes the partition's inbox (`<prefix>.reply.p<N>.>`: the replies to the commands
//! of its sagas, which carry the partition, and the signals routed to them), fires their timers
//! and resumes their parked sagas. Its engine then keeps them in its cache with no one else
//! writing them, so version conflicts are the exception.
//!
//! A [`LeaseKeeper`] per orchestrator, every quarter of `partitions.lease_ms`:
//! 1. heartbeats its row in `orchestrator.members` (the live orchestrators);
//! 2. renews the leases it holds (at the epochs it holds them with); one it no longer holds
//!    was taken by another after it expired: it is *lost*, dropped at once;
//! 3. divides the partitions among the live members (sorted by instance, partition `p` to the
//!    member `p mod n`), releases those that are no longer its own (after stopping their
//!    consumer, so the inputs in hand are committed first), and takes its own that are free or
//!    expired, raising their epoch.
//!
//! The epoch fences: the engine's commit locks the lease rows of the owned partitions it
//! touches `FOR KEY SHARE` at the epochs held, and writes nothing unless all are still at them
//! (`engine::store`). A take-over raises the epoch, a key column: it waits for the commits in
//! flight, and any later commit of the old owner (paused past its lease, cut off from the
//! database) finds nothing to lock. Its inputs in hand are then re-read and applied like any
//! non-owner's, under the saga's version check; its keeper finds the lease lost on its next
//! renewal and stops the partition's consumer.
//!
//! Everything not addressed to a partition works on any orchestrator: the HTTP API (a start
//! picks an id in a partition the orchestrator owns, so that its replies come back to it), the
//! shared signal and start consumers (which route a signal to its saga's partition), and the
//! sagas of partitions nobody owns yet (written under the version check alone).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sagas::wire::SagaId;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The partitions this process holds, each with the epoch of its lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    pub epochs: BTreeMap<u32, i64>,
}

impl Owned {
    pub fn holds(&self, partition: u32) -> bool {
        self.epochs.contains_key(&partition)
    }
}

/// What the engine, the timer loop and the consumers ask: which partitions are ours now.
/// Cheap to clone.
#[derive(Clone)]
pub struct Ownership {
    count: u32,
    owned: Arc<watch::Sender<Arc<Owned>>>,
}

impl Ownership {
    pub fn new(count: u32) -> Self {
        Self {
            count: count.max(1),
            owned: Arc::new(watch::Sender::new(Arc::new(Owned::default()))),
        }
    }

    /// Every partition owned, with no lease: a process that is the only writer by
    /// construction (tests of the engine alone).
    pub fn all(count: u32) -> Self {
        let o = Self::new(count);
        o.set(Owned {
            epochs: (0..o.count).map(|p| (p, 0)).collect(),
        });
        o
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn partition_of(&self, id: SagaId) -> u32 {
        sagas::wire::partition_of(id, self.count)
    }

    pub fn current(&self) -> Arc<Owned> {
        self.owned.borrow().clone()
    }

    /// The partitions held now, as SQL takes them (`= ANY($n::int4[])`).
    pub fn held(&self) -> Vec<i32> {
        self.current().epochs.keys().map(|p| *p as i32).collect()
    }

    /// Whether the saga's partition is held by this process.
    pub fn owns(&self, id: SagaId) -> bool {
        self.owned.borrow().holds(self.partition_of(id))
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Owned>> {
        self.owned.subscribe()
    }

    fn set(&self, owned: Owned) {
        self.owned.send_if_modified(|current| {
            if **current == owned {
                false
            } else {
                *current = Arc::new(owned);
                true
            }
        });
    }

    /// The engine's commit found these leases taken over: drop them now, before the keeper's
    /// next renewal notices.
    pub fn lost(&self, partitions: &[u32]) {
        let mut owned = (*self.current()).clone();
        for p in partitions {
            owned.epochs.remove(p);
        }
        self.set(owned);
    }

    /// A fresh saga id in a partition this process holds (UUID v7, so ids still sort by
    /// time), so that the replies to its commands come back here; any id when it holds none.
    pub fn new_id(&self) -> SagaId {
        let owned = self.current();
        let mut id = SagaId::from_uuid(uuid::Uuid::now_v7());
        if owned.epochs.is_empty() {
            return id;
        }
        // Each try hits with probability owned/count: 64 tries miss with less than
        // (1 - 1/count)^64, i.e. about 2 % for one partition of 16; then any id will do.
        for _ in 0..64 {
            if owned.holds(self.partition_of(id)) {
                break;
            }
            id = SagaId::from_uuid(uuid::Uuid::now_v7());
        }
        id
    }
}

/// Starts the consumer of a partition's inbox; it stops when the token is cancelled.
pub type SpawnConsumer = Box<dyn Fn(u32, CancellationToken) -> JoinHandle<()> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "partitions.count is {configured}, but the database's sagas are hashed to {stored} partitions; the count cannot change once chosen"
    )]
    CountChanged { configured: u32, stored: i32 },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Record the count (the first orchestrator to start chooses it) and make sure every
/// partition has its lease row.
pub async fn prepare(pool: &PgPool, count: u32) -> Result<(), Error> {
    let count = count as i32;
    sqlx::query!(
        "INSERT INTO orchestrator.partitioning (partitions) VALUES ($1) ON CONFLICT DO NOTHING",
        count
    )
    .execute(pool)
    .await?;
    let stored = sqlx::query_scalar!("SELECT partitions FROM orchestrator.partitioning")
        .fetch_one(pool)
        .await?;
    if stored != count {
        return Err(Error::CountChanged {
            configured: count as u32,
            stored,
        });
    }
    sqlx::query!(
        "INSERT INTO orchestrator.partition_leases (partition)
         SELECT generate_series(0, $1 - 1) ON CONFLICT DO NOTHING",
        count
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Takes, renews and hands over this process's leases, and runs the consumers of the
/// partitions it holds.
pub struct LeaseKeeper {
    pool: PgPool,
    ownership: Ownership,
    instance: String,
    lease: Duration,
    spawn: SpawnConsumer,
    consumers: BTreeMap<u32, (CancellationToken, JoinHandle<()>)>,
    /// When the leases were last renewed (sent): past `lease` after it, they may have been
    /// taken, so they are dropped even if the database cannot tell.
    renewed: Option<Instant>,
    metrics: Metrics,
}

impl LeaseKeeper {
    pub fn new(
        pool: PgPool,
        ownership: Ownership,
        lease: Duration,
        spawn: SpawnConsumer,
        metrics: Metrics,
    ) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let instance = format!(
            "{}{}{}",
            host,
            if host.is_empty() { "" } else { "/" },
            uuid::Uuid::now_v7()
        );
        Self {
            pool,
            ownership,
            instance,
            lease,
            spawn,
            consumers: BTreeMap::new(),
            renewed: None,
            metrics,
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Keep the leases until `shutdown`; `first` is told when the first round is over (the
    /// partitions free for this process taken), so that the API serves with them held.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        first: tokio::sync::oneshot::Sender<()>,
    ) {
        let period = self.lease / 4;
        tracing::info!(instance = %self.instance, partitions = self.ownership.count(), "taking partitions");
        let mut first = Some(first);
        loop {
            let started = Instant::now();
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "cannot renew partition leases; retrying");
                self.expire_unrenewed().await;
            }
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
            let nap = period.saturating_sub(started.elapsed());
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(nap) => {}
            }
        }
        self.hand_over().await;
    }

    async fn tick(&mut self) -> Result<(), sqlx::Error> {
        let secs = self.lease.as_secs_f64();
        let sent = Instant::now();
        sqlx::query!(
            "INSERT INTO orchestrator.members (instance, expires_at)
             VALUES ($1, now() + make_interval(secs => $2))
             ON CONFLICT (instance) DO UPDATE SET expires_at = excluded.expires_at",
            self.instance,
            secs,
        )
        .execute(&self.pool)
        .await?;
        let members: Vec<String> = sqlx::query_scalar!(
            "SELECT instance FROM orchestrator.members WHERE expires_at > now() ORDER BY instance"
        )
        .fetch_all(&self.pool)
        .await?;
        // Renew what is held; what is not renewed was taken.
        let owned = self.ownership.current();
        let (parts, epochs): (Vec<i32>, Vec<i64>) =
            owned.epochs.iter().map(|(p, e)| (*p as i32, *e)).unzip();
        let renewed: BTreeSet<u32> = sqlx::query_scalar!(
            "UPDATE orchestrator.partition_leases l
                SET expires_at = now() + make_interval(secs => $2)
               FROM unnest($3::int4[], $4::int8[]) AS h(partition, epoch)
              WHERE l.partition = h.partition AND l.epoch = h.epoch AND l.owner = $1
             RETURNING l.partition",
            self.instance,
            secs,
            &parts,
            &epochs,
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|p| p as u32)
        .collect();
        self.renewed = Some(sent);
        let mut held = (*owned).clone();
        let lost: Vec<u32> = owned
            .epochs
            .keys()
            .filter(|p| !renewed.contains(p))
            .copied()
            .collect();
        for p in &lost {
            tracing::warn!(
                partition = p,
                "partition lease lost (taken over after it expired)"
            );
            held.epochs.remove(p);
            self.metrics.partition_change("lost");
        }
        if !lost.is_empty() {
            self.ownership.set(held.clone());
            self.stop_consumers(&lost).await;
        }
        // This member's share.
        let n = members.len().max(1) as u32;
        let index = members
            .iter()
            .position(|m| *m == self.instance)
            .unwrap_or(0) as u32;
        let mine: BTreeSet<u32> = (0..self.ownership.count())
            .filter(|p| p % n == index)
            .collect();
        // Hand over what is another's now: stop consuming, then release.
        let release: Vec<u32> = held
            .epochs
            .keys()
            .filter(|p| !mine.contains(p))
            .copied()
            .collect();
        if !release.is_empty() {
            let mut kept = held.clone();
            for p in &release {
                kept.epochs.remove(p);
            }
            self.ownership.set(kept.clone());
            self.stop_consumers(&release).await;
            for p in &release {
                self.release(*p, held.epochs[p]).await?;
                self.metrics.partition_change("released");
            }
            tracing::info!(partitions = ?release, "partitions handed over");
            held = kept;
        }
        // Take what is ours and free (released, expired, never taken), one at a time in order
        // (two keepers never wait on each other in a cycle).
        let mut taken = Vec::new();
        let wanted: Vec<u32> = mine.iter().filter(|p| !held.holds(**p)).copied().collect();
        for p in &wanted {
            let row = sqlx::query!(
                "UPDATE orchestrator.partition_leases
                    SET owner = $1, epoch = epoch + 1,
                        expires_at = now() + make_interval(secs => $3)
                  WHERE partition = $2 AND (owner IS NULL OR expires_at < now())
                 RETURNING epoch",
                self.instance,
                *p as i32,
                secs,
            )
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = row {
                held.epochs.insert(*p, row.epoch);
                taken.push(*p);
                self.metrics.partition_change("acquired");
            }
        }
        if !taken.is_empty() {
            tracing::info!(partitions = ?taken, "partitions taken");
            self.ownership.set(held.clone());
            for p in taken {
                let token = CancellationToken::new();
                let handle = (self.spawn)(p, token.clone());
                self.consumers.insert(p, (token, handle));
            }
        }
        self.metrics.partitions_owned(held.epochs.len());
        Ok(())
    }

    /// The database does not answer: once the last renewal is a lease old, another
    /// orchestrator may hold the partitions; stop working on them.
    async fn expire_unrenewed(&mut self) {
        let Some(renewed) = self.renewed else { return };
        if renewed.elapsed() < self.lease {
            return;
        }
        let owned = self.ownership.current();
        if owned.epochs.is_empty() {
            return;
        }
        let dropped: Vec<u32> = owned.epochs.keys().copied().collect();
        tracing::warn!(partitions = ?dropped, "partition leases not renewed for a whole lease; dropping them");
        self.ownership.set(Owned::default());
        self.stop_consumers(&dropped).await;
        for _ in &dropped {
            self.metrics.partition_change("lost");
        }
        self.metrics.partitions_owned(0);
    }

    async fn stop_consumers(&mut self, partitions: &[u32]) {
        let mut stopping = Vec::new();
        for p in partitions {
            if let Some((token, handle)) = self.consumers.remove(p) {
                token.cancel();
                stopping.push(handle);
            }
        }
        for handle in stopping {
            // A consumer finishes the inputs in hand (each a commit); bounded all the same.
            let _ = tokio::time::timeout(Duration::from_secs(30), handle).await;
        }
    }

    async fn release(&self, partition: u32, epoch: i64) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "UPDATE orchestrator.partition_leases SET owner = NULL, expires_at = now()
              WHERE partition = $1 AND epoch = $2 AND owner = $3",
            partition as i32,
            epoch,
            self.instance,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Shutting down: stop every consumer (the inputs in hand are committed), then release
    /// every lease and leave the members, so that the others take the partitions at their
    /// next tick rather than after the leases expire.
    async fn hand_over(mut self) {
        let owned = self.ownership.current();
        let all: Vec<u32> = self.consumers.keys().copied().collect();
        self.stop_consumers(&all).await;
        self.ownership.set(Owned::default());
        for (p, epoch) in &owned.epochs {
            if let Err(e) = self.release(*p, *epoch).await {
                tracing::warn!(error = %e, partition = p, "could not release a lease; it expires on its own");
            }
        }
        let left = sqlx::query!(
            "DELETE FROM orchestrator.members WHERE instance = $1",
            self.instance
        )
        .execute(&self.pool)
        .await;
        if let Err(e) = left {
            tracing::warn!(error = %e, "could not leave the members; the row expires on its own");
        }
        self.metrics.partitions_owned(0);
        tracing::info!(
            partitions = owned.epochs.len(),
            "partitions handed over on shutdown"
        );
    }
}

/// A partition's lease, as the admin API and the dashboard show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Lease {
    pub partition: i32,
    /// The instance holding it; `None` when released or never taken.
    pub owner: Option<String>,
    pub epoch: i64,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// Held and not expired.
    pub live: bool,
}

/// A live orchestrator and the partitions it holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Member {
    pub instance: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub partitions: Vec<i32>,
}

/// Who holds what: `GET /admin/partitions` and the dashboard's overview.
#[derive(Debug, Clone, serde::Serialize)]
pub struct View {
    pub count: i32,
    pub members: Vec<Member>,
    /// Partitions no live orchestrator holds (moving, or their owner is gone and its lease has
    /// not expired yet): their replies, signals and timers wait.
    pub unowned: Vec<i32>,
    pub leases: Vec<Lease>,
}

pub async fn view(pool: &PgPool) -> Result<View, sqlx::Error> {
    let leases: Vec<Lease> = sqlx::query_as!(
        Lease,
        r#"SELECT partition, owner, epoch, expires_at,
                  (owner IS NOT NULL AND expires_at > now()) AS "live!"
             FROM orchestrator.partition_leases ORDER BY partition"#
    )
    .fetch_all(pool)
    .await?;
    let members = sqlx::query!(
        "SELECT instance, started_at, expires_at FROM orchestrator.members
          WHERE expires_at > now() ORDER BY instance"
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|m| Member {
        partitions: leases
            .iter()
            .filter(|l| l.live && l.owner.as_deref() == Some(m.instance.as_str()))
            .map(|l| l.partition)
            .collect(),
        instance: m.instance,
        started_at: m.started_at,
        expires_at: m.expires_at,
    })
    .collect();
    Ok(View {
        count: leases.len() as i32,
        unowned: leases
            .iter()
            .filter(|l| !l.live)
            .map(|l| l.partition)
            .collect(),
        members,
        leases,
    })
}
