//! The saga definitions, pure and deterministic, and the wire contract of the system.
//!
//! This crate decides; the orchestrator does. A saga is a statig state machine: an [`api::Input`]
//! goes in with the current time, plain-data [`api::Effect`]s come out (commands to dispatch,
//! timers to set or cancel, domain events to emit) and the new [`api::Status`] says whether it
//! ended. Nothing here performs IO, reads the clock or draws random numbers, so the event log of
//! a saga replayed through its machine always gives the same snapshot.
//!
//! Must never: depend on tokio, sqlx or async-nats; call `Utc::now()`; keep global state.
//!
//! - [`wire`]: ids, commands, replies, domain events, subjects: what crosses a process boundary.
//! - [`api`]: the traits and types the engine drives a saga through.
//! - [`stepwise`]: the statig machine of a saga made of steps with compensations.
//! - [`checkout`]: the checkout saga.
//! - [`policy`]: retry policies (attempts, deadlines, backoff).

pub mod api;
pub mod checkout;
pub mod policy;
pub mod stepwise;
pub mod wire;

/// Every saga type the engine knows. A new type is added here and nowhere in the engine.
pub fn types() -> Vec<&'static dyn api::SagaType> {
    vec![&checkout::TYPE]
}
