//! The shared runtime of the system's processes: what the orchestrator and every worker do the
//! same way, written once.
//!
//! - [`config`]: layered settings (defaults, a file, `SAGA_*` variables, the conventional
//!   `DATABASE_URL`/`NATS_URL`), the sections every process has, range checks.
//! - [`db`]: connecting to PostgreSQL with retry and applying the migrations;
//!   [`maintenance`]: vacuuming and analyzing a process's own tables by autovacuum's rules.
//! - [`nats`]: connecting to NATS with retry.
//! - [`consume`]: the JetStream pull-and-acknowledge loop (bounded concurrency, hand-back on
//!   stop), the one redelivery policy, and dead letters.
//! - [`outbox`]: the services' transactional outbox of domain events, and its relay.
//! - [`telemetry`]: logging; [`shutdown`]: stopping on SIGTERM or Ctrl-C.
//!
//! Must never: decide what a saga does (that is `sagas`), or know a particular service.

pub mod breaker;
pub mod config;
pub mod consume;
pub mod db;
pub mod maintenance;
pub mod nats;
pub mod outbox;
pub mod problem;
pub mod process;
pub mod shutdown;
pub mod telemetry;
pub mod text;
