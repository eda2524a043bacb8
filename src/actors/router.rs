//! The Router (several nodes on PostgreSQL only): publishes every committed batch of the
//! cluster to this node's Presence in the cluster's commit order, and applies the other signals
//! (kicks, revocations).
//!
//! Why an order at all: a session skips any notification at or below the last `seq` it sent, so
//! it must see them in `seq` order. Commits that create notifications take one cluster-wide lock,
//! so `seq` order is commit order, and PostgreSQL hands every listener its signals in commit
//! order. The Router follows that stream: a batch this node wrote is published from memory when
//! its own signal comes round (no read); another node's batch is read from the database.
//! Anything that may have been missed (a lost listener connection, a batch that could not be
//! read) makes every session here catch up from the database, which is always complete.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::db::Db;
use super::messages::*;
use super::presence::Presence;
use crate::db::cluster::{self, Signal};
use crate::db::DbError;
use crate::http::AuthCache;
use crate::protocol::notification_frame;

/// How long a batch this node wrote waits for its own signal (or the signal for the batch's
/// items) before the Router stops waiting and falls back (see `drive`).
const OWN_WAIT: Duration = Duration::from_secs(2);
/// How often a waiting head of the queue is looked at again.
const RECHECK: Duration = Duration::from_millis(20);
/// Attempts to read another node's batch before every session is told to catch up instead.
const READ_ATTEMPTS: u32 = 3;

/// Committer → Router: this node's batch `batch`, committed; answered with the number of
/// sessions each notification reached, once it is published.
#[derive(Message)]
#[rtype(result = "Vec<u32>")]
pub struct OwnBatch {
    pub batch: u64,
    pub items: Vec<(Outbound, Vec<String>)>,
}

/// Listener → Router: a signal, in commit order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Heard(pub Signal);

/// Listener → Router: the listener reconnected; signals may have been lost.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ListenerResumed;

struct OwnItems {
    items: Vec<(Outbound, Vec<String>)>,
    reply: oneshot::Sender<Vec<u32>>,
    since: Instant,
}

/// A batch to publish, in commit order.
enum Step {
    Own {
        batch: u64,
        lo: i64,
        hi: i64,
        since: Instant,
    },
    Other {
        lo: i64,
        hi: i64,
        attempts: u32,
    },
}

pub struct Router {
    node: String,
    db: Db,
    presence: Addr<Presence>,
    auth_cache: Arc<AuthCache>,
    queue: VecDeque<Step>,
    /// This node's committed batches, by number, until their signal comes round.
    own: HashMap<u64, OwnItems>,
    /// A step is being published (or read); the queue waits for it.
    busy: bool,
    recheck_queued: bool,
}

impl Router {
    pub fn new(node: String, db: Db, presence: Addr<Presence>, auth_cache: Arc<AuthCache>) -> Self {
        Router {
            node,
            db,
            presence,
            auth_cache,
            queue: VecDeque::new(),
            own: HashMap::new(),
            busy: false,
            recheck_queued: false,
        }
    }

    fn recheck_later(&mut self, ctx: &mut Context<Self>) {
        if !self.recheck_queued {
            self.recheck_queued = true;
            ctx.run_later(RECHECK, |act, ctx| {
                act.recheck_queued = false;
                act.drive(ctx);
                act.sweep_orphans(ctx);
            });
        }
    }

