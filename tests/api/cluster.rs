//! Several nodes, one PostgreSQL (issue 7): three `herald serve` child processes on one database,
//! each with its own `HERALD_NODE_ID`, a short node lease and a short heartbeat, driven through
//! real HTTP and WebSocket clients.
//!
//! - a post made on any node reaches the device's live session on whichever node holds it, in
//!   creation order, none missing, none twice (`delivered_now` counts devices online anywhere in
//!   the cluster);
//! - a device that keeps moving between nodes while posts keep coming gets every one of them, in
//!   creation order within each session and with no gaps (replay, then live);
//! - every node answers presence for the whole cluster, identically;
//! - the devices of a node killed with SIGKILL go offline on the survivors within a lease (plus a
//!   renewal period), and get what was posted to them meanwhile when they reconnect elsewhere;
//! - one session per device across the cluster (4002), and revocation of a device or a service
//!   key is enforced on every node at once (4001, 401).
//!
//! PostgreSQL only (SQLite stays single-node). Each test prints its measured figures (run with
//! `-- --nocapture` to see them): `scripts/test --test api cluster -- --nocapture`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use awc::http::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::process::Server;

const ADMIN: &str = "hadm_cluster_test_0123456789abcdef0123";
/// `HERALD_NODE_LEASE_MS` of every node: short, so that a dead node is noticed within a test.
const LEASE_MS: u64 = 1500;
/// `HERALD_HEARTBEAT_INTERVAL_MS`: short; every session of these tests is read continuously, so
/// it answers the server's pings.
const HEARTBEAT_MS: u64 = 1000;
/// Slack on top of a lease and a renewal period (a third of the lease) for a busy machine.
const KILL_MARGIN_MS: u64 = 2500;
const NAMES: [&str; 3] = ["A", "B", "C"];

// ---------------------------------------------------------------------------------------------
// Three nodes on one database

struct Cluster {
    /// HTTP and WebSocket clients for node i.
    apps: Vec<TestApp>,
    nodes: Vec<Server>,
    _dirs: Vec<tempfile::TempDir>,
    /// Declared last: the database is dropped after the nodes are gone.
    _db: TestDb,
}

impl Cluster {
    /// Three `herald serve` processes on a fresh PostgreSQL database, started one after the other
    /// (the first one runs the migrations), each in its own working directory.
    async fn start() -> Cluster {
        let db = TestDb::new(Backend::Postgres);
        let lease = LEASE_MS.to_string();
        let heartbeat = HEARTBEAT_MS.to_string();
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for name in NAMES {
            let dir = tempfile::tempdir().unwrap();
            let node_id = format!("cluster-test-{}", name.to_lowercase());
            let node = Server::start(
                dir.path(),
                &db.url,
                &[
                    ("HERALD_ADMIN_TOKEN", ADMIN),
                    ("HERALD_NODE_ID", &node_id),
                    ("HERALD_NODE_LEASE_MS", &lease),
                    ("HERALD_HEARTBEAT_INTERVAL_MS", &heartbeat),
                    ("HERALD_WORKERS", "2"),
                    ("HERALD_CONNECT_RATE_PER_IP", "0"),
                ],
            )
            .await;
            nodes.push(node);
            dirs.push(dir);
        }
        let apps = nodes.iter().map(|n| n.app(ADMIN)).collect();
        Cluster {
            apps,
            nodes,
            _dirs: dirs,
            _db: db,
        }
    }
}

impl Drop for Cluster {
    /// On a failure, the end of each node's log (the nodes are killed right after).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (name, node) in NAMES.iter().zip(&self.nodes) {
            let log = node.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "---- node {name} (port {}), last {} log lines ----\n{}",
                node.port,
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A session read continuously by its own task

/// What one session received, filled in by its reader task.
#[derive(Default)]
struct Seen {
    /// Notification frames, with the moment each arrived.
    frames: Vec<(Instant, Value)>,
    /// `Some(code)` once the session ended (`Some(None)`: without a close frame).
    close: Option<Option<u16>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// A close frame (1000), then wait for the server's.
    Close,
    /// A TCP reset: no close frame.
    Reset,
}

/// A device session whose frames a task reads (and answers pings) until it ends.
struct Live {
    node: usize,
    seen: Rc<RefCell<Seen>>,
    stop: Option<tokio::sync::oneshot::Sender<End>>,
    task: Option<actix_web::rt::task::JoinHandle<()>>,
}

impl Live {
    /// Connects `device` to node `node` (waits for `hello`) and starts reading; with `ack`, every
    /// notification is acked as soon as it arrives.
    async fn connect(c: &Cluster, node: usize, device: &Device, ack: bool) -> Live {
        let ws = c.apps[node].connect(device).await;
        Live::spawn(ws, node, ack)
    }

