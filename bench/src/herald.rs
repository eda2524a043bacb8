//! The Herald scenarios: connect, deliver (with presence queries alongside), fan-out, replay.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Mutex, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::net::{self, HttpConn, Sources};
use crate::report::{instant_at, now_ns, pace, round, Lat, Statuses};

/// What every Herald scenario needs.
pub struct Ctx {
    pub target: SocketAddr,
    /// Where `deliver` posts its notifications (`--post-target`; else `target`): another node
    /// of the same cluster for cross-node delivery.
    pub post_target: SocketAddr,
    pub admin_token: String,
    pub sources: Arc<Sources>,
    pub server_pid: Option<u32>,
    /// Names this run's keys, users and payloads.
    pub run: String,
    pub http_timeout: Duration,
    pub ws_buffer: usize,
    /// Most WebSocket handshakes in flight at once.
    pub connect_concurrency: usize,
}

impl Ctx {
    pub fn http(&self) -> HttpConn {
        HttpConn::new(self.target, self.sources.pick(), self.http_timeout)
    }

    /// A connection to the node that takes the posts.
    pub fn http_post(&self) -> HttpConn {
        HttpConn::new(self.post_target, self.sources.pick(), self.http_timeout)
    }

    fn ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.ws_buffer)
            .write_buffer_size(0)
            .max_write_buffer_size(1 << 20)
            .max_message_size(Some(1 << 20))
            .max_frame_size(Some(1 << 20))
    }

    /// Server RSS (KiB) and CPU seconds, if a server pid was given.
    fn server_sample(&self) -> (Option<u64>, Option<f64>) {
        match self.server_pid {
            Some(pid) => (net::rss_kib(pid), net::cpu_seconds(pid)),
            None => (None, None),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Device {
    pub id: String,
    pub token: String,
}

async fn call(
    conn: &mut HttpConn,
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let bytes = body.map(|b| serde_json::to_vec(b).expect("JSON serializes"));
    let r = conn
        .request(method, path, Some(bearer), bytes.as_deref())
        .await
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        r.json()?
    };
    Ok((r.status, v))
}

/// Creates this run's service key (admin).
pub async fn create_service_key(ctx: &Ctx) -> Result<String, String> {
    let mut c = ctx.http();
    let (status, v) = call(
        &mut c,
        "POST",
        "/v1/service-keys",
        &ctx.admin_token,
        Some(&json!({"name": format!("herald-bench-{}", ctx.run)})),
    )
    .await?;
    if status != 201 {
        return Err(format!("POST /v1/service-keys answered {status}: {v}"));
    }
    v["key"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no key in {v}"))
}

/// Creates one device per entry of `users` (the device's user id), 16 requests at a time.
pub async fn create_devices(
    ctx: &Ctx,
    key: &str,
    users: Vec<String>,
) -> Result<(Vec<Device>, f64), String> {
    let started = Instant::now();
    let n = users.len();
    let users = Arc::new(users);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16.min(n.max(1)) {
        let users = users.clone();
        let next = next.clone();
        let mut conn = ctx.http();
        let key = key.to_owned();
        let run = ctx.run.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= users.len() {
                    return Ok::<_, String>(out);
                }
                let body = json!({"user_id": users[i], "name": format!("hb-{run}-{i}")});
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let (status, v) =
                        call(&mut conn, "POST", "/v1/devices", &key, Some(&body)).await?;
                    if status == 201 {
                        out.push((
                            i,
                            Device {
                                id: v["device_id"].as_str().unwrap_or_default().to_owned(),
                                token: v["token"].as_str().unwrap_or_default().to_owned(),
                            },
                        ));
                        break;
                    }
                    if status == 503 && attempt < 50 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    return Err(format!("POST /v1/devices answered {status}: {v}"));
                }
            }
        }));
    }
    let mut all: Vec<Option<Device>> = vec![None; n];
    for t in tasks {
        for (i, d) in t.await.map_err(|e| e.to_string())?? {
            all[i] = Some(d);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((all.into_iter().map(|d| d.expect("created")).collect(), secs))
}

/// `GET /v1/stats` (admin) of the devices' node, or `null` when it fails.
pub async fn server_stats(ctx: &Ctx) -> Value {
    stats_of(ctx, ctx.http()).await
}

/// `GET /v1/stats` of the node that takes the posts, when it is another one.
async fn post_node_stats(ctx: &Ctx) -> Value {
    if ctx.post_target == ctx.target {
        return Value::Null;
    }
    stats_of(ctx, ctx.http_post()).await
}

async fn stats_of(ctx: &Ctx, mut c: HttpConn) -> Value {
    match call(&mut c, "GET", "/v1/stats", &ctx.admin_token, None).await {
        Ok((200, v)) => v,
        Ok((s, v)) => json!({"error": format!("HTTP {s}: {v}")}),
        Err(e) => json!({"error": e}),
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Opens a device session and waits for its `hello`.
async fn ws_open(ctx: &Ctx, token: &str) -> Result<Ws, String> {
    let tcp = net::connect_from(ctx.target, ctx.sources.pick())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut req = format!("ws://{}/v1/ws", ctx.target)
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "bad token".to_string())?,
    );
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, Some(ctx.ws_config()))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("\"hello\"") => Ok(ws),
        Ok(Some(Ok(m))) => Err(format!("first frame is not hello: {m}")),
        Ok(Some(Err(e))) => Err(format!("reading hello: {e}")),
        Ok(None) => Err("closed before hello".into()),
        Err(_) => Err("no hello within 30 s".into()),
    }
}

