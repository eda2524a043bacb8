//! `GET /v1/ws`: authenticates a device before the upgrade, then hands the socket to a Session.

use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};

use super::auth::{authenticate, bearer};
use super::limits::{client_ip, retry_after_secs};
use super::{AppState, Principal};
use crate::actors::messages::CanConnect;
use crate::actors::session::{self, SessionDeps};
use crate::actors::socket::UpgradeRequest;
use crate::error::ApiError;

/// The device token from `Authorization: Bearer`, or from `?token=` for browsers (which cannot
/// set headers on a WebSocket).
fn device_secret(req: &HttpRequest) -> Option<String> {
    bearer(req).or_else(|| {
        web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .ok()?
            .into_inner()
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
    })
}

pub async fn upgrade(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let ip = client_ip(&req, &state.limits.trusted_proxies);
    if let Some(ip) = ip {
        state.limits.connects.acquire(ip).map_err(|wait| {
            ApiError::too_many(
                "too_many_connections",
                "too many connection attempts from this address; retry later",
                retry_after_secs(wait),
            )
        })?;
    }
    let device = match authenticate(&state, ip, device_secret(&req)).await? {
        Principal::Device(d) => d,
        _ => return Err(ApiError::forbidden()),
    };
    let max_per_user = state.session.max_sessions_per_user;
    if max_per_user > 0 {
        let allowed = state
            .presence
            .send(CanConnect {
                user_id: device.user_id.clone(),
                device_id: device.device_id.clone(),
                max_per_user,
            })
            .await
            .map_err(|_| {
                ApiError::unavailable("overloaded", "the server is busy; retry shortly")
            })?;
        if !allowed {
            return Err(ApiError::too_many(
                "too_many_sessions",
                format!("this user already has {max_per_user} devices online"),
                5,
            ));
        }
    }
    let deps = SessionDeps {
        presence: state.presence.clone(),
        committer: state.committer.clone(),
        db: state.db.clone(),
        metrics: state.metrics.clone(),
        sockets: state.sockets.clone(),
    };
    if state.sockets.closing() {
        return Err(ApiError::unavailable(
            "shutting_down",
            "this node is shutting down; reconnect",
        ));
    }
    if req.extensions().get::<UpgradeRequest>().is_none() {
        // A handshake the HTTP layer did not route to the upgrade service (one with a chunked
        // body, say) has no socket to hand over.
        return Err(ApiError::bad_request(
            "not_a_websocket",
            "WebSocket handshake failed: not an upgrade request",
        ));
    }
    session::start(&req, device, state.session.clone(), deps).map_err(|e| {
        ApiError::bad_request(
            "not_a_websocket",
            format!("WebSocket handshake failed: {e}"),
        )
    })
}
