//! The API error type: what a client is told (a status, a stable snake_case code and a message)
//! as opposed to the cause, which is logged and never sent. Handlers return `Result<_, ApiError>`.

use std::fmt;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};

use crate::actors::db::JobError;
use crate::domain::Invalid;

/// Seconds a client is told to wait after a `503`.
const RETRY_AFTER_SECONDS: u32 = 1;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds for `Retry-After` (a `429`; every `503` carries one too).
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// `429 Too Many Requests`, with the seconds after which a retry can succeed.
    pub fn too_many(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer credential is required",
        )
    }
    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this credential may not do that",
        )
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
    pub fn code(&self) -> &'static str {
        self.code
    }
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after {
            res.insert_header((header::RETRY_AFTER, secs.to_string()));
        } else if self.status == StatusCode::SERVICE_UNAVAILABLE {
            res.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECONDS.to_string()));
        }
        res.json(serde_json::json!({"error": {"code": self.code, "message": self.message}}))
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::unprocessable("invalid_request", e.to_string())
    }
}

/// A database outcome becomes `503` when waiting could help and `500` when it is a bug; the cause
/// is logged here, once, and never sent.
impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        use diesel::result::{DatabaseErrorKind as K, Error as Q};
        match e {
            JobError::Overloaded => {
                ApiError::unavailable("overloaded", "the server is busy; retry shortly")
            }
            JobError::Timeout => {
                ApiError::unavailable("database_timeout", "the database did not answer in time")
            }
            JobError::Unavailable(cause) => {
                log::warn!("database unavailable: {cause}");
                ApiError::unavailable("database_unavailable", "the database is unavailable")
            }
            JobError::Query(q)
                if crate::db::is_connection_lost(&q)
                    || matches!(q, Q::DatabaseError(K::SerializationFailure, _)) =>
            {
                log::warn!("database error: {q}");
                ApiError::unavailable("database_unavailable", "the database is unavailable")
            }
            JobError::Query(q) => {
                // SQLite reports a lock held past the busy timeout, and PostgreSQL a statement
                // cancelled by its timeout, as plain errors; both mean "not now", not "bug".
                let text = q.to_string();
                if text.contains("locked") || text.contains("timeout") || text.contains("canceling")
                {
                    log::warn!("database busy: {text}");
                    ApiError::unavailable("database_busy", "the database is busy; retry shortly")
                } else {
                    log::error!("query failed: {text}");
                    ApiError::internal()
                }
            }
            JobError::Panicked => ApiError::internal(),
        }
    }
}
