//! The Committer: gathers posts, acks, delivery marks and last-seen times and hands them to the
//! writer thread as whole batches — one transaction each (group commit, DESIGN.md invariant 5).
//!
//! While one batch is being written, everything that arrives waits for the next, so an idle node
//! commits at once and a busy one commits in large batches; batches start at least
//! `min_interval` (`HERALD_MIN_COMMIT_INTERVAL_US`) apart, so at moderate rates the posts of
//! that interval share one commit instead of paying one apiece. Acks,
//! delivery marks and last-seen times, which nobody waits on, wait up to `DEFER` to share a
//! post's commit rather than start one of their own. After a batch
//! commits, its new notifications go to the Presence actor in `seq` order (persist, then push:
//! invariant 4), and each post's `202` is answered once presence says how many sessions it reached.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::db::{Db, JobError};
use super::handoff::{Handoff, ToCommitter};
use super::messages::*;
use super::presence::Presence;
use super::router::{OwnBatch, Router};
use crate::db::batch::{
    self, BatchResult, ClusterTag, PostAnswer, PostOutcome, PostRejection, WriteBatch,
};
use crate::db::cluster::PresenceChange;
use crate::domain::{now_ms, rfc3339};
use crate::protocol::notification_frame;
use crate::stats::Counters;

/// Rows one transaction may touch before the rest waits for the next batch.
const MAX_BATCH_WEIGHT: usize = 20_000;
/// Posts that may wait for a batch before new ones are refused with `503`.
const MAX_WAITING_POSTS: usize = 20_000;
/// Posts waiting past which a batch starts without waiting out the commit interval.
const POSTS_SKIP_INTERVAL: usize = 2_000;
/// Acks, marks and last-seen updates kept for a retry when the database is away; past this the
/// oldest are dropped (they are only redelivered or shown a little stale, never lost as data).
const MAX_BACKLOG: usize = 200_000;
/// How long a batch may wait for the writer thread before it is given up unwritten. Once the
/// writer has taken it, the Committer waits for its outcome however long that takes: a batch
/// given up while it ran could still commit, and its notifications would then be pushed to no one.
/// (The connection's own timeouts bound a job; `/readyz` fails while one batch has been written
/// for longer than `http::ops::WRITER_STUCK`.)
const BATCH_DEADLINE: Duration = Duration::from_secs(10);
/// Pause before retrying after a failed batch: nothing is written before it ends.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long acks, delivery marks and last-seen times may wait for a post to ride along with
/// before they are written on their own.
const DEFER: Duration = Duration::from_millis(10);
/// Rows of such work past which it is written without waiting.
const DEFER_MAX_ROWS: usize = 2_000;

type Reply = oneshot::Sender<Result<PostAnswer, PostRejection>>;

struct WaitingPost {
    post: batch::PostInput,
    deadline: Instant,
    reply: Reply,
}

/// A post's caller while its batch is written; the post itself travels in the batch.
struct Waiter {
    reply: Reply,
    /// `(poster, idempotency key)`, if the post has a key.
    idem: Option<(String, String)>,
}

impl WaitingPost {
    /// Splits off the caller, so the post can move into the batch without a copy.
    fn split(self) -> (batch::PostInput, Waiter) {
        let idem = self
            .post
            .idempotency_key
            .clone()
            .map(|k| (self.post.poster.clone(), k));
        (
            self.post,
            Waiter {
                reply: self.reply,
                idem,
            },
        )
    }
}

/// Posts sharing one `(poster, idempotency key)` while the first is being answered.
enum Idem {
    /// The first is on its way; these replies wait for its answer.
    InFlight {
        request_hash: Option<String>,
        waiters: Vec<Reply>,
    },
    /// Answered; kept until the answer's `delivered_now` is stored, so repeats match it exactly.
    Answered {
        request_hash: Option<String>,
        answer: PostAnswer,
    },
}

