//! Herald: a realtime notification server.
//!
//! Devices hold a WebSocket open; backend services post notifications over HTTP; Herald commits
//! each one, pushes it to the user's online devices, replays what a device missed when it
//! reconnects, and tracks acks. The modules, from the outside in:
//!
//! - [`config`]: settings from flags and `HERALD_*` variables.
//! - [`startup`]: builds a running node (migrations, actors, HTTP server) and exposes its port.
//! - [`http`]: the HTTP API — routes, authentication, one file per endpoint family.
//! - [`protocol`]: the WebSocket frames and close codes, and the client-frame decoder.
//! - [`actors`]: `Session` (one per WebSocket), `Presence` (one per node), `Committer` (group
//!   commit) and the `DbExecutor` threads — the only code that holds a database connection.
//! - [`db`]: backend selection, the pool, migrations and every SQL statement.
//! - [`domain`]: validated values (ids, names, TTLs), secrets and times.
//! - [`error`]: the API error type; [`stats`]: counters for `/v1/stats`.

pub mod actors;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod startup;
pub mod stats;
