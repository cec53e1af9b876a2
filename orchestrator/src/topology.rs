//! The JetStream streams and durable consumers of a deployment: all their settings are here and
//! nowhere else. The orchestrator declares them at start-up (idempotently); workers bind to
//! their consumer by name ([`sagas::wire::consumers`]).
//!
//! JetStream is treated as a transport that may lose, repeat or reorder messages: PostgreSQL is
//! the source of truth, the outbox republishes what was not acknowledged, replies are fenced by
//! the machine, and workers are idempotent per step. Streams still use file storage so that a
//! NATS restart loses nothing it had acknowledged (modulo its fsync policy).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use sagas::wire::{Subjects, consumers};

/// Roles of the streams, used in their names (`<PREFIX>_<ROLE>`).
pub mod streams {
    pub const COMMANDS: &str = "COMMANDS";
    pub const REPLIES: &str = "REPLIES";
    pub const EVENTS: &str = "EVENTS";
    pub const DEAD_LETTERS: &str = "DEAD_LETTERS";
    pub const SIGNALS: &str = "SIGNALS";
}

/// JetStream drops a repeated `Nats-Msg-Id` within this window: a command republished by the
/// relay after a crash or a lost publish acknowledgement is stored once. The relay republishes
/// within seconds, so half a minute covers it; a republish later than that (an orchestrator
/// down for longer) reaches the worker, whose idempotency per `(saga, step)` answers it. The
/// window costs nats-server memory per message id: two minutes at 670 sagas/s held 560,000.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(30);
const DAY: Duration = Duration::from_secs(86_400);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot declare stream {name}: {source}")]
    Stream {
        name: String,
        source: async_nats::Error,
    },
    #[error("cannot declare consumer {name} on {stream}: {source}")]
    Consumer {
        stream: String,
        name: String,
        source: jetstream::stream::ConsumerError,
    },
}

#[derive(Debug, Clone)]
pub struct Topology {
    subjects: Subjects,
    replicas: usize,
    reply_ack_wait: Duration,
    reply_max_deliver: i64,
    /// The worker pools of the registered saga types: a command consumer each.
    services: Vec<&'static str>,
    /// Whether a registered saga type is started by events (then their consumer is declared).
    started_by_events: bool,
    /// Sagas' partitions: an inbox consumer each (`crate::partitions`).
    partitions: u32,
}

impl Topology {
    pub fn new(
        subjects: Subjects,
        replicas: usize,
        reply_ack_wait: Duration,
        reply_max_deliver: i64,
        registry: &sagas::api::Registry,
        partitions: u32,
    ) -> Self {
        Self {
            subjects,
            replicas,
            reply_ack_wait,
            reply_max_deliver,
            services: registry.services(),
            started_by_events: registry
                .types()
                .any(|t| !t.triggers().is_empty() || !t.signal_triggers().is_empty()),
            partitions,
        }
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// How often a reply is delivered at most (`replies.max_deliver`).
    pub fn reply_max_deliver(&self) -> i64 {
        self.reply_max_deliver
    }

    pub fn stream_name(&self, role: &str) -> String {
        self.subjects.stream(role)
    }

    fn stream(
        &self,
        role: &str,
        subjects: String,
        retention: stream::RetentionPolicy,
        max_age: Duration,
    ) -> stream::Config {
        stream::Config {
            name: self.stream_name(role),
            subjects: vec![subjects],
            retention,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: DUPLICATE_WINDOW,
            max_age,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        }
    }

    /// Every stream of the deployment.
    pub fn streams(&self) -> Vec<stream::Config> {
        use stream::RetentionPolicy::{Limits, WorkQueue};
        let s = &self.subjects;
        vec![
            // Commands to the worker pools: a message is gone once its pool acknowledged it.
            self.stream(streams::COMMANDS, s.commands(), WorkQueue, 7 * DAY),
            // Replies to the orchestrators.
            self.stream(streams::REPLIES, s.replies(), WorkQueue, 7 * DAY),
            // Domain events: kept for every subscriber, for a week.
            self.stream(streams::EVENTS, s.events(), Limits, 7 * DAY),
            // Messages that could not be processed, with the reason, for an operator.
            self.stream(streams::DEAD_LETTERS, s.dead_letters(), Limits, 30 * DAY),
            // Signals for sagas, from services: gone once an orchestrator applied them.
            self.stream(streams::SIGNALS, s.signals(), WorkQueue, 7 * DAY),
        ]
    }

    fn consumer(
        &self,
        name: &str,
        filter: String,
        ack_wait: Duration,
        max_deliver: i64,
    ) -> pull::Config {
        // Redeliveries of an unacknowledged message back off: ack_wait, then twice, four and
        // eight times as long. (A message a consumer rejects on purpose is naked with its own
        // delay, or dead-lettered.)
        let backoff = (0..4).map(|i| ack_wait * (1 << i)).collect();
        pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: filter,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait,
            backoff,
            max_deliver,
            max_ack_pending: 20_000,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        }
    }

