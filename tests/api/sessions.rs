//! The session lifecycle (DESIGN.md invariant 3): every way a session ends — close frame, TCP
//! reset, TCP FIN without a close frame, heartbeat timeout, replacement, revocation — leaves the
//! device offline in `/v1/presence` and no pooled connection in use; churn leaves presence equal
//! to the truth; a post made after `hello` reaches that session live.

use std::time::{Duration, Instant};

use awc::http::StatusCode;
use futures_util::future::{join, join_all};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value};

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    close_frame_leaves_device_offline,
    tcp_reset_leaves_device_offline,
    tcp_fin_without_close_frame_leaves_device_offline,
    heartbeat_timeout_closes_the_silent_session_only,
    new_session_replaces_the_old_one_with_4002,
    revocation_closes_with_4001_and_goes_offline,
    churn_leaves_presence_exact_and_pool_idle,
    post_right_after_hello_is_delivered_live,
    concurrent_sessions_of_one_device_leave_exactly_one,
    reset_before_hello_leaves_nothing_behind,
    reset_during_replay_releases_everything,
    server_shutdown_closes_sessions_with_1001,
);

/// The presence entries of `device` in the first page of `/v1/presence`.
pub(crate) async fn presence_entries(app: &TestApp, device: &Device) -> Vec<Value> {
    app.presence().await["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["device_id"] == device.id.as_str())
        .cloned()
        .collect()
}

pub(crate) async fn is_online(app: &TestApp, device: &Device) -> bool {
    !presence_entries(app, device).await.is_empty()
}

/// The device is offline in the presence list and in its user's presence (when the user's
/// presence still lists it: a revoked device may be gone from it), and the presence counts agree
/// with the list.
pub(crate) async fn assert_offline(app: &TestApp, device: &Device) {
    let presence = app.presence().await;
    let listed = presence["devices"].as_array().unwrap();
    assert!(
        !listed.iter().any(|d| d["device_id"] == device.id.as_str()),
        "device {} is still online: {presence}",
        device.id
    );
    assert_eq!(presence["online_devices"], listed.len(), "{presence}");
    let (status, user) = app
        .get(
            &format!("/v1/presence/users/{}", device.user_id),
            &app.admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{user}");
    if let Some(entry) = user["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device.id.as_str())
    {
        assert_eq!(entry["online"], false, "{user}");
    }
}

/// A ping gets its pong: the session is alive and reading.
pub(crate) async fn assert_alive(ws: &mut WsClient) {
    ws.send_json(json!({"type": "ping"})).await;
    loop {
        let v = ws.recv_json().await;
        if v["type"] == "pong" {
            return;
        }
        assert_eq!(v["type"], "notification", "unexpected frame {v}");
    }
}

/// Closes with a 1000 close frame and waits for the server's close frame (1000 too), then drops
/// the socket. (Unlike `WsClient::close`, it does not wait for the server to close the TCP
/// connection, which actix does only when the client closes or a second later.)
pub(crate) async fn close_politely(mut ws: WsClient) {
    ws.stream
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .expect("the close frame is sent");
    assert_eq!(
        ws.expect_close().await,
        Some(1000),
        "the server echoes 1000"
    );
}

/// Waits until the node has noticed that `device`'s session is gone.
async fn eventually_offline(app: &TestApp, device: &Device, how: &str) {
    eventually(&format!("the device is offline after {how}"), || async {
        !is_online(app, device).await
    })
    .await;
}

async fn close_frame_leaves_device_offline(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let bystander = app.device(&key, "bob").await;
    let mut other = app.connect(&bystander).await;
    let ws = app.connect(&phone).await;
    let entries = presence_entries(&app, &phone).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["user_id"], "alice");
    assert!(entries[0]["connected_at"].is_string(), "{entries:?}");
    let p = app.presence().await;
    assert_eq!(p["online_devices"], 2, "{p}");
    assert_eq!(p["online_users"], 2, "{p}");

    close_politely(ws).await;

    // At once: no waiting for the server to notice.
    assert_offline(&app, &phone).await;
    assert_eq!(app.online_ids().await, vec![bystander.id.clone()]);
    let p = app.presence().await;
    assert_eq!(p["online_devices"], 1, "{p}");
    assert_eq!(p["online_users"], 1, "{p}");
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], 1, "{stats}");
    assert_alive(&mut other).await;
}

