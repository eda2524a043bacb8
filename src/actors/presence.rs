//! The Presence actor: one per node, the map `device → live session` (and `user → devices`).
//!
//! It routes committed notifications to live sessions, replaces a device's older session (4002),
//! closes revoked devices' sessions (4001) and answers who is online. It never touches the
//! database and never waits on a session: every push is a `do_send` into the session's mailbox.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use actix::prelude::*;

use super::committer::Committer;
use super::db::{Db, JobError};
use super::messages::*;
use super::session::Session;
use crate::db::cluster::{self, PresenceChange};
use crate::db::DbError;
use crate::domain::rfc3339;
use crate::protocol::close;

struct Online {
    session_id: String,
    user_id: String,
    name: String,
    connected_at: i64,
    addr: Addr<Session>,
}

#[derive(Default)]
pub struct Presence {
    /// Ordered by device id, so the presence list pages with a stable cursor.
    devices: BTreeMap<String, Online>,
    /// Each user's online devices.
    users: HashMap<String, BTreeSet<String>>,
    /// Set when this node is one of several: who is online is then answered from the cluster's
    /// presence table, which every node writes.
    cluster: Option<Db>,
    /// The Committer that writes this node's presence rows, in the order Presence saw the
    /// registrations and ends (so a replaced session's late row cannot win).
    committer: Option<Addr<Committer>>,
}

impl Actor for Presence {
    type Context = Context<Self>;
}

impl Presence {
    /// Presence for one node of several: questions about who is online go to the database.
    pub fn for_cluster(db: Db) -> Self {
        Presence {
            cluster: Some(db),
            ..Presence::default()
        }
    }
}

impl Presence {
    fn forget(&mut self, device_id: &str) -> Option<Online> {
        let online = self.devices.remove(device_id)?;
        if let Some(set) = self.users.get_mut(&online.user_id) {
            set.remove(device_id);
            if set.is_empty() {
                self.users.remove(&online.user_id);
            }
        }
        Some(online)
    }

    fn describe(device_id: &str, o: &Online) -> OnlineDevice {
        OnlineDevice {
            device_id: device_id.to_owned(),
            user_id: o.user_id.clone(),
            name: o.name.clone(),
            connected_at_ms: o.connected_at,
            connected_at: rfc3339(o.connected_at),
        }
    }
}

impl Presence {
    /// Whether `device_id` may come online without its user passing `max_per_user` sessions.
    fn within_limit(&self, user_id: &str, device_id: &str, max_per_user: usize) -> bool {
        if max_per_user == 0 {
            return true;
        }
        let others = self
            .users
            .get(user_id)
            .map_or(0, |set| set.len() - usize::from(set.contains(device_id)));
        others < max_per_user
    }
}

impl Handler<CanConnect> for Presence {
    type Result = bool;

    fn handle(&mut self, msg: CanConnect, _: &mut Context<Self>) -> bool {
        self.within_limit(&msg.user_id, &msg.device_id, msg.max_per_user)
    }
}

impl Handler<Register> for Presence {
    type Result = bool;

    fn handle(&mut self, msg: Register, _: &mut Context<Self>) -> bool {
        if !self.within_limit(&msg.user_id, &msg.device_id, msg.max_per_user) {
            return false;
        }
        if let (Some(committer), Some(written)) = (&self.committer, msg.row_written) {
            committer.do_send(PresenceUpdate {
                change: PresenceChange::Online {
                    device_id: msg.device_id.clone(),
                    user_id: msg.user_id.clone(),
                    name: msg.name.clone(),
                    session_id: msg.session_id.clone(),
                    connected_at: msg.connected_at,
                },
                written: Some(written),
            });
        }
        if let Some(old) = self.forget(&msg.device_id) {
            log::info!(
                "device {} session {} replaced by session {}",
                msg.device_id,
                old.session_id,
                msg.session_id
            );
            old.addr.do_send(CloseSession {
                code: close::REPLACED,
                reason: "replaced by a newer session",
            });
        }
        self.users
            .entry(msg.user_id.clone())
            .or_default()
            .insert(msg.device_id.clone());
        self.devices.insert(
            msg.device_id,
            Online {
                session_id: msg.session_id,
                user_id: msg.user_id,
                name: msg.name,
                connected_at: msg.connected_at,
                addr: msg.addr,
            },
        );
        true
    }
}