/// What device sessions tell the collector.
pub(crate) enum Ev {
    /// A notification of this run: device, sequence, intended send time, receive time.
    Recv {
        dev: u32,
        seq: u64,
        sent_ns: u64,
        recv_ns: u64,
    },
    /// A notification of another run (acked, not counted).
    Stale,
    /// An ack frame carrying `n` ids was written.
    Acked { n: u32, at_ns: u64 },
    /// The server ended the session.
    Closed { code: Option<u16> },
    /// From now on, latencies of offline devices count as replay, from this time.
    ReplayStart(u64),
    /// How many of these (seq, device) pairs have not been received yet: the accepted posts,
    /// targets per post, and the devices not to wait for (offline or never connected).
    Missing {
        accepted: Arc<Vec<u64>>,
        k: usize,
        skip: Arc<Vec<bool>>,
        reply: oneshot::Sender<u64>,
    },
    /// The collector is done: hand over what it gathered.
    Finish(oneshot::Sender<Collector>),
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    id: Option<&'a str>,
    payload: Option<Payload<'a>>,
}

#[derive(Deserialize)]
pub(crate) struct Payload<'a> {
    pub run: &'a str,
    pub seq: u64,
    pub t: u64,
}

#[derive(Deserialize)]
struct LooseFrame {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
}

/// Handles one text frame; returns the id to ack.
fn on_text(text: &str, dev: u32, run: &str, tx: &mpsc::UnboundedSender<Ev>) -> Option<String> {
    let recv_ns = now_ns();
    match serde_json::from_str::<Frame>(text) {
        Ok(f) if f.kind == "notification" => {
            let id = f.id?.to_owned();
            match f.payload {
                Some(p) if p.run == run => {
                    let _ = tx.send(Ev::Recv {
                        dev,
                        seq: p.seq,
                        sent_ns: p.t,
                        recv_ns,
                    });
                }
                _ => {
                    let _ = tx.send(Ev::Stale);
                }
            }
            Some(id)
        }
        Ok(_) => None,
        Err(_) => match serde_json::from_str::<LooseFrame>(text) {
            Ok(f) if f.kind == "notification" => {
                let _ = tx.send(Ev::Stale);
                f.id
            }
            _ => None,
        },
    }
}

/// A device: reads notifications, acks everything it got in one frame per read burst.
async fn run_device(
    mut ws: Ws,
    dev: u32,
    run: Arc<str>,
    tx: mpsc::UnboundedSender<Ev>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ids: Vec<String> = Vec::new();
    loop {
        if *stop.borrow() {
            break;
        }
        let first = tokio::select! {
            _ = stop.changed() => break,
            m = ws.next() => m,
        };
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Some(Ok(Message::Text(t))) => {
                    if let Some(id) = on_text(t.as_str(), dev, &run, &tx) {
                        ids.push(id);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let _ = tx.send(Ev::Closed {
                        code: frame.map(|f| u16::from(f.code)),
                    });
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    let _ = tx.send(Ev::Closed { code: None });
                    return;
                }
            }
            if ids.len() < 500 {
                next = ws.next().now_or_never();
            }
        }
        if !ids.is_empty() {
            let frame = json!({"type": "ack", "ids": ids}).to_string();
            let n = ids.len() as u32;
            ids.clear();
            if ws.send(Message::text(frame)).await.is_err() {
                let _ = tx.send(Ev::Closed { code: None });
                return;
            }
            let _ = tx.send(Ev::Acked { n, at_ns: now_ns() });
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}

/// Gathers what the devices saw.
pub struct Collector {
    pub(crate) got: Vec<HashSet<u64>>,
    pub(crate) unique: Arc<AtomicU64>,
    pub(crate) dups: u64,
    pub(crate) stale: u64,
    /// Live end-to-end latency (receive − intended send) for sends in or after the window start.
    pub(crate) e2e: Lat,
    /// The same, warm-up included.
    pub(crate) e2e_all: Lat,
    /// Replay latency (receive − reconnect start) of offline devices' notifications.
    pub(crate) replay: Lat,
    pub(crate) window: Arc<(AtomicU64, AtomicU64)>,
    pub(crate) recv_in_window: u64,
    pub(crate) acks_in_window: u64,
    pub(crate) acks_total: u64,
    pub(crate) recv_total: u64,
    pub(crate) offline: Vec<bool>,
    pub(crate) replay_start: Option<u64>,
    /// Last receive time per offline device during replay.
    pub(crate) replay_last: Vec<u64>,
    /// Per sequence: deliveries, first and last receive time (fan-out only).
    pub(crate) per_seq: Option<BTreeMap<u64, (u64, u64, u64, u64)>>,
    pub(crate) closed: Statuses,
}

impl Collector {
    /// The counting window starts out empty; `window` sets it once it is known.
    pub(crate) fn new(devices: usize, offline: Vec<bool>, per_seq: bool) -> Self {
        Collector {
            got: vec![HashSet::new(); devices],
            unique: Arc::new(AtomicU64::new(0)),
            dups: 0,
            stale: 0,
            e2e: Lat::default(),
            e2e_all: Lat::default(),
            replay: Lat::default(),
            window: Arc::new((AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX))),
            recv_in_window: 0,
            acks_in_window: 0,
            acks_total: 0,
            recv_total: 0,
            offline,
            replay_start: None,
            replay_last: vec![0; devices],
            per_seq: per_seq.then(BTreeMap::new),
            closed: Statuses::default(),
        }
    }

    pub(crate) fn spawn(mut self) -> (mpsc::UnboundedSender<Ev>, Arc<AtomicU64>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let unique = self.unique.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    Ev::Recv {
                        dev,
                        seq,
                        sent_ns,
                        recv_ns,
                    } => self.on_recv(dev as usize, seq, sent_ns, recv_ns),
                    Ev::Stale => self.stale += 1,
                    Ev::Acked { n, at_ns } => {
                        self.acks_total += n as u64;
                        let (w0, w1) = self.window();
                        if at_ns >= w0 && at_ns < w1 {
                            self.acks_in_window += n as u64;
                        }
                    }
                    Ev::Closed { code } => self.closed.add(match code {
                        Some(c) => c.to_string(),
                        None => "no_close_frame".into(),
                    }),
                    Ev::ReplayStart(ns) => self.replay_start = Some(ns),
                    Ev::Missing {
                        accepted,
                        k,
                        skip,
                        reply,
                    } => {
                        let m = self.got.len();
                        let missing = accepted
                            .iter()
                            .flat_map(|&s| targets_of(s, k, m).map(move |d| (s, d)))
                            .filter(|&(s, d)| !skip[d] && !self.got[d].contains(&s))
                            .count();
                        let _ = reply.send(missing as u64);
                    }
                    Ev::Finish(reply) => {
                        let _ = reply.send(self);
                        return;
                    }
                }
            }
        });
        (tx, unique)
    }

    fn window(&self) -> (u64, u64) {
        (
            self.window.0.load(Ordering::Relaxed),
            self.window.1.load(Ordering::Relaxed),
        )
    }

    fn on_recv(&mut self, dev: usize, seq: u64, sent_ns: u64, recv_ns: u64) {
        self.recv_total += 1;
        let (w0, w1) = self.window();
        if !self.got[dev].insert(seq) {
            self.dups += 1;
            return;
        }
        self.unique.fetch_add(1, Ordering::Relaxed);
        if recv_ns >= w0 && recv_ns < w1 {
            self.recv_in_window += 1;
        }
        match (self.offline[dev], self.replay_start) {
            (true, Some(start)) => {
                self.replay.record_ns(recv_ns.saturating_sub(start));
                self.replay_last[dev] = self.replay_last[dev].max(recv_ns);
            }
            (true, None) => {}
            (false, _) => {
                self.e2e_all.record_ns(recv_ns.saturating_sub(sent_ns));
                if sent_ns >= w0 {
                    self.e2e.record_ns(recv_ns.saturating_sub(sent_ns));
                }
            }
        }
        if let Some(m) = self.per_seq.as_mut() {
            let e = m.entry(seq).or_insert((0, sent_ns, u64::MAX, 0));
            e.0 += 1;
            e.2 = e.2.min(recv_ns);
            e.3 = e.3.max(recv_ns);
        }
    }
}

