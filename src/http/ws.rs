//! `GET /v1/ws`: authenticates a device before the upgrade, then hands the socket to a Session.

use actix_web::{web, HttpRequest, HttpResponse};

use super::auth::{authenticate, bearer};
use super::{AppState, Principal};
use crate::actors::session::{self, SessionDeps};
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
    stream: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let device = match authenticate(&state, device_secret(&req)).await? {
        Principal::Device(d) => d,
        _ => return Err(ApiError::forbidden()),
    };
    let deps = SessionDeps {
        presence: state.presence.clone(),
        committer: state.committer.clone(),
        db: state.db.clone(),
        metrics: state.metrics.clone(),
    };
    session::start(&req, stream, device, state.session.clone(), deps).map_err(|e| {
        ApiError::bad_request(
            "not_a_websocket",
            format!("WebSocket handshake failed: {e}"),
        )
    })
}
