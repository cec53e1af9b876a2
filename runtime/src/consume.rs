//! The JetStream pull-and-acknowledge loop every consumer of the system runs, with its one
//! redelivery policy and its dead letters.
//!
//! A handler decides what becomes of each message: acknowledged (done), handed back for later
//! ([`retry_later`]: a delay that doubles with each delivery; on the consumer's last allowed
//! delivery the message is dead-lettered instead, so that nothing vanishes without a trace), or
//! set aside at once ([`dead_letter`]: a message that can never be processed, on
//! `<prefix>.dlq.<origin>` with the reason).
//!
//! On shutdown a consumer stops pulling, hands back at once (`Nak` without delay) the messages
//! already pulled into its buffer but not started, so that another process takes them without
//! waiting out the ack wait, and finishes the ones in hand.

use std::future::Future;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use sagas::wire::{Subjects, headers};
use tokio_util::sync::CancellationToken;

/// Why a message could not be handled now. It is not acknowledged and comes back later.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

impl From<sqlx::Error> for Unavailable {
    fn from(e: sqlx::Error) -> Self {
        Unavailable(format!("database: {e}"))
    }
}

/// Bind to a durable consumer that the orchestrator declares; wait for it while the
/// orchestrator is not up yet. `None` when stopped while waiting.
pub async fn bind(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
    shutdown: &CancellationToken,
) -> Option<PullConsumer> {
    let mut warned = false;
    loop {
        let found = match js.get_stream(stream).await {
            Ok(s) => s
                .get_consumer::<jetstream::consumer::pull::Config>(consumer)
                .await
                .ok(),
            Err(_) => None,
        };
        if let Some(c) = found {
            return Some(c);
        }
        if !warned {
            tracing::info!(
                stream,
                consumer,
                "waiting for the orchestrator to declare this consumer"
            );
            warned = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Pull from `consumer` (of `stream`) and run `handle` on each message, at most `concurrency` at once, until
/// `shutdown`; then stop pulling, hand back what was pulled but not started
/// (`hand_back_buffered`), and finish the messages in hand. `handle` also gets the consumer's
/// delivery limit (`MaxDeliver`), for [`retry_later`].
pub async fn consume<F, Fut>(
    js: jetstream::Context,
    stream: String,
    consumer_name: &str,
    concurrency: usize,
    shutdown: CancellationToken,
    handle: F,
) where
    F: Fn(jetstream::Message, i64) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut inflight = FuturesUnordered::new();
    'outer: while !shutdown.is_cancelled() {
        let Some(consumer) = bind(&js, &stream, consumer_name, &shutdown).await else {
            break;
        };
        let max_deliver = consumer.cached_info().config.max_deliver;
        let messages = consumer
            .stream()
            .max_messages_per_batch(concurrency.min(1000))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, consumer = consumer_name, "cannot pull; retrying");
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
                    hand_back_buffered(messages, consumer_name).await;
                    break 'outer;
                }
                Some(_) = inflight.next(), if !inflight.is_empty() => {}
                next = messages.next(), if inflight.len() < concurrency => match next {
                    Some(Ok(msg)) => inflight.push(handle(msg, max_deliver)),
                    // The consumer's leader moved or went away (a JetStream leader change, a
                    // server of the cluster restarting): its pull request is lost, and the
                    // stream would wait out the request's expiry before asking again. Pull
                    // afresh instead.
                    Some(Err(e)) if pull_again(e.kind()) => {
                        tracing::warn!(error = %e, consumer = consumer_name, "pull interrupted; pulling again");
                        hand_back_buffered(messages, consumer_name).await;
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'outer,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'outer,
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, consumer = consumer_name, "pull error"),
                    None => continue 'outer,
                },
            }
        }
    }
    while inflight.next().await.is_some() {}
    tracing::info!(consumer = consumer_name, "consumer stopped");
}

/// Whether a pull stream's error means its pull request is lost (to be made again), rather
/// than a message that could not be read.
fn pull_again(kind: MessagesErrorKind) -> bool {
    matches!(
        kind,
        MessagesErrorKind::MissingHeartbeat
            | MessagesErrorKind::NoResponders
            | MessagesErrorKind::ConsumerDeleted
            | MessagesErrorKind::Pull
    )
}

