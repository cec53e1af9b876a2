//! The consumer of the events stream for the saga types: it starts, for each event a registered
//! saga type is triggered by ([`sagas::api::SagaType::triggers`]), the saga the type makes of
//! it, and it delivers, as a signal, each event a type listens to
//! ([`sagas::api::SagaType::signal_triggers`]: a carrier's `ShipmentDispatched` for the
//! fulfilment of its order) to the saga of that type for the event's subject.
//!
//! A start is idempotent per type and key (the key the type derives from the event, e.g. the
//! order id): a redelivered or duplicated event finds the saga it started and starts no second
//! one. A signal's id is derived from the event's, so a redelivered event is applied once.
//! Events that concern no saga are acknowledged and skipped; an event that cannot be read is
//! dead-lettered; one whose start or signal fails for now comes back later.

use async_nats::jetstream;
use runtime::consume::{self, DeadLetters};
use sagas::api::{Input, Registry};
use sagas::wire::{Event, SignalTarget, consumers, headers};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::{self, Applied, Engine, Idempotency, NewSaga, Origin};
use crate::metrics::Metrics;
use crate::topology::{Topology, streams};

const ORIGIN: &str = "starts";

pub struct StartConsumer {
    engine: Engine,
    pool: sqlx::PgPool,
    /// Per type, the configured overrides of its policies (`sagas.policies`).
    policies: std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, sagas::policy::StepPolicyOverride>,
    >,
    registry: Arc<Registry>,
    js: jetstream::Context,
    topology: Topology,
    dead_letters: DeadLetters,
    concurrency: usize,
    metrics: Metrics,
}

