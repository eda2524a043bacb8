//! Counters of what a node has done since it started, for `/v1/stats`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Debug)]
pub struct Counters {
    pub started: Instant,
    /// Notifications committed (each counted once, however many devices it targets).
    pub accepted: AtomicU64,
    /// Deliveries marked as written to a device's socket.
    pub delivered: AtomicU64,
    /// Deliveries acked by their device.
    pub acked: AtomicU64,
    /// Write transactions committed by the Committer (each a whole batch).
    pub write_batches: AtomicU64,
    /// Items (posts, acks, delivery marks, last-seen times) those batches carried.
    pub write_items: AtomicU64,
    /// Write transactions that failed (their work is retried after a pause).
    pub write_failures: AtomicU64,
    /// When the batch being written now was started (ms since the epoch), 0 when none is.
    pub writing_since_ms: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            started: Instant::now(),
            accepted: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            write_batches: AtomicU64::new(0),
            write_items: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            writing_since_ms: AtomicU64::new(0),
        }
    }
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
