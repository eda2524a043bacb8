//! Every SQL statement Herald runs, as functions of `&mut DbConn`. Callers decide the transaction.

use std::collections::HashMap;

use diesel::prelude::*;

use super::fixed::{self, rows_sql};
use super::schema::{deliveries, devices, notifications, service_keys};
use super::DbConn;

/// `deliveries.state`: stored, not yet written to a socket.
pub const STATE_PENDING: i16 = 0;
/// `deliveries.state`: written to one of the device's sessions, not yet acked.
pub const STATE_DELIVERED: i16 = 1;
/// `deliveries.state`: acked by the device; never delivered to it again.
pub const STATE_ACKED: i16 = 2;

// The state tests below are SQL literals, not bound parameters: SQLite re-prepares a statement on
// every execution when a bound value decides whether a partial index (`WHERE state < 2`) applies.

/// `deliveries.state < 2`: pending or delivered, not yet acked.
fn unacked() -> diesel::expression::SqlLiteral<diesel::sql_types::Bool> {
    diesel::dsl::sql("deliveries.state < 2")
}

#[derive(Debug, Clone, Queryable, Insertable)]
#[diesel(table_name = service_keys)]
pub struct ServiceKeyRow {
    pub id: String,
    pub name: String,
    pub key_hash: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, Queryable, Insertable)]
#[diesel(table_name = devices)]
pub struct DeviceRow {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub token_hash: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub last_seen: Option<i64>,
}

#[derive(Debug, Clone, Queryable)]
pub struct NotificationRow {
    pub seq: i64,
    pub id: String,
    pub poster: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub payload: String,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub device_count: i32,
    pub delivered_now: Option<i32>,
}

/// A notification to insert (`insert_posts`).
#[derive(Debug, Clone)]
pub struct NewNotificationRow<'a> {
    pub id: &'a str,
    pub poster: &'a str,
    pub created_at: i64,
    pub expires_at: i64,
    pub payload: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub request_hash: Option<&'a str>,
    pub device_count: i32,
}

/// A `seq` (SQLite's `LastSeq`).
#[derive(QueryableByName)]
struct Seq {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    seq: i64,
}

/// A created notification's id and `seq` (`RETURNING`, PostgreSQL).
#[derive(QueryableByName)]
struct IdSeq {
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    seq: i64,
}

rows_sql! {
    /// The last `seq` ever given (AUTOINCREMENT keeps it in `sqlite_sequence`; the table's own
    /// largest as well, in case that row was ever edited), 0 before the first notification. No
    /// row values; run as one empty row.
    LastSeq = (
        concat!(
            "SELECT max(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'notifications'), 0), ",
            "COALESCE((SELECT max(seq) FROM notifications), 0)) AS seq"
        ),
        "",
        ""
    );
    /// Rows `(seq, id, poster, created_at, expires_at, payload, idempotency_key, request_hash,
    /// device_count)`. The single writer numbers a batch's posts itself, from `LastSeq`: a
    /// `RETURNING` made SQLite collect the rows in a temporary B-tree and hand back a text id
    /// per row to be matched up again.
    InsertNotifications = (
        concat!(
            "INSERT INTO notifications (seq, id, poster, created_at, expires_at, payload, ",
            "idempotency_key, request_hash, device_count) VALUES "
        ),
        "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ""
    );
    /// Rows `(device_id, notification_seq)`.
    InsertDeliveries = (
        "INSERT INTO deliveries (device_id, notification_seq, state) VALUES ",
        "(?, ?, 0)",
        ""
    );
    // Marks and acks go one row per run (`fixed::execute_one`; their text is valid for one row
    // only, so never `fixed::execute` them): an `UPDATE … FROM (VALUES …)`
    // over many rows made SQLite build a temporary B-tree of the join on every run, and cost
    // 2–3 times as many instructions per row as a key look-up per row does (`benches/writer.rs`).
    /// One row `(device_id, notification_seq)`; pending, it becomes delivered at the batch's time.
    MarkDelivered = (
        "UPDATE deliveries SET state = 1, delivered_at = ? WHERE state = 0 AND ",
        "device_id = ? AND notification_seq = ?",
        ""
    );
    /// One row `(device_id, notification id)`; pending, it becomes delivered and acked.
    AckPending = (
        "UPDATE deliveries SET state = 2, acked_at = ?, delivered_at = ? WHERE state = 0 AND ",
        "device_id = ? AND notification_seq = (SELECT seq FROM notifications WHERE id = ?)",
        ""
    );
    /// One row `(device_id, notification id)`; delivered, it becomes acked.
    AckDelivered = (
        "UPDATE deliveries SET state = 2, acked_at = ? WHERE state = 1 AND ",
        "device_id = ? AND notification_seq = (SELECT seq FROM notifications WHERE id = ?)",
        ""
    );
    /// Rows `(device_id, ms)`, one per device (the caller keeps each device's latest).
    TouchLastSeen = (
        "UPDATE devices SET last_seen = s.column2 FROM (VALUES ",
        "(?, ?)",
        ") AS s WHERE devices.id = s.column1"
    );
    /// Rows: device ids; answers the live ones.
    LiveDevices = (
        "SELECT id FROM devices WHERE revoked_at IS NULL AND id IN (",
        "?",
        ")"
    );
    /// Rows: user ids; answers their live devices as `(user_id, id)`.
    DevicesOfUsers = (
        "SELECT user_id, id FROM devices WHERE revoked_at IS NULL AND user_id IN (",
        "?",
        ")"
    );
}