async fn tcp_reset_leaves_device_offline(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let bystander = app.device(&key, "alice").await;
    let mut other = app.connect(&bystander).await;
    let ws = app.connect(&phone).await;
    assert!(is_online(&app, &phone).await);

    ws.reset();
    eventually_offline(&app, &phone, "a TCP reset").await;
    assert_offline(&app, &phone).await;
    assert_eq!(app.online_ids().await, vec![bystander.id.clone()]);
    let p = app.presence().await;
    assert_eq!(
        p["online_users"], 1,
        "alice is still online on another device: {p}"
    );
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], 1, "{stats}");
    assert_alive(&mut other).await;

    // The device can come back at once.
    let mut again = app.connect(&phone).await;
    assert_alive(&mut again).await;
    assert!(is_online(&app, &phone).await);
}

async fn tcp_fin_without_close_frame_leaves_device_offline(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let bystander = app.device(&key, "bob").await;
    let mut other = app.connect(&bystander).await;
    let ws = app.connect(&phone).await;
    assert!(is_online(&app, &phone).await);

    // Closing the socket with nothing unread sends a FIN, and no close frame.
    drop(ws);
    eventually_offline(&app, &phone, "a TCP FIN without a close frame").await;
    assert_offline(&app, &phone).await;
    assert_eq!(app.online_ids().await, vec![bystander.id.clone()]);
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], 1, "{stats}");
    assert_alive(&mut other).await;
}

/// With 200 ms heartbeats, a client that never reads (so never answers a ping) is closed after
/// about two intervals and shown offline, while a client that keeps reading stays up.
async fn heartbeat_timeout_closes_the_silent_session_only(b: Backend) {
    const INTERVAL: Duration = Duration::from_millis(200);
    let app = spawn_app_with(b, |a| a.heartbeat_interval_ms = 200).await;
    let key = app.service_key().await;
    let silent = app.device(&key, "sleepy").await;
    let lively = app.device(&key, "awake").await;

    let mut lively_ws = app.connect(&lively).await;
    let started = Instant::now();
    let mut silent_ws = app.connect(&silent).await;
    assert_eq!(silent_ws.hello["heartbeat_interval_ms"], 200);
    assert!(is_online(&app, &silent).await);

    // The lively client reads (and so answers pings) for well over two intervals while the
    // silent one is watched going offline.
    let watch = async {
        eventually_offline(&app, &silent, "a heartbeat timeout").await;
        started.elapsed()
    };
    let (gone_after, lively_saw) = join(
        watch,
        lively_ws.next_event_within(Duration::from_millis(1500)),
    )
    .await;
    assert!(
        lively_saw.is_none(),
        "a client that answers pings must stay up, it saw {lively_saw:?}"
    );
    assert!(
        gone_after >= INTERVAL * 2,
        "closed after {gone_after:?}, before two silent intervals"
    );
    assert!(
        gone_after <= Duration::from_millis(1500),
        "a silent client must be dropped after about two intervals (200 ms each), took {gone_after:?}"
    );
    assert_offline(&app, &silent).await;
    assert!(
        is_online(&app, &lively).await,
        "the lively client went offline"
    );
    assert_alive(&mut lively_ws).await;

    // The silent client's socket was closed by the server. (Its close code is not checked: the
    // client answers the queued pings on a dead socket when it finally reads.)
    match silent_ws.next_event().await {
        Event::Close(_) => {}
        Event::Json(v) => panic!("the silent session sent {v} instead of closing"),
    }
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], 1, "{stats}");
}

async fn new_session_replaces_the_old_one_with_4002(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut first = app.connect(&phone).await;
    let first_since = presence_entries(&app, &phone).await[0]["connected_at"].clone();

    let mut second = app.connect(&phone).await;
    assert_ne!(
        first.hello["session_id"], second.hello["session_id"],
        "a new session has a new id"
    );

    // Posted once the new session said hello: it must go to the new session only.
    let (status, posted) = app
        .notify(
            &key,
            json!({"device_ids": [phone.id], "payload": "for the new one"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
    assert_eq!(posted["delivered_now"], 1, "{posted}");

    // The old session sees nothing but its close.
    match first.next_event().await {
        Event::Close(code) => assert_eq!(code, Some(4002)),
        Event::Json(v) => panic!("the replaced session got {v}"),
    }

    // Right after the old session is closed: the device is online exactly once, with the new
    // session (the old one's cleanup must not take the new one offline).
    let entries = presence_entries(&app, &phone).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let since = entries[0]["connected_at"].as_str().unwrap();
    assert!(
        since >= first_since.as_str().unwrap(),
        "connected_at {since} is older than the first session's {first_since}"
    );
    let p = app.presence().await;
    assert_eq!(p["online_devices"], 1, "{p}");
    assert_eq!(p["online_users"], 1, "{p}");
    let (_, user) = app.get("/v1/presence/users/alice", &app.admin).await;
    assert_eq!(user["online"], true, "{user}");
    assert_eq!(user["devices"][0]["online"], true, "{user}");

    let got = second.recv_notification().await;
    assert_eq!(got["id"], posted["id"]);
    // And a later post still goes to the new one.
    let id = app.notify_device(&key, &phone, json!("later")).await;
    assert_eq!(second.recv_notification().await["id"], id.as_str());
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], 1, "{stats}");

    // The new session ending takes the device offline.
    close_politely(second).await;
    assert_offline(&app, &phone).await;
    app.pool_settles().await;
}

async fn revocation_closes_with_4001_and_goes_offline(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let laptop = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;
    let mut other = app.connect(&laptop).await;

    let status = app.delete(&format!("/v1/devices/{}", phone.id), &key).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Offline as soon as the revocation is answered.
    assert_offline(&app, &phone).await;
    assert_eq!(ws.expect_close().await, Some(4001));
    assert_offline(&app, &phone).await;
    assert_eq!(app.online_ids().await, vec![laptop.id.clone()]);
    assert_eq!(app.presence().await["online_users"], 1);

    // The token is refused from then on, before the upgrade.
    assert_eq!(app.connect_raw(&phone.token).await.err(), Some(401));
    assert_offline(&app, &phone).await;
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], 1, "{stats}");
    assert_alive(&mut other).await;
}