impl Handler<Unregister> for Presence {
    type Result = ();

    fn handle(&mut self, msg: Unregister, _: &mut Context<Self>) {
        let current = self
            .devices
            .get(&msg.device_id)
            .map(|o| o.session_id == msg.session_id);
        if current != Some(true) {
            // A newer session, a revocation or a shutdown has taken the device (and its row).
            if let Some(gone) = msg.row_gone {
                let _ = gone.send(true);
            }
            return;
        }
        self.forget(&msg.device_id);
        if let Some(committer) = &self.committer {
            committer.do_send(PresenceUpdate {
                change: PresenceChange::Offline {
                    device_id: msg.device_id,
                    session_id: msg.session_id,
                },
                written: msg.row_gone,
            });
        } else if let Some(gone) = msg.row_gone {
            let _ = gone.send(true);
        }
    }
}

impl Handler<Publish> for Presence {
    type Result = MessageResult<Publish>;

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) -> Self::Result {
        let counts = msg
            .items
            .into_iter()
            .map(|(outbound, targets)| {
                let mut n = 0;
                for device_id in &targets {
                    if let Some(online) = self.devices.get(device_id) {
                        online.addr.do_send(Deliver(outbound.clone()));
                        n += 1;
                    }
                }
                n
            })
            .collect();
        MessageResult(counts)
    }
}

impl Handler<Revoke> for Presence {
    type Result = ();

    fn handle(&mut self, msg: Revoke, _: &mut Context<Self>) {
        if let Some(online) = self.forget(&msg.device_id) {
            online.addr.do_send(CloseSession {
                code: close::REVOKED,
                reason: "device revoked",
            });
        }
    }
}

impl Handler<ListPresence> for Presence {
    type Result = ResponseFuture<Result<PresencePage, JobError>>;

    fn handle(&mut self, msg: ListPresence, _: &mut Context<Self>) -> Self::Result {
        if let Some(db) = self.cluster.clone() {
            return Box::pin(cluster_page(db, msg));
        }
        let after = match &msg.after {
            Some(a) => Bound::Excluded(a.clone()),
            None => Bound::Unbounded,
        };
        let mut devices = Vec::with_capacity(msg.limit.min(1024));
        let mut more = false;
        let (online_devices, online_users) = match &msg.user_id {
            Some(user) => {
                let set = self.users.get(user);
                let ids = set.map(|s| s.range((after, Bound::Unbounded)));
                for id in ids.into_iter().flatten() {
                    if devices.len() == msg.limit {
                        more = true;
                        break;
                    }
                    devices.push(Self::describe(id, &self.devices[id]));
                }
                let n = set.map_or(0, |s| s.len());
                (n, usize::from(n > 0))
            }
            None => {
                for (id, online) in self.devices.range((after, Bound::Unbounded)) {
                    if devices.len() == msg.limit {
                        more = true;
                        break;
                    }
                    devices.push(Self::describe(id, online));
                }
                (self.devices.len(), self.users.len())
            }
        };
        let next = if more {
            devices.last().map(|d| d.device_id.clone())
        } else {
            None
        };
        let page = PresencePage {
            online_devices,
            online_users,
            devices,
            next,
        };
        Box::pin(async move { Ok(page) })
    }
}

impl Handler<OnlineSince> for Presence {
    type Result = ResponseFuture<Result<HashMap<String, i64>, JobError>>;

