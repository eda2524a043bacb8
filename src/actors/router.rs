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
//! read, a batch of this node's whose signal never came) makes every session here catch up from
//! the database, which is always complete — never a publish out of order: a session skips any
//! `seq` at or below the last it sent, so an out-of-order publish could hide an earlier one.
//! Catch-ups are coalesced (one per `CATCH_UP_EVERY`), so a flapping listener is not a stampede.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

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
/// At most one catch-up of every session per this long.
const CATCH_UP_EVERY: Duration = Duration::from_secs(1);
/// Swept batch numbers remembered, so their late signals are skipped.
const SWEPT_KEPT: usize = 1024;

/// Committer → Router: this node's batch `batch`, committed (the Committer does not wait: in a
/// cluster, `delivered_now` comes from the database's presence).
#[derive(Message)]
#[rtype(result = "()")]
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
    /// This process's random number: signals of an earlier process with the same node id are
    /// someone else's batches.
    run: u64,
    db: Db,
    presence: Addr<Presence>,
    auth_cache: Arc<AuthCache>,
    queue: VecDeque<Step>,
    /// This node's committed batches, by number, until their signal comes round.
    own: HashMap<u64, OwnItems>,
    /// Own batches given up on (their signal never came), so a late signal is skipped.
    swept: VecDeque<u64>,
    /// A step is being read; the queue waits for it.
    busy: bool,
    recheck_queued: bool,
    last_catch_up: Option<Instant>,
    catch_up_queued: bool,
}

impl Router {
    pub fn new(
        node: String,
        run: u64,
        db: Db,
        presence: Addr<Presence>,
        auth_cache: Arc<AuthCache>,
    ) -> Self {
        Router {
            node,
            run,
            db,
            presence,
            auth_cache,
            queue: VecDeque::new(),
            own: HashMap::new(),
            swept: VecDeque::new(),
            busy: false,
            recheck_queued: false,
            last_catch_up: None,
            catch_up_queued: false,
        }
    }

    /// Every session here reads what it may have missed from the database — at most once per
    /// `CATCH_UP_EVERY` (a later request is folded into one at the end of the period).
    fn catch_up(&mut self, ctx: &mut Context<Self>) {
        let wait = self
            .last_catch_up
            .map(|t| CATCH_UP_EVERY.saturating_sub(t.elapsed()))
            .unwrap_or_default();
        if wait.is_zero() {
            self.last_catch_up = Some(Instant::now());
            self.presence.do_send(CatchUp);
        } else if !self.catch_up_queued {
            self.catch_up_queued = true;
            ctx.run_later(wait, |act, ctx| {
                act.catch_up_queued = false;
                act.catch_up(ctx);
            });
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
                        self.publish(own.items);
                    } else if since.elapsed() > OWN_WAIT {
                        // Its items never came (the Committer never learned the batch committed:
                        // say, its connection broke during the commit): read them like another
                        // node's.
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

    /// Hands a batch to Presence. `do_send`, like every catch-up: Presence sees them in the
    /// order the Router sends them.
    fn publish(&mut self, items: Vec<(Outbound, Vec<String>)>) {
        self.presence.do_send(Publish { items });
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
                if !items.is_empty() {
                    act.publish(items);
                }
                act.drive(ctx);
            }
            Err(e) => {
                act.busy = false;
                if attempt + 1 >= READ_ATTEMPTS {
                    log::warn!("cannot read batch {lo}..={hi} ({e}); sessions catch up instead");
                    act.queue.pop_front();
                    act.catch_up(ctx);
                } else if let Some(Step::Other { attempts, .. }) = act.queue.front_mut() {
                    *attempts = attempt + 1;
                }
                act.recheck_later(ctx);
            }
        })
        .wait(ctx);
    }

    /// Own batches whose signal never came within `OWN_WAIT` (the listener lost it): not
    /// published — that could put them ahead of an earlier batch still unheard of — but dropped,
    /// and every session catches up from the database instead.
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
            "{} batch(es) of this node had no signal within {OWN_WAIT:?}; sessions catch up instead",
            waiting.len()
        );
        for b in waiting {
            self.own.remove(&b);
            self.swept.push_back(b);
            if self.swept.len() > SWEPT_KEPT {
                self.swept.pop_front();
            }
        }
        self.catch_up(ctx);
    }
}

impl Actor for Router {
    type Context = Context<Self>;
}

impl Handler<OwnBatch> for Router {
    type Result = ();

    fn handle(&mut self, msg: OwnBatch, ctx: &mut Context<Self>) {
        self.own.insert(
            msg.batch,
            OwnItems {
                items: msg.items,
                since: Instant::now(),
            },
        );
        self.drive(ctx);
        self.recheck_later(ctx);
    }
}

impl Handler<Heard> for Router {
    type Result = ();

    fn handle(&mut self, Heard(signal): Heard, ctx: &mut Context<Self>) {
        match signal {
            Signal::Posts {
                node,
                run,
                batch,
                lo,
                hi,
            } => {
                let own = node == self.node && run == self.run;
                if own && self.swept.contains(&batch) {
                    // Given up on already; the catch-up read it.
                    return;
                }
                self.queue.push_back(if own {
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

    fn handle(&mut self, _: ListenerResumed, ctx: &mut Context<Self>) {
        log::info!("cluster signals may have been missed; every session catches up");
        // Revocations may have been missed too: no cached credential is trusted.
        self.auth_cache.forget_all();
        self.catch_up(ctx);
    }
}
