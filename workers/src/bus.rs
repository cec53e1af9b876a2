//! Serving a worker pool's commands and a subscriber's domain events over the shared consume
//! loop ([`runtime::consume`]): answering commands (reply before ack), and setting poison
//! messages aside on the dead-letter subject.
//!
//! A handler tells three things apart ([`Handler::handle`]): a command answered (the reply is
//! stored, then the command acknowledged); one that cannot be handled now ([`Unavailable`]:
//! handed back with a growing delay, dead-lettered on the consumer's last allowed delivery); and
//! a poison command ([`Error::Poison`]: one the orchestrator cannot have sent, such as a command
//! for a saga that is not an order, which is dead-lettered at once with the reason, acknowledged,
//! and never acted on).

use std::future::Future;

use async_nats::HeaderMap;
use async_nats::jetstream;
use runtime::consume::{DeadLetters, consume, correlation_id, dead_letter, retry_later};
use sagas::wire::{Command, Event, ReplyOutcome, Subjects, consumers, headers};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use runtime::consume::Unavailable;

use crate::health::{Metrics, Outcome};

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

/// The payload of `cmd`, as the `service`'s contract (`T`) defines it. A command whose action
/// the contract does not have is poison with a reason that says so (a newer saga type's
/// command sent to an older worker, or a stray one); one whose fields do not fit its action is
/// poison too.
pub fn payload<T: DeserializeOwned>(cmd: &Command, service: &str) -> Result<T, Error> {
    cmd.body.decode().map_err(|e| {
        let action = cmd.action();
        if e.to_string().starts_with("unknown variant") || action.is_empty() {
            Error::Poison(format!(
                "unknown command {action:?} for the {service} service (saga type {})",
                cmd.saga_type
            ))
        } else {
            Error::Poison(format!("malformed {action} command: {e}"))
        }
    })
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
/// (origin `cmd-<service>`) and acknowledged; the consumer goes on. Each command is counted
/// in `metrics` ([`crate::health`]): in flight while held, then by outcome and time taken.
#[allow(clippy::too_many_arguments)]
pub async fn serve_commands<H: Handler>(
    js: jetstream::Context,
    subjects: Subjects,
    service: &'static str,
    handler: H,
    concurrency: usize,
    faults: crate::config::Faults,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let metrics = &metrics;
    let swallow = std::sync::atomic::AtomicU32::new(faults.swallow);
    let swallow = &swallow;
    let stream = subjects.stream("COMMANDS");
    let origin = format!("cmd-{service}");
    let handler = &handler;
    let dead_letters = DeadLetters::new(js.clone(), subjects.clone());
    let (js_ref, subjects_ref, origin_ref, dl) = (&js, &subjects, origin.as_str(), &dead_letters);
    consume(
        js.clone(),
        stream,
        consumers::commands(service),
        concurrency,
        shutdown,
        move |msg, max_deliver| async move {
            let in_flight = metrics.arrived(service);
            let cid = correlation_id(&msg);
            let span = tracing::info_span!(
                "command",
                correlation_id = %cid,
                service = %service,
                saga_id = tracing::field::Empty
            );
            // The command's work is a span of its saga's trace (when traces are exported).
            runtime::telemetry::join_traceparent(
                &span,
                msg.headers
                    .as_ref()
                    .and_then(|h| h.get(runtime::telemetry::TRACEPARENT))
                    .map(|v| v.as_str()),
            );
            async move {
                let cmd: Command = match serde_json::from_slice(&msg.payload) {
                    Ok(c) => c,
                    Err(e) => {
                        metrics.failure(service, "undecodable");
                        dead_letter(dl, origin_ref, &msg, &format!("undecodable command: {e}")).await;
                        return;
                    }
                };
                // Every line about this command from here on (a dead letter's too) names its saga.
                tracing::Span::current().record("saga_id", tracing::field::display(cmd.saga_id));
                if !cmd.service.is_empty() && cmd.service != service {
                    let why = format!("a command for {}, not for {service}", cmd.service);
                    metrics.failure(service, "misrouted");
                    dead_letter(dl, origin_ref, &msg, &why).await;
                        return;
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
                        dead_letter(dl, origin_ref, &msg, &why).await;
                        metrics.handled(service, Outcome::Poison, &in_flight);
                        return;
                    }
                    Err(Error::Unavailable(e)) => {
                        tracing::warn!(saga_id = %cmd.saga_id, step = %cmd.step, error = %e, "command not handled; it will be redelivered");
                        retry_later(dl, origin_ref, &msg, max_deliver, &e.to_string()).await;
                        metrics.handled(service, Outcome::Unavailable, &in_flight);
                        return;
                    }
                };
                let outcome_kind = Outcome::of(&outcome);
                let reply = cmd.reply(outcome);
                let payload = serde_json::to_vec(&reply).expect("replies serialize");
                let mut h = HeaderMap::new();
                h.insert(headers::CORRELATION_ID, cid.as_str());
                h.insert(headers::MSG_ID, format!("reply:{}", cmd.id).as_str());
                if runtime::telemetry::tracing_enabled() {
                    h.insert(
                        runtime::telemetry::TRACEPARENT,
                        runtime::telemetry::traceparent(cmd.saga_id.as_uuid()).as_str(),
                    );
                }
                let stored = match js_ref.publish_with_headers(subjects_ref.reply_to(&cmd, service), h, payload.into()).await {
                    Ok(ack) => ack.await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match stored {
                    Ok(_) => {
                        tracing::debug!(saga_id = %cmd.saga_id, step = %cmd.step, attempt = cmd.attempt, "replied");
                        if let Err(e) = msg.ack().await {
                            metrics.failure(service, "ack_failed");
                            tracing::warn!(error = %e, "could not acknowledge a command; it will be redelivered");
                        }
                        metrics.handled(service, outcome_kind, &in_flight);
                    }
                    Err(e) => {
                        metrics.failure(service, "reply_not_stored");
                        tracing::warn!(saga_id = %cmd.saga_id, error = %e, "reply not stored; the command will be redelivered");
                        retry_later(dl, origin_ref, &msg, max_deliver, &format!("reply not stored: {e}")).await;
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
/// producer may publish them); a message that is not an event at all, or one `on_event` calls
/// poison, is dead-lettered. The event carries the correlation id of its message (its header)
/// when its body has none.
pub async fn serve_events<F, Fut>(
    js: jetstream::Context,
    subjects: Subjects,
    consumer: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
    on_event: F,
) where
    F: Fn(Event) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let stream = subjects.stream("EVENTS");
    let origin = format!("events-{consumer}");
    let dead_letters = DeadLetters::new(js.clone(), subjects.clone());
    let (dl, origin_ref, on_event) = (&dead_letters, origin.as_str(), &on_event);
    consume(js.clone(), stream, consumer, concurrency, shutdown, move |msg, max_deliver| async move {
        let cid = correlation_id(&msg);
        let span = tracing::info_span!("event", correlation_id = %cid, consumer);
        async move {
            let value: serde_json::Value = match serde_json::from_slice(&msg.payload) {
                Ok(v) => v,
                Err(e) => {
                    dead_letter(dl, origin_ref, &msg, &format!("undecodable event: {e}")).await;
                        return;
                }
            };
            let event: Event = match serde_json::from_value::<Event>(value.clone()) {
                Ok(e) => Event { correlation_id: e.correlation_id.clone().or_else(|| Some(cid.to_string())), ..e },
                Err(e) if value.get("type").is_some_and(|t| t.is_string()) && value.get("id").is_some() => {
                    tracing::debug!(error = %e, "skipping an event this build does not handle");
                    let _ = msg.ack().await;
                    return;
                }
                Err(e) => {
                    dead_letter(dl, origin_ref, &msg, &format!("not an event: {e}")).await;
                        return;
                }
            };
            match on_event(event).await {
                Ok(()) => {
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, "could not acknowledge an event; it will be redelivered");
                    }
                }
                Err(Error::Poison(why)) => {
                    tracing::warn!(%why, "event set aside");
                    dead_letter(dl, origin_ref, &msg, &why).await;
                }
                Err(Error::Unavailable(e)) => {
                    tracing::warn!(error = %e, "event not handled; it will be redelivered");
                    retry_later(dl, origin_ref, &msg, max_deliver, &e.to_string()).await;
                }
            }
        }
        .instrument(span)
        .await
    })
    .await
}
