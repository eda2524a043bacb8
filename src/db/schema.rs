//! The portable schema, valid for both backends (see `migrations/sqlite` and `migrations/postgres`).

diesel::table! {
    service_keys (id) {
        id -> Text,
        name -> Text,
        key_hash -> Text,
        created_at -> BigInt,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    devices (id) {
        id -> Text,
        user_id -> Text,
        name -> Text,
        token_hash -> Text,
        created_at -> BigInt,
        revoked_at -> Nullable<BigInt>,
        last_seen -> Nullable<BigInt>,
    }
}

diesel::table! {
    notifications (seq) {
        seq -> BigInt,
        id -> Text,
        poster -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        payload -> Text,
        idempotency_key -> Nullable<Text>,
        request_hash -> Nullable<Text>,
        device_count -> Integer,
        delivered_now -> Nullable<Integer>,
    }
}

diesel::table! {
    deliveries (device_id, notification_seq) {
        device_id -> Text,
        notification_seq -> BigInt,
        state -> SmallInt,
        delivered_at -> Nullable<BigInt>,
        acked_at -> Nullable<BigInt>,
    }
}

diesel::joinable!(deliveries -> notifications (notification_seq));
diesel::allow_tables_to_appear_in_same_query!(
    service_keys,
    devices,
    notifications,
    deliveries,
    nodes,
    presence
);

diesel::table! {
    nodes (node_id) {
        node_id -> Text,
        started_at -> BigInt,
        lease_expires_at -> BigInt,
        lease_ms -> BigInt,
    }
}

diesel::table! {
    presence (device_id) {
        device_id -> Text,
        user_id -> Text,
        name -> Text,
        node_id -> Text,
        session_id -> Text,
        connected_at -> BigInt,
    }
}