pub struct Committer {
    db: Db,
    presence: Addr<Presence>,
    counters: Arc<Counters>,
    posts: Vec<WaitingPost>,
    next: WriteBatch,
    /// `next.weight()`, kept as work is gathered: it is asked for on every message.
    next_rows: usize,
    idem: HashMap<(String, String), Idem>,
    /// The idempotency entry each pending `delivered_now` write will release.
    idem_seqs: HashMap<i64, (String, String)>,
    /// Replies owed once the writes gathered before they were asked for are committed.
    barriers: Vec<oneshot::Sender<()>>,
    writing: bool,
    flush_queued: bool,
    /// When the earliest scheduled wake-up is due (the end of [`DEFER`] or of `min_interval`).
    wake_due: Option<Instant>,
    /// Shortest time between the starts of two batches while urgent work keeps coming.
    min_interval: Duration,
    /// When the last batch started.
    last_start: Option<Instant>,
    /// Since when deferred work has waited, so it waits [`DEFER`] in all, not per timer.
    deferred_since: Option<Instant>,
    /// After a failed batch, nothing is written before this (see [`RETRY_PAUSE`]).
    retry_at: Option<Instant>,
    /// Set when this node is one of several on PostgreSQL.
    cluster: Option<ClusterLink>,
    /// Sessions waiting for their presence row to be written (in `next`).
    online_waiters: Vec<oneshot::Sender<bool>>,
}

/// How the Committer takes part in a cluster: its batches carry the node's id and a number,
/// and their notifications go to the Router, which publishes them in the cluster's commit order.
pub struct ClusterLink {
    pub node: String,
    pub run: u64,
    pub router: Addr<Router>,
    pub batches: u64,
}

impl Actor for Committer {
    type Context = Context<Self>;
}

impl Committer {
    pub fn new(db: Db, presence: Addr<Presence>, counters: Arc<Counters>) -> Self {
        Committer {
            db,
            presence,
            counters,
            posts: Vec::new(),
            next: WriteBatch::default(),
            next_rows: 0,
            idem: HashMap::new(),
            idem_seqs: HashMap::new(),
            barriers: Vec::new(),
            writing: false,
            flush_queued: false,
            wake_due: None,
            min_interval: Duration::ZERO,
            last_start: None,
            deferred_since: None,
            retry_at: None,
            cluster: None,
            online_waiters: Vec::new(),
        }
    }

    /// Spaces the starts of batches at least `interval` apart while work keeps coming (see
    /// `HERALD_MIN_COMMIT_INTERVAL_US`).
    pub fn min_interval(mut self, interval: Duration) -> Self {
        self.min_interval = interval;
        self
    }

    /// Makes this Committer one node's of several.
    pub fn in_cluster(mut self, node: String, run: u64, router: Addr<Router>) -> Self {
        self.cluster = Some(ClusterLink {
            node,
            run,
            router,
            batches: 0,
        });
        self
    }

    /// Asks for a flush after the messages already in the mailbox, so they join this batch —
    /// as soon as `min_interval` has passed since the last batch started if anyone waits for it,
    /// else within [`DEFER`] (see [`Committer::urgent`]).
    fn wake(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.flush_queued {
            return;
        }
        if self.pausing() {
            // The timer set when the batch failed calls this again when the pause ends.
            return;
        }
        if self.urgent() {
            // Back-to-back batches at a moderate rate each carried a post or two and paid a
            // whole commit (and sync) apiece; waiting out the interval lets the posts arriving
            // meanwhile share one. A writer idle for longer than the interval adds no wait.
            let left = self.last_start.map_or(Duration::ZERO, |at| {
                self.min_interval.saturating_sub(at.elapsed())
            });
            if left.is_zero()
                || self.next_rows >= DEFER_MAX_ROWS
                || self.posts.len() >= POSTS_SKIP_INTERVAL
            {
                self.flush_now(ctx);
            } else {
                self.wake_in(left, ctx);
            }
            return;
        }
        if self.next.is_empty() {
            self.deferred_since = None;
            return;
        }
        let since = *self.deferred_since.get_or_insert_with(Instant::now);
        let left = DEFER.saturating_sub(since.elapsed());
        if left.is_zero() {
            self.flush_now(ctx);
        } else {
            self.wake_in(left, ctx);
        }
    }

    /// Calls [`Committer::wake`] again after `left`, unless a wake-up is due sooner already.
    fn wake_in(&mut self, left: Duration, ctx: &mut Context<Self>) {
        let due = Instant::now() + left;
        if self.wake_due.is_some_and(|d| d <= due) {
            return;
        }
        self.wake_due = Some(due);
        ctx.run_later(left, move |act, ctx| {
            if act.wake_due == Some(due) {
                act.wake_due = None;
            }
            act.wake(ctx);
        });
    }

    fn flush_now(&mut self, ctx: &mut Context<Self>) {
        self.deferred_since = None;
        self.flush_queued = true;
        ctx.notify(Flush);
    }

