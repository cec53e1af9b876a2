//! The reply consumers, on the shared consume loop ([`runtime::consume`]): one per partition
//! this orchestrator holds (`orchestrator-replies-p<N>`, the partition's inbox: the replies to
//! its sagas' commands and the signals routed to them, `crate::partitions`), and the shared
//! one every orchestrator pulls from, for replies to commands that name no partition. Each reply is fed to its saga through the
//! engine; the message is acknowledged only after the commit, so a crash before the commit
//! means a redelivery, and a redelivery after it is fenced off by the machine (it no longer
//! waits for that attempt).
//!
//! A reply that cannot be decoded, or names no saga we know, is a poison message: it goes to
//! the dead-letter subject with the reason, is acknowledged, and never stops the consumer. One
//! that cannot be applied now (PostgreSQL does not answer) comes back later, with the system's
//! one redelivery policy.

use async_nats::jetstream;
use runtime::consume::{self, DeadLetters};
use sagas::api::Input;
use sagas::wire::{ROUTED_SIGNAL, Reply, SignalMessage, SignalTarget, consumers, headers};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::{self, Applied, Engine, Origin};
use crate::metrics::Metrics;
use crate::topology::{Topology, streams};

/// The origin of the replies' dead letters (`<prefix>.dlq.replies`).
const ORIGIN: &str = "replies";

pub struct ReplyConsumer {
    engine: Engine,
    js: jetstream::Context,
    topology: Topology,
    dead_letters: DeadLetters,
    concurrency: usize,
    metrics: Metrics,
    /// The partition whose inbox this consumer pulls; `None`: the shared consumer.
    partition: Option<u32>,
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
            partition: None,
        }
    }

    /// The consumer of partition `p`'s inbox.
    pub fn for_partition(mut self, p: u32) -> Self {
        self.partition = Some(p);
        self
    }

    /// Pull and apply replies until `shutdown`; then stop pulling, hand back what was pulled
    /// but not started, and finish the replies in hand.
    pub async fn run(self, shutdown: CancellationToken) {
        let stream = self.topology.stream_name(streams::REPLIES);
        let this = &self;
        let name = match self.partition {
            Some(p) => consumers::partition(p),
            None => consumers::REPLIES.to_owned(),
        };
        consume::consume(
            self.js.clone(),
            stream,
            &name,
            self.concurrency,
            shutdown,
            |msg, max_deliver| async move {
                this.handle(msg, max_deliver).await;
            },
        )
        .await;
    }

    /// Apply one reply message and acknowledge it when that is safe.
    pub async fn handle(&self, msg: jetstream::Message, max_deliver: i64) -> Handled {
        let correlation_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::CORRELATION_ID))
            .map(|v| v.as_str().to_owned());
        let span = tracing::info_span!(
            "reply",
            correlation_id = correlation_id.as_deref().unwrap_or("")
        );
        runtime::telemetry::join_traceparent(
            &span,
            msg.headers
                .as_ref()
                .and_then(|h| h.get(runtime::telemetry::TRACEPARENT))
                .map(|v| v.as_str()),
        );
        async move {
            let routed_signal = msg.subject.as_str().rsplit('.').next() == Some(ROUTED_SIGNAL);
            let (saga, input) = if routed_signal {
                match serde_json::from_slice::<SignalMessage>(&msg.payload) {
                    Ok(SignalMessage { target: SignalTarget::Saga { saga_id }, signal, .. }) => {
                        (saga_id, Input::Signal(signal))
                    }
                    Ok(_) => return self.dead_letter(&msg, "a routed signal names no saga id").await,
                    Err(e) => return self.dead_letter(&msg, &format!("undecodable routed signal: {e}")).await,
                }
            } else {
                match serde_json::from_slice::<Reply>(&msg.payload) {
                    Ok(reply) => (reply.saga_id, Input::Reply(reply)),
                    Err(e) => return self.dead_letter(&msg, &format!("undecodable reply: {e}")).await,
                }
            };
            let origin = Origin {
                correlation_id: correlation_id.clone(),
                ..Default::default()
            };
            let handled = match self.engine.apply(saga, input, origin).await {
                Ok(Applied::Applied { .. }) => Handled::Applied,
                Ok(Applied::Ignored(_)) => Handled::Ignored,
                Ok(Applied::NotFound) => {
                    return self
                        .dead_letter(&msg, &format!("reply for unknown saga {saga}"))
                        .await;
                }
                Err(e @ engine::Error::Corrupt { .. }) => {
                    return self.dead_letter(&msg, &e.to_string()).await;
                }
                Err(e) => {
                    tracing::warn!(saga_id = %saga, error = %e, "reply not applied; it will be redelivered");
                    // On its last allowed delivery it is set aside rather than dropped.
                    consume::retry_later(
                        &self.dead_letters,
                        ORIGIN,
                        &msg,
                        max_deliver,
                        &e.to_string(),
                    )
                    .await;
                    return Handled::Retry;
                }
            };
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, "could not acknowledge a reply; it will be redelivered and fenced off");
            }
            handled
        }
        .instrument(span)
        .await
    }

    async fn dead_letter(&self, msg: &jetstream::Message, reason: &str) -> Handled {
        if consume::dead_letter(&self.dead_letters, ORIGIN, msg, reason).await {
            self.metrics.dead_letter(ORIGIN);
            Handled::DeadLettered
        } else {
            Handled::Retry
        }
    }
}
