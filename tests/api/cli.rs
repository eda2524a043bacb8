//! The `herald` command line of API.md: `--help` everywhere, `migrate`, `service-key create`,
//! `device create`, and `herald serve` as a real child process that generates its admin token
//! file (SQLite only: the CLI is the same code for both backends).

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use awc::http::StatusCode;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::both_backends;
use crate::helpers::{connect_request, spawn_app, Backend, Device};

/// Every setting the binary reads from the environment: cleared so the caller's shell cannot
/// leak into a test.
const HERALD_ENV: &[&str] = &[
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
];

/// `herald` with a clean environment, run in `dir`.
fn herald(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    for var in HERALD_ENV {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info").current_dir(dir);
    cmd
}

/// Runs `herald args…` to completion.
fn run(dir: &Path, args: &[&str]) -> Output {
    herald(dir).args(args).output().expect("herald runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// The one line a `create` command printed on stdout.
#[track_caller]
fn printed_secret(out: &Output) -> String {
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly the secret on stdout: {stdout:?}");
    let secret = lines[0].trim().to_owned();
    assert!(
        secret.len() >= 32 && !secret.contains(' '),
        "a high-entropy token: {secret:?}"
    );
    secret
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A `herald serve` child, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    /// Starts `herald serve` on a free port with this database and waits for `/healthz`.
    async fn start(dir: &Path, db: &Path) -> Server {
        Self::start_with(dir, db, &[]).await
    }

    /// Like `start`, with more environment variables (`HERALD_ADMIN_TOKEN`, `RUST_LOG`, …).
    async fn start_with(dir: &Path, db: &Path, env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let log = dir.join(format!("serve-{port}.log"));
        let child = herald(dir)
            .arg("serve")
            .env("HERALD_BIND", format!("127.0.0.1:{port}"))
            .env("HERALD_DATABASE_URL", sqlite_url(db))
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

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET with a bearer token; status and JSON body.
    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
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

    /// Stops the server (SIGKILL through its own handle) and returns its log.
    fn stop(mut self) -> String {
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

both_backends!(cli_credentials_work_on_a_running_node);

// ---------------------------------------------------------------------------------------------

#[test]
fn every_subcommand_has_help() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--help"], &["serve", "migrate", "device", "service-key"]),
        (
            &["serve", "--help"],
            &[
                "HERALD_BIND",
                "HERALD_DATABASE_URL",
                "HERALD_ADMIN_TOKEN",
                "HERALD_DB_POOL_SIZE",
                "127.0.0.1:8080",
                "sqlite://herald.db",
            ],
        ),
        (
            &["migrate", "--help"],
            &[
                "--database-url",
                "HERALD_DATABASE_URL",
                "sqlite://herald.db",
            ],
        ),
        (&["device", "--help"], &["create"]),
        (
            &["device", "create", "--help"],
            &["--user", "--name", "HERALD_DATABASE_URL"],
        ),
        (&["service-key", "--help"], &["create"]),
        (
            &["service-key", "create", "--help"],
            &["--name", "HERALD_DATABASE_URL"],
        ),
    ];
    for (args, mentions) in cases {
        let out = run(dir.path(), args);
        assert_success(&out, &format!("herald {}", args.join(" ")));
        let help = text(&out.stdout);
        for m in *mentions {
            assert!(
                help.contains(m),
                "`herald {}` does not mention {m}:\n{help}",
                args.join(" ")
            );
        }
    }
    // Asking for help touches nothing.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn unknown_subcommand_fails_with_usage() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["frobnicate"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).to_lowercase().contains("usage"));
    let out = run(dir.path(), &["device", "create"]);
    assert!(!out.status.success(), "--user is required");
    assert!(text(&out.stderr).contains("--user"));
}

#[test]
fn migrate_creates_the_database_by_flag_or_env_and_is_repeatable() {
    let dir = tempfile::tempdir().unwrap();
    let by_flag = dir.path().join("flag.db");
    let url = sqlite_url(&by_flag);
    let out = run(dir.path(), &["migrate", "--database-url", &url]);
    assert_success(&out, "migrate --database-url");
    assert!(by_flag.exists(), "the database file is created");
    let again = run(dir.path(), &["migrate", "--database-url", &url]);
    assert_success(&again, "a second migrate");

    let by_env = dir.path().join("env.db");
    let out = herald(dir.path())
        .arg("migrate")
        .env("HERALD_DATABASE_URL", sqlite_url(&by_env))
        .output()
        .unwrap();
    assert_success(&out, "migrate with HERALD_DATABASE_URL");
    assert!(by_env.exists());
    assert!(
        !dir.path().join("herald.db").exists(),
        "the default was not used"
    );
}

#[test]
fn migrate_refuses_a_bad_database_url_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["mysql://localhost/x", "nonsense"] {
        let out = run(dir.path(), &["migrate", "--database-url", url]);
        assert!(!out.status.success(), "{url} is refused");
        let stderr = text(&out.stderr);
        assert!(!stderr.is_empty(), "an explanation for {url}");
        assert!(!stderr.contains("panicked"), "no panic for {url}: {stderr}");
    }
}

#[test]
fn create_commands_print_only_the_secret_and_validate_input() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir.path().join("herald.db"));
    let out = run(
        dir.path(),
        &[
            "service-key",
            "create",
            "--name",
            "x",
            "--database-url",
            &url,
        ],
    );
    assert_success(&out, "service-key create");
    let key = printed_secret(&out);
    assert!(!text(&out.stderr).contains(&key), "the key is not logged");

    let out = run(
        dir.path(),
        &["device", "create", "--user", "u", "--database-url", &url],
    );
    assert_success(&out, "device create");
    let token = printed_secret(&out);
    assert_ne!(token, key);
    assert!(
        !text(&out.stderr).contains(&token),
        "the token is not logged"
    );

    let long = "u".repeat(129);
    for args in [
        &["device", "create", "--user", "", "--database-url", &url][..],
        &["device", "create", "--user", &long, "--database-url", &url][..],
        &[
            "device",
            "create",
            "--user",
            "a\u{1}b",
            "--database-url",
            &url,
        ][..],
        &[
            "service-key",
            "create",
            "--name",
            "",
            "--database-url",
            &url,
        ][..],
    ] {
        let out = run(dir.path(), args);
        assert!(!out.status.success(), "refused: {args:?}");
        assert!(text(&out.stdout).trim().is_empty(), "no secret printed");
        assert!(!text(&out.stderr).contains("panicked"));
    }
}

/// `herald serve` without an admin token generates one into a 0600 file beside the SQLite file,
/// logs the path and never the token; credentials made by the CLI work against it; a restart
/// reads the same token back.
#[actix_web::test]
async fn serve_generates_an_admin_token_file_and_honours_cli_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    let db = data.join("herald.db");
    let url = sqlite_url(&db);

    let out = run(
        dir.path(),
        &[
            "service-key",
            "create",
            "--name",
            "cli",
            "--database-url",
            &url,
        ],
    );
    assert_success(&out, "service-key create");
    let key = printed_secret(&out);
    let out = herald(dir.path())
        .args([
            "device",
            "create",
            "--user",
            "cli-user",
            "--name",
            "cli-phone",
        ])
        .env("HERALD_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert_success(&out, "device create");
    let token = printed_secret(&out);

    let server = Server::start(dir.path(), &db).await;
    let token_file = data.join("herald-admin.token");
    assert!(
        token_file.exists(),
        "the admin token file is beside the database:\n{}",
        server.log_text()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
    }
    let admin = fs::read_to_string(&token_file).unwrap().trim().to_owned();
    assert!(admin.len() >= 32, "a high-entropy admin token");

    let (status, stats) = server.get("/v1/stats", &admin).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert!(stats["uptime_seconds"].is_u64());
    let (status, _) = server.get("/v1/stats", &key).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a service key is not the admin"
    );

    // The CLI's service key works and sees the CLI's device.
    let (status, listed) = server.get("/v1/devices?user_id=cli-user", &key).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["devices"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["devices"][0]["name"], "cli-phone");
    let device_id = listed["devices"][0]["device_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The CLI's device token opens a WebSocket.
    let addr: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let mut req = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let mut ws = connect_request(addr, req)
        .await
        .expect("the device token opens a WebSocket");
    let hello = ws.recv_json().await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["device_id"], device_id.as_str());
    assert_eq!(hello["user_id"], "cli-user");
    drop(ws);

    let log = server.stop();
    let shown = token_file.display().to_string();
    assert!(log.contains(&shown), "the log names {shown}:\n{log}");
    assert!(!log.contains(&admin), "the log never shows the admin token");
    assert!(!log.contains(&key) && !log.contains(&token));

    // A restart reads the same token back and does not rewrite it.
    let server = Server::start(dir.path(), &db).await;
    assert_eq!(
        fs::read_to_string(&token_file).unwrap().trim(),
        admin,
        "the token file is kept"
    );
    let (status, _) = server.get("/v1/stats", &admin).await;
    assert_eq!(status, StatusCode::OK);
    let log = server.stop();
    assert!(!log.contains(&admin), "the log never shows the admin token");
}

