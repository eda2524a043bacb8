-- Deliveries keyed by (notification_seq, device_id). Keyed by device first, each delivery a batch
-- inserted went to a random leaf of the key's index, plus an entry in `deliveries_by_notification`;
-- an ack (never a HOT update: `state` is in `deliveries_unacked`'s predicate) added entries to
-- both again. Keyed by notification first, a batch's entries land on the key's newest leaves, and
-- the key's prefix serves the look-ups by notification (status, purge's cascade, a cluster's
-- batch reads), so `deliveries_by_notification` goes: one index entry less per insert and per ack.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_pkey;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_pkey PRIMARY KEY (notification_seq, device_id);
DROP INDEX deliveries_by_notification;
