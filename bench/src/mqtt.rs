//! The delivery workload against an MQTT broker (Mosquitto): one persistent session
//! (clean session off) per device, each subscribed at QoS 1 to its own topic; publishers publish
//! at QoS 1 at the intended send times; subscribers PUBACK everything.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::herald::{finish, Collector, Ev, Payload};
use crate::net;
use crate::report::{instant_at, now_ns, pace, round, Lat, Statuses};

#[derive(Clone, Debug)]
pub struct MqttOpts {
    pub target: SocketAddr,
    pub devices: usize,
    pub rate: f64,
    pub duration: f64,
    pub warmup: f64,
    pub drain: f64,
    pub publishers: usize,
    pub broker_pid: Option<u32>,
    pub connect_concurrency: usize,
}

/// A broker this run started, stopped when dropped.
pub struct Broker {
    pub child: Option<tokio::process::Child>,
}

impl Broker {
    /// Stops a broker this run started, and reaps it.
    pub async fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// Makes sure a broker answers at `target`; starts `mosquitto -p PORT` (loopback only) if none.
pub async fn ensure_broker(target: SocketAddr) -> Result<Broker, String> {
    if net::listening(target, Duration::from_secs(1)).await {
        return Ok(Broker { child: None });
    }
    if target.ip().to_string() != "127.0.0.1" {
        return Err(format!(
            "no broker at {target}; the harness starts one only on 127.0.0.1"
        ));
    }
    eprintln!(
        "no MQTT broker at {target}: starting mosquitto -p {}",
        target.port()
    );
    // Without a configuration file, mosquitto 2 listens on the loopback interface only.
    let child = tokio::process::Command::new("mosquitto")
        .arg("-p")
        .arg(target.port().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start mosquitto: {e}"))?;
    let broker = Broker { child: Some(child) };
    for _ in 0..50 {
        if net::listening(target, Duration::from_millis(200)).await {
            return Ok(broker);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("mosquitto did not start listening on {target}"))
}

fn options(id: String, target: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, target.ip().to_string(), target.port());
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    o
}

fn topic(run: &str, dev: usize) -> String {
    format!("hb/{run}/d{dev}")
}

/// One subscriber: connects, subscribes at QoS 1, then reports every message it gets.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    run: Arc<str>,
    dev: usize,
    target: SocketAddr,
    sem: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    tx: mpsc::UnboundedSender<Ev>,
    mut stop: watch::Receiver<bool>,
    errors: Arc<std::sync::Mutex<Statuses>>,
) {
    let permit = sem.acquire_owned().await.ok();
    let (client, mut el) = AsyncClient::new(options(format!("hb-{run}-s{dev}"), target), 16);
    let _ = client.subscribe(topic(&run, dev), QoS::AtLeastOnce).await;
    let mut permit = permit;
    let mut subscribed = false;
    let mut failures = 0;
    loop {
        let ev = tokio::select! {
            _ = stop.changed() => break,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::SubAck(_))) if !subscribed => {
                subscribed = true;
                permit.take();
                let _ = ready.send(Ok(()));
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let recv_ns = now_ns();
                match serde_json::from_slice::<Payload>(&p.payload) {
                    Ok(pl) if pl.run == &*run => {
                        let _ = tx.send(Ev::Recv {
                            dev: dev as u32,
                            seq: pl.seq,
                            sent_ns: pl.t,
                            recv_ns,
                        });
                    }
                    _ => {
                        let _ = tx.send(Ev::Stale);
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::PubAck(_))) => {
                let _ = tx.send(Ev::Acked {
                    n: 1,
                    at_ns: now_ns(),
                });
            }
            Ok(_) => {}
            Err(e) => {
                errors
                    .lock()
                    .expect("not poisoned")
                    .add(first_words(&e.to_string()));
                failures += 1;
                if !subscribed && failures >= 5 {
                    permit.take();
                    let _ = ready.send(Err(e.to_string()));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
    drop(el);
    // Leave nothing behind in the broker: a clean-session connect discards the persistent session.
    let mut o = options(format!("hb-{run}-s{dev}"), target);
    o.set_clean_session(true);
    let (client, mut el) = AsyncClient::new(o, 4);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(ev) = el.poll().await {
            if matches!(ev, Event::Incoming(Packet::ConnAck(_))) {
                break;
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
}

fn first_words(e: &str) -> String {
    e.split(['(', ',', ':'])
        .next()
        .unwrap_or(e)
        .trim()
        .to_owned()
}

/// What one publisher learned.
#[derive(Default)]
struct PubOut {
    answer: Lat,
    statuses: Statuses,
    accepted: Vec<u64>,
    accepted_in_window: u64,
}

/// Runs one publisher's event loop: matches each PUBACK to the publish it answers. It ends when
/// the publisher disconnects (the poll future is never cancelled, so no request is lost).
async fn publisher_loop(
    mut el: rumqttc::EventLoop,
    order: Arc<std::sync::Mutex<VecDeque<(u64, u64)>>>,
    answered: Arc<AtomicU64>,
    window: (u64, u64),
) -> PubOut {
    let mut out = PubOut::default();
    let mut inflight: HashMap<u16, (u64, u64)> = HashMap::new();
    loop {
        match el.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(job) = order.lock().expect("not poisoned").pop_front() {
                    inflight.insert(pkid, job);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                if let Some((seq, sent_ns)) = inflight.remove(&a.pkid) {
                    let done = now_ns();
                    answered.fetch_add(1, Ordering::Relaxed);
                    if sent_ns >= window.0 {
                        out.answer.record_ns(done.saturating_sub(sent_ns));
                    }
                    out.statuses.add("puback");
                    out.accepted.push(seq);
                    if done >= window.0 && done < window.1 {
                        out.accepted_in_window += 1;
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(rumqttc::ConnectionError::RequestsDone) => break,
            Err(e) => {
                out.statuses
                    .add(format!("error: {}", first_words(&e.to_string())));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    if !inflight.is_empty() {
        *out.statuses.0.entry("unanswered".into()).or_default() += inflight.len() as u64;
    }
    out
}

/// The delivery workload against the broker.
pub async fn deliver(run: &str, o: MqttOpts) -> Result<Value, String> {
    let broker = ensure_broker(o.target).await?;
    let broker_pid = o
        .broker_pid
        .or_else(|| broker.child.as_ref().and_then(|c| c.id()));
    let run: Arc<str> = Arc::from(format!("{run}m"));
    let m = o.devices;

    let col = Collector::new(m, vec![false; m], false);
    let window_cell = col.window.clone();
    let (tx, unique) = col.spawn();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let sem = Arc::new(Semaphore::new(o.connect_concurrency.max(1)));
    let errors = Arc::new(std::sync::Mutex::new(Statuses::default()));
    let t_conn = Instant::now();
    let mut subs = Vec::new();
    for dev in 0..m {
        subs.push(tokio::spawn(subscriber(
            run.clone(),
            dev,
            o.target,
            sem.clone(),
            ready_tx.clone(),
            tx.clone(),
            stop_rx.clone(),
            errors.clone(),
        )));
    }
    drop(ready_tx);
    let mut subscribed = 0usize;
    let mut sub_fail = Statuses::default();
    for _ in 0..m {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => subscribed += 1,
            Ok(Some(Err(e))) => sub_fail.add(first_words(&e)),
            _ => {
                sub_fail.add("timeout");
                break;
            }
        }
    }
    let connect_s = t_conn.elapsed().as_secs_f64();
    eprintln!("MQTT: {subscribed} of {m} subscribers ready in {connect_s:.1} s");

    let t0 = now_ns() + 300_000_000;
    let dur_ns = (o.duration * 1e9) as u64;
    let window = (t0 + (o.warmup * 1e9) as u64, t0 + dur_ns);
    window_cell.0.store(window.0, Ordering::Relaxed);
    window_cell.1.store(window.1, Ordering::Relaxed);

    let sampler = tokio::spawn(async move {
        let sample = || broker_pid.map(|p| (net::rss_kib(p), net::cpu_seconds(p)));
        tokio::time::sleep_until(instant_at(window.0).into()).await;
        let a = (sample(), now_ns());
        tokio::time::sleep_until(instant_at(window.1).into()).await;
        let b = (sample(), now_ns());
        (a, b)
    });

    let p = o.publishers.max(1);
    let mut pubs = Vec::new();
    let mut loops = Vec::new();
    let answered = Arc::new(AtomicU64::new(0));
    for j in 0..p {
        let mut opts = options(format!("hb-{run}-p{j}"), o.target);
        opts.set_inflight(u16::MAX);
        opts.set_request_channel_capacity(1 << 20);
        let (client, el) = AsyncClient::new(opts, 1 << 20);
        let order = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        loops.push(tokio::spawn(publisher_loop(
            el,
            order.clone(),
            answered.clone(),
            window,
        )));
        pubs.push((client, order));
    }
    let client_cpu = net::PostingClock::start(t0);
    let total = (o.rate * o.duration).round() as u64;
    // Published from the pacer thread itself (`try_publish` only queues the request for the
    // client's event loop), as Herald's posts are queued for its posters from the same thread.
    // From the intended send time to the publish (after the warm-up), as Herald's `send_lag`.
    let send_lag = Arc::new(std::sync::Mutex::new(Lat::default()));
    // Publishes the client refused (its request queue full): counted as `not_queued`.
    let not_queued = Arc::new(AtomicU64::new(0));
    let lag_max = {
        let (send_lag, not_queued, run) = (send_lag.clone(), not_queued.clone(), run.clone());
        let pubs: Vec<_> = pubs.iter().map(|(c, o)| (c.clone(), o.clone())).collect();
        let warm_until = window.0;
        pace(t0, 1e9 / o.rate, total, move |seq, sent_ns| {
            if sent_ns >= warm_until {
                let lag = now_ns().saturating_sub(sent_ns);
                send_lag.lock().expect("not poisoned").record_ns(lag);
            }
            let (client, order) = &pubs[seq as usize % p];
            let payload = format!(r#"{{"run":"{run}","seq":{seq},"t":{sent_ns}}}"#);
            let topic = topic(&run, seq as usize % m);
            // PUBACKs are matched to publishes by order: queued under the lock, and taken back
            // if the client refused it, so a refusal cannot shift every later match.
            let mut order = order.lock().expect("not poisoned");
            order.push_back((seq, sent_ns));
            if client
                .try_publish(topic, QoS::AtLeastOnce, false, payload.into_bytes())
                .is_err()
            {
                order.pop_back();
                not_queued.fetch_add(1, Ordering::Relaxed);
            }
            true
        })
        .await?
    };
    // Every scheduled publish was offered (the closure never stops the pacer).
    let refused = not_queued.load(Ordering::Relaxed);
    let sent = total - refused;
    let send_lag = std::mem::take(&mut *send_lag.lock().expect("not poisoned"));
    let until = Instant::now() + Duration::from_secs_f64(o.drain);
    while answered.load(Ordering::Relaxed) < sent && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (client, _) in &pubs {
        let _ = client.disconnect().await;
    }
    let mut out = PubOut::default();
    for l in loops {
        let r = l.await.map_err(|e| e.to_string())?;
        out.answer.add(&r.answer);
        out.statuses.merge(&r.statuses);
        out.accepted.extend(r.accepted);
        out.accepted_in_window += r.accepted_in_window;
    }
    if refused > 0 {
        *out.statuses.0.entry("not_queued".into()).or_default() += refused;
    }
    let posting_done = now_ns();
    let client_cpu = client_cpu.stop(posting_done);
    let ((sa, ta), (sb, tb)) = sampler.await.map_err(|e| e.to_string())?;
    // As in Herald's run: the client's counts by the nominal window, the broker's CPU by the
    // time between its two samples.
    let window_s = (window.1 - window.0) as f64 / 1e9;
    let sampled_s = (tb - ta) as f64 / 1e9;
    let expected_n = out.accepted.len() as u64;
    let until = Instant::now() + Duration::from_secs_f64(o.drain);
    while unique.load(Ordering::Relaxed) < expected_n && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_after = (now_ns() - posting_done) as f64 / 1e9;
    let _ = stop_tx.send(true);
    for s in subs {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    let c = finish(&tx).await;
    broker.stop().await;
    let mut lost = 0u64;
    for &s in &out.accepted {
        if !c.got[s as usize % m].contains(&s) {
            lost += 1;
        }
    }
    let cpu_window = match (sa, sb) {
        (Some((_, Some(a))), Some((_, Some(b)))) => Some(b - a),
        _ => None,
    };
    let errors = errors.lock().expect("not poisoned").json();
    Ok(json!({
        "scenario": "mqtt-deliver",
        "target": o.target.to_string(),
        "params": {"devices": m, "rate_per_s": o.rate, "duration_s": o.duration, "warmup_s": o.warmup,
                   "publishers": p, "qos": 1, "clean_session": false},
        "setup": {"subscribed": subscribed, "subscribe_failures": sub_fail.json(), "connect_s": round(connect_s, 2)},
        "window_s": round(window_s, 3),
        "sampled_s": round(sampled_s, 3),
        "rates": {
            "posts_accepted_per_s": round(out.accepted_in_window as f64 / window_s, 1),
            "deliveries_per_s": round(c.recv_in_window as f64 / window_s, 1),
            "acks_per_s": round(c.acks_in_window as f64 / window_s, 1),
        },
        "publish_status": out.statuses.json(),
        "posts": {"scheduled": total, "accepted": out.accepted.len(), "scheduler_lag_max_ms": round(lag_max as f64 / 1e6, 3), "send_lag": send_lag.summary()},
        "post_answer": out.answer.summary(),
        "e2e_delivery": c.e2e.summary(),
        "e2e_delivery_incl_warmup": c.e2e_all.summary(),
        "deliveries": {
            "expected": expected_n,
            "received_unique": c.unique.load(Ordering::Relaxed),
            "received_total": c.recv_total,
            "acks_sent": c.acks_total,
            "lost": lost,
            "duplicates": c.dups,
            "stale_from_other_runs": c.stale,
            "drained_after_s": round(drained_after, 3),
            "subscriber_errors": errors,
        },
        "broker": {
            "pid": broker_pid,
            "rss_kib_window_end": sb.and_then(|s| s.0),
            "cpu_s_in_window": cpu_window.map(|x| round(x, 3)),
            "cpu_cores_used": cpu_window.map(|x| round(x / sampled_s, 3)),
            "cpu_us_per_delivery": match cpu_window { Some(x) if c.recv_in_window > 0 => Some(round(x / c.recv_in_window as f64 * 1e6, 2)), _ => None },
        },
        "client": client_cpu.report(),
    }))
}
