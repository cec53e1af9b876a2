//! The stateless step workers and the simulated third parties.
//!
//! Each worker pool is its own process ([`bus::serve_commands`] with one [`bus::Handler`]):
//! [`inventory`], [`payment`], [`shipping`], plus [`notification`], which reacts to domain
//! events. A worker keeps no state in memory: everything it knows is in its service's schema,
//! so any number of processes can serve one pool and any of them can die at any time. Before
//! any effect, a real worker checks that the command's saga is an order and that the command
//! matches it ([`orders`]); a command that does not is dead-lettered and does nothing.
//!
//! Must never: write another service's schema or the orchestrator's tables (the orders read
//! model, `orders.orders`, is read, by saga id); act on a command whose saga is not an order or that does
//! not match it; acknowledge a command before its reply is stored; repeat an effect for a
//! `(saga, step)` it already answered.

pub mod batch;
pub mod bus;
pub mod carrier_reports;
pub mod clients;
pub mod config;
pub mod health;
pub mod inventory;
pub mod noop;
pub mod notification;
pub mod order;
pub mod orders;
pub mod payment;
pub mod product;
pub mod run;
pub mod shipping;
pub mod simulator;
pub mod thirdparty;
