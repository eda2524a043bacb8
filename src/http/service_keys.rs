//! `/v1/service-keys`: admin-only management of the keys backend services post with.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{created, read_json, AppState, Principal};
use crate::db::queries::{self, ServiceKeyRow};
use crate::db::DbError;
use crate::domain::{self, generate_secret, hash_secret, new_id, now_ms, rfc3339, SecretKind};
use crate::error::ApiError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
}

#[derive(Serialize)]
struct KeyView {
    id: String,
    name: String,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

impl KeyView {
    fn of(row: ServiceKeyRow, key: Option<String>) -> Self {
        KeyView {
            id: row.id,
            name: row.name,
            created_at: rfc3339(row.created_at),
            key,
        }
    }
}

pub async fn create(
    who: Principal,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    who.require_admin()?;
    let body: CreateKey = read_json(&req, body, state.max_body_bytes).await?;
    domain::parse_key_name(&body.name)?;
    let key = generate_secret(SecretKind::ServiceKey);
    let row = ServiceKeyRow {
        id: new_id(),
        name: body.name,
        key_hash: hash_secret(&key),
        created_at: now_ms(),
        revoked_at: None,
    };
    let stored = row.clone();
    state
        .db
        .write(state.db.deadline(), move |c| {
            queries::insert_service_key(c, &stored).map_err(DbError::from)
        })
        .await?;
    log::info!("service key {} ({:?}) created", row.id, row.name);
    Ok(created(&KeyView::of(row, Some(key))))
}

pub async fn list(who: Principal, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    who.require_admin()?;
    let rows = state
        .db
        .read(state.db.deadline(), |c| {
            queries::list_service_keys(c).map_err(DbError::from)
        })
        .await?;
    let keys: Vec<KeyView> = rows.into_iter().map(|r| KeyView::of(r, None)).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "service_keys": keys })))
}

pub async fn revoke(
    who: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    who.require_admin()?;
    let id = path.into_inner();
    state.auth_cache.forget(&id);
    let target = id.clone();
    let revoked = state
        .db
        .write(state.db.deadline(), move |c| {
            queries::revoke_service_key(c, &target, now_ms()).map_err(DbError::from)
        })
        .await?;
    // Forgotten once the revocation has committed, so no cached credential outlives it.
    state.auth_cache.forget(&id);
    if !revoked {
        return Err(ApiError::not_found("service key"));
    }
    log::info!("service key {id} revoked");
    Ok(HttpResponse::NoContent().finish())
}
