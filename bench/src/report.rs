//! Latency histograms, clocks and the report.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A monotonic clock expressed as UNIX nanoseconds: the shared epoch of send timestamps.
/// It is read once from the system clock and then advanced by `Instant`, so a clock step
/// during a run cannot distort latencies.
struct Clock {
    base: Instant,
    base_unix_ns: u64,
}

static CLOCK: OnceLock<Clock> = OnceLock::new();

fn clock() -> &'static Clock {
    CLOCK.get_or_init(|| Clock {
        base: Instant::now(),
        base_unix_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64,
    })
}

/// Now, in nanoseconds since the UNIX epoch.
pub fn now_ns() -> u64 {
    let c = clock();
    c.base_unix_ns + c.base.elapsed().as_nanos() as u64
}

/// The `Instant` at which `now_ns()` reads `ns`.
pub fn instant_at(ns: u64) -> Instant {
    let c = clock();
    if ns >= c.base_unix_ns {
        c.base + Duration::from_nanos(ns - c.base_unix_ns)
    } else {
        c.base
    }
}

/// A latency histogram in microseconds (1 µs to 1 h, 3 significant digits).
pub struct Lat(Histogram<u64>);

impl Default for Lat {
    fn default() -> Self {
        Lat(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"))
    }
}

impl Lat {
    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record((ns / 1000).max(1));
    }
    pub fn add(&mut self, other: &Lat) {
        let _ = self.0.add(&other.0);
    }
    /// `{count, p50_ms, p90_ms, p99_ms, p999_ms, max_ms}`.
    pub fn summary(&self) -> Value {
        if self.0.is_empty() {
            return json!({"count": 0});
        }
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        json!({
            "count": self.0.len(),
            "p50_ms": ms(self.0.value_at_quantile(0.50)),
            "p90_ms": ms(self.0.value_at_quantile(0.90)),
            "p99_ms": ms(self.0.value_at_quantile(0.99)),
            "p999_ms": ms(self.0.value_at_quantile(0.999)),
            "max_ms": ms(self.0.max()),
        })
    }
    /// `summary()` plus `"buckets": [[µs, count], …]` (the histogram's recorded values), so that
    /// `herald-bench sum` can merge several processes' histograms exactly.
    pub fn summary_with_buckets(&self) -> Value {
        let mut v = self.summary();
        let buckets: Vec<[u64; 2]> = self
            .0
            .iter_recorded()
            .map(|b| [b.value_iterated_to(), b.count_at_value()])
            .collect();
        v["buckets"] = json!(buckets);
        v
    }
    /// Adds what `summary_with_buckets` wrote.
    pub fn add_buckets(&mut self, v: &Value) -> bool {
        let Some(buckets) = v["buckets"].as_array() else {
            return false;
        };
        for b in buckets {
            if let (Some(us), Some(n)) = (b[0].as_u64(), b[1].as_u64()) {
                let _ = self.0.record_n(us.max(1), n);
            }
        }
        true
    }
}

/// Answer counts by HTTP status ("202", "503", …, "io_error", "timeout").
#[derive(Default, Clone)]
pub struct Statuses(pub BTreeMap<String, u64>);

impl Statuses {
    pub fn add(&mut self, key: impl Into<String>) {
        *self.0.entry(key.into()).or_default() += 1;
    }
    pub fn merge(&mut self, other: &Statuses) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }
    pub fn json(&self) -> Value {
        json!(self.0)
    }
}

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Writes the report (pretty JSON) to `path`.
pub fn write(path: &std::path::Path, report: &Value) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(report).expect("JSON serializes");
    text.push('\n');
    std::fs::write(path, text)
}

/// The pacer's shortest sleep.
const PACER_TICK_NS: u64 = 250_000;