pub(crate) async fn finish(tx: &mpsc::UnboundedSender<Ev>) -> Collector {
    let (reply, rx) = oneshot::channel();
    let _ = tx.send(Ev::Finish(reply));
    rx.await.expect("collector answers")
}

/// Opens sessions for `which` devices, `ctx.connect_concurrency` handshakes at a time, and runs
/// each as a device task. Returns the tasks, failures by reason and the handshake latencies.
async fn connect_devices(
    ctx: &Arc<Ctx>,
    devices: &[Device],
    which: &[usize],
    tx: &mpsc::UnboundedSender<Ev>,
    stop: &watch::Receiver<bool>,
) -> (Vec<tokio::task::JoinHandle<()>>, Statuses, Lat, Vec<bool>) {
    let sem = Arc::new(Semaphore::new(ctx.connect_concurrency.max(1)));
    let run: Arc<str> = Arc::from(ctx.run.as_str());
    let mut pending = Vec::new();
    for &i in which {
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let ctx = ctx.clone();
        let token = devices[i].token.clone();
        let (tx, stop, run) = (tx.clone(), stop.clone(), run.clone());
        pending.push((
            i,
            tokio::spawn(async move {
                let started = Instant::now();
                let r = ws_open(&ctx, &token).await;
                drop(permit);
                let took = started.elapsed();
                match r {
                    Ok(ws) => {
                        let task = tokio::spawn(run_device(ws, i as u32, run, tx, stop));
                        Ok((task, took))
                    }
                    Err(e) => Err(e),
                }
            }),
        ));
    }
    let mut tasks = Vec::new();
    let mut failures = Statuses::default();
    let mut lat = Lat::default();
    let mut ok = vec![false; devices.len()];
    for (i, p) in pending {
        match p.await {
            Ok(Ok((task, took))) => {
                lat.record_ns(took.as_nanos() as u64);
                tasks.push(task);
                ok[i] = true;
            }
            Ok(Err(e)) => failures.add(first_words(&e)),
            Err(e) => failures.add(format!("task: {e}")),
        }
    }
    (tasks, failures, lat, ok)
}

/// The error kind without the varying parts, for counting.
fn first_words(e: &str) -> String {
    e.split(['(', ',']).next().unwrap_or(e).trim().to_owned()
}

/// Options of the delivery scenarios.
#[derive(Clone, Debug)]
pub struct DeliverOpts {
    pub devices: usize,
    pub rate: f64,
    pub duration: f64,
    pub warmup: f64,
    pub drain: f64,
    pub targets_per_post: usize,
    pub http_conns: usize,
    pub presence_interval_ms: u64,
    pub presence_limit: usize,
    /// Replay only: the fraction of devices offline while posting.
    pub offline_fraction: f64,
    pub replay_timeout: f64,
    /// Start posting at this UNIX time (seconds), to line up several processes.
    pub start_at: Option<u64>,
}

struct Job {
    seq: u64,
    sent_ns: u64,
}

