//! Crash safety under `kill -9`: `herald serve` runs as a child process while several posters
//! send a stream of notifications (each with an `Idempotency-Key` and a sequence number in its
//! payload) and every device has a live session; the node is killed with SIGKILL at random
//! moments and restarted on the same database, several times. Afterwards:
//!
//! - every post answered `202` reaches every device it targets, and each device's replay has its
//!   notifications in creation order with no gaps and no duplicates (every live session of the
//!   storm saw a prefix of that order);
//! - nothing is half-written: each post that got no answer is sent again with the same key, and
//!   answers the first attempt's notification if that one committed (never a second one); every
//!   notification has a delivery for every device it targets, and every notification a device
//!   receives is one of the test's posts, delivered to all of that post's targets.
//!
//! The seed of a run is printed; `HERALD_CRASH_SEED=<seed>` replays its timings (roughly: the
//! scheduler decides the rest).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use awc::error::{ConnectError, SendRequestError};
use awc::http::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::MaybeTlsStream;

use crate::both_backends;
use crate::helpers::*;
use crate::load::Lcg;
use crate::process::Server;

const ADMIN: &str = "hadm_crash_test_0123456789abcdef0123";
/// Concurrent posters.
const POSTERS: usize = 8;
/// SIGKILLs per run.
const KILLS: usize = 5;

both_backends!(kill_9_under_posts_loses_no_202_and_leaves_nothing_half_written);

/// The test's own view of one post.
#[derive(Clone, Debug)]
struct Post {
    /// Global number, also in the payload.
    seq: u64,
    poster: usize,
    /// Index in its poster's stream (a poster sends one post at a time).
    index: u64,
    idem: String,
    body: Value,
    /// The devices the post must reach.
    targets: BTreeSet<String>,
    outcome: Outcome,
}

#[derive(Clone, Debug)]
enum Outcome {
    /// `202` with this answer.
    Accepted(Value),
    /// Sent, but the connection died (or the node answered `503`) before an answer.
    Unanswered(String),
}

/// A notification frame as a session received it.
#[derive(Clone, Debug)]
struct Seen {
    id: String,
    created_at: SystemTime,
    seq: u64,
}

/// What the posters and readers share with the test body.
#[derive(Default)]
struct Shared {
    /// `http://127.0.0.1:<port>` of the node now running.
    base: RefCell<String>,
    stop: Cell<bool>,
    next_seq: Cell<u64>,
    posts: RefCell<Vec<Post>>,
    /// Every session of the storm: `(device id, frames in arrival order)`.
    sessions: RefCell<Vec<(String, Vec<Seen>)>>,
}

/// `herald serve` on `db_url` with this test's admin token.
async fn start_node(db_url: &str, dir: &std::path::Path) -> Server {
    Server::start(
        dir,
        db_url,
        &[("HERALD_ADMIN_TOKEN", ADMIN), ("HERALD_WORKERS", "2")],
    )
    .await
}

fn time_of(v: &Value) -> SystemTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("a time string, got {v}"));
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("RFC 3339 time, got {s:?}: {e}"))
}

