//! Health, readiness and statistics.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::openapi::{Forbidden, TooManyRequests, Unauthorized, Unavailable};
use super::{AppState, Principal};
use crate::actors::db::QueueSnapshot;
use crate::actors::messages::CountSessions;
use crate::db::PoolSnapshot;
use crate::error::ApiError;
use crate::stats::Counters;

/// How long `/readyz` waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// A write batch running longer than this makes the node not ready: the database takes no writes.
pub const WRITER_STUCK: Duration = Duration::from_secs(30);

/// The answer of `/healthz` and `/readyz`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Health {
    /// `ok` (`/healthz`) or `ready` (`/readyz`).
    #[schema(value_type = String, pattern = "^(ok|ready)$")]
    status: &'static str,
}

/// Liveness: `200` while the process serves.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process serves.", body = Health)),
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// Readiness: `200` when the database answers within a second and the writer is not stuck on
/// one batch, else `503`.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "The database answers.", body = Health),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let since = Counters::get(&state.counters.writing_since_ms) as i64;
    let writing_ms = crate::domain::now_ms() - since;
    if since > 0 && writing_ms > WRITER_STUCK.as_millis() as i64 {
        log::error!(
            "not ready: one write batch has run for {} s",
            writing_ms / 1000
        );
        return Err(ApiError::unavailable(
            "not_ready",
            "the database takes no writes",
        ));
    }
    match state.db.ping(READY_TIMEOUT).await {
        Ok(()) => Ok(HttpResponse::Ok().json(Health { status: "ready" })),
        Err(e) => {
            log::warn!("not ready: {e}");
            Err(ApiError::unavailable(
                "not_ready",
                "the database does not answer",
            ))
        }
    }
}

/// Open sessions, from Presence.
async fn sessions(state: &AppState) -> Result<usize, ApiError> {
    state
        .presence
        .send(CountSessions)
        .await
        .map_err(|_| ApiError::internal())
}

/// Prometheus metrics, in the text exposition format; every name starts with `herald_`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The metrics.", body = String,
            content_type = "text/plain; version=0.0.4; charset=utf-8"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub async fn metrics(who: Principal, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    who.require_admin()?;
    let sessions = sessions(&state).await?;
    let text = state.metrics.render(
        sessions,
        &state.counters,
        &state.db.pool_snapshot(),
        &state.db.queue_snapshot(),
    );
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text))
}

/// The answer of `/v1/stats`. Counters may be added: clients ignore fields they do not know.
#[derive(Serialize, ToSchema)]
struct Stats {
    /// Live WebSocket sessions.
    sessions: usize,
    db_pool: PoolSnapshot,
    #[schema(value_type = ExecutorStats)]
    executor: QueueSnapshot,
    notifications: NotificationStats,
    writes: WriteStats,
    uptime_seconds: u64,
}

/// Notifications since the start.
#[derive(Serialize, ToSchema)]
struct NotificationStats {
    accepted: u64,
    delivered: u64,
    acked: u64,
}

/// The Committer's write transactions since the start, and the items they held.
#[derive(Serialize, ToSchema)]
struct WriteStats {
    /// Committed.
    transactions: u64,
    items: u64,
    /// Failed and rolled back (their acks, marks and last-seen times are retried).
    failed: u64,
}

/// The database executors' mailboxes: the schema of [`QueueSnapshot`].
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // a schema only
struct ExecutorStats {
    queue_depth: u64,
    max_queue_depth: u64,
    rejected: u64,
    timeouts: u64,
}

/// Counters for operators: sessions, the database pool and executors, notifications, writes.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The counters.", body = Stats),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub async fn stats(who: Principal, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    who.require_admin()?;
    let sessions = sessions(&state).await?;
    let c = &state.counters;
    Ok(HttpResponse::Ok().json(Stats {
        sessions,
        db_pool: state.db.pool_snapshot(),
        executor: state.db.queue_snapshot(),
        notifications: NotificationStats {
            accepted: Counters::get(&c.accepted),
            delivered: Counters::get(&c.delivered),
            acked: Counters::get(&c.acked),
        },
        writes: WriteStats {
            transactions: Counters::get(&c.write_batches),
            items: Counters::get(&c.write_items),
            failed: Counters::get(&c.write_failures),
        },
        uptime_seconds: c.started.elapsed().as_secs(),
    }))
}
