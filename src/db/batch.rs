//! The group-commit unit of work: many posts, acks, delivery marks and last-seen times written
//! in one transaction by the single writer thread (DESIGN.md, "Writes at speed").

use std::collections::{BTreeSet, HashMap, HashSet};

use diesel::prelude::*;

use super::cluster::{self, PresenceChange, Signal};
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
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NotificationAccepted)]
pub struct PostAnswer {
    pub id: String,
    #[serde(skip)]
    pub created_at_ms: i64,
    #[serde(skip)]
    pub expires_at_ms: i64,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
    /// Devices the notification is for.
    pub devices: usize,
    /// Of those, how many it was pushed to on the spot.
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
        /// Several nodes: how many of its devices were online anywhere in the cluster when it
        /// committed (each is pushed it by the node holding it).
        online_now: Option<u32>,
    },
    /// An earlier post with the same idempotency key and the same request.
    Existing(NotificationRow),
    Rejected(PostRejection),
}

/// Everything gathered for one transaction.
#[derive(Clone, Debug, Default)]
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
    /// Cluster-wide presence changes, in order (several nodes on PostgreSQL only).
    pub presence: Vec<PresenceChange>,
    /// Set when this node is one of several: who writes the batch, and its number.
    pub cluster: Option<ClusterTag>,
}

/// The writing node and the batch's number, for the signal that announces its notifications.
#[derive(Clone, Debug)]
pub struct ClusterTag {
    pub node: String,
    pub run: u64,
    pub batch: u64,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.posts.is_empty()
            && self.acks.is_empty()
            && self.delivered.is_empty()
            && self.seen.is_empty()
            && self.delivered_now.is_empty()
            && self.presence.is_empty()
    }

    /// Acks, marks, last-seen times and counts carried (posts are counted by the caller).
    pub fn items(&self) -> usize {
        self.acks.len()
            + self.delivered.len()
            + self.seen.len()
            + self.delivered_now.len()
            + self.presence.len()
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
            + self.presence.len()
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
        let mut created_at = now;
        if batch.cluster.is_some() && !batch.posts.is_empty() {
            // Commits that create notifications go one at a time across the cluster, so every
            // node sees `seq` order as commit order, and `created_at` follows it.
            cluster::lock_commits(c)?;
            created_at = cluster::creation_time(c)?;
        }
        let mut result = BatchResult {
            posts: create_all(c, &batch.posts, created_at)?,
            ..BatchResult::default()
        };
        if let Some(tag) = &batch.cluster {
            let seqs = result.posts.iter().filter_map(|p| match p {
                PostOutcome::Created { seq, .. } => Some(*seq),
                _ => None,
            });
            if let (Some(lo), Some(hi)) = (seqs.clone().min(), seqs.max()) {
                cluster::notify(
                    c,
                    &Signal::Posts {
                        node: tag.node.clone(),
                        run: tag.run,
                        batch: tag.batch,
                        lo,
                        hi,
                    },
                )?;
            }
            cluster::apply_presence(c, &tag.node, &batch.presence)?;
            count_online(c, &mut result.posts)?;
        }
        // Acks first: an ack also sets `delivered_at` when no mark was written yet, so a mark
        // gathered in the same batch as its ack finds nothing left to change (no row write).
        let acked = queries::ack_all(c, &batch.acks, now)?;
        let marked = queries::mark_delivered_all(c, &batch.delivered, now)?;
        result.acked = acked.acked as u64;
        result.delivered = (marked + acked.delivered) as u64;
        queries::touch_last_seen_all(c, &batch.seen)?;
        for (seq, n) in &batch.delivered_now {
            queries::set_delivered_now(c, *seq, *n)?;
        }
        Ok(result)
    })
}

/// Sets each created post's `online_now` from the cluster's presence, in one query.
fn count_online(c: &mut DbConn, posts: &mut [PostOutcome]) -> QueryResult<()> {
    let targets: Vec<String> = posts
        .iter()
        .filter_map(|p| match p {
            PostOutcome::Created { device_ids, .. } => Some(device_ids.iter().cloned()),
            _ => None,
        })
        .flatten()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if targets.is_empty() {
        return Ok(());
    }
    let online: HashSet<String> = cluster::online_since(c, &targets)?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for p in posts {
        if let PostOutcome::Created {
            device_ids,
            online_now,
            ..
        } = p
        {
            *online_now = Some(device_ids.iter().filter(|d| online.contains(*d)).count() as u32);
        }
    }
    Ok(())
}