/// A device id (SQLite's batch statements).
#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
}

/// A device and its user (SQLite's batch statements).
#[derive(QueryableByName)]
struct UserDevice {
    #[diesel(sql_type = diesel::sql_types::Text)]
    user_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
}

#[derive(Debug, Clone, Queryable)]
pub struct DeliveryRow {
    pub device_id: String,
    pub state: i16,
    pub delivered_at: Option<i64>,
    pub acked_at: Option<i64>,
}

/// One unacked notification of a device, as replay sends it.
#[derive(Debug, Clone, Queryable)]
pub struct PendingRow {
    pub seq: i64,
    pub id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub payload: String,
}

// ---- service keys -------------------------------------------------------------------------

pub fn insert_service_key(conn: &mut DbConn, row: &ServiceKeyRow) -> QueryResult<()> {
    diesel::insert_into(service_keys::table)
        .values(row)
        .execute(conn)
        .map(drop)
}

/// Keys not revoked, oldest first.
pub fn list_service_keys(conn: &mut DbConn) -> QueryResult<Vec<ServiceKeyRow>> {
    service_keys::table
        .filter(service_keys::revoked_at.is_null())
        .order(service_keys::created_at.asc())
        .load(conn)
}

/// Revokes a live key; false when there is no such live key.
pub fn revoke_service_key(conn: &mut DbConn, id: &str, now: i64) -> QueryResult<bool> {
    let n = diesel::update(service_keys::table)
        .filter(service_keys::id.eq(id))
        .filter(service_keys::revoked_at.is_null())
        .set(service_keys::revoked_at.eq(now))
        .execute(conn)?;
    if n == 1 && matches!(conn, DbConn::Pg(_)) {
        // Every node forgets the key at once (their credential caches included).
        super::cluster::notify(conn, &super::cluster::Signal::RevokeKey { key: id.into() })?;
    }
    Ok(n == 1)
}

/// The id of the live key with this hash.
pub fn service_key_by_hash(conn: &mut DbConn, hash: &str) -> QueryResult<Option<String>> {
    service_keys::table
        .filter(service_keys::key_hash.eq(hash))
        .filter(service_keys::revoked_at.is_null())
        .select(service_keys::id)
        .first(conn)
        .optional()
}

// ---- devices --------------------------------------------------------------------------------

pub fn insert_device(conn: &mut DbConn, row: &DeviceRow) -> QueryResult<()> {
    diesel::insert_into(devices::table)
        .values(row)
        .execute(conn)
        .map(drop)
}

/// The live device with this token hash.
pub fn device_by_hash(conn: &mut DbConn, hash: &str) -> QueryResult<Option<DeviceRow>> {
    devices::table
        .filter(devices::token_hash.eq(hash))
        .filter(devices::revoked_at.is_null())
        .first(conn)
        .optional()
}

/// A user's live devices, oldest first.
pub fn devices_of_user(conn: &mut DbConn, user_id: &str) -> QueryResult<Vec<DeviceRow>> {
    devices::table
        .filter(devices::user_id.eq(user_id))
        .filter(devices::revoked_at.is_null())
        .order((devices::created_at.asc(), devices::id.asc()))
        .load(conn)
}

