//! The OpenAPI 3.1 description of the HTTP API, generated from the code: each handler carries a
//! `#[utoipa::path]` annotation (method, path, parameters, body, every answer it can give) and each
//! request and answer type derives `ToSchema`, so the document changes with the handlers. It is
//! served at `GET /openapi.json` without authentication; `scripts/schemathesis` tests the live
//! server against it and `tests/api/openapi.rs` checks it lists every route.
//!
//! The error answers shared by every endpoint are defined here once, as response components.

use std::collections::HashMap;
use std::sync::OnceLock;

use actix_web::HttpResponse;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::openapi::header::Header;
use utoipa::openapi::schema::{Object, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema, ToResponse, ToSchema};

use super::{devices, notifications, ops, presence, service_keys};
use crate::domain::{MAX_ID_CHARS, MAX_USER_ID_CHARS};

/// Free text as the server accepts it: no control characters (Unicode category Cc, which is what
/// `char::is_control` refuses); lengths are given beside it, in characters. utoipa's attributes
/// take only literals, so the handlers' `#[schema]`/`#[param]` attributes repeat it.
const TEXT_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]*$";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald",
        description = "A realtime notification server: backend services post notifications over \
            HTTP, devices receive them on a WebSocket (`GET /v1/ws`), with durable delivery, \
            replay and acks. This document is generated from the server's code; the contract is \
            API.md. Every non-2xx answer has the JSON body `{\"error\": {\"code\", \"message\"}}`.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        ops::healthz,
        ops::readyz,
        serve,
        service_keys::create,
        service_keys::list,
        service_keys::revoke,
        devices::create,
        devices::list,
        devices::revoke,
        notifications::post,
        notifications::status,
        presence::list,
        presence::user,
        ops::stats,
        ops::metrics,
        websocket,
    ),
    components(
        schemas(ErrorBody),
        responses(
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            PayloadTooLarge,
            Unprocessable,
            TooManyRequests,
            Unavailable,
        ),
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "operations", description = "Health, readiness, statistics, metrics."),
        (name = "service keys", description = "The keys backend services use (admin only)."),
        (name = "devices", description = "Users' devices and their tokens."),
        (name = "notifications", description = "Posting notifications and reading their delivery."),
        (name = "presence", description = "Who is online now (admin only)."),
        (name = "websocket", description = "A device's session: see API.md for its frames."),
    ),
)]
pub struct ApiDoc;

/// The document as JSON. utoipa cannot say everything the server checks, so a few facts are
/// written onto its output here: `Retry-After` is always sent with a `429` or `503`, and a
/// notification needs at least one target.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
    if let Some(responses) = doc
        .pointer_mut("/components/responses")
        .and_then(Value::as_object_mut)
    {
        for response in responses.values_mut() {
            if let Some(h) = response.pointer_mut("/headers/Retry-After") {
                h["required"] = json!(true);
            }
        }
    }
    if let Some(post) = doc.pointer_mut("/components/schemas/PostNotification") {
        post["anyOf"] = json!([
            {"required": ["user_ids"], "properties": {"user_ids": {"minItems": 1}}},
            {"required": ["device_ids"], "properties": {"device_ids": {"minItems": 1}}},
            {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
        ]);
    }
    doc
}

/// The methods the document gives the path `pattern` (as the router writes it, `/v1/devices/{id}`),
/// for the `Allow` header of a `405`: `"DELETE"`, `"GET, POST"`.
pub fn allowed_methods(pattern: &str) -> Option<&'static str> {
    static TABLE: OnceLock<HashMap<String, String>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let doc = document();
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        paths
            .into_iter()
            .map(|(path, item)| {
                let mut methods: Vec<String> = item
                    .as_object()
                    .map(|ops| ops.keys().map(|m| m.to_ascii_uppercase()).collect())
                    .unwrap_or_default();
                methods.sort();
                (path, methods.join(", "))
            })
            .collect()
    });
    table.get(pattern).map(String::as_str)
}

/// `GET /openapi.json`: this document, built once.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "This OpenAPI document.", body = serde_json::Value)),
)]
pub async fn serve() -> HttpResponse {
    static JSON: OnceLock<String> = OnceLock::new();
    let body = JSON.get_or_init(|| document().to_string());
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body.as_str())
}

