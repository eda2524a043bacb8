//! The test world: a real Herald node on a random port with its own database (a fresh SQLite
//! file, or a fresh PostgreSQL database dropped afterwards), a real HTTP client and a real
//! WebSocket client. Every test builds its own and tears it down.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use awc::http::StatusCode;
use diesel::{Connection, PgConnection, RunQueryDsl};
use futures_util::{SinkExt, StreamExt};
use herald::config::ServeArgs;
use herald::startup::Application;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should happen at once before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);
pub const ADMIN_TOKEN: &str = "hadm_test_admin_token_0123456789abcdef";

/// The PostgreSQL server tests create their databases on.
pub fn pg_admin_url() -> String {
    std::env::var("HERALD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs a test body once per backend: `both_backends!(name)` expects `async fn name(b: Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[actix_web::test]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await
            }
            #[actix_web::test]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await
            }
        }
    )+};
}

/// A database made for one test and removed after it.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    pub fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("herald.db").display());
                TestDb {
                    url,
                    _dir: Some(dir),
                    pg_name: None,
                }
            }
            Backend::Postgres => {
                let name = format!("herald_test_{}", uuid::Uuid::new_v4().simple());
                let admin = pg_admin_url();
                let mut conn = PgConnection::establish(&admin).unwrap_or_else(|e| {
                    panic!("PostgreSQL is required for this test ({admin}): {e}")
                });
                diesel::sql_query(format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .expect("create database");
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                TestDb {
                    url: format!("{base}/{name}"),
                    _dir: None,
                    pg_name: Some(name),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            if let Ok(mut conn) = PgConnection::establish(&pg_admin_url()) {
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn);
            }
        }
    }
}

/// A running node and clients for it.
pub struct TestApp {
    pub port: u16,
    pub base: String,
    pub admin: String,
    pub http: awc::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub db: TestDb,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl TestApp {
    /// Clients for a node that runs elsewhere (a child process); its database is the caller's.
    pub fn attach(port: u16, admin: &str) -> TestApp {
        TestApp {
            port,
            base: format!("http://127.0.0.1:{port}"),
            admin: admin.to_owned(),
            http: http_client(),
            stop: None,
            thread: None,
            db: TestDb {
                url: String::new(),
                _dir: None,
                pg_name: None,
            },
        }
    }
}

/// Settings for test nodes: quick heartbeats so timeouts can be seen in a test.
pub fn test_args(db: &TestDb) -> ServeArgs {
    let mut args = ServeArgs::with_database(db.url.clone());
    args.bind = "127.0.0.1:0".into();
    args.admin_token = Some(ADMIN_TOKEN.to_owned().into());
    args.workers = Some(2);
    // Tests open hundreds of sessions from 127.0.0.1 at once; the per-address connection limit
    // has its own tests (hostile.rs).
    args.connect_rate_per_ip = 0.0;
    args
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Starts a node on its own thread and actix system, with settings adjusted by `tweak`.
pub async fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut ServeArgs)) -> TestApp {
    // Server logs are off unless RUST_LOG asks for them (e.g. RUST_LOG=warn ... -- --nocapture).
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off"))
        .is_test(true)
        .try_init();
    let db = TestDb::new(backend);
    let mut args = test_args(&db);
    tweak(&mut args);
    let (tx, rx) = mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let app = Application::build(args).await.expect("the server starts");
            let handle = app.handle();
            tx.send(app.port()).unwrap();
            let server = actix_web::rt::spawn(app.run_until_stopped());
            let _ = stopped.await;
            handle.stop().await;
            let _ = server.await;
        });
    });
    let port = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server started");
    let http = http_client();
    TestApp {
        port,
        base: format!("http://127.0.0.1:{port}"),
        admin: ADMIN_TOKEN.to_owned(),
        http,
        stop: Some(stop),
        thread: Some(thread),
        db,
    }
}

/// An HTTP client that drops idle connections before the server's 5 s keep-alive closes them,
/// so a request never lands on a connection the server is closing.
pub fn http_client() -> awc::Client {
    let connector = awc::Connector::new()
        .conn_keep_alive(Duration::from_secs(2))
        .limit(200);
    awc::Client::builder()
        .connector(connector)
        .timeout(Duration::from_secs(60))
        .finish()
}