    /// Whether someone waits for the next batch: a post's caller, a barrier, a session's
    /// presence row — or the gathered acks, marks and last-seen times are many. Those alone
    /// wait up to [`DEFER`] for a post to share its commit (and its sync): written each on its
    /// own, a device's mark and ack made two more commits per notification at low rates.
    /// The status API, `/v1/stats` and `last_seen` show them up to [`DEFER`] later; a replay on
    /// this node waits behind a barrier, which is urgent. In a cluster a device may reconnect to
    /// another node, whose replay cannot wait on this node's barrier, so acks go with the next
    /// batch there (within the commit interval).
    fn urgent(&self) -> bool {
        !self.posts.is_empty()
            || (self.cluster.is_some() && !self.next.acks.is_empty())
            || !self.barriers.is_empty()
            || !self.online_waiters.is_empty()
            || !self.next.presence.is_empty()
            || self.next_rows >= DEFER_MAX_ROWS
    }

    /// Whether a failed batch's pause (see [`RETRY_PAUSE`]) is still running.
    fn pausing(&self) -> bool {
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }

    /// Counts `rows` more rows of gathered work (see [`WriteBatch::weight`]).
    fn gathered(&mut self, rows: usize) {
        self.next_rows += rows;
    }

    /// Takes up to `MAX_BATCH_WEIGHT` rows of work, dropping posts whose caller gave up.
    fn take_batch(&mut self) -> (WriteBatch, Vec<Waiter>) {
        let mut batch = std::mem::take(&mut self.next);
        let mut weight = std::mem::take(&mut self.next_rows);
        let now = Instant::now();
        let mut taken = Vec::new();
        let mut rest = Vec::new();
        let mut late = Vec::new();
        for w in std::mem::take(&mut self.posts) {
            if w.deadline <= now || w.reply.is_closed() {
                late.push(w);
                continue;
            }
            let wt = 1 + w.post.device_ids.len() + w.post.user_ids.len();
            if weight + wt > MAX_BATCH_WEIGHT && !taken.is_empty() {
                rest.push(w);
            } else {
                weight += wt;
                taken.push(w);
            }
        }
        self.posts = rest;
        // Through `answer`, so repeats waiting on the same idempotency key are answered too.
        for w in late {
            let (_, waiter) = w.split();
            self.answer(waiter, Err(PostRejection::Timeout), None);
        }
        let (posts, waiters) = taken.into_iter().map(WaitingPost::split).unzip();
        batch.posts = posts;
        if let Some(link) = &mut self.cluster {
            link.batches += 1;
            batch.cluster = Some(ClusterTag {
                node: link.node.clone(),
                run: link.run,
                batch: link.batches,
            });
        }
        (batch, waiters)
    }

