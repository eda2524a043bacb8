-- Several nodes on one database (issue 7). Times are milliseconds since the Unix epoch, taken
-- from the database's clock so nodes' clocks need not agree.

-- One row per live node; a node renews its lease on a timer, and the others clear the presence
-- of a node whose lease has expired.
CREATE TABLE nodes (
    node_id           TEXT PRIMARY KEY NOT NULL,
    started_at        BIGINT NOT NULL,
    lease_expires_at  BIGINT NOT NULL,
    lease_ms          BIGINT NOT NULL
);

-- Who is online, cluster-wide: one row per device with a live session, on the node holding it.
CREATE TABLE presence (
    device_id     TEXT PRIMARY KEY NOT NULL,
    user_id       TEXT NOT NULL,
    name          TEXT NOT NULL,
    node_id       TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    connected_at  BIGINT NOT NULL
);
CREATE INDEX presence_by_user ON presence (user_id, device_id);
CREATE INDEX presence_by_node ON presence (node_id);