/// With `HERALD_ADMIN_TOKEN` set, that token is the admin's, no file is written and the token is
/// never logged.
#[actix_web::test]
async fn serve_takes_the_admin_token_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("herald.db");
    let admin = "hadm_from_the_environment_0123456789abcdef";
    let server = Server::start_with(dir.path(), &db, &[("HERALD_ADMIN_TOKEN", admin)]).await;
    let (status, _) = server.get("/v1/stats", admin).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server.get("/v1/stats", "hadm_wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(!dir.path().join("herald-admin.token").exists());
    let log = server.stop();
    assert!(
        !log.contains(admin),
        "the log never shows the admin token:\n{log}"
    );
}

/// Operators create credentials with the CLI while the server runs, on either backend: they work
/// at once, with no restart.
async fn cli_credentials_work_on_a_running_node(b: Backend) {
    let app = spawn_app(b).await;
    let dir = tempfile::tempdir().unwrap();
    let url = app.db.url.clone();
    let out = run(
        dir.path(),
        &[
            "service-key",
            "create",
            "--name",
            "ops",
            "--database-url",
            &url,
        ],
    );
    assert_success(&out, "service-key create");
    let key = printed_secret(&out);
    let out = run(
        dir.path(),
        &[
            "device",
            "create",
            "--user",
            "ops-user",
            "--database-url",
            &url,
        ],
    );
    assert_success(&out, "device create");
    let token = printed_secret(&out);

    let (status, listed) = app.get("/v1/service-keys", &app.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["service_keys"][0]["name"], "ops", "{listed}");
    let (status, listed) = app.get("/v1/devices?user_id=ops-user", &key).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let device = Device {
        id: listed["devices"][0]["device_id"]
            .as_str()
            .unwrap()
            .to_owned(),
        user_id: "ops-user".into(),
        token,
    };
    let mut ws = app.connect(&device).await;
    let id = app
        .notify_device(&key, &device, serde_json::json!("from ops"))
        .await;
    assert_eq!(ws.recv_notification().await["id"], id.as_str());
}

