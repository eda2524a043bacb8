//! Every message between Herald's actors, in one place. Each names its sender and receiver.

use std::collections::HashMap;
use std::time::Instant;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::oneshot;

use super::session::Session;
use crate::db::batch::{PostAnswer, PostInput, PostRejection};

/// A notification ready for sockets: its frame is serialized once and shared by every session.
#[derive(Clone, Debug)]
pub struct Outbound {
    /// Creation order; a session never sends a lower `seq` after a higher one.
    pub seq: i64,
    /// Milliseconds since the epoch after which it is not sent.
    pub expires_at: i64,
    /// The whole `notification` text frame.
    pub frame: ByteString,
    /// When its transaction committed, for the delivery-latency histogram.
    pub committed_at: std::time::Instant,
}

/// Presence → Session: write this notification to the socket.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver(pub Outbound);

/// Presence → Session: close with this code (replaced, revoked, shutting down).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseSession {
    pub code: u16,
    pub reason: &'static str,
}

/// Session → Presence: this session now serves this device (replacing any older session).
/// Answers false, registering nothing, if the user already has `max_per_user` other devices
/// online (0: no limit).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Register {
    pub session_id: String,
    pub device_id: String,
    pub user_id: String,
    pub name: String,
    pub connected_at: i64,
    pub addr: Addr<Session>,
    pub max_per_user: usize,
    /// One node of several: answered once the session's presence row is committed (Presence
    /// hands the row to the Committer, so rows are written in registration order).
    pub row_written: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// HTTP → Presence: whether a new session of this device would stay within the user's limit of
/// `max_per_user` live sessions (checked before the upgrade, and again at registration).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct CanConnect {
    pub user_id: String,
    pub device_id: String,
    pub max_per_user: usize,
}

/// Session → Presence: this session has ended. Ignored if a newer session holds the device.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub session_id: String,
    pub device_id: String,
    /// One node of several: answered once the session's presence row is gone (at once if a
    /// newer session, a revocation or a shutdown has taken the row already).
    pub row_gone: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// Startup → Presence: the Committer that writes the cluster's presence rows.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetCommitter(pub Addr<super::committer::Committer>);

/// Committer → Presence: notifications just committed, in creation order, with their targets.
/// Answers how many live sessions each one was handed to.
#[derive(Message)]
#[rtype(result = "Vec<u32>")]
pub struct Publish {
    pub items: Vec<(Outbound, Vec<String>)>,
}

/// HTTP → Presence: the device was revoked; close its session with 4001.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Revoke {
    pub device_id: String,
}

/// One online device as presence reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OnlineDevice {
    pub device_id: String,
    pub user_id: String,
    pub name: String,
    #[serde(skip)]
    pub connected_at_ms: i64,
    pub connected_at: String,
}

/// One page of the presence list.
#[derive(Debug, serde::Serialize)]
pub struct PresencePage {
    pub online_devices: usize,
    pub online_users: usize,
    pub devices: Vec<OnlineDevice>,
    pub next: Option<String>,
}

/// HTTP → Presence: who is online, by device id, after a cursor.
#[derive(Message)]
#[rtype(result = "Result<PresencePage, super::db::JobError>")]
pub struct ListPresence {
    pub user_id: Option<String>,
    pub after: Option<String>,
    pub limit: usize,
}

/// HTTP → Presence: which of these devices are online, and since when (ms).
#[derive(Message)]
#[rtype(result = "Result<HashMap<String, i64>, super::db::JobError>")]
pub struct OnlineSince {
    pub device_ids: Vec<String>,
}

/// HTTP → Presence: how many sessions are open.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CountSessions;

/// HTTP → Committer: commit this post; the answer comes on `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubmitPost {
    pub post: PostInput,
    /// Not started after this instant.
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<PostAnswer, PostRejection>>,
}

/// Session → Committer: the device acked these notification ids.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordAck {
    pub device_id: String,
    pub ids: Vec<String>,
}

/// Session → Committer: these notifications were written to the device's socket.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordDelivered {
    pub device_id: String,
    pub seqs: Vec<i64>,
}

/// Session → Committer: the device was seen (connect or disconnect) at this time.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordSeen {
    pub device_id: String,
    pub at: i64,
}

/// Shutdown → Presence: close every session with 1001 and forget them all.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAll;

/// Shutdown → Committer: is everything gathered written? (If not, deferred work is written now.)
#[derive(Message)]
#[rtype(result = "bool")]
pub struct IsIdle;

/// Session → Committer: answer once everything already gathered (this device's acks from an
/// earlier session, say) is written, so a replay read after it sees them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AfterWrites {
    pub reply: oneshot::Sender<()>,
}

/// Session → Committer: a presence change for the cluster's presence table (ignored on a single
/// node). `written`, if given, is answered once the change is committed (true) or failed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PresenceUpdate {
    pub change: crate::db::cluster::PresenceChange,
    pub written: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// Router → Presence: the session `session_id` of `device_id` was replaced on another node:
/// close it with 4002 if it is still this device's session here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Kick {
    pub device_id: String,
    pub session_id: String,
}

/// Router → Presence → every session: a signal may have been missed; read anything committed
/// after the last notification sent from the database.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct CatchUp;

/// NodeKeeper → Presence: the cluster lost this node's presence (its lease lapsed); write every
/// local session's presence row again through this Committer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reassert {
    pub committer: Addr<super::committer::Committer>,
}
