//! The Product service of the brief: the Product and Category aggregates ([`model`], pure),
//! their repositories and unit of work ([`repo`]) and the service's REST API ([`api`]). The
//! inventory worker serves the API beside the saga's `reserve_stock` step.

pub mod api;
pub mod model;
pub mod repo;
