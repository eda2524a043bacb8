//! The NodeKeeper (several nodes on PostgreSQL only): keeps this node's lease row alive and
//! clears the presence of nodes whose lease expired — a node killed with SIGKILL leaves no ghost
//! for longer than its lease.

use std::time::Duration;

use actix::prelude::*;

use super::committer::Committer;
use super::db::Db;
use super::messages::Reassert;
use super::presence::Presence;
use crate::db::{cluster, DbError};

pub struct NodeKeeper {
    node: String,
    lease: Duration,
    db: Db,
    presence: Addr<Presence>,
    committer: Addr<Committer>,
}

impl NodeKeeper {
    pub fn new(
        node: String,
        lease: Duration,
        db: Db,
        presence: Addr<Presence>,
        committer: Addr<Committer>,
    ) -> Self {
        NodeKeeper {
            node,
            lease,
            db,
            presence,
            committer,
        }
    }

    /// Renews the lease, then clears expired nodes' presence.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        let db = self.db.clone();
        let node = self.node.clone();
        let lease_ms = self.lease.as_millis() as i64;
        async move {
            let deadline = db.deadline();
            let renewed = db
                .write(deadline, move |c| {
                    cluster::renew_lease(c, &node, lease_ms).map_err(DbError::from)
                })
                .await;
            let reaped = db
                .write(db.deadline(), |c| cluster::reap(c, false).map_err(DbError::from))
                .await;
            (renewed, reaped)
        }
        .into_actor(self)
        .map(|(renewed, reaped), act, _| {
            match renewed {
                Ok(true) => {}
                Ok(false) => {
                    log::warn!(
                        "node {}: its lease had lapsed and its presence was cleared; writing it again",
                        act.node
                    );
                    act.presence.do_send(Reassert {
                        committer: act.committer.clone(),
                    });
                }
                Err(e) => log::warn!("node {}: cannot renew its lease: {e}", act.node),
            }
            match reaped {
                Ok((dead, cleared)) if !dead.is_empty() || cleared > 0 => log::info!(
                    "cleared the presence of expired node(s) {dead:?}: {cleared} device(s) offline"
                ),
                Ok(_) => {}
                Err(e) => log::warn!("cannot clear expired nodes: {e}"),
            }
        })
        .wait(ctx);
    }
}

impl Actor for NodeKeeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.lease / 3, |act, ctx| act.tick(ctx));
    }
}
