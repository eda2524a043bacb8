//! `/v1/notifications`: services post notifications and read their delivery status.

use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use utoipa::{IntoParams, ToSchema};

use super::openapi::{
    BadRequest, DeviceId, Forbidden, NotFound, PayloadTooLarge, TooManyRequests, Unauthorized,
    Unavailable, Unprocessable, UserId,
};
use super::{parse_json, read_json_bytes, AppState, Principal};
use crate::actors::handoff;
use crate::actors::messages::SubmitPost;
use crate::db::batch::{PostAnswer, PostInput, PostRejection};
use crate::db::queries::{self, STATE_ACKED, STATE_DELIVERED};
use crate::db::DbError;
use crate::domain::{self, new_id, now_ms, rfc3339, Invalid, MAX_PAYLOAD_BYTES, MAX_TARGETS};
use crate::error::ApiError;

const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// A notification to post: at least one target among `user_ids`, `device_ids` and `user_id`, at
/// most 1000 in all.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PostNotification)]
struct PostBody {
    /// Users whose devices (those that exist now) get the notification.
    #[serde(default)]
    #[schema(value_type = Vec<UserId>, max_items = 1000)]
    user_ids: Vec<String>,
    /// Devices that get the notification; an unknown one is a `422`.
    #[serde(default)]
    #[schema(value_type = Vec<DeviceId>, max_items = 1000)]
    device_ids: Vec<String>,
    /// One more user, for a single-user post.
    #[schema(required = false, value_type = Option<UserId>)]
    user_id: Option<String>,
    /// Any JSON value, at most 64 KiB serialized.
    #[schema(value_type = serde_json::Value)]
    payload: Box<RawValue>,
    /// Seconds until the notification expires: 1–2,592,000 [default: 86,400].
    #[schema(required = false, minimum = 1, maximum = 2_592_000)]
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
    // The payload is kept as the client sent it, so it must be JSON every client can read back:
    // nested at most 128 deep and with no lone UTF-16 surrogate in its escapes (serde_json's
    // rules, and within what common parsers accept). Otherwise a device could not parse the
    // notification, so could never ack it, and would get it again on every reconnect.
    if let Err(e) = serde_json::from_str::<ReadableJson>(payload) {
        return Err(ApiError::unprocessable(
            "invalid_request",
            format!("payload: not JSON that devices can read back ({e})"),
        ));
    }
    let ttl = domain::parse_ttl(body.ttl_seconds)?;
    Ok((user_ids, device_ids, payload.to_owned(), ttl * 1000))
}

/// Any JSON value, read through and dropped as it is read: the payload check of [`validate`]
/// without building a `serde_json::Value` (a node and an allocation per value). It goes through
/// the same parser paths as a `Value` does — every string and key decoded, so a lone surrogate is
/// an error; arrays and objects nested at most 128 deep — and accepts what a `Value` accepts,
/// except an object whose first key is serde_json's private raw-value marker (which a `Value`
/// reads specially, and which a device parsing with serde_json's `raw_value` feature could not
/// read back as an object): such a payload is refused.
struct ReadableJson;

/// The key serde_json (with `raw_value`) treats as a raw value when it comes first in an object.
const RAW_VALUE_MARKER: &str = "$serde_json::private::RawValue";

/// Reads an object's first key: whether it is [`RAW_VALUE_MARKER`].
struct IsRawValueMarker;

impl<'de> serde::de::DeserializeSeed<'de> for IsRawValueMarker {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for IsRawValueMarker {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<bool, E> {
        Ok(key == RAW_VALUE_MARKER)
    }
}

impl<'de> Deserialize<'de> for ReadableJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ReadableJson)
    }
}

impl<'de> serde::de::Visitor<'de> for ReadableJson {
    type Value = ReadableJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(ReadableJson)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(ReadableJson)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(ReadableJson)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(ReadableJson)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(ReadableJson)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(ReadableJson)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<ReadableJson>()?.is_some() {}
        Ok(ReadableJson)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        match map.next_key_seed(IsRawValueMarker)? {
            None => return Ok(ReadableJson),
            Some(true) => {
                return Err(serde::de::Error::custom(format!(
                    "the key {RAW_VALUE_MARKER:?} is reserved"
                )))
            }
            Some(false) => map.next_value::<ReadableJson>()?,
        };
        while map.next_entry::<ReadableJson, ReadableJson>()?.is_some() {}
        Ok(ReadableJson)
    }
}

/// What `POST /v1/notifications` does to a body before it touches the database (parse, then the
/// limits of API.md): the entry point of the `notification_request` fuzz target (`fuzz/`).
pub fn check_notification_request(body: &[u8]) -> Result<(), ApiError> {
    validate(parse_json(body)?).map(|_| ())
}

