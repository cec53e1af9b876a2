//! The reply consumer: a durable JetStream pull consumer shared by every orchestrator. Each
//! reply is fed to its saga through the engine; the message is acknowledged only after the
//! commit, so a crash before the commit means a redelivery, and a redelivery after it is
//! fenced off by the machine (it no longer waits for that attempt).
//!
//! A reply that cannot be decoded, or names no saga we know, is a poison message: it goes to
//! the dead-letter subject with the reason, is acknowledged, and never stops the consumer.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use sagas::api::Input;
use sagas::wire::{Reply, consumers, headers};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dead_letter::DeadLetters;
use crate::engine::{self, Applied, Engine, Origin};
use crate::metrics::Metrics;
use crate::topology::{Topology, streams};

pub struct ReplyConsumer {
    engine: Engine,
    js: jetstream::Context,
    topology: Topology,
    dead_letters: DeadLetters,
    concurrency: usize,
    metrics: Metrics,
}

/// How long a reply that could not be applied (PostgreSQL did not answer, the engine is
/// stopping) waits before it comes back: half a second after its first delivery, doubling with
/// each delivery up to half a minute, so that an outage does not use up `replies.max_deliver`
/// in seconds.
fn redelivery_delay(delivered: i64) -> Duration {
    let doublings = (delivered.max(1) - 1).min(6) as u32;
    (Duration::from_millis(500) * (1 << doublings)).min(Duration::from_secs(30))
}

/// What became of one reply message.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    Applied,
    Ignored,
    DeadLettered,
    /// Not acknowledged: JetStream delivers it again.
    Retry,
}

impl ReplyConsumer {
    pub fn new(
        engine: Engine,
        js: jetstream::Context,
        topology: Topology,
        concurrency: usize,
        metrics: Metrics,
    ) -> Self {
        let dead_letters = DeadLetters::new(js.clone(), topology.subjects().clone());
        Self {
            engine,
            js,
            topology,
            dead_letters,
            concurrency,
            metrics,
        }
    }

    async fn consumer(&self) -> Result<PullConsumer, async_nats::Error> {
        let stream = self
            .js
            .get_stream(self.topology.stream_name(streams::REPLIES))
            .await?;
        stream.get_consumer(consumers::REPLIES).await
    }

    /// Pull and apply replies until `shutdown`; then stop pulling and finish the replies in hand.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut inflight = FuturesUnordered::new();
        'outer: while !shutdown.is_cancelled() {
            let messages = match self.consumer().await {
                Ok(c) => c
                    .stream()
                    .max_messages_per_batch(self.concurrency.min(1000))
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                    .map_err(async_nats::Error::from),
                Err(e) => Err(e),
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "reply consumer unavailable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        // Replies pulled but not started go back at once, for another
                        // orchestrator (or the next start), rather than after their ack wait.
                        while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
                            if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
                                tracing::debug!(error = %e, "could not hand a reply back; it is redelivered after its ack wait");
                            }
                        }
                        break 'outer;
                    }
                    Some(_) = inflight.next(), if !inflight.is_empty() => {}
                    next = messages.next(), if inflight.len() < self.concurrency => match next {
                        Some(Ok(msg)) => inflight.push(self.handle(msg)),
                        Some(Err(e)) => tracing::warn!(error = %e, "reply stream error"),
                        None => continue 'outer,
                    },
                }
            }
        }
        while inflight.next().await.is_some() {}
        tracing::info!("reply consumer stopped");
    }

    /// Apply one reply message and acknowledge it when that is safe.
    pub async fn handle(&self, msg: jetstream::Message) -> Handled {
        let correlation_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::CORRELATION_ID))
            .map(|v| v.as_str().to_owned());
        let span = tracing::info_span!(
            "reply",
            correlation_id = correlation_id.as_deref().unwrap_or("")
        );
        async move {
            let handled = match serde_json::from_slice::<Reply>(&msg.payload) {
                Err(e) => {
                    self.dead_letter(&msg, &format!("undecodable reply: {e}")).await
                }
                Ok(reply) => {
                    let saga = reply.saga_id;
                    let origin = Origin {
                        correlation_id: correlation_id.clone(),
                        ..Default::default()
                    };
                    match self.engine.apply(saga, Input::Reply(reply), origin).await {
                        Ok(Applied::Applied { .. }) => Handled::Applied,
                        Ok(Applied::Ignored(_)) => Handled::Ignored,
                        Ok(Applied::NotFound) => {
                            self.dead_letter(&msg, &format!("reply for unknown saga {saga}")).await
                        }
                        Err(e @ engine::Error::Corrupt { .. }) => {
                            self.dead_letter(&msg, &e.to_string()).await
                        }
                        Err(e) => {
                            // On its last allowed delivery, set it aside rather than let
                            // JetStream drop it without a trace.
                            let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
                            let limit = self.topology.reply_max_deliver();
                            if limit > 0 && delivered >= limit {
                                let why = format!("not applied after {delivered} deliveries: {e}");
                                self.dead_letter(&msg, &why).await
                            } else {
                                tracing::warn!(saga_id = %saga, error = %e, "reply not applied; it will be redelivered");
                                Handled::Retry
                            }
                        }
                    }
                }
            };
            let ack = match handled {
                Handled::Retry => {
                    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
                    msg.ack_with(AckKind::Nak(Some(redelivery_delay(delivered)))).await
                }
                _ => msg.ack().await,
            };
            if let Err(e) = ack {
                tracing::warn!(error = %e, "could not acknowledge a reply; it will be redelivered and fenced off");
            }
            handled
        }
        .instrument(span)
        .await
    }

    async fn dead_letter(&self, msg: &jetstream::Message, reason: &str) -> Handled {
        match self.dead_letters.put("replies", msg, reason).await {
            Ok(()) => {
                self.metrics.dead_letter("replies");
                Handled::DeadLettered
            }
            Err(e) => {
                tracing::error!(error = %e, reason, "could not dead-letter a reply; it will be redelivered");
                Handled::Retry
            }
        }
    }
}
