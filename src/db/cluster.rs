//! What several nodes on one PostgreSQL share (issue 7): node leases, cluster-wide presence,
//! the commit lock that makes `seq` order the cluster's commit order, and the signals nodes send
//! each other over `LISTEN/NOTIFY`. PostgreSQL only; SQLite is single-node.
//!
//! Times here come from the database's clock, so the nodes' clocks need not agree.

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text};
use diesel::{sql_query, PgConnection};
use serde::{Deserialize, Serialize};

use super::DbConn;

/// The `LISTEN/NOTIFY` channel of every signal.
pub const CHANNEL: &str = "herald";
/// Advisory lock keys ("herald" in ASCII, then a number).
const MIGRATION_LOCK: i64 = 0x6865_7261_6c64_0001;
const COMMIT_LOCK: i64 = 0x6865_7261_6c64_0002;
/// First key of the two-key advisory lock each node's listener session holds while the node
/// lives (the second is `hashtext(node_id)`): the database releases it the moment the node's
/// process dies, so the others can tell a dead node without waiting for its lease.
const LIVENESS_LOCK: i32 = 0x6865_7200;
/// Milliseconds since the Unix epoch on the database's clock.
const DB_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// What one node tells the others (and itself: every node listens to the one channel, and
/// PostgreSQL hands each listener the signals in commit order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Signal {
    /// `node` committed notifications `lo..=hi` (batch number `batch` of its process `run`:
    /// a random number per start, so a new process never takes an old one's batch for its own).
    Posts {
        node: String,
        run: u64,
        batch: u64,
        lo: i64,
        hi: i64,
    },
    /// The session `session` of `device` on `node` was replaced by a session on another node.
    Kick {
        node: String,
        device: String,
        session: String,
    },
    /// A device was revoked: forget its credential, close its session (4001).
    RevokeDevice { device: String },
    /// A service key was revoked: forget its credential.
    RevokeKey { key: String },
}

/// A change to the cluster's presence, written with the next batch.
#[derive(Clone, Debug)]
pub enum PresenceChange {
    Online {
        device_id: String,
        user_id: String,
        name: String,
        session_id: String,
        connected_at: i64,
    },
    Offline {
        device_id: String,
        session_id: String,
    },
    /// A live local session's row, written again after the node's lease lapsed and the others
    /// cleared its presence; a newer session of the device elsewhere keeps its row.
    Reassert {
        device_id: String,
        user_id: String,
        name: String,
        session_id: String,
        connected_at: i64,
    },
}

impl PresenceChange {
    pub fn device_id(&self) -> &str {
        match self {
            PresenceChange::Online { device_id, .. }
            | PresenceChange::Offline { device_id, .. }
            | PresenceChange::Reassert { device_id, .. } => device_id,
        }
    }
}

fn pg(conn: &mut DbConn) -> QueryResult<&mut PgConnection> {
    match conn {
        DbConn::Pg(c) => Ok(c),
        DbConn::Sqlite(_) => Err(diesel::result::Error::QueryBuilderError(
            "cluster queries need PostgreSQL".into(),
        )),
    }
}

pub fn lock_migrations(c: &mut PgConnection) -> QueryResult<()> {
    sql_query("SELECT pg_advisory_lock($1)")
        .bind::<BigInt, _>(MIGRATION_LOCK)
        .execute(c)
        .map(drop)
}

pub fn unlock_migrations(c: &mut PgConnection) -> QueryResult<()> {
    sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(MIGRATION_LOCK)
        .execute(c)
        .map(drop)
}

/// Takes the cluster's commit lock for the rest of the transaction: transactions that create
/// notifications commit one at a time, so `seq` order is commit order across every node.
pub fn lock_commits(conn: &mut DbConn) -> QueryResult<()> {
    sql_query("SELECT pg_advisory_xact_lock($1)")
        .bind::<BigInt, _>(COMMIT_LOCK)
        .execute(pg(conn)?)
        .map(drop)
}

/// Sends a signal when the transaction commits (at once outside one).
pub fn notify(conn: &mut DbConn, signal: &Signal) -> QueryResult<()> {
    let payload = serde_json::to_string(signal).expect("a signal serializes");
    sql_query("SELECT pg_notify($1, $2)")
        .bind::<Text, _>(CHANNEL)
        .bind::<Text, _>(payload)
        .execute(pg(conn)?)
        .map(drop)
}

