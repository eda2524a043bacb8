//! The actors of DESIGN.md: one `Session` per WebSocket, one `Presence` per node, the `Committer`
//! that groups writes into few transactions, and the `DbExecutor` threads that alone touch the
//! database. They speak only through the messages in [`messages`].

pub mod committer;
pub mod db;
pub mod handoff;
pub mod messages;
pub mod node;
pub mod presence;
pub mod purger;
pub mod router;
pub mod session;
pub mod socket;
