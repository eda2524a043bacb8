//! The notification path: post → live push → ack → status; offline devices; replay; expiry.

use std::time::Duration;

use awc::http::StatusCode;
use serde_json::json;

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    live_delivery_ack_and_status,
    offline_device_gets_it_on_connect,
    unacked_come_again_acked_never,
    expired_never_come,
    replay_then_live_in_order_without_gaps,
    user_targets_reach_every_device_of_the_user,
);

async fn live_delivery_ack_and_status(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;
    assert_eq!(ws.hello["user_id"], "alice");
    assert!(ws.hello["session_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(ws.hello["heartbeat_interval_ms"].as_u64().unwrap() > 0);

    let (status, posted) = app
        .notify(&key, json!({"user_ids": ["alice"], "payload": {"title": "hi", "n": [1, 2]}, "ttl_seconds": 60}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
    assert_eq!(posted["devices"], 1);
    assert_eq!(posted["delivered_now"], 1);
    let id = posted["id"].as_str().unwrap();

    let got = ws.recv_notification().await;
    assert_eq!(got["id"], id);
    assert_eq!(got["payload"], json!({"title": "hi", "n": [1, 2]}));
    assert_eq!(got["created_at"], posted["created_at"]);
    assert_eq!(got["expires_at"], posted["expires_at"]);

    let path = format!("/v1/notifications/{id}");
    eventually("the delivery is marked delivered", || async {
        app.get(&path, &key).await.1["deliveries"][0]["state"] == "delivered"
    })
    .await;

    ws.ack(&[id]).await;
    eventually("the delivery is marked acked", || async {
        app.get(&path, &key).await.1["deliveries"][0]["state"] == "acked"
    })
    .await;
    let (status, st) = app.get(&path, &key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(st["payload"], json!({"title": "hi", "n": [1, 2]}));
    let d = &st["deliveries"][0];
    assert_eq!(d["device_id"], phone.id.as_str());
    assert!(
        d["delivered_at"].is_string() && d["acked_at"].is_string(),
        "{st}"
    );
    let stats = app.stats().await;
    assert_eq!(stats["notifications"]["accepted"], 1);
    assert_eq!(stats["notifications"]["delivered"], 1);
    assert_eq!(stats["notifications"]["acked"], 1);
}

async fn offline_device_gets_it_on_connect(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "bob").await;
    let (status, posted) = app
        .notify(
            &key,
            json!({"user_id": "bob", "payload": "while you were away"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(posted["delivered_now"], 0);
    let id = posted["id"].as_str().unwrap();
    let (_, st) = app.get(&format!("/v1/notifications/{id}"), &key).await;
    assert_eq!(st["deliveries"][0]["state"], "pending");

    let mut ws = app.connect(&phone).await;
    let got = ws.recv_notification().await;
    assert_eq!(got["id"], id);
    assert_eq!(got["payload"], "while you were away");
}

async fn unacked_come_again_acked_never(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "carol").await;
    let first = app.notify_device(&key, &phone, json!(1)).await;
    let second = app.notify_device(&key, &phone, json!(2)).await;

    let mut ws = app.connect(&phone).await;
    assert_eq!(ws.recv_notification().await["id"], first.as_str());
    assert_eq!(ws.recv_notification().await["id"], second.as_str());
    ws.ack(&[&first]).await;
    let path = format!("/v1/notifications/{first}");
    eventually("the ack is stored", || async {
        app.get(&path, &key).await.1["deliveries"][0]["state"] == "acked"
    })
    .await;
    ws.close().await;

    let mut ws = app.connect(&phone).await;
    assert_eq!(
        ws.recv_notification().await["id"],
        second.as_str(),
        "only the unacked one comes again"
    );
    ws.expect_silence(Duration::from_millis(300)).await;
}

async fn expired_never_come(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "dave").await;
    let (status, posted) = app
        .notify(
            &key,
            json!({"device_ids": [phone.id], "payload": "short-lived", "ttl_seconds": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = posted["id"].as_str().unwrap().to_owned();
    let keeper = app.notify_device(&key, &phone, json!("long-lived")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let mut ws = app.connect(&phone).await;
    assert_eq!(ws.recv_notification().await["id"], keeper.as_str());
    ws.expect_silence(Duration::from_millis(300)).await;
    let (_, st) = app.get(&format!("/v1/notifications/{id}"), &key).await;
    assert_eq!(st["deliveries"][0]["state"], "expired");
}

/// Posts keep coming while a device with a backlog connects: it must see every notification once
/// per session, in creation order — replay first, then live, with no gap and no reordering.
async fn replay_then_live_in_order_without_gaps(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "erin").await;
    let mut expected = Vec::new();
    for i in 0..700 {
        expected.push(app.notify_device(&key, &phone, json!(i)).await);
    }
    let poster = {
        let app_base = app.base.clone();
        let key = key.clone();
        let device = phone.id.clone();
        actix_web::rt::spawn(async move {
            let http = http_client();
            let mut ids = Vec::new();
            for i in 700..1000 {
                let mut res = http
                    .post(format!("{app_base}/v1/notifications"))
                    .insert_header(("Authorization", format!("Bearer {key}")))
                    .send_json(&json!({"device_ids": [device], "payload": i}))
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::ACCEPTED);
                let body: serde_json::Value = res.json().await.unwrap();
                ids.push(body["id"].as_str().unwrap().to_owned());
            }
            ids
        })
    };
    let mut ws = app.connect(&phone).await;
    let mut seen = Vec::new();
    while seen.len() < 1000 {
        let n = ws.recv_notification().await;
        assert_eq!(
            n["payload"],
            seen.len(),
            "notification {} out of order",
            seen.len()
        );
        seen.push(n["id"].as_str().unwrap().to_owned());
    }
    expected.extend(poster.await.unwrap());
    assert_eq!(seen, expected);
    ws.expect_silence(Duration::from_millis(300)).await;
}

async fn user_targets_reach_every_device_of_the_user(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "fay").await;
    let laptop = app.device(&key, "fay").await;
    let other = app.device(&key, "gus").await;
    let mut a = app.connect(&phone).await;
    let mut c = app.connect(&other).await;
    let (status, posted) = app
        .notify(&key, json!({"user_ids": ["fay"], "payload": {"x": 1}}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(posted["devices"], 2);
    assert_eq!(posted["delivered_now"], 1);
    assert_eq!(a.recv_notification().await["id"], posted["id"]);
    let mut l = app.connect(&laptop).await;
    assert_eq!(l.recv_notification().await["id"], posted["id"]);
    c.expect_silence(Duration::from_millis(200)).await;
}
