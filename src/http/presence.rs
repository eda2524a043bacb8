//! `/v1/presence`: who is online, for the admin. Answered from the Presence actor, so it is exact.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::openapi::{
    BadRequest, Forbidden, TooManyRequests, Unauthorized, Unavailable, Unprocessable,
};
use super::{AppState, Principal};
use crate::actors::messages::{ListPresence, OnlineSince};
use crate::db::{queries, DbError};
use crate::domain::{self, rfc3339};
use crate::error::ApiError;

/// Devices per page when `limit` is not given, and the most a page may hold.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this user's devices.
    #[param(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"
    )]
    user_id: Option<String>,
    /// Devices per page: 1–1000 [default: 100].
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `next` cursor of the previous page.
    #[param(min_length = 1, max_length = 64, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$")]
    after: Option<String>,
}

/// The answer of `GET /v1/presence`: the schema of [`crate::actors::messages::PresencePage`],
/// which Presence serializes (kept beside the handler, since the actors do not know about
/// OpenAPI; `scripts/schemathesis` and `tests/api/openapi.rs` check the two agree).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PresencePage)]
#[allow(dead_code)] // a schema only
struct PresencePageSchema {
    /// Devices online now (all of them, or the user's).
    online_devices: usize,
    /// Users with a device online now (all of them, or 0/1 for one user).
    online_users: usize,
    /// This page, by `device_id`.
    devices: Vec<OnlineDeviceSchema>,
    /// The cursor for the next page (`after`), or `null` on the last page.
    #[schema(required = true)]
    next: Option<String>,
}

/// One online device: the schema of [`crate::actors::messages::OnlineDevice`].
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = OnlineDevice)]
#[allow(dead_code)] // a schema only
struct OnlineDeviceSchema {
    device_id: String,
    user_id: String,
    name: String,
    #[schema(format = DateTime)]
    connected_at: String,
}

/// Who is online now, by `device_id`, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/presence",
    operation_id = "list_presence",
    tag = "presence",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "One page of the online devices.", body = PresencePageSchema),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Unprocessable),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub async fn list(
    who: Principal,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    who.require_admin()?;
    let q = query.into_inner();
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {MAX_LIMIT}"),
        ));
    }
    if let Some(u) = &q.user_id {
        domain::parse_user_id(u)?;
    }
    if let Some(a) = &q.after {
        // A cursor is a device id; one with control characters (a NUL, which PostgreSQL cannot
        // even compare) was never handed out.
        domain::parse_id("after", a)?;
    }
    let page = state
        .presence
        .send(ListPresence {
            user_id: q.user_id,
            after: q.after,
            limit,
        })
        .await
        .map_err(|_| ApiError::internal())??;
    Ok(HttpResponse::Ok().json(page))
}

/// One device of a user, online or not.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct UserDevice {
    device_id: String,
    name: String,
    online: bool,
    /// When its live session started, or `null` if it is offline.
    #[schema(format = DateTime, required = true)]
    connected_at: Option<String>,
    /// When a session of the device last ended, or `null` if none has.
    #[schema(format = DateTime, required = true)]
    last_seen: Option<String>,
}

/// The answer of `GET /v1/presence/users/{user_id}`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct UserPresence {
    user_id: String,
    /// Whether any of the user's devices is online.
    online: bool,
    devices: Vec<UserDevice>,
}

/// One user's devices and which of them are online. A user without devices is not an error: it
/// has none, and is offline.
#[utoipa::path(
    get,
    path = "/v1/presence/users/{user_id}",
    operation_id = "user_presence",
    tag = "presence",
    security(("bearer" = [])),
    params((
        "user_id" = String, Path, min_length = 1, max_length = 128, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$",
        description = "The user."
    )),
    responses(
        (status = 200, description = "The user's devices.", body = UserPresence),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Unprocessable),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub async fn user(
    who: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    who.require_admin()?;
    let user_id = path.into_inner();
    domain::parse_user_id(&user_id)?;
    let uid = user_id.clone();
    let rows = state
        .db
        .read(state.db.deadline(), move |c| {
            queries::devices_of_user(c, &uid).map_err(DbError::from)
        })
        .await?;
    let online = state
        .presence
        .send(OnlineSince {
            device_ids: rows.iter().map(|r| r.id.clone()).collect(),
        })
        .await
        .map_err(|_| ApiError::internal())??;
    let devices: Vec<UserDevice> = rows
        .into_iter()
        .map(|r| {
            let since = online.get(&r.id).copied();
            UserDevice {
                online: since.is_some(),
                connected_at: since.map(rfc3339),
                last_seen: r.last_seen.map(rfc3339),
                device_id: r.id,
                name: r.name,
            }
        })
        .collect();
    let any_online = devices.iter().any(|d| d.online);
    Ok(HttpResponse::Ok().json(UserPresence {
        user_id,
        online: any_online,
        devices,
    }))
}
