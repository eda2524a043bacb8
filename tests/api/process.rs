//! `herald` as a real child process, for the tests of the command line, shutdown and crashes.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use awc::http::StatusCode;
use serde_json::Value;

use crate::helpers::TestApp;

/// Every setting the binary reads from the environment: cleared so the caller's shell cannot
/// leak into a test.
pub const HERALD_ENV: &[&str] = &[
    "HERALD_BIND",
    "HERALD_DATABASE_URL",
    "HERALD_ADMIN_TOKEN",
    "HERALD_ADMIN_TOKEN_FILE",
    "HERALD_DB_POOL_SIZE",
    "HERALD_DB_QUEUE_LIMIT",
    "HERALD_DB_DEADLINE_MS",
    "HERALD_HEARTBEAT_INTERVAL_MS",
    "HERALD_WS_MAX_FRAME_BYTES",
    "HERALD_MAX_BODY_BYTES",
    "HERALD_WORKERS",
    "HERALD_RETENTION_SECONDS",
    "HERALD_PURGE_INTERVAL_MS",
    "HERALD_WS_OUTBOUND_MAX_BYTES",
    "HERALD_WS_OUTBOUND_MAX_FRAMES",
    "HERALD_WS_SLOW_GRACE_MS",
    "HERALD_WS_MAX_FRAMES_PER_SECOND",
    "HERALD_MAX_SESSIONS_PER_USER",
    "HERALD_CONNECT_RATE_PER_IP",
    "HERALD_CONNECT_BURST_PER_IP",
    "HERALD_AUTH_FAILURE_RATE_PER_IP",
    "HERALD_AUTH_FAILURE_BURST_PER_IP",
    "HERALD_TRUSTED_PROXIES",
    "HERALD_HANDSHAKE_TIMEOUT_MS",
    "HERALD_NODE_ID",
    "HERALD_NODE_LEASE_MS",
];

/// `herald` with a clean environment, run in `dir`.
pub fn herald(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    for var in HERALD_ENV {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info").current_dir(dir);
    cmd
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A `herald serve` child, killed when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Server {
    /// Starts `herald serve` on a free port with this database URL and these extra environment
    /// variables (`HERALD_ADMIN_TOKEN`, `RUST_LOG`, …), and waits for `/healthz`.
    pub async fn start(dir: &Path, db_url: &str, env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let log = dir.join(format!("serve-{port}.log"));
        let child = herald(dir)
            .arg("serve")
            .env("HERALD_BIND", format!("127.0.0.1:{port}"))
            .env("HERALD_DATABASE_URL", db_url)
            .envs(env.iter().copied())
            .stdout(Stdio::from(
                fs::File::create(dir.join("serve.out")).unwrap(),
            ))
            .stderr(Stdio::from(fs::File::create(&log).unwrap()))
            .spawn()
            .expect("herald serve starts");
        let mut server = Server { child, port, log };
        server.wait_healthy().await;
        server
    }

    async fn wait_healthy(&mut self) {
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(2))
            .finish();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("herald serve exited with {status}:\n{}", self.log_text());
            }
            if let Ok(res) = client.get(self.url("/healthz")).send().await {
                if res.status() == StatusCode::OK {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "herald serve never became healthy:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET with a bearer token; status and JSON body.
    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(30))
            .finish();
        let mut res = client
            .get(self.url(path))
            .insert_header(("Authorization", format!("Bearer {token}")))
            .send()
            .await
            .expect("an answer");
        let body = res.body().await.expect("a body");
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).expect("a JSON body")
        };
        (res.status(), value)
    }

    /// Clients for this node, with this admin token.
    pub fn app(&self, admin: &str) -> TestApp {
        TestApp::attach(self.port, admin)
    }

    /// Sends a signal (`-TERM`, `-KILL`, …) to the process.
    pub fn signal(&self, sig: &str) {
        let sent = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success(), "kill {sig}");
    }

    /// Waits for the process to exit, failing after `within`.
    pub async fn exited(&mut self, within: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                return exit;
            }
            assert!(
                start.elapsed() < within,
                "herald did not exit:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (SIGKILL through its own handle) and returns its log.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log_text()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
