//! Nodes and databases: SQLite is single-node, so a second `herald serve` on the same SQLite
//! file is refused with a clear error, while the command-line tools keep working beside the node
//! and a node that died (even by SIGKILL) does not block its successor.

use std::time::Duration;

use crate::process::{herald, Server};

const ADMIN: &str = "hadm_nodes_test_admin_token_0123456789";

#[actix_web::test]
async fn a_second_node_on_one_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    let mut first = Server::start(dir.path(), &url, &[("HERALD_ADMIN_TOKEN", ADMIN)]).await;

    let second = herald(dir.path())
        .arg("serve")
        .env("HERALD_BIND", "127.0.0.1:0")
        .env("HERALD_DATABASE_URL", &url)
        .env("HERALD_ADMIN_TOKEN", ADMIN)
        .output()
        .expect("herald runs");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second node started: {stderr}");
    assert!(
        stderr.contains("another herald node is already serving") && stderr.contains("PostgreSQL"),
        "the refusal does not say why: {stderr}"
    );

    // The CLI works beside the running node.
    let created = herald(dir.path())
        .args(["device", "create", "--user", "alice"])
        .env("HERALD_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    // A node killed with SIGKILL leaves no lock behind: the next one starts.
    first.signal("-KILL");
    first.exited(Duration::from_secs(10)).await;
    let next = Server::start(dir.path(), &url, &[("HERALD_ADMIN_TOKEN", ADMIN)]).await;
    let (status, _) = next.get("/readyz", ADMIN).await;
    assert_eq!(status.as_u16(), 200);
    next.stop();
}
