//! Prometheus metrics for `GET /metrics`, all named `herald_…` with units in their names and
//! `_total` on counters. Event-driven ones (latencies, closes by code, HTTP requests) are recorded
//! where they happen; totals Herald already keeps for `/v1/stats` are brought up to date at each
//! scrape, so nothing is counted twice on the hot path. Nothing secret is ever a label.

use std::sync::Mutex;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::actors::db::QueueSnapshot;
use crate::db::PoolSnapshot;
use crate::stats::Counters;

/// Buckets for latencies measured in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    /// Serializes scrapes, so the catch-up of totals below never counts a delta twice.
    scrape: Mutex<()>,
    pub sessions_open: IntGauge,
    pub connects: IntCounter,
    pub disconnects: IntCounterVec,
    accepted: IntCounter,
    delivered: IntCounter,
    acked: IntCounter,
    pub expired: IntCounter,
    /// Post committed → frame written to the session's socket buffer.
    pub delivery_latency: Histogram,
    pool_size: IntGauge,
    pool_idle: IntGauge,
    pool_in_use: IntGauge,
    pool_waits: IntCounter,
    pool_timeouts: IntCounter,
    queue_depth: IntGauge,
    queue_rejected: IntCounter,
    /// Time a database job holds an executor thread.
    pub job_duration: Histogram,
    pub http_requests: IntCounterVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("metric definitions are valid and registered once")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
            must(r.register(Box::new(m.clone())));
            m
        }
        let counter = |name: &str, help: &str| reg(&registry, must(IntCounter::new(name, help)));
        let gauge = |name: &str, help: &str| reg(&registry, must(IntGauge::new(name, help)));
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            reg(&registry, must(Histogram::with_opts(opts)))
        };
        Metrics {
            sessions_open: gauge("herald_sessions_open", "WebSocket sessions open now."),
            connects: counter(
                "herald_session_connects_total",
                "WebSocket sessions started.",
            ),
            disconnects: reg(
                &registry,
                must(IntCounterVec::new(
                    Opts::new(
                        "herald_session_disconnects_total",
                        "WebSocket sessions ended, by close code.",
                    ),
                    &["code"],
                )),
            ),
            accepted: counter(
                "herald_notifications_accepted_total",
                "Notifications committed.",
            ),
            delivered: counter(
                "herald_notifications_delivered_total",
                "Deliveries written to a device's socket (marked delivered).",
            ),
            acked: counter(
                "herald_notifications_acked_total",
                "Deliveries acked by their device.",
            ),
            expired: counter(
                "herald_notifications_expired_total",
                "Deliveries that expired unacked (counted when purged).",
            ),
            delivery_latency: histogram(
                "herald_delivery_latency_seconds",
                "From a notification's commit to its frame being written to a live session.",
            ),
            pool_size: gauge(
                "herald_db_pool_size_connections",
                "Connections in the database pool.",
            ),
            pool_idle: gauge(
                "herald_db_pool_idle_connections",
                "Pooled connections not checked out.",
            ),
            pool_in_use: gauge(
                "herald_db_pool_in_use_connections",
                "Pooled connections checked out.",
            ),
            pool_waits: counter(
                "herald_db_pool_waits_total",
                "Checkouts that found no idle connection.",
            ),
            pool_timeouts: counter("herald_db_pool_timeouts_total", "Checkouts that timed out."),
            queue_depth: gauge(
                "herald_executor_queue_depth_jobs",
                "Database jobs waiting or running.",
            ),
            queue_rejected: counter(
                "herald_executor_rejected_total",
                "Database jobs refused because the executor's mailbox was full.",
            ),
            job_duration: histogram(
                "herald_executor_job_duration_seconds",
                "Time a database job held an executor thread and its connection.",
            ),
            http_requests: reg(
                &registry,
                must(IntCounterVec::new(
                    Opts::new(
                        "herald_http_requests_total",
                        "HTTP requests answered, by route and status.",
                    ),
                    &["route", "status"],
                )),
            ),
            scrape: Mutex::new(()),
            registry,
        }
    }

    /// Brings the scrape-time values up to date and renders the text exposition format.
    pub fn render(
        &self,
        sessions: usize,
        counters: &Counters,
        pool: &PoolSnapshot,
        queue: &QueueSnapshot,
    ) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let catch_up = |c: &IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        self.sessions_open.set(sessions as i64);
        catch_up(&self.accepted, Counters::get(&counters.accepted));
        catch_up(&self.delivered, Counters::get(&counters.delivered));
        catch_up(&self.acked, Counters::get(&counters.acked));
        self.pool_size.set(pool.size.into());
        self.pool_idle.set(pool.idle.into());
        self.pool_in_use.set(pool.in_use.into());
        catch_up(&self.pool_waits, pool.waits);
        catch_up(&self.pool_timeouts, pool.timeouts);
        self.queue_depth.set(queue.queue_depth as i64);
        catch_up(&self.queue_rejected, queue.rejected);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
