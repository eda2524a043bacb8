//! `/v1/notifications`: services post notifications and read their delivery status.

use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::{parse_json, read_json_bytes, AppState, Principal};
use crate::actors::messages::SubmitPost;
use crate::db::batch::{PostInput, PostRejection};
use crate::db::queries::{self, STATE_ACKED, STATE_DELIVERED};
use crate::db::DbError;
use crate::domain::{self, new_id, now_ms, rfc3339, Invalid, MAX_PAYLOAD_BYTES, MAX_TARGETS};
use crate::error::ApiError;

const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostBody {
    #[serde(default)]
    user_ids: Vec<String>,
    #[serde(default)]
    device_ids: Vec<String>,
    user_id: Option<String>,
    payload: Box<RawValue>,
    ttl_seconds: Option<i64>,
}

/// Checks a post against the limits of API.md and returns what the Committer needs.
fn validate(body: PostBody) -> Result<(Vec<String>, Vec<String>, String, i64), ApiError> {
    let mut user_ids = body.user_ids;
    user_ids.extend(body.user_id);
    let mut device_ids = body.device_ids;
    if user_ids.is_empty() && device_ids.is_empty() {
        return Err(Invalid {
            field: "user_ids",
            reason: "give at least one of user_ids or device_ids".into(),
        }
        .into());
    }
    if user_ids.len() + device_ids.len() > MAX_TARGETS {
        return Err(Invalid {
            field: "user_ids",
            reason: format!("at most {MAX_TARGETS} targets per post"),
        }
        .into());
    }
    for u in &user_ids {
        domain::parse_user_id(u)?;
    }
    for d in &device_ids {
        domain::parse_id("device_ids", d)?;
    }
    user_ids.sort_unstable();
    user_ids.dedup();
    device_ids.sort_unstable();
    device_ids.dedup();
    let payload = body.payload.get();
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(ApiError::too_large(format!(
            "the payload is limited to {MAX_PAYLOAD_BYTES} bytes"
        )));
    }
    let ttl = domain::parse_ttl(body.ttl_seconds)?;
    Ok((user_ids, device_ids, payload.to_owned(), ttl * 1000))
}

pub async fn post(
    who: Principal,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    who.require_service()?;
    let idempotency_key = match req.headers().get(IDEMPOTENCY_HEADER) {
        None => None,
        Some(v) => {
            let key = v.to_str().map_err(|_| {
                ApiError::bad_request("invalid_idempotency_key", "Idempotency-Key must be ASCII")
            })?;
            domain::parse_idempotency_key(key)
                .map_err(|e| ApiError::bad_request("invalid_idempotency_key", e.to_string()))?;
            Some(key.to_owned())
        }
    };
    let bytes = read_json_bytes(&req, body, state.max_body_bytes).await?;
    let (user_ids, device_ids, payload, ttl_ms) = validate(parse_json(&bytes)?)?;
    let request_hash = idempotency_key
        .as_ref()
        .map(|_| request_fingerprint(&bytes));
    let post = PostInput {
        id: new_id(),
        poster: who.poster(),
        idempotency_key,
        request_hash,
        user_ids,
        device_ids,
        payload,
        ttl_ms,
    };
    let deadline = state.db.deadline();
    let (reply, answer) = oneshot::channel();
    state.committer.do_send(SubmitPost {
        post,
        deadline,
        reply,
    });
    let wait = deadline.saturating_duration_since(Instant::now());
    let answer = match tokio::time::timeout(wait, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_dropped)) => Err(PostRejection::Unavailable),
        Err(_elapsed) => Err(PostRejection::Timeout),
    };
    match answer {
        Ok(a) => Ok(HttpResponse::Accepted().json(a)),
        Err(why) => Err(rejection(why)),
    }
}

/// SHA-256 of the body in a canonical form (keys sorted, no whitespace), so a retry of the same
/// request matches its first try however the client spaced or ordered it.
fn request_fingerprint(body: &[u8]) -> String {
    let canonical = serde_json::from_slice::<serde_json::Value>(body)
        .map(|v| v.to_string().into_bytes())
        .unwrap_or_else(|_| body.to_vec());
    hex::encode(Sha256::digest(&canonical))
}

fn rejection(why: PostRejection) -> ApiError {
    match why {
        PostRejection::UnknownDevices(ids) => ApiError::unprocessable(
            "unknown_device",
            format!("no such device: {}", ids.join(", ")),
        ),
        PostRejection::KeyReused => ApiError::unprocessable(
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request",
        ),
        PostRejection::Overloaded => {
            ApiError::unavailable("overloaded", "the server is busy; retry shortly")
        }
        PostRejection::Timeout => ApiError::unavailable(
            "database_timeout",
            "the notification could not be committed in time; retry with the same Idempotency-Key",
        ),
        PostRejection::Unavailable => {
            ApiError::unavailable("database_unavailable", "the database is unavailable")
        }
        PostRejection::Internal => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        ),
    }
}

#[derive(Serialize)]
struct DeliveryView {
    device_id: String,
    state: &'static str,
    delivered_at: Option<String>,
    acked_at: Option<String>,
}

pub async fn status(
    who: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    who.require_service()?;
    let id = path.into_inner();
    let found = state
        .db
        .read(state.db.deadline(), move |c| {
            let Some(n) = queries::notification_by_id(c, &id)? else {
                return Ok(None);
            };
            let deliveries = queries::deliveries_of(c, n.seq)?;
            Ok::<_, DbError>(Some((n, deliveries)))
        })
        .await?;
    let Some((n, deliveries)) = found else {
        return Err(ApiError::not_found("notification"));
    };
    if !matches!(who, Principal::Admin) && n.poster != who.poster() {
        return Err(ApiError::forbidden());
    }
    let now = now_ms();
    let deliveries: Vec<DeliveryView> = deliveries
        .into_iter()
        .map(|d| DeliveryView {
            state: match d.state {
                STATE_ACKED => "acked",
                _ if n.expires_at <= now => "expired",
                STATE_DELIVERED => "delivered",
                _ => "pending",
            },
            device_id: d.device_id,
            delivered_at: d.delivered_at.map(rfc3339),
            acked_at: d.acked_at.map(rfc3339),
        })
        .collect();
    let payload: Box<RawValue> =
        RawValue::from_string(n.payload).map_err(|_| ApiError::internal())?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": n.id,
        "created_at": rfc3339(n.created_at),
        "expires_at": rfc3339(n.expires_at),
        "payload": payload,
        "deliveries": deliveries,
    })))
}
