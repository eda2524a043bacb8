-- Most posts carry no idempotency key: index only those that do (a key still identifies one
-- post per poster; `poster = $1 AND idempotency_key = $2` implies the index's condition), so a
-- post without one writes one index entry less.
DROP INDEX notifications_idempotency;
CREATE UNIQUE INDEX notifications_idempotency ON notifications (poster, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