    fn finish(
        &mut self,
        batch: WriteBatch,
        waiting: Vec<Waiter>,
        online: Vec<oneshot::Sender<bool>>,
        res: Result<BatchResult, JobError>,
        ctx: &mut Context<Self>,
    ) {
        let ok = res.is_ok();
        for w in online {
            let _ = w.send(ok);
        }
        let result = match res {
            Ok(r) => r,
            Err(e) => {
                log::warn!(
                    "write batch failed ({e}); {} posts answered 503",
                    waiting.len()
                );
                let why = match e {
                    JobError::Overloaded => PostRejection::Overloaded,
                    JobError::Timeout => PostRejection::Timeout,
                    JobError::Query(ref q) if crate::db::is_connection_lost(q) => {
                        PostRejection::Unavailable
                    }
                    JobError::Query(_) | JobError::Panicked => PostRejection::Internal,
                    JobError::Unavailable(_) => PostRejection::Unavailable,
                };
                for w in waiting {
                    self.answer(w, Err(why.clone()), None);
                }
                Counters::add(&self.counters.write_failures, 1);
                self.requeue(batch);
                self.retry_at = Some(Instant::now() + RETRY_PAUSE);
                ctx.run_later(RETRY_PAUSE, |act, ctx| act.wake(ctx));
                return;
            }
        };
        for (seq, _) in &batch.delivered_now {
            if let Some(k) = self.idem_seqs.remove(seq) {
                self.idem.remove(&k);
            }
        }
        Counters::add(&self.counters.write_batches, 1);
        Counters::add(
            &self.counters.write_items,
            batch.items() as u64 + waiting.len() as u64,
        );
        Counters::add(&self.counters.delivered, result.delivered);
        Counters::add(&self.counters.acked, result.acked);

        let committed_at = Instant::now();
        let mut published = Vec::new();
        let mut to_answer = Vec::new();
        // `batch.posts`, `waiting` and `result.posts` line up one to one.
        for ((post, w), outcome) in batch.posts.iter().zip(waiting).zip(result.posts) {
            match outcome {
                PostOutcome::Created {
                    seq,
                    created_at,
                    expires_at,
                    device_ids,
                    online_now,
                } => {
                    Counters::add(&self.counters.accepted, 1);
                    let frame = notification_frame(&post.id, created_at, expires_at, &post.payload);
                    let answer = answer_of(&post.id, created_at, expires_at, device_ids.len(), 0);
                    published.push((
                        Outbound {
                            seq,
                            expires_at,
                            frame: frame.into(),
                            committed_at,
                        },
                        device_ids,
                    ));
                    to_answer.push((w, seq, answer, online_now));
                }
                PostOutcome::Existing(row) => {
                    let answer = answer_of(
                        &row.id,
                        row.created_at,
                        row.expires_at,
                        row.device_count as usize,
                        row.delivered_now.unwrap_or(0) as u32,
                    );
                    self.answer(w, Ok(answer), None);
                }
                PostOutcome::Rejected(why) => self.answer(w, Err(why), None),
            }
        }
        if published.is_empty() {
            return;
        }
        // Sessions skip anything at or below the last seq they sent, so presence must see the
        // batch in seq order, whatever order the database handed the seqs out in.
        let mut order: Vec<usize> = (0..published.len()).collect();
        order.sort_by_key(|&i| published[i].0.seq);
        if order.windows(2).any(|w| w[0] > w[1]) {
            let mut slots: Vec<_> = published.into_iter().zip(to_answer).map(Some).collect();
            (published, to_answer) = order
                .iter()
                .map(|&i| slots[i].take().expect("each index once"))
                .unzip();
        }
        // Presence pushes to sessions in this order; the `202`s go out once it has counted. In a
        // cluster the Router publishes it, once the cluster's earlier commits are published.
        let counts: futures_util::future::LocalBoxFuture<'static, Vec<u32>> =
            match (&self.cluster, &batch.cluster) {
                (Some(link), Some(tag)) => {
                    // The Router publishes it in the cluster's commit order; the answers do not
                    // wait for that (`delivered_now` is the cluster's count, `online_now`).
                    link.router.do_send(OwnBatch {
                        batch: tag.batch,
                        items: published,
                    });
                    Box::pin(async { Vec::new() })
                }
                _ => {
                    let sent = self.presence.send(Publish { items: published });
                    Box::pin(async move { sent.await.unwrap_or_default() })
                }
            };
        let fut = counts.into_actor(self).map(move |counts, act, ctx| {
            for (i, (w, seq, mut answer, online_now)) in to_answer.into_iter().enumerate() {
                // In a cluster, devices online on any node count (each node pushes to its own).
                answer.delivered_now =
                    online_now.unwrap_or_else(|| counts.get(i).copied().unwrap_or(0));
                let stored = w.idem.as_ref().map(|_| seq);
                if stored.is_some() {
                    act.next
                        .delivered_now
                        .push((seq, answer.delivered_now as i32));
                    act.gathered(1);
                }
                act.answer(w, Ok(answer), stored);
            }
            act.wake(ctx);
        });
        // `wait` holds the next batch's publish until this one's is counted, so presence always
        // sees notifications in commit order; presence is local and never waits on anyone.
        ctx.wait(fut);
    }

    /// Answers a post and every repeat of it that waited on the same idempotency key. A new
    /// notification's answer (`stored` is its seq) is kept until its `delivered_now` is written.
    fn answer(
        &mut self,
        w: Waiter,
        result: Result<PostAnswer, PostRejection>,
        stored: Option<i64>,
    ) {
        let _ = w.reply.send(result.clone());
        let Some(k) = w.idem else {
            return;
        };
        if let Some(Idem::InFlight {
            waiters,
            request_hash,
        }) = self.idem.remove(&k)
        {
            for w in waiters {
                let _ = w.send(result.clone());
            }
            if let (Ok(answer), Some(seq)) = (result, stored) {
                self.idem.insert(
                    k.clone(),
                    Idem::Answered {
                        request_hash,
                        answer,
                    },
                );
                self.idem_seqs.insert(seq, k);
            }
        }
    }