/// Open-loop pacing on a thread of its own, awaited until it ends: calls `send(seq, sent_ns)` for `seq` in
/// `0..total`, each at its intended send time `t0 + seq × interval_ns` (or at once, if that has
/// passed), until `send` returns `false`. Returns how far behind schedule a send ever was
/// (`scheduler_lag_max_ms`: since the pacer thread this includes the tick's own lateness, up to
/// 250 µs; before, only sends made without sleeping counted).
/// Latency is always measured from `sent_ns`, never from when the send actually happened.
///
/// Not a tokio timer: those tick in whole milliseconds, so a sender sleeping on one woke up to
/// 1 ms late and sent in bursts of ~10 at 10,000/s — ~0.5 ms of every reported latency (p99
/// ~2 ms), for Herald and Mosquitto alike, was the load generator's own lateness. This thread
/// sleeps on the kernel's high-resolution timer, with its timer slack set to 1 µs, and wakes at
/// most every `PACER_TICK_NS`: waking for every send (every 100 µs at 10,000/s) cost the client
/// 11 % of a core more than this tick — taken from the server on a 2-core machine — for 0.1 ms
/// less send lag. Measured at 10,000/s: send lag p50 0.42 → 0.18 ms, p99 1.7 → 0.65–0.92 ms.
pub async fn pace(
    t0: u64,
    interval_ns: f64,
    total: u64,
    mut send: impl FnMut(u64, u64) -> bool + Send + 'static,
) -> Result<u64, String> {
    let pacer = std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || {
            // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and changes only this thread.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong);
            }
            let mut lag_max = 0u64;
            for seq in 0..total {
                let sent_ns = t0 + (seq as f64 * interval_ns) as u64;
                let mut now = now_ns();
                // Within 20 µs of the send time a sleep would only add its own wake-up delay:
                // spin the rest, so that nothing is ever sent before its time.
                while sent_ns > now + 20_000 {
                    let nap = (sent_ns - now).max(PACER_TICK_NS);
                    std::thread::sleep(Duration::from_nanos(nap));
                    now = now_ns();
                }
                while now < sent_ns {
                    std::hint::spin_loop();
                    now = now_ns();
                }
                lag_max = lag_max.max(now - sent_ns);
                if !send(seq, sent_ns) {
                    break;
                }
            }
            lag_max
        })
        .map_err(|e| format!("cannot start the pacer thread: {e}"))?;
    // The thread sleeps through the run: it is joined off the runtime's threads.
    tokio::task::spawn_blocking(move || pacer.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the pacer thread panicked".to_string())
}

