//! PostgreSQL going away mid-run: posts get `503` within their deadline instead of hanging, open
//! sessions stay up, and once the database is back everything works again without a restart —
//! with no notification that got a `202` lost. The database is reached through a TCP proxy the
//! test controls, so the shared PostgreSQL server stays up for the other tests.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use awc::http::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::*;

const PASS: u8 = 0;
const HANG: u8 = 1;
const DOWN: u8 = 2;

/// A TCP proxy in front of PostgreSQL: passes bytes, stalls them (a hung server), or drops every
/// connection and refuses new ones (a stopped server).
struct PgProxy {
    port: u16,
    mode: Arc<AtomicU8>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl PgProxy {
    fn start(upstream: String) -> PgProxy {
        let mode = Arc::new(AtomicU8::new(PASS));
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let (m, t) = (mode.clone(), tasks.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap().port()).unwrap();
                loop {
                    let (client, _) = listener.accept().await.unwrap();
                    if m.load(Ordering::SeqCst) == DOWN {
                        drop(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let a = tokio::spawn(pump(cr, sw, m.clone()));
                    let b = tokio::spawn(pump(sr, cw, m.clone()));
                    t.lock()
                        .unwrap()
                        .extend([a.abort_handle(), b.abort_handle()]);
                }
            });
        });
        let port = rx.recv().unwrap();
        PgProxy {
            port,
            mode,
            tasks,
            _thread: thread,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        if mode == DOWN {
            for t in self.tasks.lock().unwrap().drain(..) {
                t.abort();
            }
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while mode.load(Ordering::SeqCst) == HANG {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while mode.load(Ordering::SeqCst) == HANG {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `host:port` of a `postgres://user@host:port/db` URL.
fn host_port(url: &str) -> String {
    let rest = url.split_once('@').map(|(_, r)| r).unwrap_or(url);
    let rest = rest
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://");
    rest.split('/').next().unwrap().to_owned()
}

#[actix_web::test]
async fn postgres_hanging_then_back() {
    outage(HANG).await
}

#[actix_web::test]
async fn postgres_stopped_then_back() {
    outage(DOWN).await
}

async fn outage(kind: u8) {
    let db = TestDb::new(Backend::Postgres);
    let proxy = PgProxy::start(host_port(&db.url));
    let proxied = db
        .url
        .replace(&host_port(&db.url), &format!("127.0.0.1:{}", proxy.port));
    let deadline_ms = 1_000;
    let app = spawn_app_with(Backend::Postgres, |a| {
        a.db.database_url = proxied;
        a.db_deadline_ms = deadline_ms;
    })
    .await;
    let key = app.service_key().await;
    let phone = app.device(&key, "olga").await;
    let mut ws = app.connect(&phone).await;
    let mut promised = vec![app.notify_device(&key, &phone, json!("before")).await];
    assert_eq!(ws.recv_notification().await["id"], promised[0].as_str());

    proxy.set(kind);
    for i in 0..5 {
        let started = Instant::now();
        let (status, body) = app
            .notify(&key, json!({"device_ids": [phone.id], "payload": i}))
            .await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(deadline_ms + 2_000),
            "a post took {took:?} during the outage"
        );
        match status {
            StatusCode::ACCEPTED => promised.push(body["id"].as_str().unwrap().to_owned()),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(body["error"]["code"].is_string(), "{body}");
            }
            other => panic!("during the outage a post got {other}: {body}"),
        }
    }
    let (status, _) = app.call("GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, headers, _) = app
        .call_raw(
            "POST",
            "/v1/notifications",
            Some(&key),
            Some(b"{\"user_id\":\"olga\",\"payload\":1}".to_vec()),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        headers.contains_key("retry-after"),
        "a 503 carries Retry-After"
    );
    // The session is still up: it answers a ping.
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.recv_json().await["type"], "pong");

    proxy.set(PASS);
    let mut back = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let (status, body) = app
            .notify(&key, json!({"device_ids": [phone.id], "payload": "after"}))
            .await;
        if status == StatusCode::ACCEPTED {
            promised.push(body["id"].as_str().unwrap().to_owned());
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(back, "posting never recovered after the database came back");
    assert_eq!(
        app.call("GET", "/readyz", None, None).await.0,
        StatusCode::OK
    );

    // Every notification that got a 202 reaches the device: live, or on its next session.
    let mut seen = std::collections::HashSet::new();
    seen.insert(promised[0].clone());
    while let Some(Event::Json(v)) = ws.next_event_within(Duration::from_secs(2)).await {
        if v["type"] == "notification" {
            seen.insert(v["id"].as_str().unwrap().to_owned());
        }
    }
    ws.close().await;
    let mut ws = app.connect(&phone).await;
    while let Some(Event::Json(v)) = ws.next_event_within(Duration::from_secs(2)).await {
        if v["type"] == "notification" {
            seen.insert(v["id"].as_str().unwrap().to_owned());
        }
    }
    for id in &promised {
        assert!(
            seen.contains(id),
            "notification {id} got a 202 but never arrived"
        );
    }
    let stats = app.pool_settles().await;
    assert_eq!(stats["sessions"], 1, "{stats}");
}