/// Whether a node id is safe everywhere it goes (log lines, SQL literals, signals).
pub fn valid_node_id(node: &str) -> bool {
    (1..=64).contains(&node.len())
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// The statement the listener's session runs to try to take `node`'s liveness lock; it answers
/// `t` or `f` (`node` must be [`valid_node_id`]).
pub fn liveness_lock_sql(node: &str) -> String {
    assert!(valid_node_id(node), "node ids are checked at start");
    format!("SELECT pg_try_advisory_lock({LIVENESS_LOCK}, hashtext('{node}'))")
}

/// The creation time for a batch of new notifications, taken under the commit lock: the
/// database's clock, never before the last notification's, so `created_at` never goes back in
/// `seq` order whichever node writes.
pub fn creation_time(conn: &mut DbConn) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = BigInt)]
        now: i64,
    }
    let row: Now = sql_query(format!(
        "SELECT GREATEST({DB_NOW}, COALESCE((SELECT created_at FROM notifications \
         ORDER BY seq DESC LIMIT 1), 0)) AS now"
    ))
    .get_result(pg(conn)?)?;
    Ok(row.now)
}

/// A node's start: its lease row, and none of the presence it left behind when it last died
/// (DESIGN.md invariant 6).
pub fn start_node(conn: &mut DbConn, node: &str, lease_ms: i64) -> QueryResult<()> {
    let c = pg(conn)?;
    c.transaction(|c| {
        sql_query("DELETE FROM presence WHERE node_id = $1")
            .bind::<Text, _>(node)
            .execute(c)?;
        sql_query(format!(
            "INSERT INTO nodes (node_id, started_at, lease_expires_at, lease_ms) \
             VALUES ($1, {DB_NOW}, {DB_NOW} + $2, $2) \
             ON CONFLICT (node_id) DO UPDATE SET started_at = excluded.started_at, \
             lease_expires_at = excluded.lease_expires_at, lease_ms = excluded.lease_ms"
        ))
        .bind::<Text, _>(node)
        .bind::<BigInt, _>(lease_ms)
        .execute(c)
        .map(drop)
    })
}

/// Renews a node's lease; false if its row is gone (the others found it expired and cleared
/// its presence), in which case the row is written again and the node must re-assert its
/// sessions.
pub fn renew_lease(conn: &mut DbConn, node: &str, lease_ms: i64) -> QueryResult<bool> {
    let c = pg(conn)?;
    let renewed = sql_query(format!(
        "UPDATE nodes SET lease_expires_at = {DB_NOW} + $2 WHERE node_id = $1"
    ))
    .bind::<Text, _>(node)
    .bind::<BigInt, _>(lease_ms)
    .execute(c)?;
    if renewed == 1 {
        return Ok(true);
    }
    sql_query(format!(
        "INSERT INTO nodes (node_id, started_at, lease_expires_at, lease_ms) \
         VALUES ($1, {DB_NOW}, {DB_NOW} + $2, $2) \
         ON CONFLICT (node_id) DO UPDATE SET lease_expires_at = excluded.lease_expires_at"
    ))
    .bind::<Text, _>(node)
    .bind::<BigInt, _>(lease_ms)
    .execute(c)?;
    Ok(false)
}

#[derive(QueryableByName)]
struct NodeIdRow {
    #[diesel(sql_type = Text)]
    node_id: String,
}

/// Removes nodes whose lease has expired, or whose process is gone (its liveness lock is free:
/// the database dropped its connection), and every presence row of a node that is not live.
/// A live node's lock is also free for a moment while its listener reconnects, so on the timer
/// (`at_start` false) a free lock counts only once the node has also missed a renewal; a node
/// starting (`at_start`) takes a free lock at its word, so a restarted node clears its previous
/// life at once.
pub fn reap(conn: &mut DbConn, at_start: bool) -> QueryResult<(Vec<String>, usize)> {
    let missed = if at_start {
        "TRUE".to_owned()
    } else {
        format!("lease_expires_at < {DB_NOW} + lease_ms / 2")
    };
    let c = pg(conn)?;
    c.transaction(|c| {
        let dead: Vec<NodeIdRow> = sql_query(format!(
            "DELETE FROM nodes WHERE lease_expires_at < {DB_NOW} \
             OR ({missed} AND pg_try_advisory_xact_lock({LIVENESS_LOCK}, hashtext(node_id))) \
             RETURNING node_id"
        ))
        .load(c)?;
        let cleared = sql_query(
            "DELETE FROM presence p WHERE NOT EXISTS \
             (SELECT 1 FROM nodes n WHERE n.node_id = p.node_id)",
        )
        .execute(c)?;
        Ok((dead.into_iter().map(|r| r.node_id).collect(), cleared))
    })
}