impl StartConsumer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Engine,
        pool: sqlx::PgPool,
        policies: std::collections::BTreeMap<
            String,
            std::collections::BTreeMap<String, sagas::policy::StepPolicyOverride>,
        >,
        registry: Arc<Registry>,
        js: jetstream::Context,
        topology: Topology,
        concurrency: usize,
        metrics: Metrics,
    ) -> Self {
        let dead_letters = DeadLetters::new(js.clone(), topology.subjects().clone());
        Self {
            engine,
            pool,
            policies,
            registry,
            js,
            topology,
            dead_letters,
            concurrency,
            metrics,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        if self
            .registry
            .types()
            .all(|t| t.triggers().is_empty() && t.signal_triggers().is_empty())
        {
            // No saga is started or signalled by events: the consumer is not read (it keeps
            // its place).
            return;
        }
        let stream = self.topology.stream_name(streams::EVENTS);
        let this = &self;
        consume::consume(
            self.js.clone(),
            stream,
            consumers::STARTS,
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
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(runtime::telemetry::new_correlation_id);
        let span = tracing::info_span!("start", correlation_id = %correlation_id);
        async move {
            let event: Event = match serde_json::from_slice(&msg.payload) {
                Ok(e) => e,
                Err(e) => {
                    if consume::dead_letter(&self.dead_letters, ORIGIN, &msg, &format!("not an event: {e}")).await {
                        self.metrics.dead_letter(ORIGIN);
                    }
                    return;
                }
            };
            // Why a type could not make a saga of the event, for the dead letter.
            let mut refused = Vec::new();
            for t in self.registry.triggered_by(&event.source, &event.name) {
                let Some(mut start) = t.start_on(&event) else { continue };
                // The configured overrides of the type's policies (validated at start-up), under
                // those the event itself asks for.
                if let Some(configured) = self.policies.get(t.name())
                    && let Some(request) = start.request.as_object_mut()
                {
                    let mut policies = serde_json::to_value(configured).expect("policies serialize");
                    if let (Some(all), Some(asked)) = (
                        policies.as_object_mut(),
                        request.get("policies").and_then(|p| p.as_object()),
                    ) {
                        all.extend(asked.clone());
                    }
                    request.insert("policies".into(), policies);
                }
                let request_hash = Sha256::digest(start.request.to_string()).to_vec();
                let new = NewSaga {
                    saga_type: t.name().to_owned(),
                    request: start.request,
                    correlation_id: correlation_id.clone(),
                    idempotency: Some(Idempotency {
                        scope: format!("event:{}", t.name()),
                        key: start.key,
                        request_hash,
                    }),
                    secrets: Vec::new(),
                };
                match self.engine.start(new).await {
                    Ok(started) => tracing::info!(saga_type = t.name(), event = %event.name, ?started, "saga started by an event"),
                    // The type cannot make a saga of this event: a defect of the type or of
                    // the event, not something a redelivery fixes.
                    Err(e @ engine::Error::InvalidStart(_)) => {
                        tracing::error!(saga_type = t.name(), event = %event.name, error = %e, "an event could not start its saga");
                        refused.push(format!("{}: {e}", t.name()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "saga not started; the event comes back");
                        return consume::retry_later(&self.dead_letters, ORIGIN, &msg, max_deliver, &e.to_string()).await;
                    }
                }
            }
            for t in self.registry.signalled_by(&event.source, &event.name) {
                let Some((subject, signal)) = t.signal_on(&event) else { continue };
                let target = SignalTarget::Subject { saga_type: t.name().to_owned(), subject };
                let saga = match crate::signals::resolve(&self.pool, &target).await {
                    Ok(Some(saga)) => saga,
                    Ok(None) => {
                        // Not every event of the kind is for a saga of the type.
                        tracing::debug!(saga_type = t.name(), event = %event.name, "an event for no saga");
                        continue;
                    }
                    Err(e) => {
                        return consume::retry_later(&self.dead_letters, ORIGIN, &msg, max_deliver, &e.to_string()).await;
                    }
                };
                let name = signal.name.clone();
                let signal = match crate::signals::route(&self.js, self.topology.subjects(), self.engine.ownership(), saga, signal, Some(&correlation_id)).await {
                    Ok(crate::signals::Routed::Here(signal)) => signal,
                    Ok(crate::signals::Routed::Forwarded) => {
                        tracing::debug!(saga_id = %saga, signal = %name, "an event's signal routed to its saga's partition");
                        continue;
                    }
                    Err(e) => {
                        return consume::retry_later(&self.dead_letters, ORIGIN, &msg, max_deliver, &format!("cannot route the signal to its partition: {e}")).await;
                    }
                };
                let origin = Origin { correlation_id: Some(correlation_id.clone()), ..Default::default() };
                match self.engine.apply(saga, Input::Signal(signal), origin).await {
                    Ok(Applied::Applied { .. }) => tracing::info!(saga_id = %saga, signal = %name, event = %event.name, "an event signalled its saga"),
                    Ok(Applied::Ignored(why)) => tracing::info!(saga_id = %saga, signal = %name, %why, "an event's signal was ignored"),
                    Ok(Applied::NotFound) => tracing::warn!(saga_id = %saga, "the saga of an event's signal is gone"),
                    Err(e @ engine::Error::Corrupt { .. }) => refused.push(format!("{}: {e}", t.name())),
                    Err(e) => {
                        tracing::warn!(saga_id = %saga, error = %e, "signal not applied; the event comes back");
                        return consume::retry_later(&self.dead_letters, ORIGIN, &msg, max_deliver, &e.to_string()).await;
                    }
                }
            }
            if !refused.is_empty() {
                // Set aside with the reason, for an operator to see (and replay once fixed); the
                // types that did start a saga are not started twice by a replay.
                let reason = format!("the event starts or signals no saga: {}", refused.join("; "));
                if consume::dead_letter(&self.dead_letters, ORIGIN, &msg, &reason).await {
                    self.metrics.dead_letter(ORIGIN);
                }
                return;
            }
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, "could not acknowledge an event; it comes back and starts nothing twice");
            }
        }
        .instrument(span)
        .await
    }
}