/// 300 connect/disconnect cycles in parallel batches over several devices: a third end with a
/// close frame, a third with a TCP reset, a third with a FIN and no close frame. Afterwards
/// presence is exactly the sessions left open, and no pooled connection is in use.
async fn churn_leaves_presence_exact_and_pool_idle(b: Backend) {
    const DEVICES: usize = 12;
    const BATCHES: usize = 25;
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        devices.push(app.device(&key, &format!("churner-{}", i % 4)).await);
    }
    let app = &app;
    let mut cycles = 0;
    for batch in 0..BATCHES {
        // Each batch touches every device once, concurrently; a device's previous session may
        // not have been noticed as gone yet (reset, FIN), so some connects replace a dead one.
        let runs = devices.iter().enumerate().map(|(i, d)| async move {
            let ws = app.connect(d).await;
            match (batch + i) % 3 {
                0 => ws.reset(),
                1 => close_politely(ws).await,
                _ => drop(ws),
            }
        });
        cycles += join_all(runs).await.len();
    }
    assert_eq!(cycles, 300);

    // Leave some sessions open: every other device.
    let mut open = Vec::new();
    let mut expected = Vec::new();
    for d in devices.iter().step_by(2) {
        open.push(app.connect(d).await);
        expected.push(d.id.clone());
    }
    expected.sort();
    eventually("presence equals the open sessions", || async {
        app.online_ids().await == expected
    })
    .await;
    let p = app.presence().await;
    assert_eq!(p["online_devices"], expected.len(), "{p}");
    assert_eq!(p["online_users"], 2, "churner-0 and churner-2: {p}");
    for ws in &mut open {
        assert_alive(ws).await;
    }
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], expected.len(), "{stats}");
    assert_eq!(stats["db_pool"]["in_use"], 0, "{stats}");
    assert_eq!(
        app.online_ids().await,
        expected,
        "presence moved afterwards"
    );

    // Closing the rest leaves nobody.
    for ws in open {
        close_politely(ws).await;
    }
    assert!(app.online_ids().await.is_empty());
    app.pool_settles().await;
}