/// Opens the WebSocket session of a device (frames and close codes: API.md). The credential is a
/// device token, in `Authorization: Bearer` or, for browsers, `?token=`; it is checked before the
/// upgrade. Handled by `http::ws::upgrade`; described here.
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "websocket",
    security(("bearer" = []), ("device_token_query" = [])),
    responses(
        (status = 101, description = "Switching Protocols: the session is open; the first \
            frame is `hello`."),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 429, response = TooManyRequests),
        (status = 503, response = Unavailable),
    )
)]
#[allow(dead_code)] // a description only
fn websocket() {}

/// The body of every error answer.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // a schema only: `ApiError` writes it
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // a schema only
struct ErrorDetail {
    /// Stable, for programs.
    #[schema(pattern = "^[a-z][a-z0-9_]*$", example = "invalid_request")]
    code: String,
    /// For people; may change.
    message: String,
}

/// A `user_id`: 1–128 characters, no control characters.
pub struct UserId;

impl PartialSchema for UserId {
    fn schema() -> RefOr<Schema> {
        text(1, MAX_USER_ID_CHARS)
    }
}

impl ToSchema for UserId {}

/// An id of ours given by a client: 1–64 characters, no control characters.
pub struct DeviceId;

impl PartialSchema for DeviceId {
    fn schema() -> RefOr<Schema> {
        text(1, MAX_ID_CHARS)
    }
}

impl ToSchema for DeviceId {}

fn text(min: usize, max: usize) -> RefOr<Schema> {
    Object::builder()
        .schema_type(Type::String)
        .min_length(Some(min))
        .max_length(Some(max))
        .pattern(Some(TEXT_PATTERN))
        .into()
}

/// An error answer: the JSON error body, and `Retry-After` (whole seconds) if `retry_after`.
fn error_response(description: &str, retry_after: bool) -> RefOr<Response> {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        Content::new(Some(Ref::from_schema_name("ErrorBody"))),
    );
    if retry_after {
        let seconds = Object::builder()
            .schema_type(Type::Integer)
            .minimum(Some(1));
        let mut header = Header::new(seconds);
        header.description = Some("Seconds to wait before retrying.".into());
        response = response.header("Retry-After", header);
    }
    response.build().into()
}

/// Declares the shared error answers as response components.
macro_rules! error_responses {
    ($($name:ident: $retry_after:expr, $description:expr;)+) => {$(
        #[doc = $description]
        pub struct $name;

        impl<'r> ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<Response>) {
                (stringify!($name), error_response($description, $retry_after))
            }
        }
    )+};
}

error_responses! {
    BadRequest: false, "The request is malformed: a body that is not JSON (`invalid_json`), a bad \
        query string (`invalid_query`, `missing_user_id`), a bad `Idempotency-Key` \
        (`invalid_idempotency_key`), or, on `/v1/ws`, not a WebSocket handshake \
        (`not_a_websocket`).";
    Unauthorized: false, "No credential, or not a valid one (`unauthorized`).";
    Forbidden: false, "The credential is valid but its role may not do this (`forbidden`).";
    NotFound: false, "No such object (`not_found`).";
    PayloadTooLarge: false, "The body, or a notification's payload, is over its limit \
        (`too_large`).";
    Unprocessable: false, "The body is JSON but not a valid request: wrong types, missing or \
        unknown fields, values past their limits (`invalid_request`), an unknown device \
        (`unknown_device`), an `Idempotency-Key` reused for another request \
        (`idempotency_key_reused`).";
    TooManyRequests: true, "This client address sent too many wrong credentials lately \
        (`too_many_failed_attempts`), or, on `/v1/ws`, opens connections too fast \
        (`too_many_connections`) or its user has too many devices online (`too_many_sessions`).";
    Unavailable: true, "The database is unavailable, overloaded or too slow (`overloaded`, \
        `database_timeout`, `database_unavailable`, `database_busy`, `not_ready`): retry after \
        `Retry-After` seconds.";
}

/// The credentials: a bearer token (admin token, service key or device token), and for
/// `/v1/ws` a device token in the query string.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer <token>`: the admin token, a service key or a \
                         device token, as the operation allows.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "device_token_query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "A device token in `?token=`, for browsers (`/v1/ws` only).",
            ))),
        );
    }
}
