//! The orchestrator: the one process kind that owns saga state.
//!
//! It serves the HTTP API ([`http`]), applies inputs to sagas and commits their effects
//! ([`engine`]), publishes what was committed ([`relay`]), consumes the workers' replies
//! ([`replies`]) and fires durable timers ([`timers`]). Several orchestrators can run side by
//! side on one database: every write is guarded by the saga's version, timers are claimed with
//! `SKIP LOCKED`, and the reply consumer is shared.
//!
//! Must never: publish or acknowledge anything before the commit that produced it; decide what
//! a saga does (that is the `sagas` crate); write the services' tables (the workers do; the
//! catalogue is read through the Product service's API).

// Problem (an HTTP error) is large by nature and built once per failed request.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod admin_cli;
pub mod audit;
pub mod breakers;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod dead_letters;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod partitions;
pub mod privacy;
pub mod relay;
pub mod replies;
pub mod signals;
pub mod starts;
pub mod startup;
pub mod timers;
pub mod topology;
pub mod unpark;
