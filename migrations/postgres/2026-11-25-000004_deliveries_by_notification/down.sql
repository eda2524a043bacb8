ALTER TABLE deliveries DROP CONSTRAINT deliveries_pkey;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_pkey PRIMARY KEY (device_id, notification_seq);
CREATE INDEX deliveries_by_notification ON deliveries (notification_seq);