/// `herald-bench sum`: one report for a run made of several `deliver` processes (lined up with
/// `--start-at`). Client-side rates and counts are added up; latency histograms are merged
/// exactly (from their buckets); server-side rates are taken once per distinct node (several
/// processes may watch the same one).
pub fn sum(paths: &[std::path::PathBuf]) -> Result<Value, String> {
    let mut reports = Vec::new();
    for p in paths {
        let text =
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        if !matches!(v["scenario"].as_str(), Some("deliver" | "replay")) {
            return Err(format!("{} is not a deliver report", p.display()));
        }
        reports.push(v);
    }
    let add = |path: &[&str]| -> f64 {
        reports
            .iter()
            .map(|r| {
                let mut cur = r;
                for k in path {
                    cur = &cur[*k];
                }
                cur.as_f64().unwrap_or(0.0)
            })
            .sum()
    };
    let mut lat = BTreeMap::new();
    for key in ["post_answer", "e2e_delivery"] {
        let mut h = Lat::default();
        let mut exact = true;
        for r in &reports {
            if r[key]["count"].as_u64().unwrap_or(0) > 0 {
                exact &= h.add_buckets(&r[key]);
            }
        }
        let mut s = h.summary();
        if !exact {
            s["note"] = json!("some reports had no buckets: incomplete");
        }
        lat.insert(key, s);
    }
    let mut statuses = Statuses::default();
    let mut closed = Statuses::default();
    for r in &reports {
        for (src, dst) in [
            (&r["http_status"], &mut statuses),
            (&r["deliveries"]["sessions_closed_by_server"], &mut closed),
        ] {
            if let Some(o) = src.as_object() {
                for (k, v) in o {
                    *dst.0.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
                }
            }
        }
    }
    // Server figures once per node watched.
    let mut nodes = BTreeMap::new();
    for r in &reports {
        let t = r["target"].as_str().unwrap_or("?").to_owned();
        nodes.entry(t).or_insert_with(|| {
            json!({
                "accepted_per_s": r["rates"]["server_accepted_per_s"],
                "delivered_per_s": r["rates"]["server_delivered_per_s"],
                "acked_per_s": r["rates"]["server_acked_per_s"],
                "cpu_cores_used": r["server"]["cpu_cores_used"],
                "rss_kib_window_end": r["server"]["rss_kib_window_end"],
                "stats_after": r["server"]["stats_after"],
            })
        });
    }
    let node_sum = |k: &str| -> f64 { nodes.values().map(|n| n[k].as_f64().unwrap_or(0.0)).sum() };
    let starts: Vec<u64> = reports
        .iter()
        .filter_map(|r| r["window_unix_ns"][0].as_u64())
        .collect();
    let skew_ms = match (starts.iter().min(), starts.iter().max()) {
        (Some(a), Some(b)) => Some(round((b - a) as f64 / 1e6, 3)),
        _ => None,
    };
    let windows: Vec<Value> = reports.iter().map(|r| r["window_s"].clone()).collect();
    let pairs: Vec<Value> = reports
        .iter()
        .map(|r| json!({"devices_at": r["target"], "posts_to": r["post_target"], "label": r["label"]}))
        .collect();
    Ok(json!({
        "scenario": "deliver-sum",
        "label": format!("{} processes", reports.len()),
        "processes": pairs,
        "window_s": windows,
        "window_start_skew_ms": skew_ms,
        "params": {
            "devices": add(&["params", "devices"]) as u64,
            "rate_per_s": add(&["params", "rate_per_s"]),
        },
        "setup": {"connected": add(&["setup", "connected"]) as u64},
        "rates": {
            "posts_accepted_per_s": round(add(&["rates", "posts_accepted_per_s"]), 1),
            "deliveries_per_s": round(add(&["rates", "deliveries_per_s"]), 1),
            "acks_per_s": round(add(&["rates", "acks_per_s"]), 1),
            "server_accepted_per_s": round(node_sum("accepted_per_s"), 1),
            "server_delivered_per_s": round(node_sum("delivered_per_s"), 1),
            "server_acked_per_s": round(node_sum("acked_per_s"), 1),
        },
        "http_status": statuses.json(),
        "post_answer": lat["post_answer"],
        "e2e_delivery": lat["e2e_delivery"],
        "deliveries": {
            "expected_online": add(&["deliveries", "expected_online"]) as u64,
            "received_unique": add(&["deliveries", "received_unique"]) as u64,
            "lost": add(&["deliveries", "lost"]) as u64,
            "undelivered_to_devices_that_failed_to_connect":
                add(&["deliveries", "undelivered_to_devices_that_failed_to_connect"]) as u64,
            "duplicates": add(&["deliveries", "duplicates"]) as u64,
            "received_of_posts_not_answered_202":
                add(&["deliveries", "received_of_posts_not_answered_202"]) as u64,
            "stale_from_other_runs": add(&["deliveries", "stale_from_other_runs"]) as u64,
            "sessions_closed_by_server": closed.json(),
        },
        "server": {
            "nodes": nodes,
            "cpu_cores_used": round(node_sum("cpu_cores_used"), 3),
            // All watched nodes' CPU over all the deliveries they made.
            "cpu_us_per_delivery": (node_sum("delivered_per_s") > 0.0).then(|| round(
                node_sum("cpu_cores_used") / node_sum("delivered_per_s") * 1e6, 1)),
        },
    }))
}