/// `hello` is sent only once the session is registered: a post made right after it is pushed
/// live to that session, with fresh devices and with a device replacing its previous session.
async fn post_right_after_hello_is_delivered_live(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let mut device = app.device(&key, "quick").await;
    let mut earlier: Vec<String> = Vec::new();
    let mut previous: Option<WsClient> = None;
    for i in 0..20 {
        if i % 2 == 0 {
            // A fresh device.
            if let Some(ws) = previous.take() {
                close_politely(ws).await;
            }
            device = app.device(&key, "quick").await;
            earlier.clear();
        }
        // On odd rounds this replaces the session of the previous round, still open.
        let mut ws = app.connect(&device).await;
        let (status, posted) = app
            .notify(&key, json!({"device_ids": [device.id], "payload": i}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
        assert_eq!(
            posted["delivered_now"], 1,
            "round {i}: a post after hello must be pushed to the session at once: {posted}"
        );
        let id = posted["id"].as_str().unwrap().to_owned();
        loop {
            let got = ws.recv_notification().await;
            if got["id"] == id.as_str() {
                assert_eq!(got["payload"], i);
                break;
            }
            // The previous round's notification (unacked) may come first on a replacing session.
            assert!(
                earlier.iter().any(|e| got["id"] == e.as_str()),
                "round {i}: unexpected {got}"
            );
        }
        earlier.push(id);
        if let Some(mut old) = previous.replace(ws) {
            assert_eq!(old.expect_close().await, Some(4002), "round {i}");
        }
    }
    if let Some(ws) = previous.take() {
        close_politely(ws).await;
    }
    assert!(app.online_ids().await.is_empty());
    app.pool_settles().await;
}

/// Eight sessions of one device opened at once: seven are closed with 4002, one survives, and
/// presence shows the device once, with notifications going to the survivor.
async fn concurrent_sessions_of_one_device_leave_exactly_one(b: Backend) {
    const N: usize = 8;
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let app = &app;
    let mut sockets: Vec<WsClient> = join_all((0..N).map(|_| async {
        let mut ws = app
            .connect_raw(&phone.token)
            .await
            .expect("the upgrade succeeds");
        // `hello` comes first even on a session that is replaced straight away.
        let hello = ws.recv_json().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        ws.hello = hello;
        ws
    }))
    .await;

    let mut closed = [false; N];
    {
        let mut ends: FuturesUnordered<_> = sockets
            .iter_mut()
            .enumerate()
            .map(|(i, ws)| async move { (i, ws.next_event_within(PATIENCE).await) })
            .collect();
        for _ in 0..N - 1 {
            let (i, event) = ends.next().await.unwrap();
            match event {
                Some(Event::Close(code)) => assert_eq!(code, Some(4002), "session {i}"),
                other => panic!("{} sessions still open; session {i} saw {other:?}", N - 1),
            }
            closed[i] = true;
        }
    }
    let survivor = closed.iter().position(|c| !c).unwrap();
    let mut ws = sockets.swap_remove(survivor);
    assert_alive(&mut ws).await;
    let entries = presence_entries(app, &phone).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(app.presence().await["online_devices"], 1);
    let (status, posted) = app
        .notify(
            &key,
            json!({"device_ids": [phone.id], "payload": "survivor"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
    assert_eq!(posted["delivered_now"], 1, "{posted}");
    assert_eq!(ws.recv_notification().await["id"], posted["id"]);
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], 1, "{stats}");
    close_politely(ws).await;
    assert_offline(app, &phone).await;
}

/// Sockets reset right after the upgrade, before `hello` could be read (the session may still be
/// registering): nothing stays online and no connection stays checked out.
async fn reset_before_hello_leaves_nothing_behind(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let mut devices = Vec::new();
    for i in 0..10 {
        devices.push(app.device(&key, &format!("hasty-{i}")).await);
    }
    let app = &app;
    for _ in 0..5 {
        join_all(devices.iter().map(|d| async move {
            let ws = app
                .connect_raw(&d.token)
                .await
                .expect("the upgrade succeeds");
            ws.reset();
        }))
        .await;
    }
    eventually("every hasty device is offline", || async {
        app.online_ids().await.is_empty()
    })
    .await;
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], 0, "{stats}");
    // The devices still work.
    let mut ws = app.connect(&devices[0]).await;
    assert_alive(&mut ws).await;
    assert_eq!(app.online_ids().await, vec![devices[0].id.clone()]);
}

/// A device with a long backlog drops its socket (reset or FIN) in the middle of its replay, over
/// and over: it goes offline, nothing stays checked out, and its next session still gets the
/// whole backlog in order.
async fn reset_during_replay_releases_everything(b: Backend) {
    const BACKLOG: usize = 600;
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "backlogged").await;
    let mut ids = Vec::new();
    for i in 0..BACKLOG {
        ids.push(app.notify_device(&key, &phone, json!(i)).await);
    }
    for round in 0..10 {
        let mut ws = app.connect(&phone).await;
        // Read a little of the replay, then vanish.
        for _ in 0..round * 7 {
            ws.recv_notification().await;
        }
        if round % 2 == 0 {
            ws.reset();
        } else {
            drop(ws);
        }
    }
    eventually_offline(&app, &phone, "resets during replay").await;
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], 0, "{stats}");

    let mut ws = app.connect(&phone).await;
    for (i, id) in ids.iter().enumerate() {
        let got = ws.recv_notification().await;
        assert_eq!(got["id"], id.as_str(), "notification {i}");
    }
    ws.expect_silence(Duration::from_millis(200)).await;
    app.pool_settles().await;
}

/// API.md: close code 1001 means the server is shutting down. Stopping the node closes its
/// sessions with 1001 rather than just dropping their sockets.
async fn server_shutdown_closes_sessions_with_1001(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let laptop = app.device(&key, "bob").await;
    let mut a = app.connect(&phone).await;
    let mut c = app.connect(&laptop).await;
    // Stops the node (the harness's stop) and waits for its thread; the close frames wait in the
    // clients' sockets.
    drop(app);
    assert_eq!(a.expect_close().await, Some(1001), "shutdown close code");
    assert_eq!(c.expect_close().await, Some(1001), "shutdown close code");
}