    /// Publishes the head of the queue if it can be, and so on.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        while !self.busy {
            let Some(step) = self.queue.front_mut() else {
                return;
            };
            match step {
                Step::Own {
                    batch,
                    lo,
                    hi,
                    since,
                } => {
                    if let Some(own) = self.own.remove(batch) {
                        self.queue.pop_front();
                        self.publish(ctx, own.items, Some(own.reply));
                    } else if since.elapsed() > OWN_WAIT {
                        // Its items never came (the write outlived its deadline and was answered
                        // 503, yet committed): read them like another node's.
                        let (lo, hi) = (*lo, *hi);
                        *step = Step::Other {
                            lo,
                            hi,
                            attempts: 0,
                        };
                    } else {
                        self.recheck_later(ctx);
                        return;
                    }
                }
                Step::Other { lo, hi, attempts } => {
                    let (lo, hi, attempt) = (*lo, *hi, *attempts);
                    self.busy = true;
                    self.read_and_publish(ctx, lo, hi, attempt);
                }
            }
        }
    }

    fn publish(
        &mut self,
        ctx: &mut Context<Self>,
        items: Vec<(Outbound, Vec<String>)>,
        reply: Option<oneshot::Sender<Vec<u32>>>,
    ) {
        self.busy = true;
        self.presence
            .send(Publish { items })
            .into_actor(self)
            .map(|counts, act, ctx| {
                if let Some(reply) = reply {
                    let _ = reply.send(counts.unwrap_or_default());
                }
                act.busy = false;
                act.drive(ctx);
            })
            .wait(ctx);
    }

    fn read_and_publish(&mut self, ctx: &mut Context<Self>, lo: i64, hi: i64, attempt: u32) {
        let db = self.db.clone();
        let deadline = db.deadline();
        async move {
            db.read(deadline, move |c| {
                cluster::batch_deliveries(c, lo, hi).map_err(DbError::from)
            })
            .await
        }
        .into_actor(self)
        .map(move |res, act, ctx| match res {
            Ok(rows) => {
                act.queue.pop_front();
                let committed_at = Instant::now();
                let mut items: Vec<(Outbound, Vec<String>)> = Vec::new();
                for r in rows {
                    match items.last_mut() {
                        Some((o, targets)) if o.seq == r.seq => targets.push(r.device_id),
                        _ => items.push((
                            Outbound {
                                seq: r.seq,
                                expires_at: r.expires_at,
                                frame: notification_frame(
                                    &r.id,
                                    r.created_at,
                                    r.expires_at,
                                    &r.payload,
                                )
                                .into(),
                                committed_at,
                            },
                            vec![r.device_id],
                        )),
                    }
                }
                act.busy = false;
                if items.is_empty() {
                    act.drive(ctx);
                } else {
                    act.publish(ctx, items, None);
                }
            }
            Err(e) => {
                act.busy = false;
                if attempt + 1 >= READ_ATTEMPTS {
                    log::warn!("cannot read batch {lo}..={hi} ({e}); sessions catch up instead");
                    act.queue.pop_front();
                    act.presence.do_send(CatchUp);
                } else if let Some(Step::Other { attempts, .. }) = act.queue.front_mut() {
                    *attempts = attempt + 1;
                }
                act.recheck_later(ctx);
            }
        })
        .wait(ctx);
    }

    /// Own batches whose signal never came (the listener lost it): published out of turn, after
    /// which every session catches up, since order can no longer be vouched for.
    fn sweep_orphans(&mut self, ctx: &mut Context<Self>) {
        let waiting: Vec<u64> = self
            .own
            .iter()
            .filter(|(_, o)| o.since.elapsed() > OWN_WAIT)
            .map(|(b, _)| *b)
            .filter(|b| {
                !self
                    .queue
                    .iter()
                    .any(|s| matches!(s, Step::Own { batch, .. } if batch == b))
            })
            .collect();
        if waiting.is_empty() {
            if !self.own.is_empty() {
                self.recheck_later(ctx);
            }
            return;
        }
        log::warn!(
            "{} batch(es) of this node had no signal within {OWN_WAIT:?}; publishing them and catching up",
            waiting.len()
        );
        for b in waiting {
            if let Some(own) = self.own.remove(&b) {
                let counts = self.presence.send(Publish { items: own.items });
                let reply = own.reply;
                actix::spawn(async move {
                    let _ = reply.send(counts.await.unwrap_or_default());
                });
            }
        }
        self.presence.do_send(CatchUp);
    }
}

impl Actor for Router {
    type Context = Context<Self>;
}

impl Handler<OwnBatch> for Router {
    type Result = ResponseFuture<Vec<u32>>;

    fn handle(&mut self, msg: OwnBatch, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, counted) = oneshot::channel();
        self.own.insert(
            msg.batch,
            OwnItems {
                items: msg.items,
                reply,
                since: Instant::now(),
            },
        );
        self.drive(ctx);
        self.recheck_later(ctx);
        Box::pin(async move { counted.await.unwrap_or_default() })
    }
}

impl Handler<Heard> for Router {
    type Result = ();

    fn handle(&mut self, Heard(signal): Heard, ctx: &mut Context<Self>) {
        match signal {
            Signal::Posts {
                node,
                batch,
                lo,
                hi,
            } => {
                self.queue.push_back(if node == self.node {
                    Step::Own {
                        batch,
                        lo,
                        hi,
                        since: Instant::now(),
                    }
                } else {
                    Step::Other {
                        lo,
                        hi,
                        attempts: 0,
                    }
                });
                self.drive(ctx);
            }
            Signal::Kick {
                node,
                device,
                session,
            } => {
                if node == self.node {
                    self.presence.do_send(Kick {
                        device_id: device,
                        session_id: session,
                    });
                }
            }
            Signal::RevokeDevice { device } => {
                self.auth_cache.forget(&device);
                self.presence.do_send(Revoke { device_id: device });
            }
            Signal::RevokeKey { key } => self.auth_cache.forget(&key),
        }
    }
}

impl Handler<ListenerResumed> for Router {
    type Result = ();

    fn handle(&mut self, _: ListenerResumed, _: &mut Context<Self>) {
        log::info!("cluster signals may have been missed; every session catches up");
        self.presence.do_send(CatchUp);
    }
}
