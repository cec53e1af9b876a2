//! The Product service of the brief: the Product and Category aggregates ([`model`], pure),
//! their repositories and unit of work ([`repo`]), the service's REST API ([`api`], worker
//! `product`) and the seeding of a catalogue through the repositories ([`seed`]).

pub mod api;
pub mod model;
pub mod repo;
pub mod seed;
