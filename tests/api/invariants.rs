//! DESIGN.md's invariants that are not covered by a feature test elsewhere.

use std::path::Path;

use awc::http::StatusCode;
use serde_json::json;

use crate::both_backends;
use crate::helpers::*;

/// Invariant 1: no pool or pooled connection is named outside the database layer, so nothing
/// async can hold one.
#[test]
fn pooled_connections_live_only_in_the_database_layer() {
    fn walk(dir: &Path, offenders: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, offenders);
                continue;
            }
            let rel = path
                .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel.starts_with("src/db/") || rel == "src/actors/db.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for needle in ["PooledConnection", "r2d2::", "Pool<", "DbPool"] {
                if text.contains(needle) {
                    offenders.push(format!("{rel} names {needle}"));
                }
            }
        }
    }
    let mut offenders = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut offenders,
    );
    assert!(offenders.is_empty(), "{offenders:?}");
}

both_backends!(
    a_full_mailbox_is_a_503_with_retry_after,
    authentication_writes_nothing
);

/// Invariant 2: back-pressure is the executor's bounded mailbox; past it, requests are answered
/// `503` with `Retry-After` at once, never a hang or a `500`, and the node recovers.
async fn a_full_mailbox_is_a_503_with_retry_after(b: Backend) {
    let app = spawn_app_with(b, |a| {
        a.db_pool_size = 2;
        a.db_queue_limit = 2;
    })
    .await;
    let key = app.service_key().await;
    let calls =
        (0..200).map(|_| app.call_raw("GET", "/v1/devices?user_id=u", Some(&key), None, &[]));
    let answers = futures_util::future::join_all(calls).await;
    let mut overloaded = 0;
    for (status, headers, body) in &answers {
        match *status {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                overloaded += 1;
                assert_eq!(body["error"]["code"], "overloaded", "{body}");
                assert!(headers.contains_key("retry-after"));
            }
            other => panic!("got {other}: {body}"),
        }
    }
    assert!(
        overloaded > 0,
        "200 concurrent reads never filled a mailbox of 2"
    );
    let stats = app.pool_settles().await;
    assert!(
        stats["executor"]["rejected"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert_eq!(
        app.get("/v1/devices?user_id=u", &key).await.0,
        StatusCode::OK
    );
}

/// Invariant 5: authenticating a request reads and never writes.
async fn authentication_writes_nothing(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "ivy").await;
    let before = app.stats().await["writes"]["transactions"].clone();
    for _ in 0..20 {
        assert_eq!(
            app.get("/v1/devices?user_id=ivy", &key).await.0,
            StatusCode::OK
        );
        assert_eq!(
            app.get("/v1/devices?user_id=ivy", &phone.token).await.0,
            StatusCode::FORBIDDEN
        );
    }
    let (status, _) = app
        .post("/v1/devices", "hsk_not_a_key", json!({"user_id": "x"}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.stats().await["writes"]["transactions"], before);
}
