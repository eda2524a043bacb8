//! Herald's integration suite: one binary, a file per feature. Every test starts a real node on
//! a random port with its own database and drives it with real HTTP and WebSocket clients, once
//! on SQLite and once on PostgreSQL (`writes.rs` alone drives the database layer directly: the
//! writer's batch statements).

mod helpers;

mod authz;
mod cli;
mod cluster;
mod crash;
mod delivery;
mod hostile;
mod http_api;
mod invariants;
mod load;
mod metrics;
mod nodes;
mod openapi;
mod operations;
mod outage;
mod process;
mod protocol;
mod regression;
mod sessions;
mod writes;
