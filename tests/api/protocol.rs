//! The WebSocket wire protocol of API.md: ping/pong, error frames for bad frames, the close codes
//! for repeated bad frames (1008), binary frames (1003) and oversized frames (1009), ack semantics,
//! server pings and fragmented messages; and that one device's misbehaviour touches nobody else.

use std::time::Duration;

use awc::http::StatusCode;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::both_backends;
use crate::helpers::*;
use crate::sessions::{assert_alive, assert_offline, close_politely, is_online};

both_backends!(
    ping_gets_pong,
    bad_frames_get_an_error_and_the_session_stays_up,
    repeated_bad_frames_close_with_1008,
    binary_frame_closes_with_1003,
    oversized_text_frame_closes_with_1009,
    fragmented_text_messages_are_reassembled,
    fragmented_message_over_the_limit_closes_with_1009,
    acking_unknown_or_foreign_ids_does_nothing,
    ack_is_idempotent,
    acked_then_reconnect_at_once_is_not_redelivered,
    server_sends_websocket_pings,
    a_misbehaving_device_does_not_disturb_others,
);

/// Sends a frame the server must refuse, tolerating a socket the server already closed.
async fn send_raw(ws: &mut WsClient, msg: Message) {
    let _ = ws.stream.send(msg).await;
}

/// The next frame must be an `error` frame with a code and a message; returns the code.
async fn expect_error_frame(ws: &mut WsClient, sent: &str) -> String {
    let v = ws.recv_json().await;
    assert_eq!(v["type"], "error", "after {sent:?} got {v}");
    let code = v["code"].as_str().unwrap_or_default();
    assert!(
        !code.is_empty(),
        "after {sent:?}: error without a code: {v}"
    );
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "after {sent:?}: error without a message: {v}"
    );
    code.to_owned()
}

/// The next frame must be `pong` (not an error, not a notification).
async fn expect_pong(ws: &mut WsClient) {
    ws.send_json(json!({"type": "ping"})).await;
    let v = ws.recv_json().await;
    assert_eq!(v, json!({"type": "pong"}));
}

