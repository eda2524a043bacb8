//! Health, readiness and statistics.

use std::time::Duration;

use actix_web::{web, HttpResponse};

use super::{AppState, Principal};
use crate::actors::messages::CountSessions;
use crate::error::ApiError;
use crate::stats::Counters;

/// How long `/readyz` waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    match state.db.ping(READY_TIMEOUT).await {
        Ok(()) => Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))),
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

pub async fn stats(who: Principal, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    who.require_admin()?;
    let sessions = sessions(&state).await?;
    let c = &state.counters;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "sessions": sessions,
        "db_pool": state.db.pool_snapshot(),
        "executor": state.db.queue_snapshot(),
        "notifications": {
            "accepted": Counters::get(&c.accepted),
            "delivered": Counters::get(&c.delivered),
            "acked": Counters::get(&c.acked),
        },
        "writes": {
            "transactions": Counters::get(&c.write_batches),
            "items": Counters::get(&c.write_items),
        },
        "uptime_seconds": c.started.elapsed().as_secs(),
    })))
}
