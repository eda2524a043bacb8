//! The HTTP API of API.md: the route table, shared state, and request-body parsing.
//!
//! Handlers parse and authorize, then send one message to the executor, the Committer or Presence,
//! and answer. Every error leaves as JSON (`{"error":{"code","message"}}`), including 404/405.

mod auth;
mod devices;
pub mod limits;
mod notifications;
mod openapi;
mod ops;
mod presence;
mod service_keys;
pub mod upgrade;
mod ws;

use std::sync::Arc;

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

pub use auth::{AdminCredential, AuthCache, Principal};
pub use devices::new_device;
pub use notifications::check_notification_request;

use crate::actors::committer::Committer;
use crate::actors::db::Db;
use crate::actors::presence::Presence;
use crate::actors::session::SessionConfig;
use crate::error::ApiError;
use crate::stats::Counters;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub presence: Addr<Presence>,
    pub committer: Addr<Committer>,
    pub admin: AdminCredential,
    pub auth_cache: Arc<AuthCache>,
    pub counters: Arc<Counters>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub session: SessionConfig,
    /// Sockets taken over by sessions whose writer is still running.
    pub sockets: crate::actors::socket::OpenSockets,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Per-address rate limits.
    pub limits: Arc<limits::Limits>,
}

/// Mounts every route. actix-web tries them in this order, and a pattern with a `{…}` segment is
/// tried with a regex: posting a notification, the request that comes at 10,000s a second, is
/// matched first.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/notifications").route(web::post().to(notifications::post)))
        .service(resource("/v1/ws").route(web::get().to(ws::upgrade)))
        .service(resource("/healthz").route(web::get().to(ops::healthz)))
        .service(resource("/readyz").route(web::get().to(ops::readyz)))
        .service(resource("/openapi.json").route(web::get().to(openapi::serve)))
        .service(
            resource("/v1/service-keys")
                .route(web::post().to(service_keys::create))
                .route(web::get().to(service_keys::list)),
        )
        .service(resource("/v1/service-keys/{id}").route(web::delete().to(service_keys::revoke)))
        .service(
            resource("/v1/devices")
                .route(web::post().to(devices::create))
                .route(web::get().to(devices::list)),
        )
        .service(resource("/v1/devices/{id}").route(web::delete().to(devices::revoke)))
        .service(resource("/v1/notifications/{id}").route(web::get().to(notifications::status)))
        .service(resource("/v1/presence").route(web::get().to(presence::list)))
        .service(resource("/v1/presence/users/{user_id}").route(web::get().to(presence::user)))
        .service(resource("/v1/stats").route(web::get().to(ops::stats)))
        .service(resource("/metrics").route(web::get().to(ops::metrics)))
        .default_service(web::to(not_found));
}

/// A resource whose unmatched methods answer a JSON 405.
fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint",
    ))
}

/// A JSON `405` with the `Allow` header RFC 9110 requires: the methods the OpenAPI document gives
/// this resource (`tests/api/openapi.rs` checks the document against the route table).
async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    use actix_web::ResponseError;
    let mut res = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed here",
    )
    .error_response();
    if let Some(allow) = req
        .match_pattern()
        .as_deref()
        .and_then(openapi::allowed_methods)
    {
        res.headers_mut().insert(
            actix_web::http::header::ALLOW,
            actix_web::http::header::HeaderValue::from_static(allow),
        );
    }
    res
}

/// Reads a JSON body of at most `limit` bytes. Syntax errors are `400 invalid_json`; wrong types,
/// missing or unknown fields are `422 invalid_request`; too long a body is `413`.
pub async fn read_json<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<T, ApiError> {
    parse_json(&read_json_bytes(req, payload, limit).await?)
}

/// Reads a request body of at most `limit` bytes (`413` past it).
pub async fn read_json_bytes(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    let too_large = || ApiError::too_large(format!("the request body is limited to {limit} bytes"));
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|_| ApiError::bad_request("bad_body", "the request body could not be read"))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Parses a JSON body, classifying the error as [`read_json`] documents. The body must be a JSON
/// object: serde would otherwise also fill a struct from an array of its fields in order.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::unprocessable("invalid_request", e.to_string())
        }
        _ => ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}")),
    })?;
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::unprocessable(
            "invalid_request",
            "the body must be a JSON object",
        ));
    }
    Ok(value)
}

/// `201 Created` with a JSON body.
pub fn created<T: serde::Serialize>(body: &T) -> HttpResponse {
    HttpResponse::Created().json(body)
}

/// Query strings that do not parse are a JSON `400`, like everything else.
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|e, _| ApiError::bad_request("invalid_query", e.to_string()).into())
}