/// Waits for the stored state of `device`'s delivery of notification `id`.
async fn delivery_state(app: &TestApp, key: &str, id: &str, device: &Device) -> Value {
    let (status, body) = app.get(&format!("/v1/notifications/{id}"), key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device.id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no delivery for {} in {body}", device.id))
}

async fn eventually_acked(app: &TestApp, key: &str, id: &str, device: &Device) {
    eventually(&format!("notification {id} is acked"), || async {
        delivery_state(app, key, id, device).await["state"] == "acked"
    })
    .await;
}

async fn ping_gets_pong(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;
    for _ in 0..3 {
        expect_pong(&mut ws).await;
    }
    // Whitespace around the JSON object does not make a ping bad.
    ws.send_text("  {\"type\": \"ping\"}  ").await;
    assert_eq!(ws.recv_json().await, json!({"type": "pong"}));
    ws.expect_silence(Duration::from_millis(200)).await;
}

async fn bad_frames_get_an_error_and_the_session_stays_up(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;
    let mut codes = Vec::new();
    // Four bad frames (below the five that close a session), each followed by a working ping.
    for bad in [
        "this is not json",
        r#"{"type":"subscribe","topic":"x"}"#,
        r#"{"type":"ack"}"#,
        r#"{"type":"ack","ids":"not-a-list"}"#,
    ] {
        ws.send_text(bad).await;
        codes.push(expect_error_frame(&mut ws, bad).await);
        expect_pong(&mut ws).await;
    }
    assert_ne!(
        codes[0], codes[1],
        "invalid JSON and an unknown type are different errors: {codes:?}"
    );
    assert!(is_online(&app, &phone).await);
    // Still a working session: it gets notifications.
    let id = app.notify_device(&key, &phone, json!("still here")).await;
    assert_eq!(ws.recv_notification().await["id"], id.as_str());
}

async fn repeated_bad_frames_close_with_1008(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;

    // One or two bad frames are forgiven.
    for bad in ["{", r#"{"type":"nope"}"#] {
        ws.send_text(bad).await;
        expect_error_frame(&mut ws, bad).await;
        expect_pong(&mut ws).await;
    }
    assert!(is_online(&app, &phone).await);

    // Keeping it up gets the session closed with 1008.
    let mut errors = 2;
    let mut code = None;
    for _ in 2..20 {
        send_raw(&mut ws, Message::text("garbage")).await;
        match ws.next_event().await {
            Event::Json(v) => {
                assert_eq!(v["type"], "error", "{v}");
                errors += 1;
            }
            Event::Close(c) => {
                code = Some(c);
                break;
            }
        }
    }
    let code = code.unwrap_or_else(|| panic!("still open after {errors} bad frames"));
    assert_eq!(code, Some(1008), "after {errors} error frames");
    assert!(errors >= 3, "closed after only {errors} bad frames");
    assert_offline(&app, &phone).await;
    app.pool_settles().await;
}

async fn binary_frame_closes_with_1003(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;
    send_raw(&mut ws, Message::binary(br#"{"type":"ping"}"#.to_vec())).await;
    assert_eq!(ws.expect_close().await, Some(1003));
    assert_offline(&app, &phone).await;
    app.pool_settles().await;
}

async fn oversized_text_frame_closes_with_1009(b: Backend) {
    let app = spawn_app_with(b, |a| a.ws_max_frame_bytes = 1024).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;
    // Just under the limit is fine (JSON may carry whitespace).
    let under = format!("{{\"type\":\"ping\"{}}}", " ".repeat(1000));
    assert!(under.len() <= 1024);
    ws.send_text(&under).await;
    assert_eq!(ws.recv_json().await, json!({"type": "pong"}));

    let over = format!("{{\"type\":\"ping\"{}}}", " ".repeat(4096 - 15));
    assert_eq!(over.len(), 4096);
    send_raw(&mut ws, Message::text(over)).await;
    assert_eq!(ws.expect_close().await, Some(1009));
    assert_offline(&app, &phone).await;
    app.pool_settles().await;
}

fn fragment(data: &str, first: bool, last: bool) -> Message {
    let op = if first { Data::Text } else { Data::Continue };
    Message::Frame(Frame::message(
        data.as_bytes().to_vec(),
        OpCode::Data(op),
        last,
    ))
}

async fn fragmented_text_messages_are_reassembled(b: Backend) {
    let app = spawn_app_with(b, |a| a.ws_max_frame_bytes = 1024).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;

    // A ping in three fragments.
    send_raw(&mut ws, fragment("{\"ty", true, false)).await;
    send_raw(&mut ws, fragment("pe\":\"pi", false, false)).await;
    send_raw(&mut ws, fragment("ng\"}", false, true)).await;
    assert_eq!(ws.recv_json().await, json!({"type": "pong"}));

    // A control frame (a WebSocket ping) between two fragments is allowed by RFC 6455.
    send_raw(&mut ws, fragment("{\"type\":", true, false)).await;
    send_raw(&mut ws, Message::Ping(b"x".to_vec().into())).await;
    send_raw(&mut ws, fragment("\"ping\"}", false, true)).await;
    assert_eq!(ws.recv_json().await, json!({"type": "pong"}));

    // An ack in two fragments works like one in a single frame.
    let id = app
        .notify_device(&key, &phone, json!("fragmented ack"))
        .await;
    assert_eq!(ws.recv_notification().await["id"], id.as_str());
    let ack = json!({"type": "ack", "ids": [id]}).to_string();
    let (head, tail) = ack.split_at(ack.len() / 2);
    send_raw(&mut ws, fragment(head, true, false)).await;
    send_raw(&mut ws, fragment(tail, false, true)).await;
    eventually_acked(&app, &key, &id, &phone).await;
    expect_pong(&mut ws).await;
}

async fn fragmented_message_over_the_limit_closes_with_1009(b: Backend) {
    let app = spawn_app_with(b, |a| a.ws_max_frame_bytes = 1024).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;
    // 4096 bytes in 16 fragments of 256: each frame is under the limit, the message is not.
    let padding = " ".repeat(256);
    send_raw(&mut ws, fragment("{\"type\":\"ping\"", true, false)).await;
    for i in 0..16 {
        send_raw(&mut ws, fragment(&padding, false, i == 15)).await;
    }
    assert_eq!(ws.expect_close().await, Some(1009));
    assert_offline(&app, &phone).await;
    app.pool_settles().await;
}

async fn acking_unknown_or_foreign_ids_does_nothing(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let mine = app.device(&key, "alice").await;
    let theirs = app.device(&key, "bob").await;
    let mut ws = app.connect(&mine).await;
    let mut other = app.connect(&theirs).await;

    let their_id = app.notify_device(&key, &theirs, json!("bob's")).await;
    assert_eq!(other.recv_notification().await["id"], their_id.as_str());
    eventually("bob's delivery is marked delivered", || async {
        delivery_state(&app, &key, &their_id, &theirs).await["state"] == "delivered"
    })
    .await;
    let my_id = app.notify_device(&key, &mine, json!("alice's")).await;
    assert_eq!(ws.recv_notification().await["id"], my_id.as_str());

    // Alice acks bob's notification and ids that do not exist: no error, session up.
    ws.ack(&[&their_id]).await;
    ws.ack(&[
        "00000000-0000-0000-0000-000000000000",
        "no-such-notification",
    ])
    .await;
    ws.ack(&[&their_id, "also-unknown"]).await;
    expect_pong(&mut ws).await;
    // Then her own: once that is stored, the acks before it have been handled too.
    ws.ack(&[&my_id]).await;
    eventually_acked(&app, &key, &my_id, &mine).await;

    let theirs_now = delivery_state(&app, &key, &their_id, &theirs).await;
    assert_eq!(theirs_now["state"], "delivered", "{theirs_now}");
    assert!(theirs_now["acked_at"].is_null(), "{theirs_now}");
    let stats = app.stats().await;
    assert_eq!(stats["notifications"]["acked"], 1, "{stats}");
    assert!(is_online(&app, &mine).await);
    expect_pong(&mut ws).await;

    // Bob still gets it again on his next session: it was never acked.
    close_politely(other).await;
    let mut other = app.connect(&theirs).await;
    assert_eq!(other.recv_notification().await["id"], their_id.as_str());
}

async fn ack_is_idempotent(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;
    let first = app.notify_device(&key, &phone, json!(1)).await;
    let second = app.notify_device(&key, &phone, json!(2)).await;
    assert_eq!(ws.recv_notification().await["id"], first.as_str());
    assert_eq!(ws.recv_notification().await["id"], second.as_str());

    ws.ack(&[&first, &first]).await;
    eventually_acked(&app, &key, &first, &phone).await;
    let acked = delivery_state(&app, &key, &first, &phone).await;
    assert!(acked["acked_at"].is_string(), "{acked}");

    // Acking it again (alone and with another) changes nothing and is no error.
    ws.ack(&[&first]).await;
    ws.ack(&[&first, &second]).await;
    expect_pong(&mut ws).await;
    eventually_acked(&app, &key, &second, &phone).await;
    let again = delivery_state(&app, &key, &first, &phone).await;
    assert_eq!(again, acked, "a repeated ack changed the delivery");
    let stats = app.stats().await;
    assert_eq!(
        stats["notifications"]["acked"], 2,
        "two notifications acked, however often: {stats}"
    );

    close_politely(ws).await;
    let mut ws = app.connect(&phone).await;
    ws.expect_silence(Duration::from_millis(300)).await;
}

/// The contract: "acked notifications are never delivered to this device again". A device that
/// acks and reconnects at once (before any group commit could be awaited) must not get it again.
async fn acked_then_reconnect_at_once_is_not_redelivered(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    for round in 0..10 {
        let id = app.notify_device(&key, &phone, json!(round)).await;
        let mut ws = app.connect(&phone).await;
        assert_eq!(ws.recv_notification().await["id"], id.as_str());
        ws.ack(&[&id]).await;
        close_politely(ws).await;
        let mut ws = app.connect(&phone).await;
        if let Some(e) = ws.next_event_within(Duration::from_millis(300)).await {
            panic!("round {round}: acked notification {id} came again: {e:?}");
        }
        close_politely(ws).await;
    }
}

async fn server_sends_websocket_pings(b: Backend) {
    let app = spawn_app_with(b, |a| a.heartbeat_interval_ms = 200).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "alice").await;
    let mut ws = app.connect(&phone).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut pings = 0;
    while pings < 2 {
        match tokio::time::timeout_at(deadline, ws.stream.next()).await {
            Err(_) => panic!("{pings} WebSocket pings within 1 s at a 200 ms heartbeat"),
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Pong(_)))) => {}
            Ok(other) => panic!("expected a ping, got {other:?}"),
        }
    }
    // Reading answered them, so the session is still up.
    expect_pong(&mut ws).await;
    assert!(is_online(&app, &phone).await);
}

