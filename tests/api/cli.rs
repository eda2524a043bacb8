//! The `herald` command line of API.md: `--help` everywhere, `migrate`, `service-key create`,
//! `device create`, and `herald serve` as a real child process that generates its admin token
//! file (SQLite only: the CLI is the same code for both backends).

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use awc::http::StatusCode;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::both_backends;
use crate::helpers::{connect_request, spawn_app, Backend, Device};
use crate::process::{herald, Server};

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

    let server = Server::start(dir.path(), &sqlite_url(&db), &[]).await;
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
    let server = Server::start(dir.path(), &sqlite_url(&db), &[]).await;
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
    let server = Server::start(
        dir.path(),
        &sqlite_url(&db),
        &[("HERALD_ADMIN_TOKEN", admin)],
    )
    .await;
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
    let mut server = Server::start(
        dir.path(),
        &sqlite_url(&db),
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

    server.signal("-TERM");
    assert_eq!(ws.expect_close().await, Some(1001));
    let exit = server.exited(Duration::from_secs(15)).await;
    assert!(exit.success(), "exit status {exit}");
    let log = server.log_text();
    assert!(log.contains("SIGTERM"), "{log}");
    for secret in [admin, key.as_str(), token.as_str()] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }
}