#[derive(Default)]
struct PosterOut {
    answer: Lat,
    /// Every answer, warm-up included (the only figure left when an overloaded run never
    /// reaches the posts after the warm-up).
    answer_all: Lat,
    /// From the intended send time to the request's start (after the warm-up): the client's
    /// own scheduling, and any wait for a free poster task (each holds one connection). Part of
    /// every latency above. Posts dropped past the deadline are not in it.
    send_lag: Lat,
    statuses: Statuses,
    accepted: Vec<u64>,
    accepted_in_window: u64,
    retries: u64,
    connects: u64,
}

fn post_body(run: &str, seq: u64, sent_ns: u64, ids: &[String], k: usize) -> Vec<u8> {
    let n = ids.len();
    let start = (seq as usize * k) % n;
    let mut targets = String::with_capacity(k * 40);
    for j in 0..k {
        if j > 0 {
            targets.push(',');
        }
        targets.push('"');
        targets.push_str(&ids[(start + j) % n]);
        targets.push('"');
    }
    format!(r#"{{"device_ids":[{targets}],"payload":{{"run":"{run}","seq":{seq},"t":{sent_ns}}}}}"#)
        .into_bytes()
}

fn targets_of(seq: u64, k: usize, n: usize) -> impl Iterator<Item = usize> {
    let start = (seq as usize * k) % n;
    (0..k).map(move |j| (start + j) % n)
}

#[allow(clippy::too_many_arguments)]
async fn poster(
    ctx: Arc<Ctx>,
    key: Arc<str>,
    ids: Arc<Vec<String>>,
    k: usize,
    jobs: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    window: (u64, u64),
    hard_end: u64,
) -> PosterOut {
    let mut conn = ctx.http_post();
    let mut out = PosterOut::default();
    loop {
        let job = { jobs.lock().await.recv().await };
        let Some(job) = job else { break };
        if now_ns() > hard_end {
            // Posting is over (duration + drain): what is still queued is never sent.
            out.statuses.add("not_sent_past_deadline");
            continue;
        }
        if job.sent_ns >= window.0 {
            out.send_lag.record_ns(now_ns().saturating_sub(job.sent_ns));
        }
        let body = post_body(&ctx.run, job.seq, job.sent_ns, &ids, k);
        let r = conn
            .request("POST", "/v1/notifications", Some(&key), Some(&body))
            .await;
        let done = now_ns();
        out.answer_all.record_ns(done.saturating_sub(job.sent_ns));
        if job.sent_ns >= window.0 {
            out.answer.record_ns(done.saturating_sub(job.sent_ns));
        }
        match r {
            Ok(resp) => {
                out.statuses.add(resp.status.to_string());
                if resp.status == 202 {
                    out.accepted.push(job.seq);
                    if done >= window.0 && done < window.1 {
                        out.accepted_in_window += 1;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => out.statuses.add("timeout"),
            Err(_) => out.statuses.add("io_error"),
        }
    }
    out.retries = conn.retries;
    out.connects = conn.connects;
    out
}

fn encode_query(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// Pages through `/v1/presence` every `interval` until `until`.
async fn presence_loop(ctx: Arc<Ctx>, interval: Duration, limit: usize, until: Instant) -> Value {
    let mut conn = ctx.http();
    let mut page = Lat::default();
    let mut scan = Lat::default();
    let mut statuses = Statuses::default();
    let mut last_seen = 0u64;
    let mut scans = 0u64;
    while Instant::now() + interval < until {
        let scan_start = now_ns();
        let mut after: Option<String> = None;
        let mut seen = 0u64;
        let mut ok = true;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/presence?limit={limit}&after={}", encode_query(a)),
                None => format!("/v1/presence?limit={limit}"),
            };
            let t = now_ns();
            let r = call(&mut conn, "GET", &path, &ctx.admin_token, None).await;
            page.record_ns(now_ns() - t);
            match r {
                Ok((200, v)) => {
                    statuses.add("200");
                    seen += v["devices"].as_array().map_or(0, |a| a.len() as u64);
                    match v["next"].as_str() {
                        Some(n) => after = Some(n.to_owned()),
                        None => break,
                    }
                }
                Ok((s, _)) => {
                    statuses.add(s.to_string());
                    ok = false;
                    break;
                }
                Err(_) => {
                    statuses.add("io_error");
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            scan.record_ns(now_ns() - scan_start);
            last_seen = seen;
            scans += 1;
        }
        tokio::time::sleep(interval).await;
    }
    json!({
        "interval_ms": interval.as_millis() as u64,
        "page_limit": limit,
        "full_scans": scans,
        "devices_in_last_scan": last_seen,
        "page_latency": page.summary(),
        "full_scan_latency": scan.summary(),
        "http_status": statuses.json(),
    })
}

fn stat_num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

fn delta_rate(a: &Value, b: &Value, path: &[&str], secs: f64) -> Option<f64> {
    Some(round((stat_num(b, path)? - stat_num(a, path)?) / secs, 1))
}

/// Scenario 2 (and, with `offline_fraction > 0`, scenario 4): open-loop posting at a fixed rate.
pub async fn deliver(ctx: Arc<Ctx>, o: DeliverOpts, replay: bool) -> Result<Value, String> {
    let m = o.devices;
    let k = o.targets_per_post.clamp(1, m.min(1000));
    let key: Arc<str> = Arc::from(create_service_key(&ctx).await?);
    let users = (0..m).map(|i| format!("hb-{}-u{i}", ctx.run)).collect();
    let (devices, create_s) = create_devices(&ctx, &key, users).await?;
    eprintln!("created {m} devices in {create_s:.1} s");
    let ids: Arc<Vec<String>> = Arc::new(devices.iter().map(|d| d.id.clone()).collect());

    let n_offline = if replay {
        ((m as f64) * o.offline_fraction).round() as usize
    } else {
        0
    };
    // The first n_offline devices: posts go round-robin, so each gets its share of the backlog.
    let offline: Vec<bool> = (0..m).map(|i| i < n_offline).collect();
    let online_idx: Vec<usize> = (n_offline..m).collect();
    let offline_idx: Vec<usize> = (0..n_offline).collect();

    let (stop_tx, stop_rx) = watch::channel(false);
    let col = Collector::new(m, offline.clone(), false);
    let window_cell = col.window.clone();
    let (tx, unique) = col.spawn();

    let t_conn = Instant::now();
    if !offline_idx.is_empty() {
        // The devices to be offline are online first, then leave (close frame), so the server
        // has seen them come and go before the posts that they will have to replay.
        let (off_tx, off_rx) = watch::channel(false);
        let (tasks, _, _, _) = connect_devices(&ctx, &devices, &offline_idx, &tx, &off_rx).await;
        let _ = off_tx.send(true);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
    let (mut dev_tasks, conn_fail, conn_lat, conn_ok) =
        connect_devices(&ctx, &devices, &online_idx, &tx, &stop_rx).await;
    let connect_s = t_conn.elapsed().as_secs_f64();
    eprintln!(
        "connected {} of {} online devices in {connect_s:.1} s",
        dev_tasks.len(),
        online_idx.len()
    );

    // Posting plan.
    let t0 = (now_ns() + 300_000_000).max(o.start_at.unwrap_or(0) * 1_000_000_000);
    if o.start_at.is_some_and(|at| at * 1_000_000_000 < now_ns()) {
        eprintln!("warning: --start-at has passed; posting starts now");
    }
    let dur_ns = (o.duration * 1e9) as u64;
    let window = (t0 + (o.warmup * 1e9) as u64, t0 + dur_ns);
    window_cell.0.store(window.0, Ordering::Relaxed);
    window_cell.1.store(window.1, Ordering::Relaxed);

    let stats_before = server_stats(&ctx).await;
    // Samples at the window bounds.
    let sampler = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(instant_at(window.0).into()).await;
            // Each sample's time is taken with its CPU reading, before the stats round trip
            // (which under load can take milliseconds).
            let pa = post_node_stats(&ctx).await;
            let (sample, t) = (ctx.server_sample(), now_ns());
            let a = (sample, server_stats(&ctx).await, t);
            tokio::time::sleep_until(instant_at(window.1).into()).await;
            let pb = post_node_stats(&ctx).await;
            let (sample, t) = (ctx.server_sample(), now_ns());
            let b = (sample, server_stats(&ctx).await, t);
            (a, b, (pa, pb))
        })
    };
    let client_cpu = net::PostingClock::start(t0);

    let (job_tx, job_rx) = mpsc::unbounded_channel::<Job>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let mut posters = Vec::new();
    for _ in 0..o.http_conns.max(1) {
        posters.push(tokio::spawn(poster(
            ctx.clone(),
            key.clone(),
            ids.clone(),
            k,
            job_rx.clone(),
            window,
            t0 + dur_ns + (o.drain * 1e9) as u64,
        )));
    }
    let presence = (o.presence_interval_ms > 0).then(|| {
        tokio::spawn(presence_loop(
            ctx.clone(),
            Duration::from_millis(o.presence_interval_ms),
            o.presence_limit,
            instant_at(t0 + dur_ns),
        ))
    });
    let total = (o.rate * o.duration).round() as u64;
    let lag_max = pace(t0, 1e9 / o.rate, total, move |seq, sent_ns| {
        job_tx.send(Job { seq, sent_ns }).is_ok()
    })
    .await?;
    let mut out = PosterOut::default();
    for p in posters {
        let r = p.await.map_err(|e| e.to_string())?;
        out.answer.add(&r.answer);
        out.answer_all.add(&r.answer_all);
        out.send_lag.add(&r.send_lag);
        out.statuses.merge(&r.statuses);
        out.accepted.extend(r.accepted);
        out.accepted_in_window += r.accepted_in_window;
        out.retries += r.retries;
        out.connects += r.connects;
    }
    let posting_done = now_ns();
    let client_cpu = client_cpu.stop(posting_done);
    let ((srv_a, stats_a, ta), (srv_b, stats_b, tb), (post_a, post_b)) =
        sampler.await.map_err(|e| e.to_string())?;
    // What the client counts (receipts, acks, answers) is counted by timestamp inside the nominal
    // window, so it is divided by the nominal window; the server's counters and CPU are read at
    // the two samples, so they are divided by the time between those.
    let window_s = (window.1 - window.0) as f64 / 1e9;
    let sampled_s = (tb - ta) as f64 / 1e9;

    // Drain: wait until every accepted post reached every online target.
    let expected_online: u64 = out
        .accepted
        .iter()
        .map(|&s| targets_of(s, k, m).filter(|&d| !offline[d]).count() as u64)
        .sum();
    // The count alone is not enough: a post answered 503 (deadline) may still have been
    // committed and delivered, so receipts can add up before every accepted one arrived.
    let drain_until = Instant::now() + Duration::from_secs_f64(o.drain);
    let accepted_arc = Arc::new(out.accepted.clone());
    let skip: Arc<Vec<bool>> = Arc::new((0..m).map(|d| offline[d] || !conn_ok[d]).collect());
    while Instant::now() < drain_until {
        if unique.load(Ordering::Relaxed) >= expected_online {
            let (reply, rx) = oneshot::channel();
            let _ = tx.send(Ev::Missing {
                accepted: accepted_arc.clone(),
                k,
                skip: skip.clone(),
                reply,
            });
            if rx.await.unwrap_or(0) == 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_after = (now_ns() - posting_done) as f64 / 1e9;

    // Replay: reconnect the offline devices and wait for their backlog.
    let mut replay_report = Value::Null;
    if replay && n_offline > 0 {
        let expected_total: u64 = out.accepted.len() as u64 * k as u64;
        let start = now_ns();
        let _ = tx.send(Ev::ReplayStart(start));
        let (tasks, fail, lat, ok) =
            connect_devices(&ctx, &devices, &offline_idx, &tx, &stop_rx).await;
        dev_tasks.extend(tasks);
        let reconnected = ok.iter().filter(|b| **b).count();
        let until = Instant::now() + Duration::from_secs_f64(o.replay_timeout);
        while unique.load(Ordering::Relaxed) < expected_total && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let complete_s = (now_ns() - start) as f64 / 1e9;
        replay_report = json!({
            "offline_devices": n_offline,
            "reconnected": reconnected,
            "reconnect_failures": fail.json(),
            "reconnect_handshake": lat.summary(),
            "wait_s": round(complete_s, 3),
            "_replay_start_ns": start,
        });
    }

    let _ = stop_tx.send(true);
    for t in dev_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let stats_after = server_stats(&ctx).await;
    let c = finish(&tx).await;

    // Lost and delivered counts per accepted post and target.
    let accepted_set: HashSet<u64> = out.accepted.iter().copied().collect();
    let received_not_accepted: u64 = c
        .got
        .iter()
        .map(|g| g.iter().filter(|s| !accepted_set.contains(s)).count() as u64)
        .sum();
    let mut lost_online = 0u64;
    let mut lost_offline = 0u64;
    let mut lost_unconnected = 0u64;
    let mut expected_offline = 0u64;
    for &s in &out.accepted {
        for d in targets_of(s, k, m) {
            if offline[d] {
                expected_offline += 1;
            }
            if !c.got[d].contains(&s) {
                if !offline[d] && !conn_ok[d] {
                    lost_unconnected += 1;
                } else if offline[d] {
                    lost_offline += 1;
                } else {
                    lost_online += 1;
                }
            }
        }
    }
    if let Value::Object(r) = &mut replay_report {
        let start = r
            .remove("_replay_start_ns")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let last = offline_idx
            .iter()
            .map(|&d| c.replay_last[d])
            .max()
            .unwrap_or(0);
        let received = expected_offline - lost_offline;
        r.insert("backlog_expected".into(), json!(expected_offline));
        r.insert("backlog_received".into(), json!(received));
        r.insert(
            "completeness".into(),
            json!(if expected_offline == 0 {
                1.0
            } else {
                round(received as f64 / expected_offline as f64, 6)
            }),
        );
        r.insert(
            "replay_time_s".into(),
            json!(round(last.saturating_sub(start) as f64 / 1e9, 3)),
        );
        r.insert("replay_latency".into(), c.replay.summary());
        r.insert(
            "replay_rate_per_s".into(),
            json!(if last > start {
                round(received as f64 / ((last - start) as f64 / 1e9), 1)
            } else {
                0.0
            }),
        );
    }

    let cpu_window = match (srv_a.1, srv_b.1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let server_delivered_window = match (
        stat_num(&stats_a, &["notifications", "delivered"]),
        stat_num(&stats_b, &["notifications", "delivered"]),
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let cpu_per_delivery_us = match (cpu_window, server_delivered_window) {
        (Some(cpu), Some(d)) if d > 0.0 => Some(round(cpu / d * 1e6, 2)),
        _ => None,
    };
    let cpu_per_delivery_client_us = match cpu_window {
        Some(cpu) if c.recv_in_window > 0 => Some(round(cpu / c.recv_in_window as f64 * 1e6, 2)),
        _ => None,
    };
    // A device that never connected cannot have lost anything: its notifications wait for it
    // (counted apart below).
    let lost = lost_online;
    let rates = json!({
        "posts_accepted_per_s": round(out.accepted_in_window as f64 / window_s, 1),
        "deliveries_per_s": round(c.recv_in_window as f64 / window_s, 1),
        "acks_per_s": round(c.acks_in_window as f64 / window_s, 1),
        "server_accepted_per_s": delta_rate(&stats_a, &stats_b, &["notifications", "accepted"], sampled_s),
        "server_delivered_per_s": delta_rate(&stats_a, &stats_b, &["notifications", "delivered"], sampled_s),
        "server_acked_per_s": delta_rate(&stats_a, &stats_b, &["notifications", "acked"], sampled_s),
        "server_write_transactions_per_s": delta_rate(&stats_a, &stats_b, &["writes", "transactions"], sampled_s),
        "post_node_accepted_per_s": delta_rate(&post_a, &post_b, &["notifications", "accepted"], sampled_s),
    });
    let report = json!({
        "scenario": if replay { "replay" } else { "deliver" },
        "target": ctx.target.to_string(),
        "post_target": ctx.post_target.to_string(),
        "params": {
            "devices": m, "rate_per_s": o.rate, "duration_s": o.duration, "warmup_s": o.warmup,
            "targets_per_post": k, "http_connections": o.http_conns, "offline_devices": n_offline,
        },
        "setup": {
            "devices_created_s": round(create_s, 2),
            "connect_s": round(connect_s, 2),
            "connected": dev_tasks_len(&conn_ok),
            "connect_failures": conn_fail.json(),
            "handshake": conn_lat.summary(),
        },
        "window_s": round(window_s, 3),
        "sampled_s": round(sampled_s, 3),
        "window_unix_ns": [window.0, window.1],
        "rates": rates,
        "http_status": out.statuses.json(),
        "posts": {
            "scheduled": total,
            "accepted": out.accepted.len(),
            "scheduler_lag_max_ms": round(lag_max as f64 / 1e6, 3),
            "send_lag": out.send_lag.summary(),
            "http_connections_opened": out.connects,
            "http_retries": out.retries,
        },
        "post_answer": out.answer.summary_with_buckets(),
        "e2e_delivery": c.e2e.summary_with_buckets(),
        "post_answer_incl_warmup": out.answer_all.summary(),
        "e2e_delivery_incl_warmup": c.e2e_all.summary(),
        "deliveries": {
            "expected_online": expected_online,
            "received_unique": c.unique.load(Ordering::Relaxed),
            "received_total": c.recv_total,
            "acked_ids_sent": c.acks_total,
            "lost": lost,
            "undelivered_to_devices_that_failed_to_connect": lost_unconnected,
            "duplicates": c.dups,
            "received_of_posts_not_answered_202": received_not_accepted,
            "stale_from_other_runs": c.stale,
            "drained_after_s": round(drained_after, 3),
            "sessions_closed_by_server": c.closed.json(),
        },
        "replay": replay_report,
        "server": {
            "pid": ctx.server_pid,
            "rss_kib_window_start": srv_a.0,
            "rss_kib_window_end": srv_b.0,
            "cpu_s_in_window": cpu_window.map(|x| round(x, 3)),
            "cpu_cores_used": cpu_window.map(|x| round(x / sampled_s, 3)),
            "cpu_us_per_delivery": cpu_per_delivery_us,
            "cpu_us_per_received_delivery": cpu_per_delivery_client_us,
            "stats_before": stats_before,
            "stats_after": stats_after,
        },
        "client": client_cpu.report(),
        "presence": match presence {
            Some(p) => p.await.map_err(|e| e.to_string())?,
            None => Value::Null,
        },
    });
    Ok(report)
}

fn dev_tasks_len(ok: &[bool]) -> usize {
    ok.iter().filter(|b| **b).count()
}

/// Scenario 1: ramp `n` sessions, hold them idle, measure server memory per session.
pub async fn connect(
    ctx: Arc<Ctx>,
    n: usize,
    ramp_rate: f64,
    hold: f64,
    start_at: Option<u64>,
) -> Result<Value, String> {
    let key = create_service_key(&ctx).await?;
    let users = (0..n).map(|i| format!("hb-{}-c{i}", ctx.run)).collect();
    let (devices, create_s) = create_devices(&ctx, &key, users).await?;
    eprintln!("created {n} devices in {create_s:.1} s");
    if let Some(at) = start_at {
        let at_ns = at * 1_000_000_000;
        if at_ns > now_ns() {
            tokio::time::sleep_until(instant_at(at_ns).into()).await;
        }
    }
    let stats_before = server_stats(&ctx).await;
    let (rss_before, cpu_before) = ctx.server_sample();
    let sessions_before = stat_num(&stats_before, &["sessions"]);

    let open = Arc::new(AtomicUsize::new(0));
    let closed_early = Arc::new(Mutex::new(Statuses::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(ctx.connect_concurrency.max(1)));
    let t0 = now_ns();
    let interval = 1e9 / ramp_rate;
    let mut pending = Vec::with_capacity(n);
    for (i, d) in devices.iter().enumerate() {
        let at = t0 + (i as f64 * interval) as u64;
        if at > now_ns() + 200_000 {
            tokio::time::sleep_until(instant_at(at).into()).await;
        }
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let ctx = ctx.clone();
        let token = d.token.clone();
        let (open, closed_early, mut stop) = (open.clone(), closed_early.clone(), stop_rx.clone());
        pending.push(tokio::spawn(async move {
            let r = ws_open(&ctx, &token).await;
            drop(permit);
            let took = now_ns().saturating_sub(at);
            let mut ws = match r {
                Ok(ws) => ws,
                Err(e) => return Err(e),
            };
            open.fetch_add(1, Ordering::Relaxed);
            let hold = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.changed() => {
                            let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
                            return;
                        }
                        m = ws.next() => match m {
                            Some(Ok(Message::Close(f))) => {
                                closed_early.lock().await.add(
                                    f.map(|f| u16::from(f.code).to_string()).unwrap_or_else(|| "close".into()));
                                break;
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => {
                                closed_early.lock().await.add("dropped");
                                break;
                            }
                        }
                    }
                }
                open.fetch_sub(1, Ordering::Relaxed);
            });
            Ok((hold, took))
        }));
    }
    let mut holds = Vec::new();
    let mut failures = Statuses::default();
    let mut lat = Lat::default();
    for p in pending {
        match p.await {
            Ok(Ok((h, took))) => {
                holds.push(h);
                lat.record_ns(took);
            }
            Ok(Err(e)) => failures.add(first_words(&e)),
            Err(e) => failures.add(format!("task: {e}")),
        }
    }
    let ramp_s = (now_ns() - t0) as f64 / 1e9;
    let connected = holds.len();
    eprintln!("{connected} sessions open after {ramp_s:.1} s; holding {hold} s");
    let stats_ramped = server_stats(&ctx).await;
    let (rss_ramped, _) = ctx.server_sample();
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let stats_after = server_stats(&ctx).await;
    let (rss_after, cpu_after) = ctx.server_sample();
    let held = open.load(Ordering::Relaxed);
    let sessions_after = stat_num(&stats_after, &["sessions"]);
    let client_rss = net::rss_kib(std::process::id());

    let _ = stop_tx.send(true);
    for h in holds {
        let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
    }
    let per_session = |rss: Option<u64>| match (rss, rss_before, sessions_before, sessions_after) {
        (Some(a), Some(b), Some(s0), Some(s1)) if s1 > s0 => {
            Some(round((a as f64 - b as f64) * 1024.0 / (s1 - s0), 0))
        }
        _ => None,
    };
    Ok(json!({
        "scenario": "connect",
        "target": ctx.target.to_string(),
        "params": {"sessions": n, "ramp_rate_per_s": ramp_rate, "hold_s": hold,
                   "connect_concurrency": ctx.connect_concurrency,
                   "source_addresses": ctx.sources.list()},
        "devices_created_s": round(create_s, 2),
        "connected": connected,
        "failed": n - connected,
        "failures": failures.json(),
        "held_to_end": held,
        "closed_during_hold": closed_early.lock().await.json(),
        "ramp_s": round(ramp_s, 3),
        "connect_latency_from_schedule": lat.summary(),
        "server": {
            "pid": ctx.server_pid,
            "sessions_before": sessions_before,
            "sessions_after_ramp": stat_num(&stats_ramped, &["sessions"]),
            "sessions_after_hold": sessions_after,
            "rss_kib_before": rss_before,
            "rss_kib_after_ramp": rss_ramped,
            "rss_kib_after_hold": rss_after,
            "rss_bytes_per_session_after_ramp": per_session(rss_ramped),
            "rss_bytes_per_session_after_hold": per_session(rss_after),
            "cpu_s": match (cpu_before, cpu_after) { (Some(a), Some(b)) => Some(round(b - a, 3)), _ => None },
            "stats_after": stats_after,
        },
        "client_rss_kib": client_rss,
    }))
}

/// Scenario 3: one post to a user with many devices; time until the last device has it.
pub async fn fanout(
    ctx: Arc<Ctx>,
    n: usize,
    posts: usize,
    interval: Duration,
) -> Result<Value, String> {
    let key = create_service_key(&ctx).await?;
    let user = format!("hb-{}-fan", ctx.run);
    let (devices, create_s) = create_devices(&ctx, &key, vec![user.clone(); n]).await?;
    eprintln!("created {n} devices in {create_s:.1} s");
    let col = Collector::new(n, vec![false; n], true);
    col.window.0.store(0, Ordering::Relaxed);
    let (tx, unique) = col.spawn();
    let (stop_tx, stop_rx) = watch::channel(false);
    let all: Vec<usize> = (0..n).collect();
    let (tasks, fail, conn_lat, ok) = connect_devices(&ctx, &devices, &all, &tx, &stop_rx).await;
    let connected = ok.iter().filter(|b| **b).count() as u64;
    let mut conn = ctx.http();
    let mut answer = Lat::default();
    let mut statuses = Statuses::default();
    let mut accepted = Vec::new();
    let mut answered_devices = Vec::new();
    for seq in 0..posts as u64 {
        let sent_ns = now_ns();
        let body = format!(
            r#"{{"user_ids":["{user}"],"payload":{{"run":"{}","seq":{seq},"t":{sent_ns}}}}}"#,
            ctx.run
        );
        let r = conn
            .request(
                "POST",
                "/v1/notifications",
                Some(&key),
                Some(body.as_bytes()),
            )
            .await;
        answer.record_ns(now_ns() - sent_ns);
        match r {
            Ok(resp) => {
                statuses.add(resp.status.to_string());
                if resp.status == 202 {
                    accepted.push(seq);
                    let v = resp.json().unwrap_or(Value::Null);
                    answered_devices.push(
                        json!({"devices": v["devices"], "delivered_now": v["delivered_now"]}),
                    );
                }
            }
            Err(_) => statuses.add("io_error"),
        }
        let want = accepted.len() as u64 * connected;
        let until = Instant::now() + Duration::from_secs(30);
        while unique.load(Ordering::Relaxed) < want && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(interval).await;
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let c = finish(&tx).await;
    let mut first = Lat::default();
    let mut last = Lat::default();
    let mut per_post = Vec::new();
    let per_seq = c.per_seq.clone().unwrap_or_default();
    for (i, &seq) in accepted.iter().enumerate() {
        if let Some(&(count, sent, f, l)) = per_seq.get(&seq) {
            first.record_ns(f - sent);
            last.record_ns(l - sent);
            per_post.push(json!({
                "seq": seq,
                "answer": answered_devices.get(i),
                "received_by": count,
                "first_ms": round((f - sent) as f64 / 1e6, 3),
                "last_ms": round((l - sent) as f64 / 1e6, 3),
            }));
        } else {
            per_post.push(json!({"seq": seq, "received_by": 0}));
        }
    }
    let expected = accepted.len() as u64 * connected;
    let got = c.unique.load(Ordering::Relaxed);
    Ok(json!({
        "scenario": "fanout",
        "target": ctx.target.to_string(),
        "params": {"devices": n, "posts": posts, "interval_ms": interval.as_millis() as u64},
        "devices_created_s": round(create_s, 2),
        "connected": connected,
        "connect_failures": fail.json(),
        "handshake": conn_lat.summary(),
        "http_status": statuses.json(),
        "post_answer": answer.summary(),
        "time_to_first_device": first.summary(),
        "time_to_last_device": last.summary(),
        "per_device_latency": c.e2e.summary(),
        "expected_deliveries": expected,
        "received_unique": got,
        "lost": expected.saturating_sub(got),
        "duplicates": c.dups,
        "posts_detail": per_post,
        "server_stats_after": server_stats(&ctx).await,
    }))
}