/// Revokes a live device and drops its unacked deliveries; the revoked row, or None.
pub fn revoke_device(conn: &mut DbConn, id: &str, now: i64) -> QueryResult<Option<DeviceRow>> {
    let device: Option<DeviceRow> = devices::table
        .filter(devices::id.eq(id))
        .filter(devices::revoked_at.is_null())
        .first(conn)
        .optional()?;
    if device.is_some() {
        diesel::update(devices::table.filter(devices::id.eq(id)))
            .set(devices::revoked_at.eq(now))
            .execute(conn)?;
        diesel::delete(
            deliveries::table
                .filter(deliveries::device_id.eq(id))
                .filter(unacked()),
        )
        .execute(conn)?;
        if matches!(conn, DbConn::Pg(_)) {
            super::cluster::forget_presence(conn, id)?;
            // Every node forgets the device's credential and closes its session there (4001).
            super::cluster::notify(
                conn,
                &super::cluster::Signal::RevokeDevice { device: id.into() },
            )?;
        }
    }
    Ok(device)
}

/// Of these device ids, the ones that name live devices.
pub fn live_device_ids(conn: &mut DbConn, ids: &[String]) -> QueryResult<Vec<String>> {
    match conn {
        DbConn::Sqlite(c) => Ok(fixed::load::<LiveDevices, _, IdRow>(c, ids)?
            .into_iter()
            .map(|r| r.id)
            .collect()),
        DbConn::Pg(_) => devices::table
            .filter(devices::id.eq_any(ids))
            .filter(devices::revoked_at.is_null())
            .select(devices::id)
            .load(conn),
    }
}

/// The live devices of these users, as `(user_id, device_id)`.
pub fn devices_of_users(
    conn: &mut DbConn,
    user_ids: &[String],
) -> QueryResult<Vec<(String, String)>> {
    match conn {
        DbConn::Sqlite(c) => Ok(fixed::load::<DevicesOfUsers, _, UserDevice>(c, user_ids)?
            .into_iter()
            .map(|r| (r.user_id, r.id))
            .collect()),
        DbConn::Pg(_) => devices::table
            .filter(devices::user_id.eq_any(user_ids))
            .filter(devices::revoked_at.is_null())
            .select((devices::user_id, devices::id))
            .load(conn),
    }
}

// ---- notifications --------------------------------------------------------------------------

/// The notification a poster made earlier with this idempotency key.
pub fn find_idempotent(
    conn: &mut DbConn,
    poster: &str,
    key: &str,
) -> QueryResult<Option<NotificationRow>> {
    notifications::table
        .filter(notifications::poster.eq(poster))
        .filter(notifications::idempotency_key.eq(key))
        .first(conn)
        .optional()
}

