//! Who is calling: the bearer credential of a request, resolved to a role. Authentication reads
//! and never writes (DESIGN.md, invariant 5). Secrets are compared by their SHA-256 only.

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;

use super::AppState;
use crate::actors::session::DeviceIdentity;
use crate::db::{queries, DbError};
use crate::domain::{constant_time_eq, hash_secret, SecretKind};
use crate::error::ApiError;

/// Longer presented secrets are refused without a look-up.
const MAX_SECRET_CHARS: usize = 256;

/// The admin token, held only as its hash.
#[derive(Clone)]
pub struct AdminCredential {
    hash: String,
}

impl AdminCredential {
    pub fn from_token(token: &str) -> Self {
        AdminCredential {
            hash: hash_secret(token),
        }
    }
    fn matches(&self, hash: &str) -> bool {
        constant_time_eq(self.hash.as_bytes(), hash.as_bytes())
    }
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub enum Principal {
    Admin,
    Service { key_id: String },
    Device(DeviceIdentity),
}

impl Principal {
    /// Who a post is recorded as coming from: `admin` or the service key's id.
    pub fn poster(&self) -> String {
        match self {
            Principal::Admin => "admin".into(),
            Principal::Service { key_id } => key_id.clone(),
            Principal::Device(d) => format!("device:{}", d.device_id),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            _ => Err(ApiError::forbidden()),
        }
    }

    pub fn require_service(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin | Principal::Service { .. } => Ok(()),
            Principal::Device(_) => Err(ApiError::forbidden()),
        }
    }
}

/// The token of `Authorization: Bearer <token>`, if the header is there and well-formed.
pub fn bearer(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Resolves a presented secret to a principal, or `401`.
pub async fn authenticate(state: &AppState, secret: Option<String>) -> Result<Principal, ApiError> {
    let secret = secret.filter(|s| !s.is_empty() && s.len() <= MAX_SECRET_CHARS);
    let Some(secret) = secret else {
        return Err(ApiError::unauthorized());
    };
    let hash = hash_secret(&secret);
    if state.admin.matches(&hash) {
        return Ok(Principal::Admin);
    }
    let deadline = state.db.deadline();
    match SecretKind::of(&secret) {
        Some(SecretKind::ServiceKey) => {
            let found = state
                .db
                .read(deadline, move |c| {
                    queries::service_key_by_hash(c, &hash).map_err(DbError::from)
                })
                .await?;
            found
                .map(|key_id| Principal::Service { key_id })
                .ok_or_else(ApiError::unauthorized)
        }
        Some(SecretKind::DeviceToken) => {
            let found = state
                .db
                .read(deadline, move |c| {
                    queries::device_by_hash(c, &hash).map_err(DbError::from)
                })
                .await?;
            found
                .map(|d| {
                    Principal::Device(DeviceIdentity {
                        device_id: d.id,
                        user_id: d.user_id,
                        name: d.name,
                    })
                })
                .ok_or_else(ApiError::unauthorized)
        }
        _ => Err(ApiError::unauthorized()),
    }
}

impl FromRequest for Principal {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let secret = bearer(req);
        Box::pin(async move {
            let state = state.ok_or_else(ApiError::internal)?;
            authenticate(&state, secret).await
        })
    }
}