/// A device as its creator saw it.
#[derive(Clone, Debug)]
pub struct Device {
    pub id: String,
    pub user_id: String,
    pub token: String,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn socket_addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    /// Sends a request with an optional bearer token and JSON body; returns status, headers and
    /// the body parsed as JSON (`Null` when empty).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let (status, _, body) = self
            .call_raw(
                method,
                path,
                token,
                body.map(|b| b.to_string().into_bytes()),
                &[],
            )
            .await;
        (status, body)
    }

    pub async fn call_raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, awc::http::header::HeaderMap, Value) {
        let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.insert_header(("Authorization", format!("Bearer {t}")));
        }
        for (k, v) in headers {
            req = req.insert_header((*k, *v));
        }
        let mut res = match body {
            Some(b) => {
                req.insert_header(("Content-Type", "application/json"))
                    .send_body(b)
                    .await
            }
            None => req.send().await,
        }
        .expect("the request gets an answer");
        let bytes = res.body().limit(16 << 20).await.expect("a readable body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!("a JSON body, got {:?}", String::from_utf8_lossy(&bytes))
            })
        };
        (res.status(), res.headers().clone(), value)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call("GET", path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", path, Some(token), Some(&body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> StatusCode {
        self.call("DELETE", path, Some(token), None).await.0
    }

    /// A new service key.
    pub async fn service_key(&self) -> String {
        let (status, body) = self
            .post("/v1/service-keys", &self.admin, json!({"name": "test"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["key"].as_str().unwrap().to_owned()
    }

    /// A new device for `user`, created with `key`.
    pub async fn device(&self, key: &str, user: &str) -> Device {
        let (status, body) = self
            .post("/v1/devices", key, json!({"user_id": user, "name": "test"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Device {
            id: body["device_id"].as_str().unwrap().to_owned(),
            user_id: user.to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
        }
    }

    /// Posts a notification; returns status and body.
    pub async fn notify(&self, key: &str, body: Value) -> (StatusCode, Value) {
        self.post("/v1/notifications", key, body).await
    }

    /// Posts `payload` to one device and expects a `202`; returns the notification id.
    pub async fn notify_device(&self, key: &str, device: &Device, payload: Value) -> String {
        let (status, body) = self
            .notify(key, json!({"device_ids": [device.id], "payload": payload}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// `GET /metrics` as the admin: the Prometheus text, checked to be served as such.
    pub async fn metrics_text(&self) -> String {
        let mut res = self
            .http
            .get(self.url("/metrics"))
            .insert_header(("Authorization", format!("Bearer {}", self.admin)))
            .send()
            .await
            .expect("an answer");
        assert_eq!(res.status(), StatusCode::OK);
        let ctype = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        String::from_utf8(res.body().await.expect("a body").to_vec()).expect("UTF-8 text")
    }

    pub async fn stats(&self) -> Value {
        let (status, body) = self.get("/v1/stats", &self.admin).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    pub async fn presence(&self) -> Value {
        let (status, body) = self.get("/v1/presence?limit=1000", &self.admin).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Ids of the online devices (first page of up to 1000).
    pub async fn online_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.presence().await["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    }

    /// Waits until the pool has no connection checked out (background writes may still be
    /// finishing right after a burst) and returns the final stats.
    pub async fn pool_settles(&self) -> Value {
        let start = Instant::now();
        loop {
            let stats = self.stats().await;
            if stats["db_pool"]["in_use"] == 0 {
                return stats;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "pool never returned to 0 in use: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens a WebSocket with a bearer token and waits for `hello`.
    pub async fn connect(&self, device: &Device) -> WsClient {
        let mut ws = self
            .connect_raw(&device.token)
            .await
            .expect("the upgrade succeeds");
        let hello = ws.recv_json().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(hello["device_id"], device.id.as_str());
        ws.hello = hello;
        ws
    }

    /// Opens a WebSocket; `Err(status)` when the upgrade is refused.
    pub async fn connect_raw(&self, token: &str) -> Result<WsClient, u16> {
        connect_request(self.socket_addr(), self.ws_request(token)).await
    }

    /// The upgrade request for `GET /v1/ws` with a bearer token.
    pub fn ws_request(
        &self,
        token: &str,
    ) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        let mut req = format!("ws://127.0.0.1:{}/v1/ws", self.port)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        req
    }
}

/// Opens a WebSocket over a TCP stream of our own, so a test can reset it.
pub async fn connect_request(
    addr: SocketAddr,
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<WsClient, u16> {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    tcp.set_nodelay(true).unwrap();
    handshake(tcp, req, 16 * 1024).await
}

/// The WebSocket handshake over a TCP stream the caller opened (from a chosen address, with a
/// chosen receive buffer, …); `Err(status)` when the upgrade is refused.
pub async fn handshake(
    tcp: TcpStream,
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
    read_buffer: usize,
) -> Result<WsClient, u16> {
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0);
    match tokio_tungstenite::client_async_with_config(req, MaybeTlsStream::Plain(tcp), Some(config))
        .await
    {
        Ok((stream, _)) => Ok(WsClient {
            stream,
            hello: Value::Null,
        }),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => Err(res.status().as_u16()),
        Err(e) => panic!("WebSocket connect failed: {e}"),
    }
}

pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub hello: Value,
}

/// What a client saw next.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    Close(Option<u16>),
}

impl WsClient {
    /// The next text frame or close, skipping pings and pongs; panics after `PATIENCE`.
    pub async fn next_event(&mut self) -> Event {
        self.next_event_within(PATIENCE)
            .await
            .expect("a frame within the patience")
    }

    /// Like `next_event`, but `None` if nothing comes within `wait`.
    pub async fn next_event_within(&mut self, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return None,
                Ok(None) => return Some(Event::Close(None)),
                Ok(Some(Err(_))) => return Some(Event::Close(None)),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    return Some(Event::Json(serde_json::from_str(&t).expect("JSON frame")))
                }
                Message::Close(frame) => {
                    return Some(Event::Close(frame.map(|f| u16::from(f.code))))
                }
                Message::Binary(_) => panic!("the server sent a binary frame"),
                _ => continue,
            }
        }
    }

    /// The next text frame as JSON; panics on close or after `PATIENCE`.
    pub async fn recv_json(&mut self) -> Value {
        match self.next_event().await {
            Event::Json(v) => v,
            Event::Close(code) => panic!("expected a frame, the session closed with {code:?}"),
        }
    }

    /// The next notification frame (skipping other kinds).
    pub async fn recv_notification(&mut self) -> Value {
        loop {
            let v = self.recv_json().await;
            if v["type"] == "notification" {
                return v;
            }
        }
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(e) = self.next_event_within(wait).await {
            panic!("expected silence, got {e:?}");
        }
    }

    /// Waits for the close frame and returns its code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.next_event().await {
                Event::Close(code) => return code,
                Event::Json(_) => continue,
            }
        }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.stream
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_text(&mut self, t: &str) {
        self.stream
            .send(Message::text(t.to_owned()))
            .await
            .expect("send");
    }

    pub async fn ack(&mut self, ids: &[&str]) {
        self.send_json(json!({"type": "ack", "ids": ids})).await;
    }

    /// Closes politely with 1000 and waits for the server's close.
    pub async fn close(mut self) {
        let _ = self
            .stream
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
        // Done when the server's close frame arrives (the server may hold TCP open a moment longer).
        while let Ok(Some(Ok(m))) = tokio::time::timeout(PATIENCE, self.stream.next()).await {
            if m.is_close() {
                break;
            }
        }
    }

    /// Drops the connection with a TCP reset: no close frame, no FIN.
    pub fn reset(self) {
        let tcp = match self.stream.get_ref() {
            MaybeTlsStream::Plain(s) => s,
            _ => unreachable!(),
        };
        socket2::SockRef::from(tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(self);
    }
}

/// Polls `check` until it returns true, failing after `PATIENCE`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