/// A node's orderly exit: its presence and its lease row go at once.
pub fn leave(conn: &mut DbConn, node: &str) -> QueryResult<()> {
    let c = pg(conn)?;
    c.transaction(|c| {
        sql_query("DELETE FROM presence WHERE node_id = $1")
            .bind::<Text, _>(node)
            .execute(c)?;
        sql_query("DELETE FROM nodes WHERE node_id = $1")
            .bind::<Text, _>(node)
            .execute(c)
            .map(drop)
    })
}

#[derive(QueryableByName)]
struct HolderRow {
    #[diesel(sql_type = Text)]
    node_id: String,
    #[diesel(sql_type = Text)]
    session_id: String,
}

/// Writes presence changes in order (inside the batch's transaction). A device coming online
/// whose previous session lives on another node gets that session kicked (4002 there).
pub fn apply_presence(
    conn: &mut DbConn,
    node: &str,
    changes: &[PresenceChange],
) -> QueryResult<()> {
    // Rows are locked in device order (a stable sort keeps each device's changes in order), so
    // two nodes' batches never wait on each other's rows in a cycle.
    let mut ordered: Vec<&PresenceChange> = changes.iter().collect();
    ordered.sort_by(|a, b| a.device_id().cmp(b.device_id()));
    for change in ordered {
        match change {
            PresenceChange::Online {
                device_id,
                session_id,
                ..
            } => {
                if write_presence(conn, node, change, "DO NOTHING")? {
                    continue;
                }
                // The device has a row: take it over (a concurrent first insert has committed
                // by now — the insert above waited for it) and kick the session it names.
                let holder: Option<HolderRow> = sql_query(
                    "SELECT node_id, session_id FROM presence WHERE device_id = $1 FOR UPDATE",
                )
                .bind::<Text, _>(device_id)
                .get_result(pg(conn)?)
                .optional()?;
                write_presence(
                    conn,
                    node,
                    change,
                    "DO UPDATE SET user_id = excluded.user_id, name = excluded.name, \
                     node_id = excluded.node_id, session_id = excluded.session_id, \
                     connected_at = excluded.connected_at",
                )?;
                if let Some(old) =
                    holder.filter(|h| h.session_id != *session_id && h.node_id != node)
                {
                    notify(
                        conn,
                        &Signal::Kick {
                            node: old.node_id,
                            device: device_id.clone(),
                            session: old.session_id,
                        },
                    )?;
                }
            }
            PresenceChange::Reassert { .. } => {
                write_presence(conn, node, change, "DO NOTHING")?;
            }
            PresenceChange::Offline {
                device_id,
                session_id,
            } => {
                sql_query("DELETE FROM presence WHERE device_id = $1 AND session_id = $2")
                    .bind::<Text, _>(device_id)
                    .bind::<Text, _>(session_id)
                    .execute(pg(conn)?)?;
            }
        }
    }
    Ok(())
}

/// Writes the presence row of an `Online` or `Reassert` change, `on_conflict` deciding what
/// happens when the device has one already; true if a row was written.
fn write_presence(
    conn: &mut DbConn,
    node: &str,
    change: &PresenceChange,
    on_conflict: &str,
) -> QueryResult<bool> {
    let (PresenceChange::Online {
        device_id,
        user_id,
        name,
        session_id,
        connected_at,
    }
    | PresenceChange::Reassert {
        device_id,
        user_id,
        name,
        session_id,
        connected_at,
    }) = change
    else {
        return Ok(false);
    };
    let n = sql_query(format!(
        "INSERT INTO presence (device_id, user_id, name, node_id, session_id, connected_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (device_id) {on_conflict}"
    ))
    .bind::<Text, _>(device_id)
    .bind::<Text, _>(user_id)
    .bind::<Text, _>(name)
    .bind::<Text, _>(node)
    .bind::<Text, _>(session_id)
    .bind::<BigInt, _>(connected_at)
    .execute(pg(conn)?)?;
    Ok(n == 1)
}

/// A revoked device is offline cluster-wide from the revocation's commit.
pub fn forget_presence(conn: &mut DbConn, device_id: &str) -> QueryResult<()> {
    sql_query("DELETE FROM presence WHERE device_id = $1")
        .bind::<Text, _>(device_id)
        .execute(pg(conn)?)
        .map(drop)
}

/// One online device, cluster-wide.
#[derive(QueryableByName, Debug)]
pub struct PresenceRow {
    #[diesel(sql_type = Text)]
    pub device_id: String,
    #[diesel(sql_type = Text)]
    pub user_id: String,
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = BigInt)]
    pub connected_at: i64,
}