/// Creates a batch's posts with a fixed number of statements however many posts there are
/// (plus one look-up per post that carries an idempotency key): the targets of all posts are
/// resolved in two queries, the notifications and their deliveries inserted together.
fn create_all(c: &mut DbConn, posts: &[PostInput], now: i64) -> QueryResult<Vec<PostOutcome>> {
    let wanted_devices: Vec<String> = posts
        .iter()
        .flat_map(|p| p.device_ids.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let live: HashSet<String> = if wanted_devices.is_empty() {
        HashSet::new()
    } else {
        queries::live_device_ids(c, &wanted_devices)?
            .into_iter()
            .collect()
    };
    let wanted_users: Vec<String> = posts
        .iter()
        .flat_map(|p| p.user_ids.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut by_user: HashMap<String, Vec<String>> = HashMap::new();
    if !wanted_users.is_empty() {
        for (user, device) in queries::devices_of_users(c, &wanted_users)? {
            by_user.entry(user).or_default().push(device);
        }
    }

    let mut outcomes: Vec<Option<PostOutcome>> = Vec::with_capacity(posts.len());
    let mut fresh: Vec<(usize, Vec<String>)> = Vec::new();
    for (i, post) in posts.iter().enumerate() {
        if let Some(outcome) = earlier_answer(c, post, now)? {
            outcomes.push(Some(outcome));
            continue;
        }
        let unknown: Vec<String> = post
            .device_ids
            .iter()
            .filter(|d| !live.contains(*d))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            outcomes.push(Some(PostOutcome::Rejected(PostRejection::UnknownDevices(
                unknown,
            ))));
            continue;
        }
        let mut targets = post.device_ids.clone();
        for user in &post.user_ids {
            targets.extend(by_user.get(user).into_iter().flatten().cloned());
        }
        targets.sort_unstable();
        targets.dedup();
        outcomes.push(None);
        fresh.push((i, targets));
    }

    let rows: Vec<NewNotificationRow<'_>> = fresh
        .iter()
        .map(|(i, targets)| {
            let post = &posts[*i];
            NewNotificationRow {
                id: &post.id,
                poster: &post.poster,
                created_at: now,
                expires_at: now + post.ttl_ms,
                payload: &post.payload,
                idempotency_key: post.idempotency_key.as_deref(),
                request_hash: post.request_hash.as_deref(),
                device_count: targets.len() as i32,
            }
        })
        .collect();
    let deliveries: Vec<(&str, &str)> = fresh
        .iter()
        .flat_map(|(i, targets)| {
            let id = posts[*i].id.as_str();
            targets.iter().map(move |d| (d.as_str(), id))
        })
        .collect();
    let seqs = queries::insert_posts(c, &rows, &deliveries)?;
    for ((i, targets), seq) in fresh.into_iter().zip(seqs) {
        outcomes[i] = Some(PostOutcome::Created {
            seq,
            created_at: now,
            expires_at: now + posts[i].ttl_ms,
            device_ids: targets,
            online_now: None,
        });
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every post has an outcome"))
        .collect())
}

/// The earlier answer to a post repeated with the same idempotency key within the window (or
/// its refusal, if the key was used for another request). A key past the window is freed.
fn earlier_answer(c: &mut DbConn, post: &PostInput, now: i64) -> QueryResult<Option<PostOutcome>> {
    let Some(key) = &post.idempotency_key else {
        return Ok(None);
    };
    let Some(row) = queries::find_idempotent(c, &post.poster, key)? else {
        return Ok(None);
    };
    if row.created_at > now - IDEMPOTENCY_WINDOW_MS {
        return Ok(Some(if row.request_hash == post.request_hash {
            PostOutcome::Existing(row)
        } else {
            PostOutcome::Rejected(PostRejection::KeyReused)
        }));
    }
    queries::forget_idempotency_key(c, row.seq)?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::queries::DeviceRow;
    use crate::db::Backend;

    fn post(id: &str, devices: &[&str]) -> PostInput {
        PostInput {
            id: id.into(),
            poster: "admin".into(),
            idempotency_key: None,
            request_hash: None,
            user_ids: Vec::new(),
            device_ids: devices.iter().map(|d| d.to_string()).collect(),
            payload: "{}".into(),
            ttl_ms: 60_000,
        }
    }

    fn seqs(r: &BatchResult) -> Vec<i64> {
        r.posts
            .iter()
            .map(|p| match p {
                PostOutcome::Created { seq, .. } => *seq,
                other => panic!("not created: {other:?}"),
            })
            .collect()
    }

    /// On SQLite the writer numbers a batch's posts itself: in the batch's order, each
    /// delivery under its own notification's seq, and never a seq used before — not even
    /// one whose notification is gone (purged).
    #[test]
    fn sqlite_seqs_follow_the_batch_and_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let backend =
            Backend::from_url(&format!("sqlite://{}", dir.path().join("t.db").display())).unwrap();
        backend.migrate().unwrap();
        let mut c = backend.connect().unwrap();
        for d in ["d1", "d2"] {
            queries::insert_device(
                &mut c,
                &DeviceRow {
                    id: d.into(),
                    user_id: "u".into(),
                    name: d.into(),
                    token_hash: format!("hash-{d}"),
                    created_at: 0,
                    revoked_at: None,
                    last_seen: None,
                },
            )
            .unwrap();
        }
        let batch = |posts| WriteBatch {
            posts,
            ..WriteBatch::default()
        };
        let first = commit(
            &mut c,
            &batch(vec![
                post("n1", &["d1"]),
                post("n2", &["d2"]),
                post("n3", &["d1", "d2"]),
            ]),
            1_000,
        )
        .unwrap();
        assert_eq!(seqs(&first), vec![1, 2, 3]);
        let devices_of = |c: &mut DbConn, seq| -> Vec<String> {
            let mut d: Vec<String> = queries::deliveries_of(c, seq)
                .unwrap()
                .into_iter()
                .map(|r| r.device_id)
                .collect();
            d.sort();
            d
        };
        assert_eq!(devices_of(&mut c, 1), ["d1"]);
        assert_eq!(devices_of(&mut c, 2), ["d2"]);
        assert_eq!(devices_of(&mut c, 3), ["d1", "d2"]);
        for (seq, id) in [(1, "n1"), (2, "n2"), (3, "n3")] {
            let n = queries::notification_by_id(&mut c, id).unwrap().unwrap();
            assert_eq!(n.seq, seq, "{id}");
        }

        // The newest notifications purged: their seqs stay used.
        queries::delete_notifications(&mut c, &[2, 3]).unwrap();
        let second = commit(&mut c, &batch(vec![post("n4", &["d2"])]), 2_000).unwrap();
        assert_eq!(seqs(&second), vec![4]);
        assert_eq!(devices_of(&mut c, 4), ["d2"]);
    }
}
