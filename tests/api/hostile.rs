//! Hostile and broken clients (issue 5): devices that stop reading (4008, bounded memory, other
//! sessions unaffected, nothing lost), floods of frames, connection storms and credential
//! guessing from one address (429), too many devices of one user, and sockets that connect but
//! never send a request.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use awc::http::StatusCode;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::both_backends;
use crate::helpers::*;

/// A TCP connection from `local` (any 127.0.0.x) to the node, with a small receive buffer when
/// `rcvbuf` is set (so a client that stops reading fills up quickly).
async fn tcp_from(local: IpAddr, to: SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).unwrap();
    }
    socket.bind(&SocketAddr::new(local, 0).into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    socket.set_tcp_nodelay(true).unwrap();
    TcpStream::from_std(socket.into()).unwrap()
}

/// A WebSocket for `token` over `tcp` (small client buffers, so a client that stops reading
/// fills up quickly); `Err(status)` if the upgrade is refused.
async fn ws_over(app: &TestApp, tcp: TcpStream, token: &str) -> Result<WsClient, u16> {
    handshake(tcp, app.ws_request(token), 4 * 1024).await
}

/// One HTTP/1.1 request from `local`, raw; returns the status and the whole answer.
async fn raw_http(app: &TestApp, local: IpAddr, head: &str) -> (u16, String) {
    let mut tcp = tcp_from(local, app.socket_addr(), None).await;
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    (status, text)
}