    fn handle(&mut self, msg: OnlineSince, _: &mut Context<Self>) -> Self::Result {
        if let Some(db) = self.cluster.clone() {
            return Box::pin(async move {
                let deadline = db.deadline();
                let rows = db
                    .read(deadline, move |c| {
                        cluster::online_since(c, &msg.device_ids).map_err(DbError::from)
                    })
                    .await?;
                Ok(rows.into_iter().collect())
            });
        }
        let found = msg
            .device_ids
            .into_iter()
            .filter_map(|id| self.devices.get(&id).map(|o| (id.clone(), o.connected_at)))
            .collect();
        Box::pin(async move { Ok(found) })
    }
}

/// A presence page from the cluster's presence table.
async fn cluster_page(db: Db, msg: ListPresence) -> Result<PresencePage, JobError> {
    let deadline = db.deadline();
    db.read(deadline, move |c| {
        let user = msg.user_id.as_deref();
        let mut rows = cluster::presence_page(c, user, msg.after.as_deref(), msg.limit as i64 + 1)?;
        let (online_devices, online_users) = cluster::presence_counts(c, user)?;
        let more = rows.len() > msg.limit;
        rows.truncate(msg.limit);
        let devices: Vec<OnlineDevice> = rows
            .into_iter()
            .map(|r| OnlineDevice {
                connected_at: rfc3339(r.connected_at),
                connected_at_ms: r.connected_at,
                device_id: r.device_id,
                user_id: r.user_id,
                name: r.name,
            })
            .collect();
        let next = if more {
            devices.last().map(|d| d.device_id.clone())
        } else {
            None
        };
        Ok(PresencePage {
            online_devices: online_devices as usize,
            online_users: online_users as usize,
            devices,
            next,
        })
    })
    .await
}

impl Handler<Kick> for Presence {
    type Result = ();

    fn handle(&mut self, msg: Kick, _: &mut Context<Self>) {
        let current = self
            .devices
            .get(&msg.device_id)
            .is_some_and(|o| o.session_id == msg.session_id);
        if current {
            if let Some(old) = self.forget(&msg.device_id) {
                log::info!(
                    "device {} session {} replaced by a session on another node",
                    msg.device_id,
                    old.session_id
                );
                old.addr.do_send(CloseSession {
                    code: close::REPLACED,
                    reason: "replaced by a newer session",
                });
            }
        }
    }
}

impl Handler<CatchUp> for Presence {
    type Result = ();

    fn handle(&mut self, msg: CatchUp, _: &mut Context<Self>) {
        for online in self.devices.values() {
            online.addr.do_send(msg);
        }
    }
}

impl Handler<SetCommitter> for Presence {
    type Result = ();

    fn handle(&mut self, msg: SetCommitter, _: &mut Context<Self>) {
        self.committer = Some(msg.0);
    }
}

impl Handler<Reassert> for Presence {
    type Result = ();

    fn handle(&mut self, msg: Reassert, _: &mut Context<Self>) {
        for (device_id, o) in &self.devices {
            msg.committer.do_send(PresenceUpdate {
                change: PresenceChange::Reassert {
                    device_id: device_id.clone(),
                    user_id: o.user_id.clone(),
                    name: o.name.clone(),
                    session_id: o.session_id.clone(),
                    connected_at: o.connected_at,
                },
                written: None,
            });
        }
    }
}

impl Handler<CountSessions> for Presence {
    type Result = usize;

    fn handle(&mut self, _: CountSessions, _: &mut Context<Self>) -> usize {
        self.devices.len()
    }
}

impl Handler<CloseAll> for Presence {
    type Result = usize;

    fn handle(&mut self, _: CloseAll, _: &mut Context<Self>) -> usize {
        let n = self.devices.len();
        for (_, online) in std::mem::take(&mut self.devices) {
            online.addr.do_send(CloseSession {
                code: close::GOING_AWAY,
                reason: "server shutting down",
            });
        }
        self.users.clear();
        n
    }
}
