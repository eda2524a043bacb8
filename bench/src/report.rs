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

/// Open-loop pacing: waits until the intended send time `sent_ns` if it is still ahead, and
/// otherwise records in `lag_max` how far behind schedule the sender is. Latency is always
/// measured from `sent_ns`, never from when the send actually happened.
pub async fn pace(sent_ns: u64, lag_max: &mut u64) {
    let now = now_ns();
    if sent_ns > now + 200_000 {
        tokio::time::sleep_until(instant_at(sent_ns).into()).await;
    } else {
        *lag_max = (*lag_max).max(now.saturating_sub(sent_ns));
    }
}