/// Inserts notifications and their pending deliveries, `(device_id, notification id)`; returns
/// the notifications' `seq`s, in the order of `rows`. On PostgreSQL this is one statement (one
/// round trip): the deliveries take their `seq`s from the notifications' `RETURNING` inside it,
/// and the rows travel as arrays, so the text is the same for every batch. On SQLite, the
/// writer numbers the posts itself (`LastSeq`), then two statements kept prepared (`fixed`'s
/// chunks) — which is right only inside the single writer's transaction (`write_tx`, `BEGIN
/// IMMEDIATE`), where nothing else can take a seq between the read and the insert.
pub fn insert_posts(
    conn: &mut DbConn,
    rows: &[NewNotificationRow<'_>],
    targets: &[(&str, &str)],
) -> QueryResult<Vec<i64>> {
    use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text};
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    match conn {
        DbConn::Pg(c) => {
            let created: Vec<IdSeq> = diesel::sql_query(
                "WITH n AS ( \
               INSERT INTO notifications (id, poster, created_at, expires_at, payload, \
                 idempotency_key, request_hash, device_count) \
               SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], \
                 $5::text[], $6::text[], $7::text[], $8::int[]) \
               RETURNING id, seq \
             ), d AS ( \
               INSERT INTO deliveries (device_id, notification_seq, state) \
               SELECT t.device_id, n.seq, 0 \
               FROM unnest($9::text[], $10::text[]) AS t(device_id, id) JOIN n ON n.id = t.id \
             ) \
             SELECT id, seq FROM n",
            )
            .bind::<Array<Text>, _>(rows.iter().map(|r| r.id).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(rows.iter().map(|r| r.poster).collect::<Vec<_>>())
            .bind::<Array<BigInt>, _>(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
            .bind::<Array<BigInt>, _>(rows.iter().map(|r| r.expires_at).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(rows.iter().map(|r| r.payload).collect::<Vec<_>>())
            .bind::<Array<Nullable<Text>>, _>(
                rows.iter().map(|r| r.idempotency_key).collect::<Vec<_>>(),
            )
            .bind::<Array<Nullable<Text>>, _>(
                rows.iter().map(|r| r.request_hash).collect::<Vec<_>>(),
            )
            .bind::<Array<Integer>, _>(rows.iter().map(|r| r.device_count).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(targets.iter().map(|(d, _)| *d).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(targets.iter().map(|(_, id)| *id).collect::<Vec<_>>())
            .load(c)?;
            let by_id: HashMap<String, i64> = created.into_iter().map(|r| (r.id, r.seq)).collect();
            Ok(rows.iter().map(|r| by_id[r.id]).collect())
        }
        DbConn::Sqlite(c) => {
            // SQLite has one writer (this thread, in this transaction), so the batch's posts
            // take the next seqs in order; the table's AUTOINCREMENT then records the last.
            let last = fixed::load_one::<LastSeq, _, Seq>(c, &())?.map_or(0, |r| r.seq);
            let values: Vec<_> = rows
                .iter()
                .zip(last + 1..)
                .map(|(r, seq)| {
                    (
                        seq,
                        r.id,
                        r.poster,
                        r.created_at,
                        r.expires_at,
                        r.payload,
                        r.idempotency_key,
                        r.request_hash,
                        r.device_count,
                    )
                })
                .collect();
            fixed::execute::<InsertNotifications, _>(c, 0, &values)?;
            let seq_of: HashMap<&str, i64> = rows.iter().map(|r| r.id).zip(last + 1..).collect();
            let deliveries: Vec<(&str, i64)> = targets
                .iter()
                .map(|(device, id)| (*device, seq_of[*id]))
                .collect();
            fixed::execute::<InsertDeliveries, _>(c, 0, &deliveries)?;
            Ok((last + 1..).take(rows.len()).collect())
        }
    }
}

/// Frees an idempotency key older than the window for reuse.
pub fn forget_idempotency_key(conn: &mut DbConn, seq: i64) -> QueryResult<()> {
    diesel::update(notifications::table.filter(notifications::seq.eq(seq)))
        .set(notifications::idempotency_key.eq(None::<String>))
        .execute(conn)
        .map(drop)
}

/// Remembers how many devices a post reached on the spot, for idempotent repeats.
pub fn set_delivered_now(conn: &mut DbConn, seq: i64, n: i32) -> QueryResult<()> {
    diesel::update(notifications::table.filter(notifications::seq.eq(seq)))
        .set(notifications::delivered_now.eq(n))
        .execute(conn)
        .map(drop)
}

pub fn notification_by_id(conn: &mut DbConn, id: &str) -> QueryResult<Option<NotificationRow>> {
    notifications::table
        .filter(notifications::id.eq(id))
        .first(conn)
        .optional()
}

/// The deliveries of one notification, by device id.
pub fn deliveries_of(conn: &mut DbConn, seq: i64) -> QueryResult<Vec<DeliveryRow>> {
    deliveries::table
        .filter(deliveries::notification_seq.eq(seq))
        .select((
            deliveries::device_id,
            deliveries::state,
            deliveries::delivered_at,
            deliveries::acked_at,
        ))
        .order(deliveries::device_id.asc())
        .load(conn)
}

/// Up to `limit` unacked, unexpired notifications of a device after `after_seq`, in creation order.
pub fn pending_for_device(
    conn: &mut DbConn,
    device_id: &str,
    after_seq: i64,
    now: i64,
    limit: i64,
) -> QueryResult<Vec<PendingRow>> {
    deliveries::table
        .inner_join(notifications::table)
        .filter(deliveries::device_id.eq(device_id))
        .filter(unacked())
        .filter(deliveries::notification_seq.gt(after_seq))
        .filter(notifications::expires_at.gt(now))
        .order(deliveries::notification_seq.asc())
        .limit(limit)
        .select((
            notifications::seq,
            notifications::id,
            notifications::created_at,
            notifications::expires_at,
            notifications::payload,
        ))
        .load(conn)
}

// ---- whole batches ---------------------------------------------------------------------------
//
// On PostgreSQL every statement is a network round trip, so a batch's marks, acks and last-seen
// times each go in one statement over `unnest`ed arrays. On SQLite statements are in-process
// calls: each goes as a few cached statements with the rows as bound parameters (`fixed`).

/// Marks many devices' notifications as written to their sockets; returns the rows changed.
pub fn mark_delivered_all(
    conn: &mut DbConn,
    marks: &[(String, Vec<i64>)],
    at: i64,
) -> QueryResult<usize> {
    use diesel::sql_types::{Array, BigInt, Text};
    if marks.is_empty() {
        return Ok(0);
    }
    match conn {
        DbConn::Pg(c) => {
            let (devices, seqs): (Vec<&str>, Vec<i64>) = marks
                .iter()
                .flat_map(|(d, seqs)| seqs.iter().map(move |s| (d.as_str(), *s)))
                .unzip();
            diesel::sql_query(
                "UPDATE deliveries SET state = 1, delivered_at = $1 \
                 FROM unnest($2::text[], $3::bigint[]) AS m(device_id, seq) \
                 WHERE deliveries.device_id = m.device_id AND deliveries.notification_seq = m.seq \
                 AND deliveries.state = 0",
            )
            .bind::<BigInt, _>(at)
            .bind::<Array<Text>, _>(devices)
            .bind::<Array<BigInt>, _>(seqs)
            .execute(c)
        }
        DbConn::Sqlite(c) => {
            let mut changed = 0;
            for (device, seqs) in marks {
                for seq in seqs {
                    changed += fixed::execute_one::<MarkDelivered, _>(c, at, &(&**device, *seq))?;
                }
            }
            Ok(changed)
        }
    }
}

/// What a batch's acks changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Acked {
    /// Deliveries acked.
    pub acked: usize,
    /// Of those, deliveries whose mark had not been written yet: the ack stands for it too
    /// (`delivered_at` = the ack's time), so they count as delivered now.
    pub delivered: usize,
}

/// Acks many devices' notifications by id; other devices' deliveries and unknown ids are ignored.
/// The caller learns how many deliveries this made delivered as well (those still pending become
/// delivered and acked at once). SQLite: per row, one or two cached key look-ups.
pub fn ack_all(conn: &mut DbConn, acks: &[(String, Vec<String>)], at: i64) -> QueryResult<Acked> {
    use diesel::sql_types::{Array, BigInt, Text};
    if acks.is_empty() {
        return Ok(Acked::default());
    }
    let mut done = Acked::default();
    match conn {
        DbConn::Pg(c) => {
            let (devices, ids): (Vec<&str>, Vec<&str>) = acks
                .iter()
                .flat_map(|(d, ids)| ids.iter().map(move |i| (d.as_str(), i.as_str())))
                .unzip();
            #[derive(QueryableByName)]
            struct Counts {
                #[diesel(sql_type = BigInt)]
                acked: i64,
                #[diesel(sql_type = BigInt)]
                delivered: i64,
            }
            // One statement. `s` locks each acked delivery that is not acked yet and reads its
            // state (`was`) — under READ COMMITTED a row another node changed meanwhile is read
            // in its latest version, so the count of those still pending stays exact — and the
            // update finds each row again by its `ctid` (held by the lock, so it cannot move).
            let n: Counts = diesel::sql_query(
                "WITH s AS MATERIALIZED ( \
                   SELECT d.ctid AS tid, d.state AS was \
                   FROM unnest($2::text[], $3::text[]) AS a(device_id, id) \
                   JOIN notifications n ON n.id = a.id \
                   JOIN deliveries d ON d.device_id = a.device_id \
                     AND d.notification_seq = n.seq AND d.state < 2 \
                   FOR UPDATE OF d \
                 ), u AS ( \
                   UPDATE deliveries SET state = 2, acked_at = $1, \
                     delivered_at = CASE WHEN deliveries.state = 0 THEN $1 \
                       ELSE deliveries.delivered_at END \
                   FROM s WHERE deliveries.ctid = s.tid \
                   RETURNING s.was \
                 ) \
                 SELECT count(*) AS acked, count(*) FILTER (WHERE was = 0) AS delivered FROM u",
            )
            .bind::<BigInt, _>(at)
            .bind::<Array<Text>, _>(&devices)
            .bind::<Array<Text>, _>(&ids)
            .get_result(c)?;
            done.acked = n.acked as usize;
            done.delivered = n.delivered as usize;
        }
        DbConn::Sqlite(c) => {
            // A delivery is either marked already (delivered → acked) or still pending (an ack
            // that overtook its mark: pending → delivered and acked at once). Which one a
            // batch's acks mostly find depends on the rate, so each row tries first what the
            // row before it found, and the second statement runs only on a miss.
            let ack = |c: &mut diesel::SqliteConnection, row: &(&str, &str), pending: bool| {
                let n = if pending {
                    fixed::execute_one::<AckPending, _>(c, at, row)?
                } else {
                    fixed::execute_one::<AckDelivered, _>(c, at, row)?
                };
                QueryResult::Ok(n > 0)
            };
            let mut expect_pending = false;
            for (device, ids) in acks {
                for id in ids {
                    let row = (&**device, &**id);
                    let found = if ack(c, &row, expect_pending)? {
                        Some(expect_pending)
                    } else if ack(c, &row, !expect_pending)? {
                        Some(!expect_pending)
                    } else {
                        None
                    };
                    if let Some(was_pending) = found {
                        done.acked += 1;
                        done.delivered += usize::from(was_pending);
                        expect_pending = was_pending;
                    }
                }
            }
        }
    }
    Ok(done)
}

/// Records many devices' last-seen times (the latest given for each device wins).
pub fn touch_last_seen_all(conn: &mut DbConn, seen: &[(String, i64)]) -> QueryResult<()> {
    use diesel::sql_types::{Array, BigInt, Text};
    if seen.is_empty() {
        return Ok(());
    }
    match conn {
        DbConn::Pg(c) => {
            let (devices, ats): (Vec<&str>, Vec<i64>) =
                seen.iter().map(|(d, at)| (d.as_str(), *at)).unzip();
            diesel::sql_query(
                "UPDATE devices SET last_seen = s.at \
                 FROM (SELECT id, max(at) AS at FROM unnest($1::text[], $2::bigint[]) AS u(id, at) GROUP BY id) AS s \
                 WHERE devices.id = s.id",
            )
            .bind::<Array<Text>, _>(devices)
            .bind::<Array<BigInt>, _>(ats)
            .execute(c)
            .map(drop)
        }
        DbConn::Sqlite(c) => {
            // One row per device, so the latest time wins across the statement's chunks too.
            let mut latest: HashMap<&str, i64> = HashMap::with_capacity(seen.len());
            for (d, at) in seen {
                let t = latest.entry(d.as_str()).or_insert(*at);
                *t = (*t).max(*at);
            }
            let rows: Vec<(&str, i64)> = latest.into_iter().collect();
            fixed::execute::<TouchLastSeen, _>(c, 0, &rows).map(drop)
        }
    }
}

/// Up to `limit` notifications that expired at or before `cutoff`, oldest first.
pub fn expired_before(conn: &mut DbConn, cutoff: i64, limit: i64) -> QueryResult<Vec<i64>> {
    notifications::table
        .filter(notifications::expires_at.le(cutoff))
        .order(notifications::expires_at.asc())
        .limit(limit)
        .select(notifications::seq)
        .load(conn)
}

/// Deletes these notifications and their deliveries; returns how many deliveries were unacked
/// (they expired without reaching their device).
pub fn delete_notifications(conn: &mut DbConn, seqs: &[i64]) -> QueryResult<u64> {
    let unacked = deliveries::table
        .filter(deliveries::notification_seq.eq_any(seqs))
        .filter(unacked())
        .count()
        .get_result::<i64>(conn)?;
    diesel::delete(deliveries::table.filter(deliveries::notification_seq.eq_any(seqs)))
        .execute(conn)?;
    diesel::delete(notifications::table.filter(notifications::seq.eq_any(seqs))).execute(conn)?;
    Ok(unacked as u64)
}

/// Answers whether the database is there.
pub fn ping(conn: &mut DbConn) -> QueryResult<()> {
    use diesel::connection::SimpleConnection;
    conn.batch_execute("SELECT 1")
}
