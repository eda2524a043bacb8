//! `/v1/presence`: who is online, for the admin. Answered from the Presence actor, so it is exact.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{AppState, Principal};
use crate::actors::messages::{ListPresence, OnlineSince};
use crate::db::{queries, DbError};
use crate::domain::{self, rfc3339};
use crate::error::ApiError;

/// Devices per page when `limit` is not given, and the most a page may hold.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    user_id: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

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
    let page = state
        .presence
        .send(ListPresence {
            user_id: q.user_id,
            after: q.after,
            limit,
        })
        .await
        .map_err(|_| ApiError::internal())?;
    Ok(HttpResponse::Ok().json(page))
}

#[derive(Serialize)]
struct UserDevice {
    device_id: String,
    name: String,
    online: bool,
    connected_at: Option<String>,
    last_seen: Option<String>,
}

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
        .map_err(|_| ApiError::internal())?;
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
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "user_id": user_id,
        "online": any_online,
        "devices": devices,
    })))
}