    /// Puts a failed batch's acks, marks and last-seen times back for the next try.
    fn requeue(&mut self, mut failed: WriteBatch) {
        let next = &mut self.next;
        failed.acks.append(&mut next.acks);
        failed.delivered.append(&mut next.delivered);
        failed.seen.append(&mut next.seen);
        failed.delivered_now.append(&mut next.delivered_now);
        // Sessions whose presence row failed were told so and close; their `Offline` follows.
        failed
            .presence
            .retain(|c| !matches!(c, PresenceChange::Online { .. }));
        failed.presence.append(&mut next.presence);
        failed.posts.clear();
        failed.cluster = None;
        *next = failed;
        // Presence changes are kept whatever the backlog (dropping one would leave a ghost row
        // or lose a session's row); they do not push acks out either. Past the bound the oldest
        // marks go first, then last-seen times, then acks — each list cut once, from its front.
        let mut excess = (next.weight() - next.presence.len()).saturating_sub(MAX_BACKLOG);
        if excess > 0 {
            let marks = drop_oldest(&mut next.delivered, &mut excess, |(_, s)| s.len());
            let seen = drop_oldest(&mut next.seen, &mut excess, |_| 1);
            let acks = drop_oldest(&mut next.acks, &mut excess, |(_, ids)| ids.len());
            log::warn!(
                "write backlog full: dropped the oldest {marks} delivery marks, {seen} last-seen \
                 times and {acks} acks"
            );
        }
        self.next_rows = self.next.weight();
    }
}

/// Removes entries from the front of `list` until their rows (`rows` each) reach `excess`, and
/// takes those rows off `excess`; returns how many entries went.
fn drop_oldest<T>(list: &mut Vec<T>, excess: &mut usize, rows: impl Fn(&T) -> usize) -> usize {
    let mut n = 0;
    for item in list.iter() {
        if *excess == 0 {
            break;
        }
        *excess = excess.saturating_sub(rows(item));
        n += 1;
    }
    list.drain(..n);
    n
}

fn answer_of(
    id: &str,
    created_at: i64,
    expires_at: i64,
    devices: usize,
    delivered_now: u32,
) -> PostAnswer {
    PostAnswer {
        id: id.to_owned(),
        created_at_ms: created_at,
        expires_at_ms: expires_at,
        created_at: rfc3339(created_at),
        expires_at: rfc3339(expires_at),
        devices,
        delivered_now,
    }
}

/// Committer → itself: write what has gathered.
#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for Committer {
    type Result = ();

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        self.flush_queued = false;
        if self.writing {
            return;
        }
        let barriers = std::mem::take(&mut self.barriers);
        let online = std::mem::take(&mut self.online_waiters);
        let (batch, waiting) = self.take_batch();
        if batch.is_empty() && waiting.is_empty() {
            // Everything asked for before these barriers is already written.
            for b in barriers {
                let _ = b.send(());
            }
            return;
        }
        self.writing = true;
        self.last_start = Some(Instant::now());
        Counters::set(&self.counters.writing_since_ms, now_ms().max(1) as u64);
        let db = self.db.clone();
        let batch = Arc::new(batch);
        let job_batch = batch.clone();
        let fut = async move {
            db.write_to_end(Instant::now() + BATCH_DEADLINE, move |c| {
                batch::commit(c, &job_batch, now_ms()).map_err(Into::into)
            })
            .await
        };
        fut.into_actor(self)
            .map(move |res, act, ctx| {
                act.writing = false;
                Counters::set(&act.counters.writing_since_ms, 0);
                // The job has dropped its handle by now (it ran, or was dropped unrun), so this
                // takes the batch back without a copy.
                let batch = Arc::unwrap_or_clone(batch);
                act.finish(batch, waiting, online, res, ctx);
                // Even after a failed batch: its acks are queued again, and a replay that runs
                // now at worst sends a notification once more (delivery is at least once).
                for b in barriers {
                    let _ = b.send(());
                }
                act.wake(ctx);
            })
            .spawn(ctx);
    }
}

impl Handler<SubmitPost> for Committer {
    type Result = ();

