//! The Purger: on a schedule, deletes notifications that expired more than the retention ago,
//! in small batches — each its own short transaction on the writer thread, so posts and acks
//! interleave with a long purge instead of waiting behind it.
//!
//! Expired notifications stop being delivered at once (replay and live pushes skip them); the
//! retention only keeps their rows for the status API (state `expired` or `acked`).

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::db::Db;
use crate::db::{queries, write_tx, DbError};
use crate::domain::now_ms;
use crate::metrics::Metrics;

/// Notifications deleted per transaction.
const PURGE_BATCH: i64 = 500;
/// Batches per round, so one round cannot run for long; the rest waits for the next round.
const MAX_BATCHES_PER_ROUND: usize = 200;

pub struct Purger {
    db: Db,
    metrics: Arc<Metrics>,
    interval: Duration,
    retention_ms: i64,
    running: bool,
}

impl Purger {
    pub fn new(db: Db, metrics: Arc<Metrics>, interval: Duration, retention: Duration) -> Self {
        Purger {
            db,
            metrics,
            interval,
            retention_ms: retention.as_millis() as i64,
            running: false,
        }
    }
}

impl Actor for Purger {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |act, ctx| {
            if act.running {
                return;
            }
            act.running = true;
            let (db, metrics, cutoff) = (
                act.db.clone(),
                act.metrics.clone(),
                now_ms() - act.retention_ms,
            );
            async move { purge(&db, &metrics, cutoff).await }
                .into_actor(act)
                .map(|_, act, _| act.running = false)
                .spawn(ctx);
        });
    }
}

/// Deletes notifications that expired at or before `cutoff`, batch by batch.
async fn purge(db: &Db, metrics: &Metrics, cutoff: i64) {
    let mut purged = 0;
    for _ in 0..MAX_BATCHES_PER_ROUND {
        let batch = db
            .write(db.deadline(), move |c| {
                Ok::<_, DbError>(write_tx(c, |c| {
                    let seqs = queries::expired_before(c, cutoff, PURGE_BATCH)?;
                    let unacked = queries::delete_notifications(c, &seqs)?;
                    Ok((seqs.len(), unacked))
                })?)
            })
            .await;
        match batch {
            Ok((n, unacked)) => {
                purged += n;
                metrics.expired.inc_by(unacked);
                if (n as i64) < PURGE_BATCH {
                    break;
                }
            }
            Err(e) => {
                log::warn!("purge of expired notifications stopped: {e}");
                break;
            }
        }
    }
    if purged > 0 {
        log::info!("purged {purged} expired notification(s)");
    }
}
