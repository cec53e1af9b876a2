//! JetStream plumbing shared by every worker: binding to a durable consumer, pulling with
//! bounded concurrency and a graceful stop, answering commands (reply before ack), and setting
//! poison messages aside on the dead-letter subject.
//!
//! A handler tells three things apart ([`Handler::handle`]): a command answered (the reply is
//! stored, then the command acknowledged); one that cannot be handled now ([`Unavailable`]:
//! handed back with a growing delay, dead-lettered on the consumer's last allowed delivery); and
//! a poison command ([`Error::Poison`]: one the orchestrator cannot have sent, such as a command
//! for a saga that is not an order, which is dead-lettered at once with the reason, acknowledged,
//! and never acted on).
//!
//! On shutdown a consumer stops pulling, hands back at once (`Nak` without delay) the messages
//! already pulled into its buffer but not started, so that another process takes them without
//! waiting out the ack wait, and finishes the ones in hand.

use std::future::Future;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use backon::{ExponentialBuilder, Retryable};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use sagas::wire::{Command, Event, ReplyOutcome, Service, Subjects, consumers, headers};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why a message could not be handled now. It is not acknowledged and comes back later.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

impl From<sqlx::Error> for Unavailable {
    fn from(e: sqlx::Error) -> Self {
        Unavailable(format!("database: {e}"))
    }
}

/// Why a command was not answered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It cannot be handled now: not acknowledged, it comes back later ([`retry_later`]).
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// It must never be acted on (it names a saga that is not an order, or does not match the
    /// order it names): set aside on the dead-letter subject with this reason, and acknowledged.
    #[error("poison command: {0}")]
    Poison(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Unavailable(e.into())
    }
}

pub async fn connect(
    url: &str,
    name: &str,
) -> Result<jetstream::Context, async_nats::ConnectError> {
    let client = (|| async {
        async_nats::ConnectOptions::new()
            .name(name)
            .max_reconnects(None)
            .connect(url)
            .await
    })
    .retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(15),
    )
    .notify(|e: &async_nats::ConnectError, d| tracing::warn!(error = %e, "NATS not ready; retrying in {d:?}"))
    .await?;
    Ok(jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client))
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

/// Pull from `consumer` and run `handle` on each message, at most `concurrency` at once, until
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
                    Some(Err(e)) => tracing::warn!(error = %e, consumer = consumer_name, "pull error"),
                    None => continue 'outer,
                },
            }
        }
    }
    while inflight.next().await.is_some() {}
    tracing::info!(consumer = consumer_name, "consumer stopped");
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

/// Set a message aside on `<prefix>.dlq.<origin>` with the reason, then acknowledge it.
pub async fn dead_letter(
    js: &jetstream::Context,
    subjects: &Subjects,
    origin: &str,
    msg: &jetstream::Message,
    reason: &str,
) {
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(512)
        .collect();
    tracing::warn!(origin, reason = %reason, subject = %msg.subject, "message dead-lettered");
    let mut h = HeaderMap::new();
    h.insert(headers::DEAD_LETTER_REASON, reason.as_str());
    h.insert(headers::DEAD_LETTER_SUBJECT, msg.subject.as_str());
    h.insert(headers::CORRELATION_ID, correlation_id(msg).as_str());
    let stored = match js
        .publish_with_headers(subjects.dead_letter(origin), h, msg.payload.clone())
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
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
    js: &jetstream::Context,
    subjects: &Subjects,
    origin: &str,
    msg: &jetstream::Message,
    max_deliver: i64,
    reason: &str,
) {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    if max_deliver > 0 && delivered >= max_deliver {
        let why = format!("not handled after {delivered} deliveries: {reason}");
        return dead_letter(js, subjects, origin, msg, &why).await;
    }
    let delay = redelivery_delay(delivered);
    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::warn!(error = %e, "could not hand a message back; it is redelivered after its ack wait");
    }
}

/// A worker pool's answer to commands. Implementations are idempotent per `(saga_id, step)`,
/// and check before any effect that the command is one the orchestrator could have sent
/// ([`crate::orders::check`]): a command for a saga that is not an order, or that does not
/// match its order, is [`Error::Poison`] and does nothing.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, cmd: &Command) -> impl Future<Output = Result<ReplyOutcome, Error>> + Send;
}

