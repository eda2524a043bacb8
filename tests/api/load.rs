//! Many devices, many posts, at once: every device gets exactly its own notifications, in one
//! global creation order, and the pool never waits (DESIGN.md invariants 1–3).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use awc::http::StatusCode;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    two_hundred_devices_get_exactly_their_own_in_order,
    pool_of_two_serves_five_hundred_sessions
);

/// A small deterministic generator, so a failing run can be replayed.
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// What each device has received, per session, in arrival order.
pub type Inbox = Rc<RefCell<HashMap<String, Vec<Vec<String>>>>>;

/// Reads a session until it ends, acking everything, recording ids under the device.
pub fn spawn_reader(
    inbox: Inbox,
    device_id: String,
    ws: WsClient,
) -> actix_web::rt::task::JoinHandle<()> {
    spawn_reader_until(inbox, device_id, ws, std::future::pending())
}

/// Like `spawn_reader`, but resets the TCP connection (no close frame) when `reset` completes.
pub fn spawn_reader_until(
    inbox: Inbox,
    device_id: String,
    mut ws: WsClient,
    reset: impl std::future::Future<Output = ()> + 'static,
) -> actix_web::rt::task::JoinHandle<()> {
    // This session's own slot: an older session of the device may still be reading when this
    // one starts, and must not write into it.
    let slot = {
        let mut inbox = inbox.borrow_mut();
        let sessions = inbox.entry(device_id.clone()).or_default();
        sessions.push(Vec::new());
        sessions.len() - 1
    };
    actix_web::rt::spawn(async move {
        let mut reset = std::pin::pin!(reset);
        loop {
            let event = tokio::select! {
                e = ws.next_event_within(Duration::from_secs(300)) => e,
                _ = &mut reset => return ws.reset(),
            };
            let Some(event) = event else { break };
            match event {
                Event::Json(v) if v["type"] == "notification" => {
                    let id = v["id"].as_str().unwrap().to_owned();
                    ws.ack(&[&id]).await;
                    inbox.borrow_mut().get_mut(&device_id).unwrap()[slot].push(id);
                }
                Event::Json(_) => {}
                Event::Close(_) => break,
            }
        }
    })
}

/// Creates `users × per_user` devices.
pub async fn make_devices(app: &TestApp, key: &str, users: usize, per_user: usize) -> Vec<Device> {
    let names: Vec<String> = (0..users)
        .flat_map(|u| vec![format!("user-{u}"); per_user])
        .collect();
    let mut devices = Vec::new();
    for chunk in names.chunks(50) {
        devices
            .extend(futures_util::future::join_all(chunk.iter().map(|u| app.device(key, u))).await);
    }
    devices
}

/// Posts `count` notifications from `concurrency` tasks, each to a random user or two random
/// devices; returns each accepted notification's id and target devices, and the status counts.
pub async fn post_many(
    app: &TestApp,
    key: &str,
    devices: &[Device],
    count: usize,
    concurrency: usize,
    seed: u64,
) -> (Vec<(String, Vec<String>)>, HashMap<u16, usize>) {
    let (accepted, statuses, _) =
        post_many_timed(app, key, devices, count, concurrency, seed).await;
    (accepted, statuses)
}

