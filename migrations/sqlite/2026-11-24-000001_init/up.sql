-- Herald's schema for SQLite. Times are milliseconds since the Unix epoch (UTC).
CREATE TABLE service_keys (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE devices (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL,
    name        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT,
    last_seen   BIGINT
);
CREATE INDEX devices_by_user ON devices (user_id);

-- `seq` is the creation order: assigned by the single writer, so it is also commit order.
-- AUTOINCREMENT keeps it from ever being reused after old rows are purged.
CREATE TABLE notifications (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    id               TEXT NOT NULL UNIQUE,
    poster           TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL,
    payload          TEXT NOT NULL,
    idempotency_key  TEXT,
    request_hash     TEXT,
    device_count     INTEGER NOT NULL,
    delivered_now    INTEGER
);
CREATE UNIQUE INDEX notifications_idempotency ON notifications (poster, idempotency_key);
CREATE INDEX notifications_by_expiry ON notifications (expires_at);

-- One row per (notification, target device). state: 0 pending, 1 delivered, 2 acked.
CREATE TABLE deliveries (
    device_id         TEXT NOT NULL,
    notification_seq  BIGINT NOT NULL REFERENCES notifications (seq) ON DELETE CASCADE,
    state             SMALLINT NOT NULL,
    delivered_at      BIGINT,
    acked_at          BIGINT,
    PRIMARY KEY (device_id, notification_seq)
);
CREATE INDEX deliveries_unacked ON deliveries (device_id, notification_seq) WHERE state < 2;
CREATE INDEX deliveries_by_notification ON deliveries (notification_seq);
