//! The outbox relay: publishes committed outbox rows to JetStream and deletes a row only after
//! JetStream acknowledged it.
//!
//! Two paths feed it. The fast one: right after a commit the engine hands the rows over in
//! memory, and they are published at once, pipelined (all publishes sent, then all acks
//! awaited). The safe one: a periodic scan of the table finds rows the fast path did not finish
//! (the process crashed between commit and publish, NATS was down, the hand-off queue was
//! full). Publishing a row twice is harmless: `Nats-Msg-Id` is the command or event id, so
//! JetStream stores it once within its duplicate window, and the workers are idempotent anyway.
//!
//! A row JetStream acknowledged is deleted by the engine's next commit, in the same statement
//! as the batch it writes anyway ([`Handle::take_acked`]): a transaction of its own per
//! hand-off would double the commits of a lightly loaded orchestrator. When the engine has no
//! batch to write, the relay deletes them itself on its next tick.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use futures::future::join_all;
use sagas::wire::headers;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config;
use crate::metrics::Metrics;

/// One committed outbox row.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: i64,
    /// The saga it belongs to (its trace, when traces are exported).
    pub saga_id: uuid::Uuid,
    pub subject: String,
    pub msg_id: String,
    pub correlation_id: String,
    pub payload: Bytes,
}

/// The ids of rows JetStream acknowledged and nobody deleted yet. Whoever takes them deletes
/// them: the engine in its next commit, or the relay on its tick.
#[derive(Clone, Default)]
struct Acked(Arc<Mutex<Vec<i64>>>);

impl Acked {
    fn push(&self, ids: impl IntoIterator<Item = i64>) {
        self.0.lock().expect("acked lock").extend(ids);
    }

    fn take(&self) -> Vec<i64> {
        std::mem::take(&mut *self.0.lock().expect("acked lock"))
    }
}

/// The engine's side of the hand-off.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Vec<Message>>,
    acked: Acked,
}

impl Handle {
    /// Hand committed rows over. Never waits: when the queue is full the rows stay in the table
    /// and the scan publishes them.
    pub fn publish(&self, messages: Vec<Message>) {
        if let Err(e) = self.tx.try_send(messages) {
            tracing::debug!(error = %e, "relay queue full; the scan will publish these rows");
        }
    }

    /// The rows JetStream acknowledged since the last take, for the engine to delete in the
    /// commit it is about to make. If that commit fails, [`Handle::untake`] them.
    pub fn take_acked(&self) -> Vec<i64> {
        self.acked.take()
    }

    /// Give back rows taken with [`Handle::take_acked`] whose delete did not commit.
    pub fn untake(&self, ids: Vec<i64>) {
        self.acked.push(ids);
    }
}

pub struct Relay {
    js: jetstream::Context,
    pool: PgPool,
    rx: mpsc::Receiver<Vec<Message>>,
    acked: Acked,
    settings: config::Relay,
    metrics: Metrics,
}

impl Relay {
    pub fn new(
        js: jetstream::Context,
        pool: PgPool,
        settings: config::Relay,
        metrics: Metrics,
    ) -> (Handle, Relay) {
        let (tx, rx) = mpsc::channel(1024);
        let acked = Acked::default();
        (
            Handle {
                tx,
                acked: acked.clone(),
            },
            Relay {
                js,
                pool,
                rx,
                acked,
                settings,
                metrics,
            },
        )
    }

    pub fn spawn(self) -> JoinHandle<()> {
        tokio::spawn(self.run())
    }