/// `post_many`, also returning how long each post took to be answered, sorted.
pub async fn post_many_timed(
    app: &TestApp,
    key: &str,
    devices: &[Device],
    count: usize,
    concurrency: usize,
    seed: u64,
) -> (
    Vec<(String, Vec<String>)>,
    HashMap<u16, usize>,
    Vec<Duration>,
) {
    let mut by_user: HashMap<String, Vec<String>> = HashMap::new();
    for d in devices {
        by_user
            .entry(d.user_id.clone())
            .or_default()
            .push(d.id.clone());
    }
    let users: Vec<String> = by_user.keys().cloned().collect();
    let accepted = Rc::new(RefCell::new(Vec::new()));
    let statuses = Rc::new(RefCell::new(HashMap::new()));
    let latencies = Rc::new(RefCell::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let per_task = count / concurrency + usize::from(t < count % concurrency);
        let (accepted, statuses, latencies) =
            (accepted.clone(), statuses.clone(), latencies.clone());
        let (base, key) = (app.base.clone(), key.to_owned());
        let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
        let (users, by_user) = (users.clone(), by_user.clone());
        tasks.push(actix_web::rt::spawn(async move {
            let http = http_client();
            let mut rng = Lcg(seed + t as u64);
            for i in 0..per_task {
                let (body, targets) = if rng.next(2) == 0 {
                    let u = &users[rng.next(users.len())];
                    (
                        json!({"user_ids": [u], "payload": {"task": t, "i": i}}),
                        by_user[u].clone(),
                    )
                } else {
                    let mut two = vec![
                        ids[rng.next(ids.len())].clone(),
                        ids[rng.next(ids.len())].clone(),
                    ];
                    two.sort();
                    two.dedup();
                    (
                        json!({"device_ids": two, "payload": {"task": t, "i": i}}),
                        two,
                    )
                };
                let sent = Instant::now();
                let mut res = http
                    .post(format!("{base}/v1/notifications"))
                    .insert_header(("Authorization", format!("Bearer {key}")))
                    .send_json(&body)
                    .await
                    .expect("an answer");
                latencies.borrow_mut().push(sent.elapsed());
                *statuses
                    .borrow_mut()
                    .entry(res.status().as_u16())
                    .or_insert(0) += 1;
                if res.status() == StatusCode::ACCEPTED {
                    let v: Value = res.json().await.unwrap();
                    assert_eq!(v["devices"], targets.len(), "{v}");
                    accepted
                        .borrow_mut()
                        .push((v["id"].as_str().unwrap().to_owned(), targets));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let accepted = accepted.borrow().clone();
    let statuses = statuses.borrow().clone();
    let mut latencies = latencies.borrow().clone();
    latencies.sort();
    (accepted, statuses, latencies)
}

/// Checks that every device received exactly its notifications (duplicates only across
/// sessions), and that any two notifications appear in the same relative order everywhere.
pub fn check_inboxes(inbox: &Inbox, accepted: &[(String, Vec<String>)], devices: &[Device]) {
    let mut expected: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (id, targets) in accepted {
        for t in targets {
            expected.entry(t.as_str()).or_default().insert(id.as_str());
        }
    }
    let inbox = inbox.borrow();
    // Every session's arrival order must fit one global creation order: the precedence edges
    // between consecutive arrivals, over all sessions, must have no cycle.
    let mut edges: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut order_pairs = 0usize;
    for d in devices {
        let sessions = &inbox[&d.id];
        let mut got: HashSet<&str> = HashSet::new();
        for session in sessions {
            let mut in_session = HashSet::new();
            for id in session {
                assert!(
                    in_session.insert(id.as_str()),
                    "device {} got {id} twice in one session",
                    d.id
                );
                got.insert(id.as_str());
            }
            for pair in session.windows(2) {
                edges
                    .entry(pair[0].as_str())
                    .or_default()
                    .insert(pair[1].as_str());
                order_pairs += 1;
            }
        }
        let want = expected.remove(d.id.as_str()).unwrap_or_default();
        let missing: Vec<_> = want.difference(&got).collect();
        let extra: Vec<_> = got.difference(&want).collect();
        assert!(
            missing.is_empty(),
            "device {} is missing {} notifications",
            d.id,
            missing.len()
        );
        assert!(
            extra.is_empty(),
            "device {} got {} notifications not meant for it",
            d.id,
            extra.len()
        );
    }
    let mut indegree: HashMap<&str, usize> = HashMap::new();
    for (from, tos) in &edges {
        indegree.entry(from).or_default();
        for to in tos {
            *indegree.entry(to).or_default() += 1;
        }
    }
    let mut ready: Vec<&str> = indegree
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(id, _)| *id)
        .collect();
    let mut sorted = 0;
    while let Some(id) = ready.pop() {
        sorted += 1;
        for to in edges.get(id).into_iter().flatten() {
            let n = indegree.get_mut(to).unwrap();
            *n -= 1;
            if *n == 0 {
                ready.push(to);
            }
        }
    }
    assert_eq!(
        sorted,
        indegree.len(),
        "sessions disagree on the order of notifications"
    );
    assert!(order_pairs > 0, "the order check compared nothing");
}

/// Waits until every device has received what was posted to it.
pub async fn wait_for_inboxes(inbox: &Inbox, accepted: &[(String, Vec<String>)]) {
    let mut want: HashMap<String, usize> = HashMap::new();
    for (_, targets) in accepted {
        for t in targets {
            *want.entry(t.clone()).or_default() += 1;
        }
    }
    let start = Instant::now();
    loop {
        let done = {
            let inbox = inbox.borrow();
            want.iter().all(|(d, n)| {
                let got: HashSet<&String> = inbox.get(d).into_iter().flatten().flatten().collect();
                got.len() >= *n
            })
        };
        if done {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "deliveries did not complete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn two_hundred_devices_get_exactly_their_own_in_order(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let devices = make_devices(&app, &key, 50, 4).await;
    let inbox: Inbox = Rc::default();
    let mut readers = Vec::new();
    for d in &devices {
        readers.push(spawn_reader(
            inbox.clone(),
            d.id.clone(),
            app.connect(d).await,
        ));
    }
    assert_eq!(app.presence().await["online_devices"], 200);

    let (accepted, statuses) = post_many(&app, &key, &devices, 2000, 40, 7).await;
    assert_eq!(statuses.get(&202), Some(&2000), "statuses: {statuses:?}");
    wait_for_inboxes(&inbox, &accepted).await;
    check_inboxes(&inbox, &accepted, &devices);

    let stats = app.pool_settles().await;
    assert_eq!(stats["notifications"]["accepted"], 2000);
    assert_eq!(stats["db_pool"]["timeouts"], 0, "{stats}");
    assert_eq!(stats["db_pool"]["waits"], 0, "{stats}");
}

/// DESIGN.md invariants 1 and 2: two connections serve 500 sessions and a stream of posts
/// without a single pool wait or timeout.
async fn pool_of_two_serves_five_hundred_sessions(b: Backend) {
    let app = spawn_app_with(b, |a| a.db_pool_size = 2).await;
    let key = app.service_key().await;
    let devices = make_devices(&app, &key, 125, 4).await;
    let inbox: Inbox = Rc::default();
    let mut connects = Vec::new();
    for chunk in devices.chunks(50) {
        let mut pending = Vec::new();
        for d in chunk {
            pending.push(app.connect(d));
        }
        connects.extend(futures_util::future::join_all(pending).await);
    }
    for (d, ws) in devices.iter().zip(connects) {
        spawn_reader(inbox.clone(), d.id.clone(), ws);
    }
    assert_eq!(app.presence().await["online_devices"], 500);

    let (accepted, statuses) = post_many(&app, &key, &devices, 1000, 50, 11).await;
    assert_eq!(statuses.get(&202), Some(&1000), "statuses: {statuses:?}");
    wait_for_inboxes(&inbox, &accepted).await;
    check_inboxes(&inbox, &accepted, &devices);
    let stats = app.pool_settles().await;
    assert_eq!(stats["db_pool"]["size"], 2, "{stats}");
    assert_eq!(stats["db_pool"]["timeouts"], 0, "{stats}");
    assert_eq!(stats["db_pool"]["waits"], 0, "{stats}");
    assert!(
        stats["db_pool"]["max_in_use"].as_u64().unwrap() <= 2,
        "{stats}"
    );
}

both_backends!(ten_thousand_acks_are_not_ten_thousand_commits);

/// DESIGN.md invariant 5: acks (and delivery marks) are written in batches, so a burst of
/// 10,000 acks — one frame each — takes far fewer than 10,000 transactions.
async fn ten_thousand_acks_are_not_ten_thousand_commits(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let devices = make_devices(&app, &key, 1, 10).await;
    // 1,000 posts to the user while offline: 10,000 pending deliveries.
    for chunk in (0..1000).collect::<Vec<_>>().chunks(50) {
        let posts = chunk
            .iter()
            .map(|i| app.notify(&key, json!({"user_id": "user-0", "payload": i})));
        for (status, body) in futures_util::future::join_all(posts).await {
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        }
    }
    let before = app.stats().await["writes"]["transactions"]
        .as_u64()
        .unwrap();
    let inbox: Inbox = Rc::default();
    let sessions = futures_util::future::join_all(devices.iter().map(|d| app.connect(d))).await;
    for (d, ws) in devices.iter().zip(sessions) {
        spawn_reader(inbox.clone(), d.id.clone(), ws);
    }
    eventually("10,000 acks are stored", || async {
        app.stats().await["notifications"]["acked"]
            .as_u64()
            .unwrap()
            >= 10_000
    })
    .await;
    let stats = app.stats().await;
    let transactions = stats["writes"]["transactions"].as_u64().unwrap() - before;
    eprintln!("10,000 acks and 10,000 delivery marks took {transactions} transactions");
    assert!(
        transactions < 1_000,
        "{transactions} transactions for 10,000 acks: {stats}"
    );
}

both_backends!(posts_in_quick_succession_share_a_commit_and_a_lone_post_waits_for_none);

/// `HERALD_MIN_COMMIT_INTERVAL_US`: posts arriving within the interval after a write
/// transaction started wait for it to pass and share one commit; a post arriving after a longer
/// quiet spell is committed at once. (An interval of a full second makes both visible.)
async fn posts_in_quick_succession_share_a_commit_and_a_lone_post_waits_for_none(b: Backend) {
    let app = spawn_app_with(b, |a| a.min_commit_interval_us = 1_000_000).await;
    let key = app.service_key().await;
    let devices = make_devices(&app, &key, 1, 1).await;
    let transactions = || async {
        app.stats().await["writes"]["transactions"]
            .as_u64()
            .unwrap()
    };
    // One batch first, so the interval counts from a real start; then quiet for longer than the
    // interval: the lone post is not held back.
    app.notify_device(&key, &devices[0], json!("first")).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let before = transactions().await;
    let t = Instant::now();
    let id = app.notify_device(&key, &devices[0], json!("lone")).await;
    let lone = t.elapsed();
    assert!(
        lone < Duration::from_millis(600),
        "a lone post took {lone:?}"
    );
    assert_eq!(transactions().await, before + 1);

    // Twenty posts right behind it wait out the rest of the interval and go in one commit.
    let t = Instant::now();
    let posts = (0..20).map(|i| app.notify(&key, json!({"user_id": "user-0", "payload": i})));
    for (status, body) in futures_util::future::join_all(posts).await {
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let burst = t.elapsed();
    assert!(
        burst >= Duration::from_millis(300),
        "the burst was not held for the interval: {burst:?} (lone post: {lone:?})"
    );
    assert_eq!(transactions().await, before + 2, "lone post {id}");
}