/// Serve the commands of one worker pool: decode, handle, publish the reply and wait for
/// JetStream to store it, and only then acknowledge the command. A crash in between means a
/// redelivery, which the handler answers again without repeating the effect. A command that
/// does not decode, belongs to another pool or that the handler finds poison is dead-lettered
/// (origin `cmd-<service>`) and acknowledged; the consumer goes on.
pub async fn serve_commands<H: Handler>(
    js: jetstream::Context,
    subjects: Subjects,
    service: Service,
    handler: H,
    concurrency: usize,
    faults: crate::config::Faults,
    shutdown: CancellationToken,
) {
    let swallow = std::sync::atomic::AtomicU32::new(faults.swallow);
    let swallow = &swallow;
    let stream = subjects.stream("COMMANDS");
    let origin = format!("cmd-{service}");
    let handler = &handler;
    let (js_ref, subjects_ref, origin_ref) = (&js, &subjects, origin.as_str());
    consume(
        js.clone(),
        stream,
        consumers::commands(service),
        concurrency,
        shutdown,
        move |msg, max_deliver| async move {
            let cid = correlation_id(&msg);
            let span = tracing::info_span!(
                "command",
                correlation_id = %cid,
                service = %service,
                saga_id = tracing::field::Empty
            );
            async move {
                let cmd: Command = match serde_json::from_slice(&msg.payload) {
                    Ok(c) => c,
                    Err(e) => {
                        return dead_letter(js_ref, subjects_ref, origin_ref, &msg, &format!("undecodable command: {e}")).await;
                    }
                };
                // Every line about this command from here on (a dead letter's too) names its saga.
                tracing::Span::current().record("saga_id", tracing::field::display(cmd.saga_id));
                if cmd.body.action().service() != service {
                    let why = format!("{} is not a {service} command", cmd.body.action().as_str());
                    return dead_letter(js_ref, subjects_ref, origin_ref, &msg, &why).await;
                }
                if swallow
                    .fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    tracing::warn!(saga_id = %cmd.saga_id, step = %cmd.step, "fault injection: command swallowed");
                    let _ = msg.ack().await;
                    return;
                }
                let outcome = match handler.handle(&cmd).await {
                    Ok(o) => o,
                    // Logged by `dead_letter`, at warn, in this span (correlation and saga id).
                    Err(Error::Poison(why)) => {
                        return dead_letter(js_ref, subjects_ref, origin_ref, &msg, &why).await;
                    }
                    Err(Error::Unavailable(e)) => {
                        tracing::warn!(saga_id = %cmd.saga_id, step = %cmd.step, error = %e, "command not handled; it will be redelivered");
                        return retry_later(js_ref, subjects_ref, origin_ref, &msg, max_deliver, &e.to_string()).await;
                    }
                };
                let reply = cmd.reply(outcome);
                let payload = serde_json::to_vec(&reply).expect("replies serialize");
                let mut h = HeaderMap::new();
                h.insert(headers::CORRELATION_ID, cid.as_str());
                h.insert(headers::MSG_ID, format!("reply:{}", cmd.id).as_str());
                let stored = match js_ref.publish_with_headers(subjects_ref.reply(service), h, payload.into()).await {
                    Ok(ack) => ack.await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match stored {
                    Ok(_) => {
                        tracing::debug!(saga_id = %cmd.saga_id, step = %cmd.step, attempt = cmd.attempt, "replied");
                        if let Err(e) = msg.ack().await {
                            tracing::warn!(error = %e, "could not acknowledge a command; it will be redelivered");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(saga_id = %cmd.saga_id, error = %e, "reply not stored; the command will be redelivered");
                        retry_later(js_ref, subjects_ref, origin_ref, &msg, max_deliver, &format!("reply not stored: {e}")).await;
                    }
                }
            }
            .instrument(span)
            .await
        },
    )
    .await
}

/// Serve domain events from the durable consumer `consumer`: decode, hand to `on_event`,
/// acknowledge. Event types this build does not know are acknowledged and skipped (a newer
/// producer may publish them); a message that is not an event at all is dead-lettered.
pub async fn serve_events<F, Fut>(
    js: jetstream::Context,
    subjects: Subjects,
    consumer: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
    on_event: F,
) where
    F: Fn(Event) -> Fut,
    Fut: Future<Output = Result<(), Unavailable>>,
{
    let stream = subjects.stream("EVENTS");
    let origin = format!("events-{consumer}");
    let (js_ref, subjects_ref, origin_ref, on_event) = (&js, &subjects, origin.as_str(), &on_event);
    consume(js.clone(), stream, consumer, concurrency, shutdown, move |msg, max_deliver| async move {
        let cid = correlation_id(&msg);
        let span = tracing::info_span!("event", correlation_id = %cid, consumer);
        async move {
            let value: serde_json::Value = match serde_json::from_slice(&msg.payload) {
                Ok(v) => v,
                Err(e) => {
                    return dead_letter(js_ref, subjects_ref, origin_ref, &msg, &format!("undecodable event: {e}")).await;
                }
            };
            let event: Event = match serde_json::from_value(value.clone()) {
                Ok(e) => e,
                Err(e) if value.get("type").is_some_and(|t| t.is_string()) && value.get("id").is_some() => {
                    tracing::debug!(error = %e, "skipping an event this build does not handle");
                    let _ = msg.ack().await;
                    return;
                }
                Err(e) => {
                    return dead_letter(js_ref, subjects_ref, origin_ref, &msg, &format!("not an event: {e}")).await;
                }
            };
            match on_event(event).await {
                Ok(()) => {
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, "could not acknowledge an event; it will be redelivered");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event not handled; it will be redelivered");
                    retry_later(js_ref, subjects_ref, origin_ref, &msg, max_deliver, &e.to_string()).await;
                }
            }
        }
        .instrument(span)
        .await
    })
    .await
}