    /// Runs until every [`Handle`] is dropped, then flushes the table once more.
    pub async fn run(mut self) {
        // Whatever a previous process left behind goes first.
        self.scan(Duration::ZERO).await;
        let mut tick = tokio::time::interval(config::ms(self.settings.scan_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buffer = Vec::new();
        loop {
            tokio::select! {
                n = self.rx.recv_many(&mut buffer, 64) => {
                    if n == 0 {
                        break;
                    }
                    let batch: Vec<Message> = buffer.drain(..).flatten().collect();
                    let done = self.publish(&batch).await;
                    self.metrics.published(done.len(), batch.len() - done.len(), false);
                    // Deleted by the engine's next commit, or by this loop's next tick (a row
                    // published but not yet deleted is only published again by a scan, and
                    // JetStream drops the duplicate).
                    self.acked.push(done);
                }
                _ = tick.tick() => {
                    self.delete_acked().await;
                    self.scan(config::ms(self.settings.scan_grace_ms)).await;
                }
            }
        }
        self.delete_acked().await;
        self.scan(Duration::ZERO).await;
        tracing::info!("relay stopped");
    }

    /// Publish rows older than `grace` that are still in the table. Rows are locked while they
    /// are published so that two orchestrators do not publish the same ones.
    pub async fn scan(&self, grace: Duration) -> usize {
        let mut total = 0;
        loop {
            match self.scan_once(grace).await {
                Ok(0) => return total,
                Ok(n) => total += n,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox scan failed");
                    return total;
                }
            }
        }
    }

    async fn scan_once(&self, grace: Duration) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let cutoff = chrono::Utc::now() - grace;
        // Read straight into messages, by column name (the payload's bytes become `Bytes`).
        let messages = sqlx::query_as!(
            Message,
            "SELECT id, saga_id, subject, msg_id, correlation_id, payload FROM orchestrator.outbox
              WHERE created_at <= $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
            cutoff,
            self.settings.max_batch as i64,
        )
        .fetch_all(&mut *tx)
        .await?;
        if messages.is_empty() {
            return Ok(0);
        }
        let found = messages.len();
        let done = self.publish(&messages).await;
        self.metrics.published(done.len(), found - done.len(), true);
        if !done.is_empty() {
            delete(&mut *tx, &done).await?;
        }
        tx.commit().await?;
        tracing::info!(found, published = done.len(), "outbox scan published rows");
        // Stop when nothing could be published (NATS down): the next tick tries again.
        Ok(if done.is_empty() { 0 } else { found })
    }

    /// Delete the acknowledged rows the engine did not take (it had nothing to commit).
    async fn delete_acked(&self) {
        let acked = self.acked.take();
        if acked.is_empty() {
            return;
        }
        if let Err(e) = delete(&self.pool, &acked).await {
            // Published but still in the table: the scan publishes them again, JetStream drops
            // the duplicates.
            tracing::warn!(error = %e, rows = acked.len(), "could not delete published outbox rows");
        }
    }

    /// Publish all, then await all acks. Returns the ids JetStream acknowledged.
    async fn publish(&self, messages: &[Message]) -> Vec<i64> {
        let mut pending: Vec<(i64, PublishAckFuture)> = Vec::with_capacity(messages.len());
        for m in messages {
            let mut h = HeaderMap::new();
            h.insert(headers::CORRELATION_ID, m.correlation_id.as_str());
            if runtime::telemetry::tracing_enabled() {
                h.insert(
                    runtime::telemetry::TRACEPARENT,
                    runtime::telemetry::traceparent(m.saga_id).as_str(),
                );
            }
            let publish = PublishMessage::build()
                .payload(m.payload.clone())
                .headers(h)
                .message_id(&m.msg_id);
            match self.js.send_publish(m.subject.clone(), publish).await {
                Ok(ack) => pending.push((m.id, ack)),
                Err(e) => {
                    tracing::warn!(error = %e, subject = %m.subject, correlation_id = %m.correlation_id,
                        "publish failed; the row stays in the outbox");
                    break;
                }
            }
        }
        join_all(pending.into_iter().map(|(id, ack)| async move {
            match ack.await {
                Ok(_) => Some(id),
                Err(e) => {
                    tracing::warn!(error = %e, row = id, "publish not acknowledged; the row stays in the outbox");
                    None
                }
            }
        }))
        .await
        .into_iter()
        .flatten()
        .collect()
    }
}

async fn delete<'e>(executor: impl sqlx::PgExecutor<'e>, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query!("DELETE FROM orchestrator.outbox WHERE id = ANY($1)", ids)
        .execute(executor)
        .await?;
    Ok(())
}
