//! Operating a node: graceful shutdown under load, `kill -9` and restart, expiry and retention.
//! Shutdown and crash tests run `herald serve` as a real child process on the test's database.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use awc::http::StatusCode;
use serde_json::json;

use crate::both_backends;
use crate::helpers::*;
use crate::load::{check_inboxes, make_devices, spawn_reader, wait_for_inboxes, Inbox};
use crate::process::Server;

const ADMIN: &str = "hadm_operations_test_0123456789abcdef";

/// `herald serve` as a child process on `db_url`, with the admin token of these tests.
async fn start_node(db_url: &str, dir: &std::path::Path) -> Server {
    Server::start(
        dir,
        db_url,
        &[("HERALD_ADMIN_TOKEN", ADMIN), ("HERALD_WORKERS", "2")],
    )
    .await
}

both_backends!(
    sigterm_under_load_loses_no_accepted_notification,
    kill_9_then_restart_leaves_presence_empty_and_replays_pending,
    expired_notifications_are_purged_after_the_retention,
);

/// SIGTERM with 200 live sessions and posts in flight: every session closes with 1001, the node
/// exits 0, presence is empty, and every notification that got a `202` reaches its devices
/// (live before the stop, or replayed by the next node on the same database).
async fn sigterm_under_load_loses_no_accepted_notification(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(b);
    let mut node = start_node(&db.url, dir.path()).await;
    let app = node.app(ADMIN);
    let key = app.service_key().await;
    let devices = make_devices(&app, &key, 50, 4).await;
    let sessions = futures_util::future::join_all(devices.iter().map(|d| app.connect(d))).await;
    let codes = Rc::new(std::cell::RefCell::new(Vec::new()));
    let mut readers = Vec::new();
    let inbox: Inbox = Rc::default();
    for (d, mut ws) in devices.iter().cloned().zip(sessions) {
        let (codes, inbox) = (codes.clone(), inbox.clone());
        inbox
            .borrow_mut()
            .entry(d.id.clone())
            .or_default()
            .push(Vec::new());
        readers.push(actix_web::rt::spawn(async move {
            loop {
                match ws.next_event_within(Duration::from_secs(60)).await {
                    Some(Event::Json(v)) if v["type"] == "notification" => {
                        let id = v["id"].as_str().unwrap().to_owned();
                        inbox
                            .borrow_mut()
                            .get_mut(&d.id)
                            .unwrap()
                            .last_mut()
                            .unwrap()
                            .push(id);
                    }
                    Some(Event::Json(_)) => {}
                    Some(Event::Close(code)) => return codes.borrow_mut().push(code),
                    None => return codes.borrow_mut().push(None),
                }
            }
        }));
    }

    // Posters keep going until the node stops answering.
    let accepted = Rc::new(std::cell::RefCell::new(Vec::new()));
    let mut posters = Vec::new();
    for t in 0..10 {
        let (accepted, base, key) = (accepted.clone(), app.base.clone(), key.clone());
        let users: Vec<String> = (0..50).map(|u| format!("user-{u}")).collect();
        let by_user: HashMap<String, Vec<String>> =
            devices.iter().fold(HashMap::new(), |mut m, d| {
                m.entry(d.user_id.clone()).or_default().push(d.id.clone());
                m
            });
        posters.push(actix_web::rt::spawn(async move {
            let http = http_client();
            for i in 0.. {
                let user = &users[(t * 7 + i) % users.len()];
                let res = http
                    .post(format!("{base}/v1/notifications"))
                    .insert_header(("Authorization", format!("Bearer {key}")))
                    .send_json(&json!({"user_id": user, "payload": {"t": t, "i": i}}))
                    .await;
                match res {
                    Ok(mut res) if res.status() == StatusCode::ACCEPTED => {
                        let v: serde_json::Value = res.json().await.unwrap();
                        accepted
                            .borrow_mut()
                            .push((v["id"].as_str().unwrap().to_owned(), by_user[user].clone()));
                    }
                    Ok(res) => assert!(
                        res.status().is_server_error(),
                        "unexpected {}",
                        res.status()
                    ),
                    Err(_) => return,
                }
            }
        }));
    }
    while accepted.borrow().len() < 300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.signal("-TERM");
    for r in readers {
        r.await.unwrap();
    }
    let status = node.exited(Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "exit status 0, not {status:?}: {}",
        node.log_text()
    );
    for p in posters {
        p.await.unwrap();
    }
    let codes = codes.borrow().clone();
    assert_eq!(codes.len(), 200);
    assert!(
        codes.iter().all(|c| *c == Some(1001)),
        "close codes: {codes:?}"
    );

    // The next node on the same database starts with nobody online, and replays the rest.
    let node = start_node(&db.url, dir.path()).await;
    let app = node.app(ADMIN);
    assert_eq!(app.presence().await["online_devices"], 0);
    let sessions = futures_util::future::join_all(devices.iter().map(|d| app.connect(d))).await;
    for (d, ws) in devices.iter().zip(sessions) {
        spawn_reader(inbox.clone(), d.id.clone(), ws);
    }
    let accepted = accepted.borrow().clone();
    assert!(accepted.len() >= 300);
    wait_for_inboxes(&inbox, &accepted).await;
    check_inboxes(&inbox, &accepted, &devices);
}

