DROP INDEX notifications_idempotency;
CREATE UNIQUE INDEX notifications_idempotency ON notifications (poster, idempotency_key);
