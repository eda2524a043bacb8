//! Every SQL statement Herald runs, as functions of `&mut DbConn`. Callers decide the transaction.

use diesel::prelude::*;

use super::schema::{deliveries, devices, notifications, service_keys};
use super::DbConn;

/// `deliveries.state`: stored, not yet written to a socket.
pub const STATE_PENDING: i16 = 0;
/// `deliveries.state`: written to one of the device's sessions, not yet acked.
pub const STATE_DELIVERED: i16 = 1;
/// `deliveries.state`: acked by the device; never delivered to it again.
pub const STATE_ACKED: i16 = 2;

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

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = notifications)]
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
                .filter(deliveries::state.lt(STATE_ACKED)),
        )
        .execute(conn)?;
    }
    Ok(device)
}

/// Of these device ids, the ones that name live devices.
pub fn live_device_ids(conn: &mut DbConn, ids: &[String]) -> QueryResult<Vec<String>> {
    devices::table
        .filter(devices::id.eq_any(ids))
        .filter(devices::revoked_at.is_null())
        .select(devices::id)
        .load(conn)
}

/// The live devices of these users.
pub fn device_ids_of_users(conn: &mut DbConn, user_ids: &[String]) -> QueryResult<Vec<String>> {
    devices::table
        .filter(devices::user_id.eq_any(user_ids))
        .filter(devices::revoked_at.is_null())
        .select(devices::id)
        .load(conn)
}

/// Records when each device was last seen.
pub fn touch_last_seen(conn: &mut DbConn, device_id: &str, at: i64) -> QueryResult<()> {
    diesel::update(devices::table.filter(devices::id.eq(device_id)))
        .set(devices::last_seen.eq(at))
        .execute(conn)
        .map(drop)
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

/// Inserts a notification and one pending delivery per device; returns its `seq`.
pub fn insert_notification(
    conn: &mut DbConn,
    row: &NewNotificationRow<'_>,
    device_ids: &[String],
) -> QueryResult<i64> {
    let seq: i64 = diesel::insert_into(notifications::table)
        .values(row)
        .returning(notifications::seq)
        .get_result(conn)?;
    for chunk in device_ids.chunks(500) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|d| {
                (
                    deliveries::device_id.eq(d.as_str()),
                    deliveries::notification_seq.eq(seq),
                    deliveries::state.eq(STATE_PENDING),
                )
            })
            .collect();
        // Multi-row inserts are backend-specific in diesel, so this one names the backend.
        let insert = diesel::insert_into(deliveries::table).values(&rows);
        match conn {
            DbConn::Pg(c) => insert.execute(c)?,
            DbConn::Sqlite(c) => insert.execute(c)?,
        };
    }
    Ok(seq)
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
        .filter(deliveries::state.lt(STATE_ACKED))
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

/// Marks these notifications as written to the device's socket (pending ones only).
pub fn mark_delivered(
    conn: &mut DbConn,
    device_id: &str,
    seqs: &[i64],
    at: i64,
) -> QueryResult<usize> {
    diesel::update(
        deliveries::table
            .filter(deliveries::device_id.eq(device_id))
            .filter(deliveries::notification_seq.eq_any(seqs))
            .filter(deliveries::state.eq(STATE_PENDING)),
    )
    .set((
        deliveries::state.eq(STATE_DELIVERED),
        deliveries::delivered_at.eq(at),
    ))
    .execute(conn)
}

/// Acks the device's own deliveries of these notification ids; other ids are ignored.
pub fn ack(conn: &mut DbConn, device_id: &str, ids: &[String], at: i64) -> QueryResult<usize> {
    let seqs = notifications::table
        .filter(notifications::id.eq_any(ids))
        .select(notifications::seq);
    diesel::update(
        deliveries::table
            .filter(deliveries::device_id.eq(device_id))
            .filter(deliveries::notification_seq.eq_any(seqs))
            .filter(deliveries::state.lt(STATE_ACKED)),
    )
    .set((
        deliveries::state.eq(STATE_ACKED),
        deliveries::acked_at.eq(at),
    ))
    .execute(conn)
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
        .filter(deliveries::state.lt(STATE_ACKED))
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
