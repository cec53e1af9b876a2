//! The services' transactional outbox: a service writes the domain events a change causes in
//! the transaction of that change ([`write`]), and its [`Relay`] publishes them to JetStream and
//! deletes each row once JetStream acknowledged it. So an event is published if and only if its
//! change committed, whatever crashes in between: a row left behind by a crash is published by
//! the next relay of any process of the service. Publishing a row twice is harmless: its
//! `Nats-Msg-Id` is the event id, which JetStream stores once within its duplicate window, and
//! subscribers are idempotent by event id anyway.
//!
//! One table (`events.outbox`) serves every service: a row is a message, whoever wrote it.
//!
//! Must never: publish a row before its transaction committed, or delete it before the ack.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use futures::future::join_all;
use sagas::wire::{Event, Subjects, headers};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Write `event` into the outbox, in the caller's transaction, with the correlation id of what
/// caused it (also written into the event). Writing the same event id again changes nothing.
pub async fn write(
    tx: &mut PgConnection,
    subjects: &Subjects,
    event: &Event,
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    let event = Event {
        correlation_id: Some(correlation_id.to_owned()),
        ..event.clone()
    };
    let payload = serde_json::to_value(&event).expect("events serialize");
    sqlx::query!(
        "INSERT INTO events.outbox (msg_id, subject, correlation_id, payload)
         VALUES ($1, $2, $3, $4) ON CONFLICT (msg_id) DO NOTHING",
        event.id.to_string(),
        subjects.event(&event),
        correlation_id,
        payload,
    )
    .execute(tx)
    .await?;
    Ok(())
}

/// Publishes the outbox: at once when woken ([`Relay::waker`], after a commit that wrote
/// events), and at every tick for what a crash or an outage left behind.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    wake: Arc<Notify>,
}

impl Relay {
    pub fn new(pool: PgPool, js: jetstream::Context) -> Self {
        Self {
            pool,
            js,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Call `notify_one` on it after committing events, to publish them now rather than at
    /// the next tick.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Publish until `shutdown`, then once more.
    pub async fn run(self, every: Duration, shutdown: CancellationToken) {
        loop {
            self.drain().await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
        self.drain().await;
    }

    /// Publish everything in the outbox now (what fails stays for the next try).
    async fn drain(&self) {
        loop {
            match self.publish_due(256).await {
                Ok(256) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "the outbox could not be read; next tick");
                    break;
                }
            }
        }
    }

    /// One step of the relay: publish up to `limit` rows, oldest first, and delete those
    /// JetStream acknowledged. Returns how many rows it read.
    pub async fn publish_due(&self, limit: i64) -> Result<usize, sqlx::Error> {
        let rows = sqlx::query!(
            "SELECT id, msg_id, subject, correlation_id, payload FROM events.outbox
              ORDER BY id LIMIT $1",
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        let n = rows.len();
        let mut pending: Vec<(i64, PublishAckFuture)> = Vec::with_capacity(n);
        for r in rows {
            let mut h = HeaderMap::new();
            h.insert(headers::CORRELATION_ID, r.correlation_id.as_str());
            let payload = serde_json::to_vec(&r.payload).expect("json serializes");
            let publish = PublishMessage::build()
                .payload(payload.into())
                .headers(h)
                .message_id(&r.msg_id);
            match self.js.send_publish(r.subject.clone(), publish).await {
                Ok(ack) => pending.push((r.id, ack)),
                Err(e) => {
                    tracing::warn!(error = %e, subject = %r.subject, "publish failed; the event stays in the outbox");
                    break;
                }
            }
        }
        let acked: Vec<i64> = join_all(pending.into_iter().map(|(id, ack)| async move {
            match ack.await {
                Ok(_) => Some(id),
                Err(e) => {
                    tracing::warn!(error = %e, "publish not acknowledged; the event stays in the outbox");
                    None
                }
            }
        }))
        .await
        .into_iter()
        .flatten()
        .collect();
        if !acked.is_empty() {
            sqlx::query!("DELETE FROM events.outbox WHERE id = ANY($1)", &acked)
                .execute(&self.pool)
                .await?;
        }
        Ok(n)
    }
}