/// `kill -9`: nothing runs on the way down. The next start shows nobody online, and every
/// unacked notification comes on reconnect.
async fn kill_9_then_restart_leaves_presence_empty_and_replays_pending(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(b);
    let mut node = start_node(&db.url, dir.path()).await;
    let app = node.app(ADMIN);
    let key = app.service_key().await;
    let online = app.device(&key, "kim").await;
    let offline = app.device(&key, "lee").await;
    let mut ws = app.connect(&online).await;
    let delivered = app
        .notify_device(&key, &online, json!("seen, not acked"))
        .await;
    assert_eq!(ws.recv_notification().await["id"], delivered.as_str());
    let acked = app.notify_device(&key, &online, json!("acked")).await;
    assert_eq!(ws.recv_notification().await["id"], acked.as_str());
    ws.ack(&[&acked]).await;
    let path = format!("/v1/notifications/{acked}");
    eventually("the ack is stored", || async {
        app.get(&path, &key).await.1["deliveries"][0]["state"] == "acked"
    })
    .await;
    let mut pending = Vec::new();
    for i in 0..5 {
        pending.push(app.notify_device(&key, &offline, json!(i)).await);
    }
    assert_eq!(app.presence().await["online_devices"], 1);

    node.signal("-KILL");
    node.exited(Duration::from_secs(10)).await;
    assert!(
        matches!(ws.next_event().await, Event::Close(_)),
        "the session is gone with the node"
    );

    let node = start_node(&db.url, dir.path()).await;
    let app = node.app(ADMIN);
    let page = app.presence().await;
    assert_eq!(page["online_devices"], 0, "{page}");
    assert_eq!(
        app.get("/v1/presence/users/kim", &app.admin).await.1["online"],
        false
    );

    let mut ws = app.connect(&online).await;
    assert_eq!(
        ws.recv_notification().await["id"],
        delivered.as_str(),
        "the unacked one again"
    );
    ws.expect_silence(Duration::from_millis(300)).await;
    let mut ws2 = app.connect(&offline).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(
            ws2.recv_notification().await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(got, pending);
}

/// Expired notifications stop being delivered at once, are kept for the retention (the status
/// API shows them `expired`), then are purged in batches; unexpired ones are untouched.
async fn expired_notifications_are_purged_after_the_retention(b: Backend) {
    let app = spawn_app_with(b, |a| {
        a.retention_seconds = 1;
        a.purge_interval_ms = 100;
    })
    .await;
    let key = app.service_key().await;
    let phone = app.device(&key, "max").await;
    let mut short = Vec::new();
    for i in 0..20 {
        let (status, body) = app
            .notify(
                &key,
                json!({"device_ids": [phone.id], "payload": i, "ttl_seconds": 1}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        short.push(body["id"].as_str().unwrap().to_owned());
    }
    let keeper = app.notify_device(&key, &phone, json!("keeper")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Expired: never delivered, but still shown until the retention has passed.
    let (status, body) = app
        .get(&format!("/v1/notifications/{}", short[0]), &key)
        .await;
    if status == StatusCode::OK {
        assert_eq!(body["deliveries"][0]["state"], "expired", "{body}");
    }
    let mut ws = app.connect(&phone).await;
    assert_eq!(ws.recv_notification().await["id"], keeper.as_str());
    ws.expect_silence(Duration::from_millis(200)).await;

    for id in &short {
        let path = format!("/v1/notifications/{id}");
        eventually("the expired notification is purged", || async {
            app.get(&path, &key).await.0 == StatusCode::NOT_FOUND
        })
        .await;
    }
    let (status, body) = app.get(&format!("/v1/notifications/{keeper}"), &key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = app.metrics_text().await;
    assert!(
        text.lines()
            .any(|l| l == "herald_notifications_expired_total 20"),
        "{text}"
    );
}