    /// Every durable consumer, with the stream role it reads.
    pub fn consumers(&self) -> Vec<(&'static str, pull::Config)> {
        let s = &self.subjects;
        let mut all = Vec::new();
        for service in &self.services {
            all.push((
                streams::COMMANDS,
                self.consumer(
                    consumers::commands(service),
                    s.command(service),
                    Duration::from_secs(30),
                    50,
                ),
            ));
        }
        // Events that start or signal sagas (only the orchestrator knows which: its registered
        // types' triggers), read from the same stream as every subscriber.
        if self.started_by_events {
            all.push((
                streams::EVENTS,
                self.consumer(
                    consumers::STARTS,
                    s.events(),
                    self.reply_ack_wait,
                    self.reply_max_deliver,
                ),
            ));
        }
        all.push((
            streams::SIGNALS,
            self.consumer(
                consumers::SIGNALS,
                s.signals(),
                self.reply_ack_wait,
                self.reply_max_deliver,
            ),
        ));
        // Each partition's inbox (its replies and routed signals), pulled by its owner only;
        // and the replies to commands that name no partition (sent before partitions), by any.
        for p in 0..self.partitions {
            all.push((
                streams::REPLIES,
                self.consumer(
                    &consumers::partition(p),
                    s.partition_inbox(p),
                    self.reply_ack_wait,
                    self.reply_max_deliver,
                ),
            ));
        }
        all.push((
            streams::REPLIES,
            self.consumer(
                consumers::REPLIES,
                s.shared_replies(),
                self.reply_ack_wait,
                self.reply_max_deliver,
            ),
        ));
        all.push((
            streams::EVENTS,
            self.consumer(
                consumers::NOTIFICATION_EVENTS,
                s.events(),
                Duration::from_secs(30),
                50,
            ),
        ));
        all.push((
            streams::EVENTS,
            self.consumer(
                consumers::ORDER_EVENTS,
                s.events(),
                Duration::from_secs(30),
                50,
            ),
        ));
        all
    }

    /// Declare every stream and consumer. Safe to run on every start and from several
    /// orchestrators at once.
    pub async fn declare(&self, js: &jetstream::Context) -> Result<(), Error> {
        for config in self.streams() {
            let name = config.name.clone();
            js.create_or_update_stream(config)
                .await
                .map_err(|e| Error::Stream {
                    name,
                    source: e.into(),
                })?;
        }
        for (role, name) in consumers::RETIRED {
            if let Ok(stream) = js.get_stream(self.stream_name(role)).await
                && stream.delete_consumer(name).await.is_ok()
            {
                tracing::info!(consumer = name, "deleted a consumer nothing reads any more");
            }
        }
        for (role, config) in self.consumers() {
            let stream_name = self.stream_name(role);
            let stream = js
                .get_stream(&stream_name)
                .await
                .map_err(|e| Error::Stream {
                    name: stream_name.clone(),
                    source: e.into(),
                })?;
            let name = config.durable_name.clone().unwrap_or_default();
            if let Err(source) = stream.create_consumer(config).await {
                // An existing consumer whose settings differ is kept as it is (the server
                // refuses some changes); say so rather than fail the start.
                match stream.get_consumer::<pull::Config>(&name).await {
                    Ok(_) => tracing::warn!(consumer = %name, error = %source,
                        "consumer exists with other settings; keeping it (delete it to apply the new ones)"),
                    Err(_) => {
                        return Err(Error::Consumer {
                            stream: stream_name,
                            name,
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}
