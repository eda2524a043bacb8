-- Deliveries keyed by (notification_seq, device_id), in a WITHOUT ROWID table. Keyed by device
-- first, every delivery a batch inserts, marks and acks landed on its own page of two B-trees (the
-- rowid table's key index and `deliveries_unacked`) besides the rowid table and
-- `deliveries_by_notification`: four B-trees per insert, and each random page written to the WAL
-- (and later checkpointed) once per commit that touched it. Keyed by notification first, a batch's
-- inserts, marks and acks fall on the few newest pages of one B-tree; only `deliveries_unacked`
-- (replay's and revocation's way in by device) is still written at random. The key's prefix is
-- the look-up by notification (status, purge's cascade), so `deliveries_by_notification` goes.
CREATE TABLE deliveries_by_seq (
    device_id         TEXT NOT NULL,
    notification_seq  BIGINT NOT NULL REFERENCES notifications (seq) ON DELETE CASCADE,
    state             SMALLINT NOT NULL,
    delivered_at      BIGINT,
    acked_at          BIGINT,
    PRIMARY KEY (notification_seq, device_id)
) WITHOUT ROWID;
INSERT INTO deliveries_by_seq (device_id, notification_seq, state, delivered_at, acked_at)
    SELECT device_id, notification_seq, state, delivered_at, acked_at FROM deliveries;
DROP TABLE deliveries;
ALTER TABLE deliveries_by_seq RENAME TO deliveries;
CREATE INDEX deliveries_unacked ON deliveries (device_id, notification_seq) WHERE state < 2;
