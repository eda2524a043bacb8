CREATE TABLE deliveries_by_device (
    device_id         TEXT NOT NULL,
    notification_seq  BIGINT NOT NULL REFERENCES notifications (seq) ON DELETE CASCADE,
    state             SMALLINT NOT NULL,
    delivered_at      BIGINT,
    acked_at          BIGINT,
    PRIMARY KEY (device_id, notification_seq)
);
INSERT INTO deliveries_by_device (device_id, notification_seq, state, delivered_at, acked_at)
    SELECT device_id, notification_seq, state, delivered_at, acked_at FROM deliveries;
DROP TABLE deliveries;
ALTER TABLE deliveries_by_device RENAME TO deliveries;
CREATE INDEX deliveries_unacked ON deliveries (device_id, notification_seq) WHERE state < 2;
CREATE INDEX deliveries_by_notification ON deliveries (notification_seq);