/// A page of online devices by device id, after a cursor, optionally of one user.
pub fn presence_page(
    conn: &mut DbConn,
    user_id: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> QueryResult<Vec<PresenceRow>> {
    sql_query(
        "SELECT device_id, user_id, name, connected_at FROM presence \
         WHERE ($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR device_id > $2) \
         ORDER BY device_id LIMIT $3",
    )
    .bind::<Nullable<Text>, _>(user_id)
    .bind::<Nullable<Text>, _>(after)
    .bind::<BigInt, _>(limit)
    .load(pg(conn)?)
}

#[derive(QueryableByName)]
struct CountsRow {
    #[diesel(sql_type = BigInt)]
    devices: i64,
    #[diesel(sql_type = BigInt)]
    users: i64,
}

/// How many devices and users are online, cluster-wide (optionally of one user).
pub fn presence_counts(conn: &mut DbConn, user_id: Option<&str>) -> QueryResult<(i64, i64)> {
    let row: CountsRow = sql_query(
        "SELECT count(*) AS devices, count(DISTINCT user_id) AS users FROM presence \
         WHERE ($1::text IS NULL OR user_id = $1)",
    )
    .bind::<Nullable<Text>, _>(user_id)
    .get_result(pg(conn)?)?;
    Ok((row.devices, row.users))
}

#[derive(QueryableByName)]
struct SinceRow {
    #[diesel(sql_type = Text)]
    device_id: String,
    #[diesel(sql_type = BigInt)]
    connected_at: i64,
}

/// Which of these devices are online anywhere in the cluster, and since when.
pub fn online_since(conn: &mut DbConn, device_ids: &[String]) -> QueryResult<Vec<(String, i64)>> {
    let rows: Vec<SinceRow> =
        // One primary-key probe per id, forced: the subquery cannot be flattened (`OFFSET 0`).
        // As a plain join the planner, costing each probe as a random read, hashed the list and
        // scanned the whole table once there were some 40 ids (one row per session online):
        // 0.7-1 ms a batch at 10,000 sessions; `= ANY($1)` sorted the list and went through a
        // bitmap.
        sql_query(
            "SELECT t.id AS device_id, p.connected_at FROM unnest($1::text[]) AS t(id) \
             CROSS JOIN LATERAL (SELECT connected_at FROM presence \
               WHERE device_id = t.id OFFSET 0) AS p",
        )
            .bind::<Array<Text>, _>(device_ids)
            .load(pg(conn)?)?;
    Ok(rows
        .into_iter()
        .map(|r| (r.device_id, r.connected_at))
        .collect())
}

/// One delivery of a batch another node committed.
#[derive(QueryableByName, Debug)]
pub struct BatchDelivery {
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
    #[diesel(sql_type = Text)]
    pub id: String,
    #[diesel(sql_type = BigInt)]
    pub created_at: i64,
    #[diesel(sql_type = BigInt)]
    pub expires_at: i64,
    #[diesel(sql_type = Text)]
    pub payload: String,
    #[diesel(sql_type = Text)]
    pub device_id: String,
}

/// The unacked deliveries of notifications `lo..=hi`, in `seq` order.
pub fn batch_deliveries(conn: &mut DbConn, lo: i64, hi: i64) -> QueryResult<Vec<BatchDelivery>> {
    sql_query(
        // Driven from `deliveries` by its key, whose prefix is `notification_seq`, so the plan
        // stays an index range scan even before PostgreSQL has statistics on the tables.
        "SELECT n.seq, n.id, n.created_at, n.expires_at, n.payload, d.device_id \
         FROM deliveries d JOIN notifications n ON n.seq = d.notification_seq \
         WHERE d.notification_seq BETWEEN $1 AND $2 AND d.state < 2 \
         ORDER BY d.notification_seq, d.device_id",
    )
    .bind::<BigInt, _>(lo)
    .bind::<BigInt, _>(hi)
    .load(pg(conn)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_small_tagged_json() {
        let s = Signal::Posts {
            node: "n1".into(),
            run: 3,
            batch: 7,
            lo: 10,
            hi: 12,
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(
            text,
            r#"{"k":"posts","node":"n1","run":3,"batch":7,"lo":10,"hi":12}"#
        );
        assert_eq!(serde_json::from_str::<Signal>(&text).unwrap(), s);
        let kick: Signal =
            serde_json::from_str(r#"{"k":"kick","node":"a","device":"d","session":"s"}"#).unwrap();
        assert!(matches!(kick, Signal::Kick { .. }));
    }
}
