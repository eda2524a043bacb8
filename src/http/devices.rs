//! `/v1/devices`: services (and the admin) register, list and revoke users' devices.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::openapi::{
    BadRequest, Forbidden, NotFound, PayloadTooLarge, TooManyRequests, Unauthorized, Unavailable,
    Unprocessable,
};
use super::{created, read_json, AppState, Principal};
use crate::actors::messages::{OnlineSince, Revoke};
use crate::db::queries::{self, DeviceRow};
use crate::db::DbError;
use crate::domain::{self, generate_secret, hash_secret, new_id, now_ms, rfc3339, SecretKind};
use crate::error::ApiError;

/// A device to register for a user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateDevice {
    /// The user the device belongs to: 1–128 characters, no control characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$",
        example = "alice"
    )]
    user_id: String,
    /// A label for people: 0–128 characters, no control characters.
    #[serde(default)]
    #[schema(
        max_length = 128,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$",
        example = "Alice's phone"
    )]
    name: String,
}

/// A new device, with its token (shown this once).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = DeviceCreated)]
struct Created {
    device_id: String,
    user_id: String,
    name: String,
    token: String,
    #[schema(format = DateTime)]
    created_at: String,
}

/// One device of a user.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Device)]
struct DeviceView {
    device_id: String,
    user_id: String,
    name: String,
    #[schema(format = DateTime)]
    created_at: String,
    online: bool,
    /// When a session of the device last ended, or `null` if none has.
    #[schema(format = DateTime, required = true)]
    last_seen: Option<String>,
}

/// The answer of `GET /v1/devices`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DeviceList {
    devices: Vec<DeviceView>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Whose devices to list (required).
    #[param(
        required = true,
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"
    )]
    user_id: Option<String>,
}

/// Creates a device row with a fresh token; shared with the CLI's `device create`.
pub fn new_device(user_id: String, name: String) -> (DeviceRow, String) {
    let token = generate_secret(SecretKind::DeviceToken);
    let row = DeviceRow {
        id: new_id(),
        user_id,
        name,
        token_hash: hash_secret(&token),
        created_at: now_ms(),
        revoked_at: None,
        last_seen: None,
    };
    (row, token)
}

/// Registers a device for a user; the answer holds its token, shown this once.
#[utoipa::path(
    post,
    path = "/v1/devices",
    operation_id = "create_device",
    tag = "devices",
    security(("bearer" = [])),
    request_body = CreateDevice,
    responses(
        (status = 201, description = "The device was created.", body = Created),
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
    who.require_service()?;
    let body: CreateDevice = read_json(&req, body, state.max_body_bytes).await?;
    domain::parse_user_id(&body.user_id)?;
    domain::parse_device_name(&body.name)?;
    let (row, token) = new_device(body.user_id, body.name);
    let stored = row.clone();
    state
        .db
        .write(state.db.deadline(), move |c| {
            queries::insert_device(c, &stored).map_err(DbError::from)
        })
        .await?;
    log::info!("device {} created for user {:?}", row.id, row.user_id);
    Ok(created(&Created {
        device_id: row.id,
        user_id: row.user_id,
        name: row.name,
        token,
        created_at: rfc3339(row.created_at),
    }))
}

/// Lists a user's devices, with whether each is online now.
#[utoipa::path(
    get,
    path = "/v1/devices",
    operation_id = "list_devices",
    tag = "devices",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "The user's devices, oldest first.", body = DeviceList),
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
    who.require_service()?;
    let Some(user_id) = query.into_inner().user_id else {
        return Err(ApiError::bad_request(
            "missing_user_id",
            "give ?user_id= to list a user's devices",
        ));
    };
    domain::parse_user_id(&user_id)?;
    let rows = state
        .db
        .read(state.db.deadline(), move |c| {
            queries::devices_of_user(c, &user_id).map_err(DbError::from)
        })
        .await?;
    let online = state
        .presence
        .send(OnlineSince {
            device_ids: rows.iter().map(|r| r.id.clone()).collect(),
        })
        .await
        .map_err(|_| ApiError::internal())??;
    let devices: Vec<DeviceView> = rows
        .into_iter()
        .map(|r| DeviceView {
            online: online.contains_key(&r.id),
            last_seen: r.last_seen.map(rfc3339),
            device_id: r.id,
            user_id: r.user_id,
            name: r.name,
            created_at: rfc3339(r.created_at),
        })
        .collect();
    Ok(HttpResponse::Ok().json(DeviceList { devices }))
}

/// Revokes a device: its token is refused from then on, its live session is closed with 4001 and
/// its pending notifications are dropped.
#[utoipa::path(
    delete,
    path = "/v1/devices/{id}",
    operation_id = "revoke_device",
    tag = "devices",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The device's `device_id`.")),
    responses(
        (status = 204, description = "The device was revoked."),
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
    who.require_service()?;
    let device_id = path.into_inner();
    if domain::parse_id("id", &device_id).is_err() {
        // Never one of ours (and a NUL would not even reach PostgreSQL).
        return Err(ApiError::not_found("device"));
    }
    state.auth_cache.forget(&device_id);
    let target = device_id.clone();
    let revoked = state
        .db
        .write(state.db.deadline(), move |c| {
            queries::revoke_device(c, &target, now_ms()).map_err(DbError::from)
        })
        .await?;
    // Forgotten once the revocation has committed, so no cached credential outlives it.
    state.auth_cache.forget(&device_id);
    if revoked.is_none() {
        return Err(ApiError::not_found("device"));
    }
    state.presence.do_send(Revoke {
        device_id: device_id.clone(),
    });
    log::info!("device {device_id} revoked");
    Ok(HttpResponse::NoContent().finish())
}