/// Hand back, without delay, the messages the pull stream already holds (pulled from the server
/// in its last batch, not handed to a handler yet): without this they would wait out the
/// consumer's ack wait before another process got them. They are taken out first and the
/// stream is dropped (which unsubscribes from its inbox) before they are handed back, so that
/// the server cannot deliver them again to this process's own pull request. Only what is ready
/// now is taken; a message still on its way is redelivered after the ack wait, as after a crash.
async fn hand_back_buffered(mut messages: jetstream::consumer::pull::Stream, consumer: &str) {
    let mut held = Vec::new();
    while let Some(Some(next)) = messages.next().now_or_never() {
        match next {
            Ok(msg) => held.push(msg),
            // A heartbeat or pull error: nothing more is ready.
            Err(e) => {
                tracing::debug!(error = %e, consumer, "pull error while handing messages back");
                break;
            }
        }
    }
    drop(messages);
    for msg in &held {
        if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
            tracing::warn!(error = %e, consumer, "could not hand back a pulled message; it is redelivered after its ack wait");
        }
    }
    if !held.is_empty() {
        tracing::info!(
            consumer,
            messages = held.len(),
            "stopping: pulled messages handed back"
        );
    }
}

pub fn correlation_id(msg: &jetstream::Message) -> String {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(headers::CORRELATION_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

/// The dead-letter subjects of a deployment: where a message that cannot be processed is set
/// aside, with the reason and the subject it came from, for an operator.
#[derive(Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    subjects: Subjects,
}

impl DeadLetters {
    pub fn new(js: jetstream::Context, subjects: Subjects) -> Self {
        Self { js, subjects }
    }

    /// Store `msg` on `<prefix>.dlq.<origin>`, with its headers (but its `Nats-Msg-Id`: a dead
    /// letter is not a duplicate of what it carries), the reason and the subject it came
    /// from, and wait for JetStream's acknowledgement. The message itself is not acknowledged.
    pub async fn put(
        &self,
        origin: &str,
        msg: &jetstream::Message,
        reason: &str,
    ) -> Result<(), async_nats::Error> {
        let mut h = HeaderMap::new();
        if let Some(original) = &msg.headers {
            for (name, values) in original.iter() {
                if AsRef::<str>::as_ref(name) == headers::MSG_ID {
                    continue;
                }
                for v in values {
                    h.append(name.clone(), v.clone());
                }
            }
        }
        // Header values are one line.
        let reason: String = reason
            .chars()
            .filter(|c| !c.is_control())
            .take(512)
            .collect();
        tracing::warn!(origin, reason = %reason, subject = %msg.subject, "message dead-lettered");
        h.insert(headers::DEAD_LETTER_REASON, reason.as_str());
        h.insert(headers::DEAD_LETTER_SUBJECT, msg.subject.as_str());
        self.js
            .publish_with_headers(self.subjects.dead_letter(origin), h, msg.payload.clone())
            .await?
            .await?;
        Ok(())
    }
}

/// Set a message aside on `<prefix>.dlq.<origin>` with the reason, then acknowledge it. If the
/// dead letter cannot be stored, the message is handed back instead of lost. Whether it was
/// set aside.
pub async fn dead_letter(
    dead_letters: &DeadLetters,
    origin: &str,
    msg: &jetstream::Message,
    reason: &str,
) -> bool {
    let stored = dead_letters.put(origin, msg, reason).await.is_ok();
    let ack = if stored {
        msg.ack().await
    } else {
        // Not set aside: leave it for a redelivery rather than lose it.
        tracing::error!(origin, subject = %msg.subject, "could not store a dead letter; the message is handed back");
        msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
            .await
    };
    if let Err(e) = ack {
        tracing::warn!(error = %e, "could not acknowledge a dead-lettered message");
    }
    stored
}

/// How long a message that could not be handled waits before it comes back: a second after its
/// first delivery, doubling with each delivery up to half a minute, so that an outage of
/// PostgreSQL or of the third party does not burn through the delivery limit in seconds.
pub fn redelivery_delay(delivered: i64) -> Duration {
    let doublings = (delivered.max(1) - 1).min(5) as u32;
    Duration::from_secs(1 << doublings).min(Duration::from_secs(30))
}

/// Leave a message that could not be handled now for a later delivery. On the consumer's last
/// allowed delivery it is set aside on the dead-letter subject instead, with the reason: JetStream
/// would deliver it no more, and a message must never vanish without a trace.
pub async fn retry_later(
    dead_letters: &DeadLetters,
    origin: &str,
    msg: &jetstream::Message,
    max_deliver: i64,
    reason: &str,
) {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    if max_deliver > 0 && delivered >= max_deliver {
        let why = format!("not handled after {delivered} deliveries: {reason}");
        dead_letter(dead_letters, origin, msg, &why).await;
        return;
    }
    let delay = redelivery_delay(delivered);
    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::warn!(error = %e, "could not hand a message back; it is redelivered after its ack wait");
    }
}
