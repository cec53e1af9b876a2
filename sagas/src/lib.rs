//! The saga definitions, pure and deterministic, and the wire contract of the system.
//!
//! This crate decides; the orchestrator does. A saga is a statig state machine: an [`api::Input`]
//! goes in with the current time, plain-data [`api::Effect`]s come out (commands to dispatch,
//! timers to set or cancel, domain events to emit, the health of a step) and the new
//! [`api::Status`] says whether it ended. Nothing here performs IO, reads the clock or draws
//! random numbers, so the event log of a saga replayed through its machine always gives the
//! same snapshot.
//!
//! Must never: depend on tokio, sqlx or async-nats; call `Utc::now()`, `Instant::now()` or
//! `Uuid::now_v7()`; draw random numbers; keep global state. (`clippy.toml` refuses the clock
//! and random ids, and `deploy/test` checks the crate alone, where neither is even compiled in.)
//!
//! - [`wire`]: the platform's envelopes (commands, replies, events, signals), ids, subjects.
//! - [`api`]: the traits and types the engine drives a saga through, and the [`api::Registry`].
//! - [`stepwise`]: the statig machine of a saga made of steps with compensations and signals.
//! - [`policy`]: retry policies (attempts, deadlines, backoff).
//! - [`shop`]: the shop's vocabulary and its services' contracts.
//! - [`checkout`]: the checkout saga.
//! - [`fulfilment`]: the fulfilment saga, from a confirmed order to its delivery.
//! - [`events`]: the shop's domain events as typed structs, and the JSON Schemas of their
//!   messages.

pub mod api;
pub mod checkout;
pub mod events;
pub mod fulfilment;
pub mod policy;
pub mod shop;
pub mod stepwise;
pub mod wire;

/// The shop's saga types: what the shop's orchestrator registers.
pub fn shop_types() -> api::Registry {
    api::Registry::new()
        .with(&checkout::TYPE)
        .with(&fulfilment::TYPE)
}
