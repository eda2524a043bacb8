-- The cluster tables of the PostgreSQL schema, for one schema on both backends. SQLite is
-- single-node (a second node on the file is refused), so Herald keeps presence in memory there
-- and these tables stay empty.
CREATE TABLE nodes (
    node_id           TEXT PRIMARY KEY NOT NULL,
    started_at        BIGINT NOT NULL,
    lease_expires_at  BIGINT NOT NULL,
    lease_ms          BIGINT NOT NULL
);

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