/// The headers of a post.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // a description only: `post` reads the header itself
struct PostHeaders {
    /// Repeating a post with the same key from the same credential within 24 h creates nothing
    /// new and answers the first answer again; the same key with another body is a `422`.
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 128,
        pattern = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"
    )]
    idempotency_key: Option<String>,
}

/// Posts a notification. The answer is sent once it is durably committed.
#[utoipa::path(
    post,
    path = "/v1/notifications",
    operation_id = "post_notification",
    tag = "notifications",
    security(("bearer" = [])),
    params(PostHeaders),
    request_body = PostBody,
    responses(
        (status = 202, description = "The notification is committed.", body = PostAnswer),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = Unprocessable),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
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
    handoff::send(
        &state.committer,
        SubmitPost {
            post,
            deadline,
            reply,
        },
    );
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

/// Where a notification stands on one device.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Delivery)]
struct DeliveryView {
    device_id: String,
    #[schema(value_type = DeliveryState)]
    state: &'static str,
    /// When it was first handed to a session of the device, or `null`.
    #[schema(format = DateTime, required = true)]
    delivered_at: Option<String>,
    /// When the device acked it, or `null`.
    #[schema(format = DateTime, required = true)]
    acked_at: Option<String>,
}

/// The `state` of a delivery.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // a schema only: `DeliveryView::state` is written as a string
enum DeliveryState {
    Pending,
    Delivered,
    Acked,
    Expired,
}

/// The answer of `GET /v1/notifications/{id}`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NotificationStatus {
    id: String,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    expires_at: String,
    /// The payload as it was posted.
    #[schema(value_type = serde_json::Value)]
    payload: Box<RawValue>,
    deliveries: Vec<DeliveryView>,
}

/// A notification and its delivery to each target device. The admin may read any; a service,
/// those it posted.
#[utoipa::path(
    get,
    path = "/v1/notifications/{id}",
    operation_id = "notification_status",
    tag = "notifications",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The notification's `id`.")),
    responses(
        (status = 200, description = "The notification.", body = NotificationStatus),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub async fn status(
    who: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    who.require_service()?;
    let id = path.into_inner();
    if domain::parse_id("id", &id).is_err() {
        // Never one of ours (and a NUL would not even reach PostgreSQL).
        return Err(ApiError::not_found("notification"));
    }
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
    Ok(HttpResponse::Ok().json(NotificationStatus {
        id: n.id,
        created_at: rfc3339(n.created_at),
        expires_at: rfc3339(n.expires_at),
        payload,
        deliveries,
    }))
}

#[cfg(test)]
mod tests {
    use super::ReadableJson;

    /// The payload check accepts what parsing into a `serde_json::Value` accepts (but for
    /// serde_json's raw-value marker, below).
    #[test]
    fn readable_json_accepts_what_a_value_accepts() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let cases = [
            r#"{"a":1,"b":[true,false,null],"c":{"d":"e"}}"#.to_string(),
            r#""plain""#.into(),
            r#""\ud83d\ude00 and \n escapes""#.into(),
            r#""\ud800 lone""#.into(),
            r#"{"\udc00":1}"#.into(),
            r#"{"a":1,"a":2}"#.into(),
            "1e400".into(),
            "-0.5e-3".into(),
            "18446744073709551616".into(),
            "[1,]".into(),
            "{\"a\" 1}".into(),
            "\"unterminated".into(),
            "".into(),
            "nul".into(),
            deep(128),
            deep(129),
        ];
        for case in &cases {
            let as_value = serde_json::from_str::<serde_json::Value>(case).is_ok();
            let checked = serde_json::from_str::<ReadableJson>(case).is_ok();
            assert_eq!(checked, as_value, "{case:?}");
        }
        // serde_json's private raw-value marker as the first key is refused, whatever follows
        // (a `Value` would read `{"…": "1"}` as the number 1); later in an object it is a key.
        for marked in [
            r#"{"$serde_json::private::RawValue":"1"}"#,
            r#"{"$serde_json::private::RawValue":"x"}"#,
            r#"{"$serde_json::private::RawValue":1,"a":2}"#,
            r#"[{"$serde_json::private::RawValue":"{}"}]"#,
        ] {
            assert!(
                serde_json::from_str::<ReadableJson>(marked).is_err(),
                "{marked}"
            );
        }
        assert!(serde_json::from_str::<ReadableJson>(
            r#"{"a":1,"$serde_json::private::RawValue":2}"#
        )
        .is_ok());
        // The cases cover both answers.
        assert!(cases
            .iter()
            .any(|c| serde_json::from_str::<ReadableJson>(c).is_ok()));
        assert!(cases
            .iter()
            .any(|c| serde_json::from_str::<ReadableJson>(c).is_err()));
    }
}