fn seen_of(frame: &Value) -> Seen {
    Seen {
        id: frame["id"].as_str().expect("an id").to_owned(),
        created_at: time_of(&frame["created_at"]),
        seq: frame["payload"]["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("a payload from this test: {frame}")),
    }
}

/// Opens a device session on `port` and waits for `hello`; `None` if the node is gone meanwhile.
async fn try_connect(port: u16, token: &str) -> Option<WsClient> {
    let mut req = format!("ws://127.0.0.1:{port}/v1/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let (stream, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
        .await
        .ok()?;
    let mut ws = WsClient {
        stream,
        hello: Value::Null,
    };
    match ws.next_event_within(PATIENCE).await {
        Some(Event::Json(hello)) if hello["type"] == "hello" => {
            ws.hello = hello;
            Some(ws)
        }
        _ => None,
    }
}

/// A live session of `device` on the node at `port` for the storm: records every notification
/// (acking none, so the final replay holds them all) until the session ends.
fn spawn_reader(
    shared: Rc<Shared>,
    port: u16,
    device: Device,
) -> actix_web::rt::task::JoinHandle<()> {
    actix_web::rt::spawn(async move {
        let Some(mut ws) = try_connect(port, &device.token).await else {
            return;
        };
        let slot = {
            let mut sessions = shared.sessions.borrow_mut();
            sessions.push((device.id.clone(), Vec::new()));
            sessions.len() - 1
        };
        loop {
            match ws.next_event_within(Duration::from_secs(120)).await {
                Some(Event::Json(v)) if v["type"] == "notification" => {
                    shared.sessions.borrow_mut()[slot].1.push(seen_of(&v));
                }
                Some(Event::Json(_)) => {}
                Some(Event::Close(_)) | None => return,
            }
        }
    })
}

/// What a post asks for, by kind: a user with two devices, a single device, two users (three
/// devices), or the other device of the two-device user.
fn target_of(kind: usize, ann: &[Device], bob: &Device) -> (Value, BTreeSet<String>) {
    match kind {
        0 => (
            json!({"user_id": "ann"}),
            ann.iter().map(|d| d.id.clone()).collect(),
        ),
        1 => (json!({"device_ids": [bob.id]}), [bob.id.clone()].into()),
        2 => (
            json!({"user_ids": ["ann", "bob"]}),
            ann.iter().chain([bob]).map(|d| d.id.clone()).collect(),
        ),
        _ => (
            json!({"device_ids": [ann[1].id]}),
            [ann[1].id.clone()].into(),
        ),
    }
}

/// Sends one post with its `Idempotency-Key` to whichever node runs now. A post that could not
/// even connect (the node is down) was never sent and is tried again once a node listens.
async fn send_post(
    shared: &Shared,
    http: &awc::Client,
    key: &str,
    idem: &str,
    body: &Value,
) -> Outcome {
    let start = Instant::now();
    loop {
        let base = shared.base.borrow().clone();
        let res = http
            .post(format!("{base}/v1/notifications"))
            .insert_header(("Authorization", format!("Bearer {key}")))
            .insert_header(("Idempotency-Key", idem))
            .send_json(body)
            .await;
        let mut res = match res {
            // The connection closed after the request went out (awc calls that `Disconnected`).
            Err(SendRequestError::Connect(ConnectError::Disconnected)) => {
                return Outcome::Unanswered("no answer: the connection closed".into())
            }
            // Refused: nothing was sent.
            Err(SendRequestError::Connect(_)) => {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "no node to post to for a minute"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Err(e) => return Outcome::Unanswered(format!("no answer: {e}")),
            Ok(res) => res,
        };
        let status = res.status();
        let bytes = match res.body().limit(1 << 20).await {
            Ok(b) => b,
            Err(e) => return Outcome::Unanswered(format!("{status}, body lost: {e}")),
        };
        let text = String::from_utf8_lossy(&bytes);
        return match status {
            StatusCode::ACCEPTED => Outcome::Accepted(
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| panic!("a JSON 202 body, got {text:?}")),
            ),
            StatusCode::SERVICE_UNAVAILABLE => Outcome::Unanswered(format!("503: {text}")),
            other => panic!("post {idem}: unexpected {other}: {text}"),
        };
    }
}

/// One poster: posts until told to stop, one at a time, each to a random target.
fn spawn_poster(
    shared: Rc<Shared>,
    p: usize,
    seed: u64,
    key: String,
    ann: Vec<Device>,
    bob: Device,
) -> actix_web::rt::task::JoinHandle<()> {
    actix_web::rt::spawn(async move {
        let mut rng = Lcg(seed ^ (p as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let http = awc::Client::builder()
            .connector(awc::Connector::new().conn_keep_alive(Duration::from_secs(2)))
            .timeout(Duration::from_secs(20))
            .finish();
        let mut index = 0;
        while !shared.stop.get() {
            let seq = shared.next_seq.get();
            shared.next_seq.set(seq + 1);
            let (mut body, targets) = target_of(rng.next(4), &ann, &bob);
            body["payload"] = json!({"seq": seq, "poster": p, "index": index});
            let idem = format!("crash-{p}-{index}");
            let outcome = send_post(&shared, &http, &key, &idem, &body).await;
            shared.posts.borrow_mut().push(Post {
                seq,
                poster: p,
                index,
                idem,
                body,
                targets,
                outcome,
            });
            index += 1;
            if rng.next(4) == 0 {
                tokio::time::sleep(Duration::from_millis(rng.next(3) as u64)).await;
            }
        }
    })
}

/// Reads a device's whole backlog on a new session: until `expected` notifications came and then
/// nothing more for a moment (or the patience ran out).
async fn replay(app: &TestApp, device: &Device, expected: usize) -> Vec<Seen> {
    let mut ws = app.connect(device).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let wait = if got.len() >= expected {
            Duration::from_millis(500)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match ws.next_event_within(wait).await {
            Some(Event::Json(v)) if v["type"] == "notification" => got.push(seen_of(&v)),
            Some(Event::Json(_)) => {}
            Some(Event::Close(code)) => panic!("the replay session closed with {code:?}"),
            None => break,
        }
    }
    ws.close().await;
    got
}

/// Lists the first few of `items` for a failure message.
fn few<T: std::fmt::Debug>(items: &[T]) -> String {
    format!(
        "{} item(s), first: {:?}",
        items.len(),
        &items[..items.len().min(8)]
    )
}

async fn kill_9_under_posts_loses_no_202_and_leaves_nothing_half_written(b: Backend) {
    let seed = std::env::var("HERALD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| getrandom::u64().expect("a random seed"));
    let run_start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(b);
    let mut node = start_node(&db.url, dir.path()).await;
    let app = node.app(ADMIN);
    let key = app.service_key().await;
    let ann = vec![app.device(&key, "ann").await, app.device(&key, "ann").await];
    let bob = app.device(&key, "bob").await;
    let devices: Vec<Device> = ann.iter().cloned().chain([bob.clone()]).collect();
    drop(app);

    let shared = Rc::new(Shared::default());
    *shared.base.borrow_mut() = format!("http://127.0.0.1:{}", node.port);
    let mut readers: Vec<_> = devices
        .iter()
        .map(|d| spawn_reader(shared.clone(), node.port, d.clone()))
        .collect();
    let posters: Vec<_> = (0..POSTERS)
        .map(|p| {
            spawn_poster(
                shared.clone(),
                p,
                seed,
                key.clone(),
                ann.clone(),
                bob.clone(),
            )
        })
        .collect();

    // The storm: posts and sessions in flight, SIGKILL at a random moment, restart, again.
    let mut rng = Lcg(seed);
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(150 + rng.next(650) as u64)).await;
        node.child.kill().expect("SIGKILL"); // std's kill() is SIGKILL: kill -9
        node.exited(Duration::from_secs(10)).await;
        node = start_node(&db.url, dir.path()).await;
        *shared.base.borrow_mut() = format!("http://127.0.0.1:{}", node.port);
        readers.extend(
            devices
                .iter()
                .map(|d| spawn_reader(shared.clone(), node.port, d.clone())),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    shared.stop.set(true);
    for p in posters {
        p.await.expect("a poster panicked");
    }
    let storm = run_start.elapsed();
    let app = node.app(ADMIN);

    // Posts that got no answer are sent again with the same key: the answer is the first
    // attempt's notification if it committed, else a new one.
    let retry_start = SystemTime::now();
    let mut posts = shared.posts.borrow().clone();
    posts.sort_by_key(|p| p.seq);
    let unanswered: Vec<usize> = (0..posts.len())
        .filter(|&i| matches!(posts[i].outcome, Outcome::Unanswered(_)))
        .collect();
    let accepted_count = posts.len() - unanswered.len();
    // The final answer of every post: (id, created_at).
    let mut answers: Vec<Option<Value>> = posts
        .iter()
        .map(|p| match &p.outcome {
            Outcome::Accepted(a) => Some(a.clone()),
            Outcome::Unanswered(_) => None,
        })
        .collect();
    let mut committed_before = 0;
    let http = http_client();
    for &i in &unanswered {
        let p = &posts[i];
        let mut outcome = send_post(&shared, &http, &key, &p.idem, &p.body).await;
        for _ in 0..20 {
            if matches!(outcome, Outcome::Accepted(_)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            outcome = send_post(&shared, &http, &key, &p.idem, &p.body).await;
        }
        let Outcome::Accepted(answer) = outcome else {
            panic!("the retry of {} never got a 202: {outcome:?}", p.idem);
        };
        assert_eq!(
            answer["devices"],
            p.targets.len(),
            "post {} targets {:?}: {answer}",
            p.idem,
            p.targets
        );
        if time_of(&answer["created_at"]) < retry_start {
            committed_before += 1;
        }
        answers[i] = Some(answer);
    }

    // Posts that were answered: repeating them answers the same notification, after crashes
    // too (a sample, to keep the run short).
    let step = (accepted_count / 150).max(1);
    let mut repeated = 0;
    for (i, p) in posts.iter().enumerate() {
        let Outcome::Accepted(first) = &p.outcome else {
            continue;
        };
        assert_eq!(first["devices"], p.targets.len(), "{}: {first}", p.idem);
        if i % step != 0 {
            continue;
        }
        repeated += 1;
        let again = send_post(&shared, &http, &key, &p.idem, &p.body).await;
        let Outcome::Accepted(again) = again else {
            panic!("the repeat of {} got no 202: {again:?}", p.idem);
        };
        for field in ["id", "created_at", "expires_at", "devices"] {
            assert_eq!(
                again[field], first[field],
                "the repeat of {} answers the first answer: first {first}, again {again}",
                p.idem
            );
        }
    }

    // Every notification of a retried post, and a sample of the others, has a delivery for
    // every device it targets and for no other.
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (i, a) in answers.iter().enumerate() {
        let id = a.as_ref().unwrap()["id"].as_str().unwrap().to_owned();
        assert!(
            by_id.insert(id.clone(), i).is_none(),
            "two posts answered with the same notification {id}"
        );
    }
    let mut status_checked = 0;
    for (i, p) in posts.iter().enumerate() {
        if matches!(p.outcome, Outcome::Accepted(_)) && i % step != 0 {
            continue;
        }
        status_checked += 1;
        let id = answers[i].as_ref().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (status, body) = app.get(&format!("/v1/notifications/{id}"), &key).await;
        assert_eq!(status, StatusCode::OK, "status of {id}: {body}");
        let delivered_to: BTreeSet<String> = body["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            delivered_to, p.targets,
            "notification {id} of post {} ({:?}) has a delivery for each target: {body}",
            p.idem, p.outcome
        );
        assert_eq!(body["payload"]["seq"], p.seq, "{body}");
    }

    // Each device's replay: every notification meant for it, once, in creation order, and only
    // those.
    let mut replays = HashMap::new();
    for d in &devices {
        let expected = posts.iter().filter(|p| p.targets.contains(&d.id)).count();
        replays.insert(d.id.clone(), replay(&app, d, expected).await);
    }
    let mut receivers: HashMap<String, BTreeSet<String>> = HashMap::new();
    for d in &devices {
        let got = &replays[&d.id];
        let mut unknown = Vec::new();
        let mut dups = Vec::new();
        let mut ids = BTreeSet::new();
        for s in got {
            if !ids.insert(s.id.clone()) {
                dups.push(s.id.clone());
            }
            match by_id.get(&s.id) {
                Some(&i) => {
                    assert_eq!(
                        s.seq, posts[i].seq,
                        "notification {} carries its post",
                        s.id
                    );
                    receivers
                        .entry(s.id.clone())
                        .or_default()
                        .insert(d.id.clone());
                }
                None => unknown.push(s.clone()),
            }
        }
        assert!(
            unknown.is_empty(),
            "device {} got notifications no post of the test was answered with (a post created \
             twice?): {}",
            d.id,
            few(&unknown)
        );
        assert!(
            dups.is_empty(),
            "device {} got duplicates: {}",
            d.id,
            few(&dups)
        );
        let missing: Vec<(u64, &str, String)> = posts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.targets.contains(&d.id))
            .map(|(i, p)| {
                (
                    p.seq,
                    answers[i].as_ref().unwrap()["id"].as_str().unwrap(),
                    p,
                )
            })
            .filter(|(_, id, _)| !ids.contains(*id))
            .map(|(seq, id, p)| (seq, id, format!("{:?}", p.outcome)))
            .collect();
        assert!(
            missing.is_empty(),
            "device {} never got these notifications meant for it: {}",
            d.id,
            few(&missing)
        );
        // Creation order: non-decreasing `created_at`, and each poster's answered posts in the
        // order it sent them (it sent each only after the previous one was answered).
        for w in got.windows(2) {
            assert!(
                w[0].created_at <= w[1].created_at,
                "device {}: {:?} arrived before the older {:?}",
                d.id,
                w[0],
                w[1]
            );
        }
        let mut last_index: HashMap<usize, u64> = HashMap::new();
        for s in got {
            let p = &posts[by_id[&s.id]];
            if let Outcome::Accepted(_) = p.outcome {
                if let Some(prev) = last_index.insert(p.poster, p.index) {
                    assert!(
                        prev < p.index,
                        "device {}: poster {}'s post {} arrived after its later post {prev}",
                        d.id,
                        p.poster,
                        p.index
                    );
                }
            }
        }
    }
    for (i, p) in posts.iter().enumerate() {
        let id = answers[i].as_ref().unwrap()["id"].as_str().unwrap();
        assert_eq!(
            receivers.get(id).cloned().unwrap_or_default(),
            p.targets,
            "notification {id} of post {} reached exactly its targets",
            p.idem
        );
    }

    // Every live session of the storm saw a prefix of its device's final order: nothing out of
    // order, no gap, on any node.
    for r in readers {
        r.await.expect("a reader panicked");
    }
    let sessions = shared.sessions.borrow();
    for (n, (device, seen)) in sessions.iter().enumerate() {
        let full = &replays[device];
        let ids: Vec<&str> = seen.iter().map(|s| s.id.as_str()).collect();
        let prefix: Vec<&str> = full.iter().take(ids.len()).map(|s| s.id.as_str()).collect();
        if let Some(at) = (0..ids.len()).find(|&k| prefix.get(k) != Some(&ids[k])) {
            panic!(
                "storm session {n} of device {device} strays from the device's order at frame \
                 {at}: got {:?}, the order has {:?}",
                &ids[at..(at + 5).min(ids.len())],
                &prefix[at..(at + 5).min(prefix.len())]
            );
        }
    }

    let refused = posts
        .iter()
        .filter(|p| matches!(&p.outcome, Outcome::Unanswered(why) if why.starts_with("503")))
        .count();
    println!(
        "crash [{b:?}] seed {seed}: {} posts, {accepted_count} answered 202, {} unanswered \
         ({refused} of them 503; {committed_before} had committed before the kill, {} had not), \
         {KILLS} kills, {} storm \
         sessions, {repeated} repeats of answered posts, {status_checked} statuses checked; \
         storm {:.1}s, total {:.1}s",
        posts.len(),
        unanswered.len(),
        unanswered.len() - committed_before,
        sessions.len(),
        storm.as_secs_f64(),
        run_start.elapsed().as_secs_f64()
    );
}
