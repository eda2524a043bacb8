//! `/v1/service-keys`: admin-only management of the keys backend services post with.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::openapi::{
    BadRequest, Forbidden, NotFound, PayloadTooLarge, TooManyRequests, Unauthorized, Unavailable,
    Unprocessable,
};
use super::{created, read_json, AppState, Principal};
use crate::db::queries::{self, ServiceKeyRow};
use crate::db::DbError;
use crate::domain::{self, generate_secret, hash_secret, new_id, now_ms, rfc3339, SecretKind};
use crate::error::ApiError;

/// A service key to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateServiceKey)]
struct CreateKey {
    /// A label for people: 1–128 characters, no control characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$",
        example = "billing"
    )]
    name: String,
}

/// A service key; `key`, the secret itself, only in the answer that created it.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ServiceKey)]
struct KeyView {
    id: String,
    name: String,
    #[schema(format = DateTime)]
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    key: Option<String>,
}

/// The answer of `GET /v1/service-keys`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ServiceKeyList {
    service_keys: Vec<KeyView>,
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

/// Creates a service key; the answer holds the key, shown this once.
#[utoipa::path(
    post,
    path = "/v1/service-keys",
    operation_id = "create_service_key",
    tag = "service keys",
    security(("bearer" = [])),
    request_body = CreateKey,
    responses(
        (status = 201, description = "The key was created; `key` is in the answer.", body = KeyView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = Unprocessable),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
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

/// Lists the keys not revoked, oldest first, without their secrets.
#[utoipa::path(
    get,
    path = "/v1/service-keys",
    operation_id = "list_service_keys",
    tag = "service keys",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The live keys, oldest first.", body = ServiceKeyList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub async fn list(who: Principal, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    who.require_admin()?;
    let rows = state
        .db
        .read(state.db.deadline(), |c| {
            queries::list_service_keys(c).map_err(DbError::from)
        })
        .await?;
    let keys: Vec<KeyView> = rows.into_iter().map(|r| KeyView::of(r, None)).collect();
    Ok(HttpResponse::Ok().json(ServiceKeyList { service_keys: keys }))
}

/// Revokes a service key: it is refused from then on.
#[utoipa::path(
    delete,
    path = "/v1/service-keys/{id}",
    operation_id = "revoke_service_key",
    tag = "service keys",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The key's `id`.")),
    responses(
        (status = 204, description = "The key was revoked."),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
pub async fn revoke(
    who: Principal,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    who.require_admin()?;
    let id = path.into_inner();
    if domain::parse_id("id", &id).is_err() {
        // Never one of ours (and a NUL would not even reach PostgreSQL).
        return Err(ApiError::not_found("service key"));
    }
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