/// One device sends garbage until it is closed with 1008; another device on the same node keeps
/// getting live notifications throughout, and stays online.
async fn a_misbehaving_device_does_not_disturb_others(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let bad = app.device(&key, "mallory").await;
    let good = app.device(&key, "alice").await;
    let mut bad_ws = app.connect(&bad).await;
    let mut good_ws = app.connect(&good).await;

    let mut closed = None;
    for round in 0..20 {
        send_raw(&mut bad_ws, Message::text("{not json")).await;
        // Alice gets a live notification between each of mallory's bad frames.
        let (status, posted) = app
            .notify(&key, json!({"device_ids": [good.id], "payload": round}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
        assert_eq!(posted["delivered_now"], 1, "round {round}: {posted}");
        let got = good_ws.recv_notification().await;
        assert_eq!(got["id"], posted["id"]);
        good_ws.ack(&[got["id"].as_str().unwrap()]).await;
        match bad_ws.next_event().await {
            Event::Json(v) => assert_eq!(v["type"], "error", "{v}"),
            Event::Close(code) => {
                closed = Some(code);
                break;
            }
        }
    }
    assert_eq!(
        closed.expect("the misbehaving session is closed"),
        Some(1008)
    );
    assert_offline(&app, &bad).await;
    assert_eq!(app.online_ids().await, vec![good.id.clone()]);
    let id = app.notify_device(&key, &good, json!("after")).await;
    assert_eq!(good_ws.recv_notification().await["id"], id.as_str());
    assert_alive(&mut good_ws).await;
    app.pool_settles().await;
}
