//! The group-commit unit of work: many posts, acks, delivery marks and last-seen times written
//! in one transaction by the single writer thread (DESIGN.md, "Writes at speed").

use diesel::prelude::*;

use super::queries::{self, NewNotificationRow, NotificationRow};
use super::{write_tx, DbConn};

/// How long an `Idempotency-Key` is remembered.
pub const IDEMPOTENCY_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// A validated post, ready to be written.
#[derive(Clone, Debug)]
pub struct PostInput {
    /// The notification's id, chosen before the write.
    pub id: String,
    /// Who posted it: `admin` or a service key's id. Scopes idempotency keys and status reads.
    pub poster: String,
    pub idempotency_key: Option<String>,
    /// SHA-256 of the request body, so a key reused for a different request is refused.
    pub request_hash: Option<String>,
    /// Deduplicated user targets.
    pub user_ids: Vec<String>,
    /// Deduplicated device targets.
    pub device_ids: Vec<String>,
    /// The payload as JSON text.
    pub payload: String,
    pub ttl_ms: i64,
}

/// The `202` answer of a post.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PostAnswer {
    pub id: String,
    #[serde(skip)]
    pub created_at_ms: i64,
    #[serde(skip)]
    pub expires_at_ms: i64,
    pub created_at: String,
    pub expires_at: String,
    pub devices: usize,
    pub delivered_now: u32,
}

/// Why a post was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostRejection {
    /// These `device_ids` name no live device.
    UnknownDevices(Vec<String>),
    /// The idempotency key was used before for a different request.
    KeyReused,
    /// Too many posts are waiting; retry.
    Overloaded,
    /// The post could not be committed within its deadline; it may or may not have been.
    Timeout,
    /// The database is unavailable; nothing was committed.
    Unavailable,
    /// A bug; see the log.
    Internal,
}

/// What became of one post in a batch.
#[derive(Debug)]
pub enum PostOutcome {
    Created {
        seq: i64,
        created_at: i64,
        expires_at: i64,
        device_ids: Vec<String>,
    },
    /// An earlier post with the same idempotency key and the same request.
    Existing(NotificationRow),
    Rejected(PostRejection),
}

/// Everything gathered for one transaction.
#[derive(Debug, Default)]
pub struct WriteBatch {
    pub posts: Vec<PostInput>,
    /// `(device_id, notification ids)`.
    pub acks: Vec<(String, Vec<String>)>,
    /// `(device_id, seqs)` written to the device's socket.
    pub delivered: Vec<(String, Vec<i64>)>,
    /// `(device_id, ms)`.
    pub seen: Vec<(String, i64)>,
    /// `(seq, count)`: how many devices an idempotent post reached on the spot.
    pub delivered_now: Vec<(i64, i32)>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.posts.is_empty()
            && self.acks.is_empty()
            && self.delivered.is_empty()
            && self.seen.is_empty()
            && self.delivered_now.is_empty()
    }

    /// Acks, marks, last-seen times and counts carried (posts are counted by the caller).
    pub fn items(&self) -> usize {
        self.acks.len() + self.delivered.len() + self.seen.len() + self.delivered_now.len()
    }

    /// Rows this batch will touch, roughly; bounds the size of one transaction.
    pub fn weight(&self) -> usize {
        self.posts
            .iter()
            .map(|p| 1 + p.device_ids.len() + p.user_ids.len())
            .sum::<usize>()
            + self.acks.iter().map(|(_, ids)| ids.len()).sum::<usize>()
            + self.delivered.iter().map(|(_, s)| s.len()).sum::<usize>()
            + self.seen.len()
            + self.delivered_now.len()
    }
}

/// What one committed batch did.
#[derive(Debug, Default)]
pub struct BatchResult {
    /// One outcome per post, in the batch's order.
    pub posts: Vec<PostOutcome>,
    pub delivered: u64,
    pub acked: u64,
}

/// Writes the whole batch in one transaction, at time `now`.
pub fn commit(conn: &mut DbConn, batch: &WriteBatch, now: i64) -> QueryResult<BatchResult> {
    write_tx(conn, |c| {
        let mut result = BatchResult::default();
        for post in &batch.posts {
            result.posts.push(create(c, post, now)?);
        }
        result.delivered = queries::mark_delivered_all(c, &batch.delivered, now)? as u64;
        result.acked = queries::ack_all(c, &batch.acks, now)? as u64;
        queries::touch_last_seen_all(c, &batch.seen)?;
        for (seq, n) in &batch.delivered_now {
            queries::set_delivered_now(c, *seq, *n)?;
        }
        Ok(result)
    })
}

fn create(c: &mut DbConn, post: &PostInput, now: i64) -> QueryResult<PostOutcome> {
    if let Some(key) = &post.idempotency_key {
        if let Some(row) = queries::find_idempotent(c, &post.poster, key)? {
            if row.created_at > now - IDEMPOTENCY_WINDOW_MS {
                return Ok(if row.request_hash == post.request_hash {
                    PostOutcome::Existing(row)
                } else {
                    PostOutcome::Rejected(PostRejection::KeyReused)
                });
            }
            queries::forget_idempotency_key(c, row.seq)?;
        }
    }
    let mut targets = Vec::new();
    if !post.device_ids.is_empty() {
        let live = queries::live_device_ids(c, &post.device_ids)?;
        if live.len() != post.device_ids.len() {
            let unknown = post
                .device_ids
                .iter()
                .filter(|d| !live.contains(d))
                .cloned()
                .collect();
            return Ok(PostOutcome::Rejected(PostRejection::UnknownDevices(
                unknown,
            )));
        }
        targets = live;
    }
    if !post.user_ids.is_empty() {
        targets.extend(queries::device_ids_of_users(c, &post.user_ids)?);
    }
    targets.sort_unstable();
    targets.dedup();
    let expires_at = now + post.ttl_ms;
    let row = NewNotificationRow {
        id: &post.id,
        poster: &post.poster,
        created_at: now,
        expires_at,
        payload: &post.payload,
        idempotency_key: post.idempotency_key.as_deref(),
        request_hash: post.request_hash.as_deref(),
        device_count: targets.len() as i32,
    };
    let seq = queries::insert_notification(c, &row, &targets)?;
    Ok(PostOutcome::Created {
        seq,
        created_at: now,
        expires_at,
        device_ids: targets,
    })
}
