//! The signal consumer: signals that services publish on `<prefix>.signals` (JetStream), for a
//! saga named by its id, or by its type and the business entity it runs for (an order id) when
//! the sender does not know the saga. Each is fed to its saga through the engine and
//! acknowledged after the commit; the saga's machine applies it, buffers it, records and
//! ignores it, or ignores a signal id it saw before. A signal that cannot be read, or that names
//! no saga, is dead-lettered with the reason; one that cannot be applied now comes back later.
//! (Clients send signals over HTTP: `POST /sagas/{id}/signals/{name}`.)

use async_nats::jetstream;
use runtime::consume::{self, DeadLetters};
use sagas::api::Input;
use sagas::wire::{SagaId, Signal, SignalMessage, SignalTarget, Subjects, consumers, headers};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::{self, Applied, Engine, Origin};
use crate::http::input;
use crate::metrics::Metrics;
use crate::partitions::Ownership;
use crate::topology::{Topology, streams};

const ORIGIN: &str = "signals";

pub struct SignalConsumer {
    engine: Engine,
    pool: PgPool,
    js: jetstream::Context,
    topology: Topology,
    dead_letters: DeadLetters,
    concurrency: usize,
    metrics: Metrics,
}

/// The saga a signal is for: by its id, or the newest saga of a type for a subject.
pub async fn resolve(pool: &PgPool, target: &SignalTarget) -> Result<Option<SagaId>, sqlx::Error> {
    match target {
        SignalTarget::Saga { saga_id } => Ok(Some(*saga_id)),
        SignalTarget::Subject { saga_type, subject } => {
            let id = sqlx::query_scalar!(
                "SELECT id FROM orchestrator.sagas WHERE saga_type = $1 AND subject = $2
                  ORDER BY id DESC LIMIT 1",
                saga_type,
                subject,
            )
            .fetch_optional(pool)
            .await?;
            Ok(id.map(SagaId::from_uuid))
        }
    }
}

/// Where a signal for `saga` went.
pub enum Routed {
    /// This process holds the saga's partition: apply it here.
    Here(Signal),
    /// Published to the inbox of the saga's partition, for its owner.
    Forwarded,
}

/// Route a signal to the orchestrator that holds its saga's partition: kept here when that is
/// this process, else published to the partition's inbox (`<prefix>.reply.p<N>._signal`, with
/// the signal's id as its `Nats-Msg-Id`), where its owner, or whoever takes the partition next,
/// applies it. So the owner's copy of the saga stays the only one written. `Err`: the inbox
/// did not take it (JetStream down or leaderless); the caller hands its message back.
pub async fn route(
    js: &jetstream::Context,
    subjects: &Subjects,
    ownership: &Ownership,
    saga: SagaId,
    signal: Signal,
    correlation_id: Option<&str>,
) -> Result<Routed, String> {
    if ownership.owns(saga) {
        return Ok(Routed::Here(signal));
    }
    let subject = subjects.partition_signal(ownership.partition_of(saga));
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        headers::MSG_ID,
        format!("signal:{saga}:{}", signal.id).as_str(),
    );
    if let Some(c) = correlation_id {
        h.insert(headers::CORRELATION_ID, c);
    }
    let message = SignalMessage {
        v: 1,
        target: SignalTarget::Saga { saga_id: saga },
        signal,
    };
    let payload = serde_json::to_vec(&message).expect("signals serialize");
    let ack = js
        .publish_with_headers(subject, h, payload.into())
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map_err(|e| e.to_string())?;
    Ok(Routed::Forwarded)
}

impl SignalConsumer {
    pub fn new(
        engine: Engine,
        pool: PgPool,
        js: jetstream::Context,
        topology: Topology,
        concurrency: usize,
        metrics: Metrics,
    ) -> Self {
        let dead_letters = DeadLetters::new(js.clone(), topology.subjects().clone());
        Self {
            engine,
            pool,
            js,
            topology,
            dead_letters,
            concurrency,
            metrics,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let stream = self.topology.stream_name(streams::SIGNALS);
        let this = &self;
        consume::consume(
            self.js.clone(),
            stream,
            consumers::SIGNALS,
            self.concurrency,
            shutdown,
            |msg, max_deliver| async move { this.handle(msg, max_deliver).await },
        )
        .await;
    }

    async fn handle(&self, msg: jetstream::Message, max_deliver: i64) {
        let correlation_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::CORRELATION_ID))
            .map(|v| v.as_str().to_owned());
        let span = tracing::info_span!(
            "signal",
            correlation_id = correlation_id.as_deref().unwrap_or("")
        );
        async move {
            let message: SignalMessage = match serde_json::from_slice(&msg.payload) {
                Ok(m) => m,
                Err(e) => return self.dead_letter(&msg, &format!("undecodable signal: {e}")).await,
            };
            if let Err(why) = input::signal_name(&message.signal.name)
                .and_then(|()| input::json_texts(&message.signal.payload))
            {
                return self.dead_letter(&msg, &format!("invalid signal: {why}")).await;
            }
            let saga = match resolve(&self.pool, &message.target).await {
                Ok(Some(saga)) => saga,
                Ok(None) => {
                    return self
                        .dead_letter(&msg, &format!("signal {} for no saga ({:?})", message.signal.name, message.target))
                        .await;
                }
                Err(e) => {
                    return consume::retry_later(&self.dead_letters, ORIGIN, &msg, max_deliver, &e.to_string()).await;
                }
            };
            let signal = match route(&self.js, self.topology.subjects(), self.engine.ownership(), saga, message.signal, correlation_id.as_deref()).await {
                Ok(Routed::Here(signal)) => signal,
                Ok(Routed::Forwarded) => {
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, "could not acknowledge a routed signal; it comes again and is told apart by its id");
                    }
                    return;
                }
                Err(e) => {
                    return consume::retry_later(&self.dead_letters, ORIGIN, &msg, max_deliver, &format!("cannot route the signal to its partition: {e}")).await;
                }
            };
            let origin = Origin {
                correlation_id,
                ..Default::default()
            };
            match self.engine.apply(saga, Input::Signal(signal), origin).await {
                Ok(Applied::Applied { .. } | Applied::Ignored(_)) => {
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, "could not acknowledge a signal; it comes again and is told apart by its id");
                    }
                }
                Ok(Applied::NotFound) => {
                    self.dead_letter(&msg, &format!("signal for unknown saga {saga}")).await
                }
                Err(e @ engine::Error::Corrupt { .. }) => self.dead_letter(&msg, &e.to_string()).await,
                Err(e) => {
                    tracing::warn!(saga_id = %saga, error = %e, "signal not applied; it will be redelivered");
                    consume::retry_later(&self.dead_letters, ORIGIN, &msg, max_deliver, &e.to_string()).await
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn dead_letter(&self, msg: &jetstream::Message, reason: &str) {
        if consume::dead_letter(&self.dead_letters, ORIGIN, msg, reason).await {
            self.metrics.dead_letter(ORIGIN);
        }
    }
}