fn get_with_token(path: &str, token: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {token}\r\n{extra}Connection: close\r\n\r\n"
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The notification payload the slow-consumer tests send: ~4 KiB, numbered.
fn bulky(i: usize) -> Value {
    json!({"n": i, "pad": "x".repeat(4000)})
}

both_backends!(a_device_that_stops_reading_is_closed_with_4008_and_loses_nothing);

/// A device stops reading while notifications keep coming: its outbound buffer stays within its
/// bound, it is closed with 4008, a healthy device of the same node keeps getting its pushes at
/// once, and everything the stalled device missed is replayed, in order, when it reconnects.
async fn a_device_that_stops_reading_is_closed_with_4008_and_loses_nothing(b: Backend) {
    let app = spawn_app_with(b, |a| {
        a.ws_outbound_max_bytes = 64 * 1024;
        a.ws_outbound_max_frames = 64;
        a.ws_slow_grace_ms = 1_000;
        a.heartbeat_interval_ms = 60_000;
    })
    .await;
    let key = app.service_key().await;
    let stalled = app.device(&key, "slow-user").await;
    let healthy = app.device(&key, "fast-user").await;

    let tcp = tcp_from(ip("127.0.0.1"), app.socket_addr(), Some(4096)).await;
    let mut slow = ws_over(&app, tcp, &stalled.token).await.expect("upgrade");
    assert_eq!(slow.recv_json().await["type"], "hello");
    let mut fast = app.connect(&healthy).await;

    // The stalled device is sent far more than its bound and the kernel's buffers hold; the
    // healthy one gets a notification between every few, and reads each at once. Posting stops
    // soon after the node gives up on the stalled device: the node waits only so long (5 s) for
    // a device to take its close frame, and the test reads it only after posting.
    let total = 1_500;
    let mut posted = Vec::new();
    let mut worst = Duration::ZERO;
    for i in 0..total {
        posted.push(app.notify_device(&key, &stalled, bulky(i)).await);
        if i % 25 == 0 {
            let sent = Instant::now();
            let id = app.notify_device(&key, &healthy, json!({"n": i})).await;
            let got = fast.recv_notification().await;
            assert_eq!(got["id"], id.as_str());
            worst = worst.max(sent.elapsed());
            if i >= 300 && !app.online_ids().await.contains(&stalled.id) {
                break;
            }
        }
    }
    let total = posted.len();
    eprintln!("healthy device: worst post-to-receive {worst:?} while the other stalled");
    assert!(
        worst < Duration::from_secs(2),
        "a stalled device slowed another down: {worst:?}"
    );

    // The node gives up on the stalled device: offline at once, pool untouched.
    eventually("the stalled device is offline", || async {
        !app.online_ids().await.contains(&stalled.id)
    })
    .await;
    assert!(app.online_ids().await.contains(&healthy.id));

    // When the device reads again, what was already in flight arrives, then the close: 4008.
    let mut seen = 0;
    let code = loop {
        match slow.next_event().await {
            Event::Json(v) if v["type"] == "notification" => seen += 1,
            Event::Json(v) => panic!("unexpected frame {v}"),
            Event::Close(code) => break code,
        }
    };
    eprintln!("the stalled device had {seen} of {total} notifications in flight when closed");
    assert_eq!(code, Some(4008));
    assert!(
        seen < total,
        "the device was closed although it got everything"
    );

    // Nothing was acked, so a new session gets every notification, in creation order.
    let mut again = app.connect(&stalled).await;
    for (i, id) in posted.iter().enumerate() {
        let n = again.recv_notification().await;
        assert_eq!(n["id"], id.as_str(), "replay out of order at {i}");
        assert_eq!(n["payload"]["n"], i);
        if i % 100 == 99 {
            let ids: Vec<&str> = posted[i - 99..=i].iter().map(String::as_str).collect();
            again.ack(&ids).await;
        }
    }
    fast.close().await;
    again.close().await;
    let stats = app.pool_settles().await;
    assert_eq!(stats["db_pool"]["timeouts"], 0, "{stats}");
}

both_backends!(a_replay_goes_no_faster_than_the_device_reads);

/// A device with a large backlog that reads slowly gets all of it, paced by its reading (the
/// outbound bound holds), and one that stops reading during replay is closed with 4008.
async fn a_replay_goes_no_faster_than_the_device_reads(b: Backend) {
    let app = spawn_app_with(b, |a| {
        a.ws_outbound_max_bytes = 32 * 1024;
        a.ws_outbound_max_frames = 32;
        a.ws_slow_grace_ms = 1_000;
        a.heartbeat_interval_ms = 60_000;
    })
    .await;
    let key = app.service_key().await;
    let device = app.device(&key, "backlog-user").await;
    let mut posted = Vec::new();
    for i in 0..1_200 {
        posted.push(app.notify_device(&key, &device, bulky(i)).await);
    }

    // Reads slowly (a pause every 100 frames, shorter than the grace): gets everything, in order.
    let tcp = tcp_from(ip("127.0.0.1"), app.socket_addr(), Some(4096)).await;
    let mut ws = ws_over(&app, tcp, &device.token).await.expect("upgrade");
    assert_eq!(ws.recv_json().await["type"], "hello");
    for (i, id) in posted.iter().enumerate() {
        let n = ws.recv_notification().await;
        assert_eq!(n["id"], id.as_str(), "out of order at {i}");
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    ws.close().await;

    // Stops reading right after hello: closed with 4008 after the grace, nothing acked.
    let tcp = tcp_from(ip("127.0.0.1"), app.socket_addr(), Some(4096)).await;
    let mut ws = ws_over(&app, tcp, &device.token).await.expect("upgrade");
    eventually("the device comes online", || async {
        app.online_ids().await.contains(&device.id)
    })
    .await;
    eventually("the stalled replay ends the session", || async {
        !app.online_ids().await.contains(&device.id)
    })
    .await;
    assert_eq!(ws.expect_close().await, Some(4008));
}

both_backends!(a_flood_of_frames_is_slowed_down_not_dropped);

/// Frames past the per-session rate are not dropped and do not grow memory: the socket is read
/// no faster than the rate allows, so a flood takes its time and every ping still gets its pong.
async fn a_flood_of_frames_is_slowed_down_not_dropped(b: Backend) {
    let app = spawn_app_with(b, |a| a.ws_max_frames_per_second = 50).await;
    let key = app.service_key().await;
    let device = app.device(&key, "chatty").await;
    let mut ws = app.connect(&device).await;
    // A burst allowance of 10 s × 50 = 500 frames, then 50 per second: 650 pings take ≥ 3 s.
    let pings = 650;
    let started = Instant::now();
    let ping = json!({"type": "ping"}).to_string();
    let mut frames =
        futures_util::stream::iter((0..pings).map(|_| Ok(Message::text(ping.clone()))));
    let (mut sink, mut stream) = ws.stream.split();
    let sender = async move {
        sink.send_all(&mut frames).await.unwrap();
        sink
    };
    let receiver = async {
        let mut pongs = 0;
        while pongs < pings {
            match tokio::time::timeout(PATIENCE, stream.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(v["type"], "pong", "{v}");
                    pongs += 1;
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("the session ended after {pongs} pongs: {other:?}"),
            }
        }
        started.elapsed()
    };
    let (sink, took) = futures_util::future::join(sender, receiver).await;
    eprintln!("{pings} pings at a limit of 50/s (burst 500) took {took:?}");
    assert!(
        took >= Duration::from_millis(2_500),
        "{pings} frames went through in {took:?}: not limited"
    );
    ws.stream = sink.reunite(stream).unwrap();
    ws.close().await;
}

both_backends!(connection_attempts_from_one_address_are_limited_with_429);

/// A burst of WebSocket connection attempts from one address is answered 429 with Retry-After
/// once its allowance is spent (whether the token is good or not); other addresses are not
/// affected.
async fn connection_attempts_from_one_address_are_limited_with_429(b: Backend) {
    let app = spawn_app_with(b, |a| {
        a.connect_rate_per_ip = 0.2;
        a.connect_burst_per_ip = 5;
    })
    .await;
    let key = app.service_key().await;
    let device = app.device(&key, "u").await;
    let from = ip("127.0.0.3");
    for _ in 0..5 {
        let tcp = tcp_from(from, app.socket_addr(), None).await;
        let ws = ws_over(&app, tcp, &device.token)
            .await
            .expect("within the burst");
        ws.close().await;
    }
    let tcp = tcp_from(from, app.socket_addr(), None).await;
    assert_eq!(ws_over(&app, tcp, &device.token).await.err(), Some(429));
    let (status, answer) = raw_http(
        &app,
        from,
        &format!(
            "GET /v1/ws HTTP/1.1\r\nHost: herald\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Authorization: Bearer {}\r\n\r\n",
            device.token
        ),
    )
    .await;
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: "),
        "{answer}"
    );
    assert!(answer.contains("\"too_many_connections\""), "{answer}");
    // Another address still connects.
    let tcp = tcp_from(ip("127.0.0.4"), app.socket_addr(), None).await;
    ws_over(&app, tcp, &device.token)
        .await
        .expect("another address is not limited")
        .close()
        .await;
}

both_backends!(wrong_credentials_from_one_address_are_limited_with_429);

/// After a burst of requests with wrong credentials, an address is answered 429 (with
/// Retry-After) for any credential that needs a database look-up, until its allowance refills;
/// known credentials still pass; other addresses — and, behind a trusted proxy, other clients of
/// that proxy — are not affected.
async fn wrong_credentials_from_one_address_are_limited_with_429(b: Backend) {
    let app = spawn_app_with(b, |a| {
        a.auth_failure_rate_per_ip = 0.01;
        a.auth_failure_burst_per_ip = 5;
        a.trusted_proxies = vec![ip("127.0.0.9")];
    })
    .await;
    let admin = app.admin.clone();
    let guesser = ip("127.0.0.5");
    for i in 0..5 {
        let (status, answer) = raw_http(
            &app,
            guesser,
            &get_with_token("/v1/service-keys", &format!("hsk_guess{i}"), ""),
        )
        .await;
        assert_eq!(status, 401, "{answer}");
    }
    let (status, answer) = raw_http(
        &app,
        guesser,
        &get_with_token("/v1/service-keys", "hsk_guess", ""),
    )
    .await;
    assert_eq!(status, 429, "{answer}");
    assert!(answer.contains("\"too_many_failed_attempts\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: "),
        "{answer}"
    );
    // A credential that would need a database look-up waits too (a real key not seen lately)...
    let key = app.service_key().await;
    let list = "/v1/devices?user_id=u";
    let (status, _) = raw_http(&app, guesser, &get_with_token(list, &key, "")).await;
    assert_eq!(status, 429);
    // ...but a known one — the admin token, or a credential used lately — passes: the other
    // clients behind the address (a NAT) are not locked out by a guesser.
    let (status, _) = raw_http(&app, guesser, &get_with_token(list, &admin, "")).await;
    assert_eq!(status, 200);
    let (status, _) = raw_http(&app, ip("127.0.0.7"), &get_with_token(list, &key, "")).await;
    assert_eq!(status, 200);
    let (status, _) = raw_http(&app, guesser, &get_with_token(list, &key, "")).await;
    assert_eq!(status, 200, "a credential in the cache passes");
    // Requests without any credential are not guesses.
    let (status, _) = raw_http(
        &app,
        ip("127.0.0.6"),
        "GET /v1/stats HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 401);
    // Another address is fine.
    let (status, answer) = raw_http(
        &app,
        ip("127.0.0.6"),
        &get_with_token("/v1/service-keys", &admin, ""),
    )
    .await;
    assert_eq!(status, 200, "{answer}");

    // Behind a trusted proxy, the client is the address the proxy appended to X-Forwarded-For.
    let proxy = ip("127.0.0.9");
    for _ in 0..5 {
        let head = get_with_token(
            "/v1/service-keys",
            "hsk_nope",
            "X-Forwarded-For: 203.0.113.7\r\n",
        );
        assert_eq!(raw_http(&app, proxy, &head).await.0, 401);
    }
    // A wrong credential from a limited client is 429; from another client, still 401.
    let probe = |peer: IpAddr, xff: &'static str| {
        let head = get_with_token(
            "/v1/service-keys",
            "hsk_probe",
            &format!("X-Forwarded-For: {xff}\r\n"),
        );
        let app = &app;
        async move { raw_http(app, peer, &head).await.0 }
    };
    assert_eq!(probe(proxy, "203.0.113.7").await, 429);
    // A client cannot dodge the limit by writing its own X-Forwarded-For entry first.
    assert_eq!(probe(proxy, "198.51.100.1, 203.0.113.7").await, 429);
    assert_eq!(probe(proxy, "203.0.113.8").await, 401);
    // An untrusted peer's X-Forwarded-For is ignored: the guesser stays limited.
    assert_eq!(probe(guesser, "203.0.113.9").await, 429);
}

both_backends!(one_user_may_have_only_so_many_devices_online);

/// `HERALD_MAX_SESSIONS_PER_USER`: past it a new device of that user is refused with 429
/// before the upgrade; a device replacing its own session does not count; a freed slot is
/// usable at once; other users are not affected.
async fn one_user_may_have_only_so_many_devices_online(b: Backend) {
    let app = spawn_app_with(b, |a| a.max_sessions_per_user = 2).await;
    let key = app.service_key().await;
    let d1 = app.device(&key, "busy").await;
    let d2 = app.device(&key, "busy").await;
    let d3 = app.device(&key, "busy").await;
    let other = app.device(&key, "calm").await;
    let mut s1 = app.connect(&d1).await;
    let s2 = app.connect(&d2).await;
    assert_eq!(app.connect_raw(&d3.token).await.err(), Some(429));
    // d1 reconnecting replaces its own session (4002), within the limit.
    let s1b = app.connect(&d1).await;
    assert_eq!(s1.expect_close().await, Some(4002));
    app.connect(&other).await.close().await;
    s2.close().await;
    eventually("d2 is offline", || async {
        !app.online_ids().await.contains(&d2.id)
    })
    .await;
    let s3 = app.connect(&d3).await;
    s3.close().await;
    s1b.close().await;
}

both_backends!(a_connection_that_never_sends_a_request_is_dropped);

/// Sockets that connect and never send a request — or stop in the middle of the request head —
/// are dropped after the handshake timeout instead of holding a slot forever.
async fn a_connection_that_never_sends_a_request_is_dropped(b: Backend) {
    let app = spawn_app_with(b, |a| a.handshake_timeout_ms = 1_500).await;
    for partial in ["", "GET /v1/ws HTTP/1.1\r\nHost: herald\r\nUpgr"] {
        let started = Instant::now();
        let mut tcp = tcp_from(ip("127.0.0.1"), app.socket_addr(), None).await;
        tcp.write_all(partial.as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
        let took = started.elapsed();
        assert!(
            read.is_ok(),
            "a silent connection was kept over 5 s ({partial:?})"
        );
        assert!(
            // actix-http's clock is cached for up to 500 ms, so the timeout may come that early.
            took >= Duration::from_millis(900),
            "dropped before the timeout: {took:?}: {:?}",
            String::from_utf8_lossy(&rest)
        );
        eprintln!(
            "silent connection ({} bytes sent) dropped after {took:?}",
            partial.len()
        );
    }
    // The node still serves.
    let (status, _) = app.get("/v1/stats", &app.admin.clone()).await;
    assert_eq!(status, StatusCode::OK);
}

both_backends!(a_payload_devices_could_not_read_back_is_refused);

/// A payload is stored and sent as the client wrote it, so it must be JSON a device can parse:
/// nested at most 128 deep, no lone UTF-16 surrogate escape. Otherwise a device could never
/// parse it, never ack it, and would get it again on every reconnect. Nothing is stored.
async fn a_payload_devices_could_not_read_back_is_refused(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let device = app.device(&key, "reader").await;
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let post =
        |payload: String| format!(r#"{{"device_ids":["{}"],"payload":{payload}}}"#, device.id);
    for (payload, ok) in [
        (nested(100), true),
        (r#""\ud83d\ude00 paired""#.to_owned(), true),
        (nested(5_000), false),
        (r#""\ud800 alone""#.to_owned(), false),
        (r#"{"a":"\udc00"}"#.to_owned(), false),
    ] {
        let (status, _, body) = app
            .call_raw(
                "POST",
                "/v1/notifications",
                Some(&key),
                Some(post(payload.clone()).into_bytes()),
                &[("Content-Type", "application/json")],
            )
            .await;
        let shown = &payload[..payload.len().min(40)];
        if ok {
            assert_eq!(status, StatusCode::ACCEPTED, "{shown}: {body}");
        } else {
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{shown}: {body}");
            assert_eq!(body["error"]["code"], "invalid_request", "{body}");
        }
    }
    // The two accepted ones arrive and parse; nothing else was stored.
    let mut ws = app.connect(&device).await;
    ws.recv_notification().await;
    let n = ws.recv_notification().await;
    assert_eq!(n["payload"], "\u{1F600} paired");
    ws.expect_silence(Duration::from_millis(300)).await;
    ws.close().await;
}
