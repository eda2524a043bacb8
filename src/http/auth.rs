//! Who is calling: the bearer credential of a request, resolved to a role. Authentication reads
//! and never writes (DESIGN.md, invariant 5). Secrets are compared by their SHA-256 only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;

use super::limits::{client_ip, retry_after_secs};
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

/// Resolves a presented secret to a principal, or `401`. An address that presented too many
/// wrong credentials lately is answered `429` (with `Retry-After`) for any credential that would
/// need a database look-up, until its allowance refills; the admin token and credentials already
/// known (cached) still pass, so clients sharing the address (a NAT) are not locked out by a
/// guesser. A request without a credential is a plain `401` and does not count.
pub async fn authenticate(
    state: &AppState,
    ip: Option<IpAddr>,
    secret: Option<String>,
) -> Result<Principal, ApiError> {
    let secret = secret.filter(|s| !s.is_empty() && s.len() <= MAX_SECRET_CHARS);
    let Some(secret) = secret else {
        return Err(ApiError::unauthorized());
    };
    let hash = hash_secret(&secret);
    if state.admin.matches(&hash) {
        return Ok(Principal::Admin);
    }
    if let Some(known) = state.auth_cache.get(&hash) {
        return Ok(known);
    }
    let limiter = &state.limits.auth_failures;
    if let Some(ip) = ip {
        if let Err(wait) = limiter.peek(ip) {
            return Err(ApiError::too_many(
                "too_many_failed_attempts",
                "too many requests with a wrong credential from this address; retry later",
                retry_after_secs(wait),
            ));
        }
    }
    let result = look_up(state, &secret, hash).await;
    if let (Err(e), Some(ip)) = (&result, ip) {
        if e.status() == actix_web::http::StatusCode::UNAUTHORIZED {
            limiter.record(ip);
        }
    }
    result
}

/// Resolves a secret that is neither the admin token nor cached, from the database.
async fn look_up(state: &AppState, secret: &str, hash: String) -> Result<Principal, ApiError> {
    let generation = state.auth_cache.generation();
    let deadline = state.db.deadline();
    let key = hash.clone();
    let found = match SecretKind::of(secret) {
        Some(SecretKind::ServiceKey) => state
            .db
            .read(deadline, move |c| {
                queries::service_key_by_hash(c, &key).map_err(DbError::from)
            })
            .await?
            .map(|key_id| Principal::Service { key_id }),
        Some(SecretKind::DeviceToken) => state
            .db
            .read(deadline, move |c| {
                queries::device_by_hash(c, &key).map_err(DbError::from)
            })
            .await?
            .map(|d| {
                Principal::Device(DeviceIdentity {
                    device_id: d.id,
                    user_id: d.user_id,
                    name: d.name,
                })
            }),
        _ => None,
    };
    let principal = found.ok_or_else(ApiError::unauthorized)?;
    state.auth_cache.put(hash, principal.clone(), generation);
    Ok(principal)
}

/// Credentials resolved recently, so a busy service's every post does not cost a database read.
/// Entries live `AUTH_CACHE_TTL`; revoking a key or device on this node removes its entries at
/// once, and a look-up that raced the revocation is not cached (the generation check).
#[derive(Default)]
pub struct AuthCache {
    entries: Mutex<HashMap<String, (Principal, Instant)>>,
    /// Bumped by every revocation; a look-up started under an older generation is not cached.
    generation: AtomicU64,
}

/// How long a resolved credential is trusted without asking the database again.
const AUTH_CACHE_TTL: Duration = Duration::from_secs(30);
/// Most credentials cached; past it the cache starts over.
const AUTH_CACHE_MAX: usize = 100_000;

impl AuthCache {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Principal, Instant)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, hash: &str) -> Option<Principal> {
        let entries = self.entries();
        let (principal, at) = entries.get(hash)?;
        (at.elapsed() < AUTH_CACHE_TTL).then(|| principal.clone())
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn put(&self, hash: String, principal: Principal, generation: u64) {
        let mut entries = self.entries();
        if self.generation() != generation {
            return;
        }
        if entries.len() >= AUTH_CACHE_MAX {
            entries.clear();
        }
        entries.insert(hash, (principal, Instant::now()));
    }

    /// Forgets every cached credential (a revocation may have been missed).
    pub fn forget_all(&self) {
        let mut entries = self.entries();
        self.generation.fetch_add(1, Ordering::SeqCst);
        entries.clear();
    }

    /// Forgets every credential of this service key or device (called after its revocation
    /// has committed).
    pub fn forget(&self, revoked: &str) {
        let mut entries = self.entries();
        self.generation.fetch_add(1, Ordering::SeqCst);
        entries.retain(|_, (p, _)| match p {
            Principal::Service { key_id } => key_id != revoked,
            Principal::Device(d) => d.device_id != revoked,
            Principal::Admin => true,
        });
    }
}

impl FromRequest for Principal {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let secret = bearer(req);
        let ip = state
            .as_ref()
            .and_then(|s| client_ip(req, &s.limits.trusted_proxies));
        Box::pin(async move {
            let state = state.ok_or_else(ApiError::internal)?;
            authenticate(&state, ip, secret).await
        })
    }
}