/// SIGTERM: every session is closed with 1001, the process exits 0, and nothing secret was
/// logged along the way (even at debug level).
#[actix_web::test]
async fn sigterm_closes_sessions_with_1001_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("herald.db");
    let admin = "hadm_sigterm_test_0123456789abcdef";
    let mut server = Server::start_with(
        dir.path(),
        &db,
        &[("HERALD_ADMIN_TOKEN", admin), ("RUST_LOG", "debug")],
    )
    .await;
    let port = server.port;
    let http = crate::helpers::http_client();
    let mut res = http
        .post(server.url("/v1/service-keys"))
        .insert_header(("Authorization", format!("Bearer {admin}")))
        .send_json(&serde_json::json!({"name": "svc"}))
        .await
        .unwrap();
    let key = res.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut res = http
        .post(server.url("/v1/devices"))
        .insert_header(("Authorization", format!("Bearer {key}")))
        .send_json(&serde_json::json!({"user_id": "sam"}))
        .await
        .unwrap();
    let device = res.json::<Value>().await.unwrap();
    let token = device["token"].as_str().unwrap().to_owned();
    let mut req = format!("ws://127.0.0.1:{port}/v1/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut ws = connect_request(addr, req).await.expect("upgrade");
    assert_eq!(ws.recv_json().await["type"], "hello");

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(server.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(ws.expect_close().await, Some(1001));
    let start = Instant::now();
    let exit = loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "herald did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit}");
    let log = server.log_text();
    assert!(log.contains("SIGTERM"), "{log}");
    for secret in [admin, key.as_str(), token.as_str()] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }
}