    fn spawn(mut ws: WsClient, node: usize, ack: bool) -> Live {
        let seen: Rc<RefCell<Seen>> = Rc::default();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<End>();
        let shared = seen.clone();
        let task = actix_web::rt::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = ws.next_event_within(Duration::from_secs(120)) => e,
                    how = &mut stopped => {
                        match how {
                            Ok(End::Reset) => ws.reset(),
                            // Asked to close, or the `Live` was dropped.
                            _ => ws.close().await,
                        }
                        return;
                    }
                };
                match event {
                    None => continue,
                    Some(Event::Json(v)) if v["type"] == "notification" => {
                        let at = Instant::now();
                        let id = v["id"].as_str().expect("a notification id").to_owned();
                        shared.borrow_mut().frames.push((at, v));
                        if ack {
                            ws.ack(&[&id]).await;
                        }
                    }
                    Some(Event::Json(_)) => {}
                    Some(Event::Close(code)) => {
                        shared.borrow_mut().close = Some(code);
                        return;
                    }
                }
            }
        });
        Live {
            node,
            seen,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn frames(&self) -> Vec<Value> {
        self.seen
            .borrow()
            .frames
            .iter()
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn ids(&self) -> Vec<String> {
        self.frames()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// When the notification `id` arrived, waiting up to `PATIENCE` for it.
    async fn arrival_of(&self, id: &str, what: &str) -> Instant {
        let start = Instant::now();
        loop {
            if let Some((at, _)) = self
                .seen
                .borrow()
                .frames
                .iter()
                .find(|(_, v)| v["id"] == id)
            {
                return *at;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "{what}: notification {id} never reached the session on node {} (it got {:?}; \
                 closed: {:?})",
                NAMES[self.node],
                self.ids(),
                self.seen.borrow().close
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until at least `n` notifications arrived; returns them.
    async fn wait_count(&self, n: usize, what: &str) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let got = self.seen.borrow().frames.len();
            if got >= n {
                return self.frames();
            }
            assert!(
                start.elapsed() < PATIENCE,
                "{what}: the session on node {} got {got} notifications, expected {n} (closed: {:?})",
                NAMES[self.node],
                self.seen.borrow().close
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn close_code(&self) -> Option<Option<u16>> {
        self.seen.borrow().close
    }

    /// Waits for the server to end the session; its close code.
    async fn closed(&self, what: &str) -> Option<u16> {
        let start = Instant::now();
        loop {
            if let Some(code) = self.close_code() {
                return code;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "{what}: the session on node {} was never closed",
                NAMES[self.node]
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Ends the session from the client side and waits for the reader to finish.
    async fn end(&mut self, how: End) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(how);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn time_of(v: &Value) -> SystemTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("a time string, got {v}"));
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("RFC 3339 time, got {s:?}: {e}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `n=… p50=… p90=… p99=… max=…` of some durations.
fn summary(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "n=0".into();
    }
    v.sort();
    let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={} p50={:.1}ms p90={:.1}ms p99={:.1}ms max={:.1}ms",
        v.len(),
        ms(pick(0.5)),
        ms(pick(0.9)),
        ms(pick(0.99)),
        ms(*v.last().unwrap())
    )
}

/// Posts to one device through `app`; expects `202` and returns the answer.
async fn post(app: &TestApp, key: &str, device_id: &str, payload: Value) -> Value {
    let (status, body) = app
        .notify(key, json!({"device_ids": [device_id], "payload": payload}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body
}

#[track_caller]
fn assert_created_in_order(frames: &[Value], what: &str) {
    for pair in frames.windows(2) {
        assert!(
            time_of(&pair[0]["created_at"]) <= time_of(&pair[1]["created_at"]),
            "{what}: created_at goes backwards: {} then {}",
            pair[0],
            pair[1]
        );
    }
}

/// Ids of the online devices in `/v1/presence` of one node (all pages of 1000).
async fn online_on(app: &TestApp) -> BTreeSet<String> {
    let (devices, _) = presence_pages(app, "", 1000).await;
    devices
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every page of `/v1/presence?{query}&limit={limit}`, following `next` with `after`: the devices
/// of all pages in order, and the first page.
async fn presence_pages(app: &TestApp, query: &str, limit: usize) -> (Vec<Value>, Value) {
    let mut devices = Vec::new();
    let mut first = Value::Null;
    let mut path = format!("/v1/presence?{query}limit={limit}");
    for _ in 0..100 {
        let (status, page) = app.get(&path, ADMIN).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {page}");
        let got = page["devices"].as_array().expect("a devices array").clone();
        assert!(got.len() <= limit, "GET {path}: more than {limit}: {page}");
        if first.is_null() {
            first = page.clone();
        }
        devices.extend(got.iter().cloned());
        match page["next"].as_str() {
            Some(cursor) => {
                assert!(!got.is_empty(), "GET {path}: a cursor after an empty page");
                path = format!("/v1/presence?{query}limit={limit}&after={cursor}");
            }
            None => return (devices, first),
        }
    }
    panic!("presence paging never ends on port {}", app.port);
}

/// Whether `device` is online according to `/v1/presence/users/{user}` of one node.
async fn user_shows_online(app: &TestApp, device: &Device) -> bool {
    let (status, body) = app
        .get(&format!("/v1/presence/users/{}", device.user_id), ADMIN)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["device_id"] == device.id.as_str() && d["online"] == true)
}

/// `/v1/presence/users/U`: `online`, and per device `(online, connected_at)`.
type UserPresence = (Value, BTreeMap<String, (Value, Value)>);

/// Everything one node says about presence: what must be the same from every node.
#[derive(Debug, PartialEq)]
struct View {
    online_devices: Value,
    online_users: Value,
    /// `/v1/presence` pages of 3, concatenated.
    listed: Vec<Value>,
    /// Per user: `/v1/presence?user_id=U` pages of 1, device ids in order.
    listed_by_user: BTreeMap<String, Vec<String>>,
    /// Per user: `/v1/presence/users/U` as (online, device → (online, connected_at)).
    users: BTreeMap<String, UserPresence>,
    /// Per user: `/v1/devices?user_id=U` as device → online.
    devices: BTreeMap<String, BTreeMap<String, Value>>,
}

impl View {
    async fn of(app: &TestApp, users: &[&str]) -> View {
        let (listed, first) = presence_pages(app, "", 3).await;
        let mut view = View {
            online_devices: first["online_devices"].clone(),
            online_users: first["online_users"].clone(),
            listed,
            listed_by_user: BTreeMap::new(),
            users: BTreeMap::new(),
            devices: BTreeMap::new(),
        };
        for user in users {
            let (pages, _) = presence_pages(app, &format!("user_id={user}&"), 1).await;
            view.listed_by_user.insert(
                user.to_string(),
                pages
                    .iter()
                    .map(|d| d["device_id"].as_str().unwrap().to_owned())
                    .collect(),
            );
            let (status, body) = app.get(&format!("/v1/presence/users/{user}"), ADMIN).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let per_device = body["devices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    (
                        d["device_id"].as_str().unwrap().to_owned(),
                        (d["online"].clone(), d["connected_at"].clone()),
                    )
                })
                .collect();
            view.users
                .insert(user.to_string(), (body["online"].clone(), per_device));
            let (status, body) = app.get(&format!("/v1/devices?user_id={user}"), ADMIN).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let flags = body["devices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    (
                        d["device_id"].as_str().unwrap().to_owned(),
                        d["online"].clone(),
                    )
                })
                .collect();
            view.devices.insert(user.to_string(), flags);
        }
        view
    }

    /// The online device ids, as every part of the view must agree.
    fn check_online(&self, want: &BTreeSet<String>) -> Result<(), String> {
        let listed: BTreeSet<String> = self
            .listed
            .iter()
            .map(|d| d["device_id"].as_str().unwrap().to_owned())
            .collect();
        if listed.len() != self.listed.len() {
            return Err(format!("a device listed twice: {:?}", self.listed));
        }
        if &listed != want {
            return Err(format!("/v1/presence lists {listed:?}, want {want:?}"));
        }
        if self.online_devices != json!(want.len()) {
            return Err(format!(
                "online_devices {} for {} online",
                self.online_devices,
                want.len()
            ));
        }
        let by_user: BTreeSet<String> = self.listed_by_user.values().flatten().cloned().collect();
        if &by_user != want {
            return Err(format!(
                "/v1/presence?user_id= lists {by_user:?}, want {want:?}"
            ));
        }
        let mut online_users = 0;
        for (user, (online, per_device)) in &self.users {
            let any = per_device.iter().any(|(d, _)| want.contains(d));
            if *online != json!(any) {
                return Err(format!("/v1/presence/users/{user}: online {online}"));
            }
            online_users += usize::from(any);
            for (d, (flag, _)) in per_device {
                if *flag != json!(want.contains(d)) {
                    return Err(format!("/v1/presence/users/{user}: {d} online {flag}"));
                }
            }
        }
        if self.online_users != json!(online_users) {
            return Err(format!(
                "online_users {} for {online_users} users online",
                self.online_users
            ));
        }
        for (user, flags) in &self.devices {
            for (d, flag) in flags {
                if *flag != json!(want.contains(d)) {
                    return Err(format!("/v1/devices?user_id={user}: {d} online {flag}"));
                }
            }
        }
        Ok(())
    }
}

/// Waits until the three nodes give the same view, and it shows exactly `want` online; returns
/// how long that took.
async fn same_view_everywhere(
    c: &Cluster,
    users: &[&str],
    want: &BTreeSet<String>,
    what: &str,
) -> Duration {
    let start = Instant::now();
    loop {
        let mut views = Vec::new();
        for app in &c.apps {
            views.push(View::of(app, users).await);
        }
        let problem = views
            .iter()
            .enumerate()
            .find_map(|(i, v)| v.check_online(want).err().map(|e| (i, e)))
            .map(|(i, e)| format!("node {}: {e}", NAMES[i]))
            .or_else(|| {
                (1..3)
                    .find(|&i| views[i] != views[0])
                    .map(|i| format!("node {} and node A differ", NAMES[i]))
            });
        match problem {
            None => return start.elapsed(),
            Some(problem) => assert!(
                start.elapsed() < PATIENCE,
                "{what}: {problem}\nA: {:#?}\nB: {:#?}\nC: {:#?}",
                views[0],
                views[1],
                views[2]
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// a. Delivery across nodes

/// One device on each node: each node's posts reach each device live (`delivered_now` 1 — the
/// device is online in the cluster), a user with a device on every node gets each post on all
/// of them; 201 posts made one after another, round-robin over the nodes, reach one device in
/// the order of their `202`s, then 3 × 50 concurrent posts from the three nodes reach another
/// device in creation order (the order its next session replays them in). Prints the delivery
/// latency, cross-node and local.
#[actix_web::test]
async fn posts_from_every_node_reach_devices_on_every_node_in_order() {
    let c = Cluster::start().await;
    let key = c.apps[0].service_key().await;
    let mut solo = Vec::new();
    let mut solo_live = Vec::new();
    for (n, name) in NAMES.iter().enumerate() {
        // Created on another node than the one it connects to.
        let d = c.apps[(n + 1) % 3]
            .device(&key, &format!("solo-{name}"))
            .await;
        solo_live.push(Live::connect(&c, n, &d, false).await);
        solo.push(d);
    }
    let mut spread = Vec::new();
    let mut spread_live = Vec::new();
    for n in 0..3 {
        let d = c.apps[n].device(&key, "spread").await;
        spread_live.push(Live::connect(&c, n, &d, false).await);
        spread.push(d);
    }
    // The user's fourth device never connects.
    c.apps[1].device(&key, "spread").await;
    let everyone: BTreeSet<String> = solo.iter().chain(&spread).map(|d| d.id.clone()).collect();
    let lag = async {
        let start = Instant::now();
        for app in &c.apps {
            eventually("every device online in every node's presence", || async {
                online_on(app).await == everyone
            })
            .await;
        }
        start.elapsed()
    }
    .await;
    println!(
        "cluster a: presence of 6 new sessions visible on all nodes after {:.1} ms",
        ms(lag)
    );

    // Each node to each device.
    for (to, device) in solo.iter().enumerate() {
        for (from, app) in c.apps.iter().enumerate() {
            let body = post(
                app,
                &key,
                &device.id,
                json!({"from": NAMES[from], "to": NAMES[to]}),
            )
            .await;
            assert_eq!(body["devices"], 1, "{body}");
            assert_eq!(
                body["delivered_now"], 1,
                "a post on node {} to a device online on node {}: delivered_now counts the \
                 devices it was pushed to, wherever they are connected: {body}",
                NAMES[from], NAMES[to]
            );
            let id = body["id"].as_str().unwrap();
            solo_live[to]
                .arrival_of(id, &format!("node {} → node {}", NAMES[from], NAMES[to]))
                .await;
        }
    }
    // A user target with a device on every node (and one offline).
    for (from, app) in c.apps.iter().enumerate() {
        let (status, body) = app
            .notify(
                &key,
                json!({"user_ids": ["spread"], "payload": {"from": NAMES[from]}}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["devices"], 4, "{body}");
        assert_eq!(
            body["delivered_now"], 3,
            "posted on node {}: three of the four devices are online (one per node): {body}",
            NAMES[from]
        );
        let id = body["id"].as_str().unwrap();
        for live in &spread_live {
            live.arrival_of(id, "a user post").await;
        }
    }
    for (n, live) in solo_live.iter().enumerate() {
        let frames = live.wait_count(3, "each node's post").await;
        assert_eq!(
            frames.len(),
            3,
            "the device on node {} got only its own three posts: {frames:?}",
            NAMES[n]
        );
        assert!(frames.iter().all(|f| f["payload"]["to"] == NAMES[n]));
    }
    for live in &spread_live {
        assert_eq!(live.wait_count(3, "user posts").await.len(), 3);
    }

    // 201 posts one after another, round-robin over the nodes, to the device on C: they arrive in
    // the order of their 202s, each once. The latency is from sending the post to the frame.
    const SEQUENTIAL: usize = 201;
    let target = &solo[2];
    let before = solo_live[2].frames().len();
    let mut sent = Vec::new();
    for i in 0..SEQUENTIAL {
        let from = i % 3;
        let at = Instant::now();
        let body = post(
            &c.apps[from],
            &key,
            &target.id,
            json!({"seq": i, "from": NAMES[from]}),
        )
        .await;
        assert_eq!(body["delivered_now"], 1, "{body}");
        sent.push((body["id"].as_str().unwrap().to_owned(), from, at));
    }
    let frames = solo_live[2]
        .wait_count(before + SEQUENTIAL, "sequential posts")
        .await;
    let got: Vec<&str> = frames[before..]
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = sent.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(
        got, want,
        "posts made one after another on nodes A, B, C, A, … arrive in the order of their 202s"
    );
    assert_created_in_order(&frames[before..], "sequential posts");
    let arrivals: HashMap<String, Instant> = solo_live[2]
        .seen
        .borrow()
        .frames
        .iter()
        .map(|(at, v)| (v["id"].as_str().unwrap().to_owned(), *at))
        .collect();
    let (mut cross, mut local) = (Vec::new(), Vec::new());
    for (id, from, at) in &sent {
        let latency = arrivals[id].saturating_duration_since(*at);
        if *from == 2 {
            local.push(latency);
        } else {
            cross.push(latency);
        }
    }
    println!(
        "cluster a: post → frame on node C, cross-node (posted on A or B): {}",
        summary(cross)
    );
    println!(
        "cluster a: post → frame on node C, local (posted on C):          {}",
        summary(local)
    );

    // 3 posters at once, one per node, 50 posts each, to the device on B.
    const CONCURRENT: usize = 50;
    let target = &solo[1];
    let before = solo_live[1].frames().len();
    let started = Instant::now();
    let streams = futures_util::future::join_all((0..3).map(|from| {
        let (app, key, target) = (&c.apps[from], &key, target);
        async move {
            let mut ids = Vec::new();
            for i in 0..CONCURRENT {
                let body = post(app, key, &target.id, json!({"poster": from, "i": i})).await;
                ids.push(body["id"].as_str().unwrap().to_owned());
            }
            ids
        }
    }))
    .await;
    println!(
        "cluster a: {} concurrent posts from 3 nodes in {:.0} ms",
        3 * CONCURRENT,
        ms(started.elapsed())
    );
    let frames = solo_live[1]
        .wait_count(before + 3 * CONCURRENT, "concurrent posts")
        .await;
    let live_order: Vec<String> = frames
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_owned())
        .collect();
    let unique: BTreeSet<&String> = live_order.iter().collect();
    assert_eq!(
        unique.len(),
        live_order.len(),
        "a notification came twice in one session"
    );
    let all: BTreeSet<&String> = streams.iter().flatten().collect();
    assert!(
        all.iter().all(|id| unique.contains(id)),
        "every concurrent post arrived"
    );
    for (from, ids) in streams.iter().enumerate() {
        let positions: Vec<usize> = ids
            .iter()
            .map(|id| live_order.iter().position(|x| x == id).unwrap())
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "the posts of node {} (one after another) arrive in their order",
            NAMES[from]
        );
    }
    assert_created_in_order(&frames, "concurrent posts");
    // The order the server stored them in: a new session (on another node; the old one is
    // replaced) replays every unacked notification in creation order. The live order was that.
    let replay = Live::connect(&c, 2, target, false).await;
    replay.wait_count(live_order.len(), "replay").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        replay.ids(),
        live_order,
        "the live order on node B is the creation order (the replay's)"
    );
    assert_eq!(solo_live[1].closed("replaced").await, Some(4002));
}

// ---------------------------------------------------------------------------------------------
// b. A device moving between nodes

/// A device keeps moving A → B → C → A … (9 sessions, each ending by a close frame, a TCP reset
/// or a newer session on the next node) while posts to it keep coming, one after another,
/// through all three nodes. It acks everything it gets. Each session gets its notifications in
/// creation order with no gaps (all it did not get came to an earlier session), and in the end
/// the device has every post, once after dedupe by id.
#[actix_web::test]
async fn device_moving_between_nodes_gets_everything_once_in_order() {
    const ROUNDS: usize = 9;
    const DWELL: Duration = Duration::from_millis(400);
    let c = Cluster::start().await;
    let key = c.apps[0].service_key().await;
    let nomad = c.apps[1].device(&key, "nomad").await;

    let stop = Cell::new(false);
    // Index = `seq` in the payload = creation order (one post at a time).
    let accepted: RefCell<Vec<String>> = RefCell::new(Vec::new());
    let sessions: RefCell<Vec<Live>> = RefCell::new(Vec::new());
    let mut replaced = 0;

    let poster = async {
        let mut seq = 0usize;
        while !stop.get() {
            let body = post(
                &c.apps[seq % 3],
                &key,
                &nomad.id,
                json!({"seq": seq, "via": NAMES[seq % 3]}),
            )
            .await;
            accepted
                .borrow_mut()
                .push(body["id"].as_str().unwrap().to_owned());
            seq += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let mover = async {
        // Until a session ends its own way, the next one replaces it (4002).
        let mut overlapping = false;
        for round in 0..=ROUNDS {
            let node = round % 3;
            let live = Live::connect(&c, node, &nomad, true).await;
            if overlapping {
                let old = sessions.borrow().last().unwrap().seen.clone();
                let start = Instant::now();
                let code = loop {
                    if let Some(code) = old.borrow().close {
                        break code;
                    }
                    assert!(
                        start.elapsed() < PATIENCE,
                        "round {round}: the session on node {} was never replaced",
                        NAMES[(node + 2) % 3]
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                assert_eq!(
                    code,
                    Some(4002),
                    "round {round}: the session on node {} is replaced by the one on node {}",
                    NAMES[(node + 2) % 3],
                    NAMES[node]
                );
                replaced += 1;
            }
            sessions.borrow_mut().push(live);
            if round == ROUNDS {
                break; // the last session drains
            }
            tokio::time::sleep(DWELL).await;
            overlapping = false;
            let mut live = sessions.borrow_mut().pop().unwrap();
            match (round + round / 3) % 3 {
                0 => live.end(End::Close).await,
                1 => live.end(End::Reset).await,
                _ => overlapping = true,
            }
            sessions.borrow_mut().push(live);
            if round == ROUNDS - 1 {
                stop.set(true);
            }
        }
    };
    futures_util::future::join(poster, mover).await;
    let sessions = sessions.into_inner();
    let accepted = accepted.into_inner();
    let n = accepted.len();
    assert!(n > 50, "the poster made only {n} posts");

    // The last session (on node A) gets whatever is left.
    let start = Instant::now();
    loop {
        let got: BTreeSet<usize> = sessions
            .iter()
            .flat_map(|s| s.frames())
            .map(|f| f["payload"]["seq"].as_u64().unwrap() as usize)
            .collect();
        if got.len() == n {
            break;
        }
        if start.elapsed() > PATIENCE {
            let missing: Vec<usize> = (0..n).filter(|s| !got.contains(s)).collect();
            panic!(
                "{} of {n} posts never reached the device (seq {:?}…)",
                missing.len(),
                &missing[..missing.len().min(20)]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut earlier: BTreeSet<usize> = BTreeSet::new();
    let mut frames_total = 0;
    for (i, s) in sessions.iter().enumerate() {
        let frames = s.frames();
        frames_total += frames.len();
        let what = format!("session {i} (node {})", NAMES[s.node]);
        let seqs: Vec<usize> = frames
            .iter()
            .map(|f| {
                let seq = f["payload"]["seq"].as_u64().expect("a payload with seq") as usize;
                assert!(seq < n, "{what}: a post the poster never made: {f}");
                assert_eq!(f["id"], accepted[seq].as_str(), "{what}: id of seq {seq}");
                seq
            })
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{what}: not in creation order or twice: {seqs:?}"
        );
        assert_created_in_order(&frames, &what);
        if let Some(&last) = seqs.last() {
            let mine: BTreeSet<usize> = seqs.iter().copied().collect();
            let gaps: Vec<usize> = (0..last)
                .filter(|k| !mine.contains(k) && !earlier.contains(k))
                .collect();
            assert!(
                gaps.is_empty(),
                "{what}: gap: it got seq {last} but never got {gaps:?}, nor did any earlier \
                 session (got {seqs:?})"
            );
        }
        earlier.extend(seqs);
    }
    assert_eq!(earlier.len(), n, "every post reached the device");
    let last = sessions.last().unwrap();
    assert_eq!(last.close_code(), None, "the last session is still up");
    println!(
        "cluster b: {n} posts over {} sessions ({replaced} replaced with 4002), {frames_total} \
         frames received, {} delivered again to a later session",
        sessions.len(),
        frames_total - n
    );
}

// ---------------------------------------------------------------------------------------------
// c. Presence from every node

/// Devices of four users connected to different nodes: `/v1/presence` (paged with `limit` and
/// `after`, and by user), `/v1/presence/users/{u}` and the `online` flags of `/v1/devices` say
/// the same on all three nodes; after two sessions end (a close frame on B, a TCP reset on C),
/// they are offline on all three.
#[actix_web::test]
async fn presence_is_the_same_from_every_node() {
    let c = Cluster::start().await;
    let key = c.apps[0].service_key().await;
    let users = ["pa", "pb", "pc", "pd"];
    let mut devices = Vec::new();
    let mut lives = Vec::new();
    for i in 0..8 {
        let d = c.apps[(i + 1) % 3].device(&key, users[i % 4]).await;
        lives.push(Live::connect(&c, i % 3, &d, false).await);
        devices.push(d);
    }
    let _never_online = c.apps[2].device(&key, "pd").await;
    let mut want: BTreeSet<String> = devices.iter().map(|d| d.id.clone()).collect();
    let lag = same_view_everywhere(&c, &users, &want, "8 sessions on 3 nodes").await;
    println!(
        "cluster c: 8 sessions on 3 nodes, the same presence on every node after {:.1} ms",
        ms(lag)
    );

    // User pb's two devices: i = 1 on node B (close frame) and i = 5 on node C (TCP reset).
    assert_eq!((lives[1].node, lives[5].node), (1, 2));
    assert_eq!(
        (devices[1].user_id.as_str(), devices[5].user_id.as_str()),
        ("pb", "pb")
    );
    lives[1].end(End::Close).await;
    lives[5].end(End::Reset).await;
    want.remove(&devices[1].id);
    want.remove(&devices[5].id);
    let lag = same_view_everywhere(&c, &users, &want, "2 sessions ended").await;
    println!(
        "cluster c: after a close on B and a reset on C, offline on every node after {:.1} ms",
        ms(lag)
    );
    for (i, live) in lives.iter().enumerate() {
        if i != 1 && i != 5 {
            assert_eq!(live.close_code(), None, "session {i} is still up");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// d. SIGKILL

/// Node A is killed with SIGKILL while two devices have sessions on it: on B and C they go offline
/// within a lease plus a renewal period (plus a margin), while the devices on B and C stay
/// online and keep getting posts. What was posted to A's devices meanwhile (and one delivered but
/// not acked before the kill) comes when they reconnect to B and C.
#[actix_web::test]
async fn killed_node_devices_go_offline_and_reconnect_elsewhere_with_everything() {
    let mut c = Cluster::start().await;
    let key = c.apps[1].service_key().await;
    let a1 = c.apps[1].device(&key, "ka").await;
    let a2 = c.apps[2].device(&key, "kb").await;
    let b1 = c.apps[0].device(&key, "kc").await;
    let c1 = c.apps[0].device(&key, "kd").await;
    let on_a1 = Live::connect(&c, 0, &a1, false).await;
    let on_a2 = Live::connect(&c, 0, &a2, false).await;
    let on_b1 = Live::connect(&c, 1, &b1, false).await;
    let on_c1 = Live::connect(&c, 2, &c1, false).await;
    let all: BTreeSet<String> = [&a1, &a2, &b1, &c1].iter().map(|d| d.id.clone()).collect();
    for app in &c.apps[1..] {
        eventually("all four online on B and C", || async {
            online_on(app).await == all
        })
        .await;
    }
    // Delivered before the kill, never acked: it comes again.
    let unacked = post(&c.apps[1], &key, &a1.id, json!("before the kill")).await;
    on_a1
        .arrival_of(unacked["id"].as_str().unwrap(), "before the kill")
        .await;

    c.nodes[0].signal("-KILL");
    let killed = Instant::now();
    c.nodes[0].exited(Duration::from_secs(10)).await;
    assert_eq!(on_a1.closed("node A killed").await, None);
    assert_eq!(on_a2.closed("node A killed").await, None);

    // Posted while A's devices are cut off, through B and C.
    let mut want_a1 = vec![unacked["id"].as_str().unwrap().to_owned()];
    let mut want_a2 = Vec::new();
    for i in 0..6 {
        let app = &c.apps[1 + i % 2];
        want_a1.push(
            post(app, &key, &a1.id, json!({"cut_off": i})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        want_a2.push(
            post(app, &key, &a2.id, json!({"cut_off": i})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }

    let limit = Duration::from_millis(LEASE_MS + LEASE_MS / 3 + KILL_MARGIN_MS);
    let survivors: BTreeSet<String> = [&b1, &c1].iter().map(|d| d.id.clone()).collect();
    let mut offline_at: [Option<Duration>; 3] = [None; 3];
    loop {
        for n in 1..3 {
            let online = online_on(&c.apps[n]).await;
            assert!(
                survivors.is_subset(&online),
                "node {}: a device of a live node went offline after A's kill: {online:?}",
                NAMES[n]
            );
            if offline_at[n].is_none() && online == survivors {
                offline_at[n] = Some(killed.elapsed());
            }
        }
        if offline_at[1].is_some() && offline_at[2].is_some() {
            break;
        }
        assert!(
            killed.elapsed() < limit,
            "A's devices still online {:.0} ms after its kill (lease {LEASE_MS} ms + renewal {} \
             ms + margin {KILL_MARGIN_MS} ms): on B at {:?}, on C at {:?}",
            ms(killed.elapsed()),
            LEASE_MS / 3,
            offline_at[1],
            offline_at[2]
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!(
        "cluster d: devices of the SIGKILLed node offline on B after {:.0} ms, on C after {:.0} ms \
         (lease {LEASE_MS} ms, limit {:.0} ms)",
        ms(offline_at[1].unwrap()),
        ms(offline_at[2].unwrap()),
        ms(limit)
    );
    for app in &c.apps[1..] {
        assert!(!user_shows_online(app, &a1).await);
        assert!(!user_shows_online(app, &a2).await);
        assert!(user_shows_online(app, &b1).await);
        assert!(user_shows_online(app, &c1).await);
        let (_, list) = app.get("/v1/devices?user_id=ka", ADMIN).await;
        assert_eq!(list["devices"][0]["online"], false, "{list}");
    }

    // Offline now: a post to a1 is pushed nowhere.
    let later = post(&c.apps[2], &key, &a1.id, json!("after the lease")).await;
    assert_eq!(later["delivered_now"], 0, "a1 is offline: {later}");
    want_a1.push(later["id"].as_str().unwrap().to_owned());
    // The survivors' sessions still work, across nodes.
    let to_b1 = post(&c.apps[2], &key, &b1.id, json!("to b1")).await;
    assert_eq!(to_b1["delivered_now"], 1, "{to_b1}");
    on_b1
        .arrival_of(to_b1["id"].as_str().unwrap(), "C → B after the kill")
        .await;
    let to_c1 = post(&c.apps[1], &key, &c1.id, json!("to c1")).await;
    assert_eq!(to_c1["delivered_now"], 1, "{to_c1}");
    on_c1
        .arrival_of(to_c1["id"].as_str().unwrap(), "B → C after the kill")
        .await;

    // A's devices come back on B and C and get everything, in order.
    let back_a1 = Live::connect(&c, 1, &a1, false).await;
    let back_a2 = Live::connect(&c, 2, &a2, false).await;
    let got_a1 = back_a1.wait_count(want_a1.len(), "a1 back on B").await;
    let got_a2 = back_a2.wait_count(want_a2.len(), "a2 back on C").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        back_a1.ids(),
        want_a1,
        "a1 on B: the unacked one, then the rest"
    );
    assert_eq!(back_a2.ids(), want_a2, "a2 on C");
    assert_created_in_order(&got_a1, "a1");
    assert_created_in_order(&got_a2, "a2");
    for app in &c.apps[1..] {
        eventually("a1 and a2 online again on B and C", || async {
            online_on(app).await == all
        })
        .await;
    }
    assert_eq!(on_b1.close_code(), None);
    assert_eq!(on_c1.close_code(), None);
}

// ---------------------------------------------------------------------------------------------
// e. One session per device across nodes

/// A device connected to A connects to B: A's session is closed with 4002 and the device is online
/// once, everywhere, and stays so (A's cleanup does not take it offline); posts go to B's
/// session. Then again from B to C.
#[actix_web::test]
async fn a_newer_session_on_another_node_replaces_the_old_with_4002() {
    let c = Cluster::start().await;
    let key = c.apps[0].service_key().await;
    let d = c.apps[0].device(&key, "mover").await;
    let only_d: BTreeSet<String> = [d.id.clone()].into_iter().collect();

    let on_a = Live::connect(&c, 0, &d, false).await;
    let mut current = on_a;
    for next in [1, 2] {
        let start = Instant::now();
        let newer = Live::connect(&c, next, &d, false).await;
        let code = current
            .closed(&format!("replaced from node {}", NAMES[next]))
            .await;
        assert_eq!(
            code,
            Some(4002),
            "the session on node {} is replaced by the one on node {}",
            NAMES[current.node],
            NAMES[next]
        );
        println!(
            "cluster e: connect on node {} → 4002 on node {} after {:.1} ms",
            NAMES[next],
            NAMES[current.node],
            ms(start.elapsed())
        );
        let users = ["mover"];
        same_view_everywhere(&c, &users, &only_d, "online once after the move").await;
        // And it stays so: the old node's cleanup, a lease later, changes nothing.
        tokio::time::sleep(Duration::from_millis(LEASE_MS + 500)).await;
        same_view_everywhere(&c, &users, &only_d, "still online a lease later").await;
        for app in &c.apps {
            let (devices, first) = presence_pages(app, "", 100).await;
            assert_eq!(devices.len(), 1, "online once: {devices:?}");
            assert_eq!(first["online_devices"], 1);
        }
        // A post from the third node reaches the new session only.
        let from = 3 - next - current.node;
        let body = post(&c.apps[from], &key, &d.id, json!({"after": next})).await;
        assert_eq!(body["delivered_now"], 1, "{body}");
        let id = body["id"].as_str().unwrap();
        newer.arrival_of(id, "a post after the move").await;
        assert!(!current.ids().iter().any(|x| x == id));
        assert_eq!(newer.close_code(), None);
        current = newer;
    }
    current.end(End::Close).await;
    same_view_everywhere(&c, &["mover"], &BTreeSet::new(), "closed").await;
}

// ---------------------------------------------------------------------------------------------
// f. Revocation across nodes

/// How long another node may go on accepting a credential revoked on B: until the revocation's
/// signal reaches it (milliseconds; the bound is generous for a loaded CI machine).
const REVOKE_BOUND: Duration = Duration::from_secs(1);

/// A device with a session on A is revoked on B: A closes the session with 4001 and the token is
/// refused on B at once and on every other node as soon as the revocation's signal arrives
/// (measured and printed). A service key used on A and C (so that their credential caches are
/// warm) and revoked on B likewise.
#[actix_web::test]
async fn revocation_on_one_node_holds_on_every_node_at_once() {
    let c = Cluster::start().await;
    let key = c.apps[0].service_key().await;
    let d = c.apps[0].device(&key, "revoked").await;
    // Every node has seen the token: C and B once, then A holds the session.
    for n in [2, 1] {
        c.apps[n].connect(&d).await.close().await;
    }
    let on_a = Live::connect(&c, 0, &d, false).await;
    let status = c.apps[1]
        .delete(&format!("/v1/devices/{}", d.id), &key)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let revoked = Instant::now();
    assert_eq!(
        on_a.closed("revoked on B").await,
        Some(4001),
        "the session on A is closed as revoked"
    );
    println!(
        "cluster f: device revoked on B → its session on A closed with 4001 after {:.1} ms",
        ms(revoked.elapsed())
    );
    // The revoking node refuses at once; the others once the revocation's signal reaches them.
    // (Probed after the 4001: a connection A accepted before the signal would replace the
    // session on A with 4002.)
    for n in [1, 0, 2] {
        let started = Instant::now();
        loop {
            match c.apps[n].connect_raw(&d.token).await {
                Err(code) => {
                    assert_eq!(code, 401, "node {}", NAMES[n]);
                    break;
                }
                Ok(_) => assert!(
                    n != 1 && started.elapsed() < REVOKE_BOUND,
                    "node {} still accepts the token of a device revoked on B after {:?}",
                    NAMES[n],
                    started.elapsed()
                ),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    println!(
        "cluster f: the revoked device token refused on every node {:.1} ms after the 204",
        ms(revoked.elapsed())
    );
    for app in &c.apps {
        eventually("the revoked device offline on every node", || async {
            !online_on(app).await.contains(&d.id)
        })
        .await;
    }

    // A service key.
    let (status, created) = c.apps[0]
        .post("/v1/service-keys", ADMIN, json!({"name": "doomed"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let doomed = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    for n in [0, 2] {
        for _ in 0..2 {
            let (status, body) = c.apps[n].get("/v1/devices?user_id=x", doomed).await;
            assert_eq!(status, StatusCode::OK, "node {}: {body}", NAMES[n]);
        }
    }
    let status = c.apps[1]
        .delete(&format!("/v1/service-keys/{id}"), ADMIN)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let revoked = Instant::now();
    for n in [1, 0, 2] {
        let started = Instant::now();
        loop {
            let (status, body) = c.apps[n].get("/v1/devices?user_id=x", doomed).await;
            if status == StatusCode::UNAUTHORIZED {
                break;
            }
            assert!(
                n != 1 && started.elapsed() < REVOKE_BOUND,
                "node {}: a service key revoked on B is still accepted after {:?}: {status} {body}",
                NAMES[n],
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (status, body) = c.apps[n]
            .notify(doomed, json!({"device_ids": [d.id], "payload": 1}))
            .await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "node {}: {body}",
            NAMES[n]
        );
    }
    println!(
        "cluster f: the revoked service key refused on every node {:.1} ms after the 204",
        ms(revoked.elapsed())
    );
}
