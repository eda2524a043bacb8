//! PostgreSQL going away mid-run: posts get `503` within their deadline instead of hanging, open
//! sessions stay up, and once the database is back everything works again without a restart —
//! with no notification that got a `202` lost. The database is reached through a TCP proxy the
//! test controls, so the shared PostgreSQL server stays up for the other tests. And a database
//! that refuses the writer's batches: they are retried after a pause, not in a loop, and nothing
//! gathered is lost.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use awc::http::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::both_backends;
use crate::helpers::*;
use diesel::connection::SimpleConnection;

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

/// Runs SQL on the test's database from a connection of its own (not the node's).
fn run_sql(app: &TestApp, sql: &str) {
    let backend = herald::db::Backend::from_url(&app.db.url).unwrap();
    let mut c = backend.connect().expect("a connection of the test's own");
    c.batch_execute(sql).expect("the test's SQL runs");
}

/// A trigger that makes every change to a delivery (a mark or an ack) fail, so every write batch
/// carrying one is rolled back at once.
fn refuse_delivery_updates(app: &TestApp, b: Backend) {
    run_sql(
        app,
        match b {
            Backend::Sqlite => {
                "CREATE TRIGGER refuse_updates BEFORE UPDATE ON deliveries \
                 BEGIN SELECT RAISE(ABORT, 'test: updates refused'); END;"
            }
            Backend::Postgres => {
                "CREATE FUNCTION refuse_updates() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'test: updates refused'; END $$; \
                 CREATE TRIGGER refuse_updates BEFORE UPDATE ON deliveries \
                 FOR EACH ROW EXECUTE FUNCTION refuse_updates();"
            }
        },
    );
}

both_backends!(a_failing_write_is_retried_after_a_pause_and_loses_nothing);

async fn a_failing_write_is_retried_after_a_pause_and_loses_nothing(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "petra").await;
    let mut ws = app.connect(&phone).await;
    let id = app.notify_device(&key, &phone, json!("to ack")).await;
    assert_eq!(ws.recv_notification().await["id"], id.as_str());
    // The delivery mark is written before the database starts refusing.
    eventually("the delivery mark is written", || async {
        let (_, n) = app.get(&format!("/v1/notifications/{id}"), &key).await;
        n["deliveries"][0]["state"] == "delivered"
    })
    .await;
    let failed = |s: &serde_json::Value| s["writes"]["failed"].as_u64().unwrap();
    assert_eq!(failed(&app.stats().await), 0);

    refuse_delivery_updates(&app, b);
    ws.ack(&[&id]).await;
    eventually("the ack's batch fails", || async {
        failed(&app.stats().await) > 0
    })
    .await;
    // A failed batch is retried after a 200 ms pause: over 2 s, at most about ten tries — not
    // one after another as fast as the database refuses them (1,914 on PostgreSQL, 179 on SQLite
    // before the pause was kept).
    let before = failed(&app.stats().await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tries = failed(&app.stats().await) - before;
    assert!(
        (1..=12).contains(&tries),
        "{tries} failed batches in 2 s: retries do not pause"
    );
    // The session is not touched by the writer's trouble.
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.recv_json().await["type"], "pong");

    // Once the database takes writes again, the ack kept for the retry is written.
    run_sql(
        &app,
        match b {
            Backend::Sqlite => "DROP TRIGGER refuse_updates",
            Backend::Postgres => "DROP TRIGGER refuse_updates ON deliveries",
        },
    );
    eventually("the kept ack is written", || async {
        let (_, n) = app.get(&format!("/v1/notifications/{id}"), &key).await;
        n["deliveries"][0]["state"] == "acked"
    })
    .await;
    let settled = failed(&app.stats().await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(failed(&app.stats().await), settled, "batches still fail");
    // Nothing is left for the device: a new session gets no replay.
    ws.close().await;
    let mut ws = app.connect(&phone).await;
    ws.expect_silence(Duration::from_millis(500)).await;
}

/// A write batch that the database holds longer than the Committer's deadline for a batch still
/// reaches the devices online the moment it commits — not only their next session — though its
/// post was answered `503` long before: the Committer waits for a started batch's outcome. (Had
/// it given up, the Router would read the batch from the database only after waiting 2 s for its
/// items — hence the test's 1.5 s bound. A single SQLite node has no such fallback, but a started
/// SQLite batch cannot be held past 10 s from outside: a lock held elsewhere stops it before it
/// starts.)
#[actix_web::test]
async fn a_batch_held_past_its_deadline_is_still_pushed_once_committed() {
    let app = spawn_app_with(Backend::Postgres, |a| a.db_deadline_ms = 1_000).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "quinn").await;
    let mut ws = app.connect(&phone).await;
    let first = app.notify_device(&key, &phone, json!("before")).await;
    assert_eq!(ws.recv_notification().await["id"], first.as_str());
    ws.ack(&[&first]).await;
    eventually("the first ack is written", || async {
        let (_, n) = app.get(&format!("/v1/notifications/{first}"), &key).await;
        n["deliveries"][0]["state"] == "acked"
    })
    .await;

    // Another client locks the notifications table for 6 s and the presence table for 12 s: the
    // batch's insert waits on the first, its count of the devices online on the second — each
    // statement for less than PostgreSQL's statement and lock timeouts (10 s), the batch 12 s in
    // all, past the Committer's 10 s deadline for a batch.
    let url = app.db.url.clone();
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        // Plain connections: Herald's own settings would end a transaction idle for 10 s.
        use diesel::Connection;
        let mut a = diesel::PgConnection::establish(&url).unwrap();
        let mut b = diesel::PgConnection::establish(&url).unwrap();
        a.batch_execute("BEGIN; LOCK TABLE notifications IN EXCLUSIVE MODE")
            .unwrap();
        b.batch_execute("BEGIN; LOCK TABLE presence IN ACCESS EXCLUSIVE MODE")
            .unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(6));
        a.batch_execute("COMMIT").unwrap();
        std::thread::sleep(Duration::from_secs(6));
        b.batch_execute("COMMIT").unwrap();
    });
    locked.recv().unwrap();
    let (status, body) = app
        .notify(&key, json!({"device_ids": [phone.id], "payload": "held"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    tokio::task::spawn_blocking(move || holder.join().unwrap())
        .await
        .unwrap();
    let released = Instant::now();

    // The held batch commits once the locks go; its notification reaches the open session.
    let mut live = Vec::new();
    while let Some(Event::Json(v)) = ws.next_event_within(Duration::from_secs(3)).await {
        if v["type"] == "notification" {
            assert_eq!(v["payload"], "held", "{v}");
            let took = released.elapsed();
            assert!(
                took < Duration::from_millis(1_500),
                "pushed {took:?} after the locks went: not by the Committer"
            );
            live.push(v["id"].as_str().unwrap().to_owned());
            ws.ack(&[v["id"].as_str().unwrap()]).await;
        }
    }
    assert_eq!(
        live.len(),
        1,
        "the held post's notification, once: {live:?}"
    );
    // Whatever the database holds for the device was pushed live: a new session has nothing.
    eventually("the held notification's ack is written", || async {
        let (_, n) = app
            .get(&format!("/v1/notifications/{}", live[0]), &key)
            .await;
        n["deliveries"][0]["state"] == "acked"
    })
    .await;
    ws.close().await;
    let mut ws = app.connect(&phone).await;
    ws.expect_silence(Duration::from_millis(500)).await;
}