    fn handle(&mut self, msg: SubmitPost, ctx: &mut Context<Self>) {
        if self.posts.len() >= MAX_WAITING_POSTS {
            let _ = msg.reply.send(Err(PostRejection::Overloaded));
            return;
        }
        if let Some(key) = &msg.post.idempotency_key {
            let k = (msg.post.poster.clone(), key.clone());
            match self.idem.get_mut(&k) {
                Some(Idem::InFlight {
                    request_hash,
                    waiters,
                }) => {
                    if *request_hash == msg.post.request_hash {
                        waiters.push(msg.reply);
                    } else {
                        let _ = msg.reply.send(Err(PostRejection::KeyReused));
                    }
                    return;
                }
                Some(Idem::Answered {
                    request_hash,
                    answer,
                }) => {
                    let result = if *request_hash == msg.post.request_hash {
                        Ok(answer.clone())
                    } else {
                        Err(PostRejection::KeyReused)
                    };
                    let _ = msg.reply.send(result);
                    return;
                }
                None => {
                    let state = Idem::InFlight {
                        request_hash: msg.post.request_hash.clone(),
                        waiters: vec![],
                    };
                    self.idem.insert(k, state);
                }
            }
        }
        self.posts.push(WaitingPost {
            post: msg.post,
            deadline: msg.deadline,
            reply: msg.reply,
        });
        self.wake(ctx);
    }
}

impl Handler<RecordAck> for Committer {
    type Result = ();

    fn handle(&mut self, msg: RecordAck, ctx: &mut Context<Self>) {
        if self.next_rows < MAX_BACKLOG {
            self.gathered(msg.ids.len());
            self.next.acks.push((msg.device_id, msg.ids));
        } else {
            log::warn!(
                "write backlog full: ack from device {} dropped",
                msg.device_id
            );
        }
        self.wake(ctx);
    }
}

impl Handler<RecordDelivered> for Committer {
    type Result = ();

    fn handle(&mut self, msg: RecordDelivered, ctx: &mut Context<Self>) {
        if self.next_rows < MAX_BACKLOG {
            self.gathered(msg.seqs.len());
            self.next.delivered.push((msg.device_id, msg.seqs));
        }
        self.wake(ctx);
    }
}

impl Handler<RecordSeen> for Committer {
    type Result = ();

    fn handle(&mut self, msg: RecordSeen, ctx: &mut Context<Self>) {
        if self.next_rows < MAX_BACKLOG {
            self.gathered(1);
            self.next.seen.push((msg.device_id, msg.at));
        }
        self.wake(ctx);
    }
}

impl Handler<Handoff> for Committer {
    type Result = ();

    /// A worker's messages of one turn, handled in the order they were sent.
    fn handle(&mut self, Handoff(list): Handoff, ctx: &mut Context<Self>) {
        for msg in list {
            match msg {
                ToCommitter::Post(m) => Handler::handle(self, m, ctx),
                ToCommitter::Ack(m) => Handler::handle(self, m, ctx),
                ToCommitter::Delivered(m) => Handler::handle(self, m, ctx),
                ToCommitter::Seen(m) => Handler::handle(self, m, ctx),
                ToCommitter::After(m) => Handler::handle(self, m, ctx),
            }
        }
    }
}

impl Handler<IsIdle> for Committer {
    type Result = bool;

    fn handle(&mut self, _: IsIdle, ctx: &mut Context<Self>) -> bool {
        let idle = !self.writing && self.posts.is_empty() && self.next.is_empty();
        if !idle && !self.writing && !self.flush_queued && !self.pausing() {
            // Stopping: deferred work goes now.
            self.flush_now(ctx);
        }
        idle
    }
}

impl Handler<AfterWrites> for Committer {
    type Result = ();

    fn handle(&mut self, msg: AfterWrites, ctx: &mut Context<Self>) {
        if !self.writing && self.posts.is_empty() && self.next.is_empty() {
            let _ = msg.reply.send(());
            return;
        }
        self.barriers.push(msg.reply);
        self.wake(ctx);
    }
}

impl Handler<PresenceUpdate> for Committer {
    type Result = ();

    fn handle(&mut self, msg: PresenceUpdate, ctx: &mut Context<Self>) {
        if self.cluster.is_none() {
            // One node: presence lives in memory only.
            if let Some(reply) = msg.written {
                let _ = reply.send(true);
            }
            return;
        }
        self.next.presence.push(msg.change);
        self.gathered(1);
        if let Some(reply) = msg.written {
            self.online_waiters.push(reply);
        }
        self.wake(ctx);
    }
}
