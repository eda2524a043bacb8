//! The HTTP API against API.md, black-box: health and routing errors, roles and credentials,
//! service keys, devices, posting notifications (validation, limits, idempotency), delivery
//! status, presence and stats. Every non-2xx answer is checked for the JSON error shape.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use awc::http::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    ids_with_control_characters_are_never_found,
    health_and_readiness_answer_200,
    unknown_path_is_404_json,
    wrong_method_is_405_json,
    every_endpoint_refuses_missing_or_unknown_credentials,
    revoked_service_key_is_refused_everywhere,
    deleted_device_token_is_refused_everywhere,
    device_token_is_forbidden_on_service_and_admin_endpoints,
    service_key_is_forbidden_on_admin_endpoints,
    admin_may_call_every_endpoint,
    services_read_only_the_status_of_their_own_notifications,
    websocket_refuses_bad_credentials_before_upgrade,
    websocket_accepts_a_token_in_the_query,
    service_key_create_list_revoke,
    service_key_revoke_unknown_is_404,
    service_key_names_are_validated,
    device_create_answers_its_shape,
    device_user_id_and_name_limits,
    device_list_shows_online_and_last_seen,
    device_list_needs_a_user_id,
    device_delete_then_again_is_404,
    deleting_a_connected_device_closes_it_and_drops_its_notifications,
    post_answers_202_with_its_shape,
    post_rejects_malformed_bodies,
    post_target_rules,
    post_ttl_bounds,
    post_payload_limit_is_413,
    post_body_over_the_limit_is_413,
    idempotent_repeat_answers_the_first_answer_and_delivers_once,
    idempotent_concurrent_repeats_agree,
    idempotency_key_reused_with_another_body_is_422,
    idempotency_keys_are_per_credential,
    idempotency_key_length_is_checked,
    status_answers_its_shape,
    status_of_unknown_notification_is_404,
    status_walks_pending_delivered_acked,
    status_turns_expired_after_the_ttl,
    presence_counts_and_pages_every_online_device_once,
    presence_filters_by_user,
    presence_limit_is_bounded,
    presence_of_a_user,
    stats_answer_their_shape,
);

// ---------------------------------------------------------------------------------------------
// Local helpers

/// An id shaped like ours that names nothing.
const NO_SUCH_ID: &str = "00000000-0000-7000-8000-000000000000";

/// Asserts a non-2xx answer: the status and `{"error":{"code","message"}}`, with a snake_case
/// code (equal to `code` when given) and a non-empty message.
#[track_caller]
fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: Option<&str>) {
    assert_eq!(status, want, "body: {body}");
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("a JSON object error body, got {body}"));
    assert_eq!(obj.len(), 1, "only `error` at the top level: {body}");
    let c = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("error.code is a string: {body}"));
    assert!(
        !c.is_empty()
            && c.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'),
        "error.code is snake_case: {body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error.message is a non-empty string: {body}"
    );
    if let Some(code) = code {
        assert_eq!(c, code, "{body}");
    }
}

/// Asserts `v` is an object holding every one of `fields`.
#[track_caller]
fn assert_fields(v: &Value, fields: &[&str]) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("an object, got {v}"));
    for f in fields {
        assert!(obj.contains_key(*f), "field `{f}` missing from {v}");
    }
}

/// An RFC 3339 time from the API.
#[track_caller]
fn time(v: &Value) -> SystemTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("a time string, got {v}"));
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("RFC 3339 time, got {s:?}: {e}"))
}

/// `b - a` in whole milliseconds (negative when `b` is earlier).
fn millis_between(a: SystemTime, b: SystemTime) -> i128 {
    match b.duration_since(a) {
        Ok(d) => d.as_millis() as i128,
        Err(e) => -(e.duration().as_millis() as i128),
    }
}

/// A request with a raw body and extra headers; returns status and JSON body.
async fn raw(
    app: &TestApp,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let (s, _, v) = app
        .call_raw(
            method,
            path,
            token,
            body.map(|b| b.as_bytes().to_vec()),
            headers,
        )
        .await;
    (s, v)
}

/// Posts a notification with an `Idempotency-Key`.
async fn post_idem(app: &TestApp, token: &str, idem: &str, body: &Value) -> (StatusCode, Value) {
    let (s, _, v) = app
        .call_raw(
            "POST",
            "/v1/notifications",
            Some(token),
            Some(body.to_string().into_bytes()),
            &[("Idempotency-Key", idem)],
        )
        .await;
    (s, v)
}

/// Who may call an endpoint.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Admin,
    Service,
}

/// One authenticated endpoint of API.md's table (except `/metrics`, which is not JSON, and
/// `/v1/ws`, which is a WebSocket; both have their own tests).
struct Endpoint {
    method: &'static str,
    path: String,
    body: Option<Value>,
    role: Role,
}

impl Endpoint {
    fn new(method: &'static str, path: String, body: Option<Value>, role: Role) -> Self {
        Endpoint {
            method,
            path,
            body,
            role,
        }
    }

    async fn call(&self, app: &TestApp, token: Option<&str>) -> (StatusCode, Value) {
        app.call(self.method, &self.path, token, self.body.as_ref())
            .await
    }
}

/// The authenticated JSON endpoints, with these ids in their paths.
fn endpoints(key_id: &str, device_id: &str, notification_id: &str) -> Vec<Endpoint> {
    use Role::*;
    vec![
        Endpoint::new(
            "POST",
            "/v1/service-keys".into(),
            Some(json!({"name": "matrix"})),
            Admin,
        ),
        Endpoint::new("GET", "/v1/service-keys".into(), None, Admin),
        Endpoint::new("DELETE", format!("/v1/service-keys/{key_id}"), None, Admin),
        Endpoint::new(
            "POST",
            "/v1/devices".into(),
            Some(json!({"user_id": "matrix", "name": "m"})),
            Service,
        ),
        Endpoint::new("GET", "/v1/devices?user_id=matrix".into(), None, Service),
        Endpoint::new("DELETE", format!("/v1/devices/{device_id}"), None, Service),
        Endpoint::new(
            "POST",
            "/v1/notifications".into(),
            Some(json!({"user_id": "matrix", "payload": {"m": 1}})),
            Service,
        ),
        Endpoint::new(
            "GET",
            format!("/v1/notifications/{notification_id}"),
            None,
            Service,
        ),
        Endpoint::new("GET", "/v1/presence".into(), None, Admin),
        Endpoint::new("GET", "/v1/presence/users/matrix".into(), None, Admin),
        Endpoint::new("GET", "/v1/stats".into(), None, Admin),
    ]
}

/// Opens a WebSocket with the token in `?token=` (as a browser would) instead of a header.
async fn connect_with_query_token(app: &TestApp, token: &str) -> Result<WsClient, u16> {
    let req = format!("ws://127.0.0.1:{}/v1/ws?token={token}", app.port)
        .into_client_request()
        .unwrap();
    connect_request(app.socket_addr(), req).await
}

/// The status of a notification, as `key` sees it.
async fn status_of(app: &TestApp, key: &str, id: &str) -> Value {
    let (status, body) = app.get(&format!("/v1/notifications/{id}"), key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The state of `device_id`'s delivery of notification `id`.
async fn delivery_state(app: &TestApp, key: &str, id: &str, device_id: &str) -> Option<String> {
    status_of(app, key, id).await["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device_id)
        .map(|d| d["state"].as_str().unwrap().to_owned())
}

/// The devices of a user as `GET /v1/devices` lists them.
async fn list_devices(app: &TestApp, key: &str, user: &str) -> Vec<Value> {
    let (status, body) = app.get(&format!("/v1/devices?user_id={user}"), key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["devices"].as_array().unwrap().clone()
}

// ---------------------------------------------------------------------------------------------
// Health and routing

async fn health_and_readiness_answer_200(b: Backend) {
    let app = spawn_app(b).await;
    let (status, _) = app.call("GET", "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.call("GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

async fn unknown_path_is_404_json(b: Backend) {
    let app = spawn_app(b).await;
    for path in ["/nope", "/v1/nope", "/v1/devices/a/b", "/v2/stats"] {
        let (status, body) = app.call("GET", path, Some(&app.admin), None).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, Some("not_found"));
    }
    let (status, body) = app.call("GET", "/nope", None, None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, Some("not_found"));
}

async fn wrong_method_is_405_json(b: Backend) {
    let app = spawn_app(b).await;
    for (method, path) in [
        ("DELETE", "/v1/stats"),
        ("PUT", "/v1/devices"),
        ("POST", "/healthz"),
        ("GET", "/v1/service-keys/x"),
        ("PATCH", "/v1/notifications"),
        ("POST", "/v1/presence"),
    ] {
        let (status, body) = app.call(method, path, Some(&app.admin), None).await;
        assert_error(
            status,
            &body,
            StatusCode::METHOD_NOT_ALLOWED,
            Some("method_not_allowed"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Roles and credentials

async fn every_endpoint_refuses_missing_or_unknown_credentials(b: Backend) {
    let app = spawn_app(b).await;
    let hex = "0123456789abcdef".repeat(4);
    let garbage = [
        "garbage".to_owned(),
        format!("hsk_{hex}"),
        format!("hdt_{hex}"),
        format!("hadm_{hex}"),
        "x".repeat(5000),
    ];
    for ep in endpoints(NO_SUCH_ID, NO_SUCH_ID, NO_SUCH_ID) {
        let (status, body) = ep.call(&app, None).await;
        assert_error(
            status,
            &body,
            StatusCode::UNAUTHORIZED,
            Some("unauthorized"),
        );
        for token in &garbage {
            let (status, body) = ep.call(&app, Some(token)).await;
            assert_error(
                status,
                &body,
                StatusCode::UNAUTHORIZED,
                Some("unauthorized"),
            );
        }
        // The admin token under another scheme is not a bearer credential.
        let (status, _, body) = app
            .call_raw(
                ep.method,
                &ep.path,
                None,
                ep.body.as_ref().map(|b| b.to_string().into_bytes()),
                &[("Authorization", &format!("Basic {}", app.admin))],
            )
            .await;
        assert_error(
            status,
            &body,
            StatusCode::UNAUTHORIZED,
            Some("unauthorized"),
        );
    }
}

async fn revoked_service_key_is_refused_everywhere(b: Backend) {
    let app = spawn_app(b).await;
    let (status, created) = app
        .post("/v1/service-keys", &app.admin, json!({"name": "doomed"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap();
    let phone = app.device(key, "matrix").await;
    let id = app.notify_device(key, &phone, json!("x")).await;
    assert_eq!(
        app.delete(
            &format!("/v1/service-keys/{}", created["id"].as_str().unwrap()),
            &app.admin
        )
        .await,
        StatusCode::NO_CONTENT
    );
    for ep in endpoints(NO_SUCH_ID, &phone.id, &id) {
        let (status, body) = ep.call(&app, Some(key)).await;
        assert_error(
            status,
            &body,
            StatusCode::UNAUTHORIZED,
            Some("unauthorized"),
        );
    }
}

async fn deleted_device_token_is_refused_everywhere(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "matrix").await;
    let id = app.notify_device(&key, &phone, json!("x")).await;
    assert_eq!(
        app.delete(&format!("/v1/devices/{}", phone.id), &key).await,
        StatusCode::NO_CONTENT
    );
    for ep in endpoints(NO_SUCH_ID, &phone.id, &id) {
        let (status, body) = ep.call(&app, Some(&phone.token)).await;
        assert_error(
            status,
            &body,
            StatusCode::UNAUTHORIZED,
            Some("unauthorized"),
        );
    }
    assert_eq!(app.connect_raw(&phone.token).await.err(), Some(401));
    assert_eq!(
        connect_with_query_token(&app, &phone.token).await.err(),
        Some(401)
    );
}

async fn device_token_is_forbidden_on_service_and_admin_endpoints(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "matrix").await;
    let id = app.notify_device(&key, &phone, json!("x")).await;
    for ep in endpoints(NO_SUCH_ID, &phone.id, &id) {
        let (status, body) = ep.call(&app, Some(&phone.token)).await;
        assert_error(status, &body, StatusCode::FORBIDDEN, Some("forbidden"));
    }
    // Nothing the device tried happened: it still exists and can connect.
    assert_eq!(list_devices(&app, &key, "matrix").await.len(), 1);
    app.connect(&phone).await;
}

async fn service_key_is_forbidden_on_admin_endpoints(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let (_, listed) = app.get("/v1/service-keys", &app.admin).await;
    let own_id = listed["service_keys"][0]["id"].as_str().unwrap().to_owned();
    for ep in endpoints(&own_id, NO_SUCH_ID, NO_SUCH_ID)
        .into_iter()
        .filter(|e| e.role == Role::Admin)
    {
        let (status, body) = ep.call(&app, Some(&key)).await;
        assert_error(status, &body, StatusCode::FORBIDDEN, Some("forbidden"));
    }
    // It could not revoke itself, nor mint a key.
    let (_, listed) = app.get("/v1/service-keys", &app.admin).await;
    assert_eq!(listed["service_keys"].as_array().unwrap().len(), 1);
    let (status, _) = app.get("/v1/devices?user_id=matrix", &key).await;
    assert_eq!(status, StatusCode::OK);
}

async fn admin_may_call_every_endpoint(b: Backend) {
    let app = spawn_app(b).await;
    let admin = app.admin.clone();
    let (status, created) = app
        .post("/v1/service-keys", &admin, json!({"name": "a"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, _) = app.get("/v1/service-keys", &admin).await;
    assert_eq!(status, StatusCode::OK);
    let key_path = format!("/v1/service-keys/{}", created["id"].as_str().unwrap());
    assert_eq!(app.delete(&key_path, &admin).await, StatusCode::NO_CONTENT);

    let phone = app.device(&admin, "root-user").await;
    let (status, _) = app.get("/v1/devices?user_id=root-user", &admin).await;
    assert_eq!(status, StatusCode::OK);
    let id = app
        .notify_device(&admin, &phone, json!({"by": "admin"}))
        .await;
    let st = status_of(&app, &admin, &id).await;
    assert_eq!(st["payload"], json!({"by": "admin"}));
    let (status, _) = app.get("/v1/presence", &admin).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.get("/v1/presence/users/root-user", &admin).await;
    assert_eq!(status, StatusCode::OK);
    app.stats().await;
    assert_eq!(
        app.delete(&format!("/v1/devices/{}", phone.id), &admin)
            .await,
        StatusCode::NO_CONTENT
    );
}

async fn services_read_only_the_status_of_their_own_notifications(b: Backend) {
    let app = spawn_app(b).await;
    let mine = app.service_key().await;
    let theirs = app.service_key().await;
    let phone = app.device(&mine, "owner").await;
    let id = app.notify_device(&mine, &phone, json!("private")).await;
    let path = format!("/v1/notifications/{id}");

    let (status, body) = app.get(&path, &theirs).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, Some("forbidden"));
    assert!(
        !body.to_string().contains("private"),
        "nothing leaks: {body}"
    );
    assert_eq!(status_of(&app, &mine, &id).await["id"], id.as_str());
    assert_eq!(status_of(&app, &app.admin, &id).await["id"], id.as_str());

    // What the admin posts is the admin's: a service cannot read it either.
    let by_admin = app
        .notify_device(&app.admin, &phone, json!("admin's"))
        .await;
    let (status, body) = app
        .get(&format!("/v1/notifications/{by_admin}"), &mine)
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, Some("forbidden"));
}

async fn websocket_refuses_bad_credentials_before_upgrade(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let hex = "0123456789abcdef".repeat(4);
    assert_eq!(app.connect_raw("garbage").await.err(), Some(401));
    assert_eq!(
        app.connect_raw(&format!("hdt_{hex}")).await.err(),
        Some(401)
    );
    assert_eq!(app.connect_raw("").await.err(), Some(401));
    assert_eq!(
        connect_with_query_token(&app, "garbage").await.err(),
        Some(401)
    );
    assert_eq!(app.connect_raw(&key).await.err(), Some(403));

    // The refusal is the JSON error of every other endpoint.
    let (status, body) = app.call("GET", "/v1/ws", Some("garbage"), None).await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        Some("unauthorized"),
    );
    let (status, body) = app.call("GET", "/v1/ws", None, None).await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        Some("unauthorized"),
    );
    let (status, body) = app.call("GET", "/v1/ws", Some(&key), None).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, Some("forbidden"));
    assert!(app.online_ids().await.is_empty());
}

async fn websocket_accepts_a_token_in_the_query(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "browser-user").await;
    let mut ws = connect_with_query_token(&app, &phone.token)
        .await
        .expect("the upgrade succeeds with ?token=");
    let hello = ws.recv_json().await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["device_id"], phone.id.as_str());
    assert_eq!(hello["user_id"], "browser-user");
    let id = app
        .notify_device(&key, &phone, json!("to the browser"))
        .await;
    assert_eq!(ws.recv_notification().await["id"], id.as_str());
}

// ---------------------------------------------------------------------------------------------
// Service keys

async fn service_key_create_list_revoke(b: Backend) {
    let app = spawn_app(b).await;
    let before = SystemTime::now() - Duration::from_secs(5);
    let (status, created) = app
        .post("/v1/service-keys", &app.admin, json!({"name": "billing"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_fields(&created, &["id", "name", "key", "created_at"]);
    assert_eq!(created["name"], "billing");
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(key.len() >= 32, "a high-entropy key: {key}");
    assert!(!id.is_empty() && id != key);
    let at = time(&created["created_at"]);
    assert!(at > before && at < SystemTime::now() + Duration::from_secs(5));

    let (status, listed) = app.get("/v1/service-keys", &app.admin).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let keys = listed["service_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{listed}");
    assert_eq!(keys[0]["id"], id.as_str());
    assert_eq!(keys[0]["name"], "billing");
    assert_eq!(keys[0]["created_at"], created["created_at"]);
    assert!(
        keys[0].get("key").is_none(),
        "the key is shown once: {listed}"
    );
    assert!(
        !listed.to_string().contains(&key),
        "the key is shown once: {listed}"
    );

    // The key works until it is revoked, and never after.
    let (status, _) = app.get("/v1/devices?user_id=u", &key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        app.delete(&format!("/v1/service-keys/{id}"), &app.admin)
            .await,
        StatusCode::NO_CONTENT
    );
    let (status, body) = app.get("/v1/devices?user_id=u", &key).await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        Some("unauthorized"),
    );
    let (_, listed) = app.get("/v1/service-keys", &app.admin).await;
    assert!(
        listed["service_keys"].as_array().unwrap().is_empty(),
        "{listed}"
    );
}

async fn service_key_revoke_unknown_is_404(b: Backend) {
    let app = spawn_app(b).await;
    for id in [NO_SUCH_ID, "not-an-id", &"z".repeat(300)] {
        let (status, body) = app
            .call(
                "DELETE",
                &format!("/v1/service-keys/{id}"),
                Some(&app.admin),
                None,
            )
            .await;
        assert_error(status, &body, StatusCode::NOT_FOUND, Some("not_found"));
    }
    // Revoking twice: the second time there is no such live key.
    let (_, created) = app
        .post("/v1/service-keys", &app.admin, json!({"name": "twice"}))
        .await;
    let path = format!("/v1/service-keys/{}", created["id"].as_str().unwrap());
    assert_eq!(app.delete(&path, &app.admin).await, StatusCode::NO_CONTENT);
    let (status, body) = app.call("DELETE", &path, Some(&app.admin), None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, Some("not_found"));
}

async fn service_key_names_are_validated(b: Backend) {
    let app = spawn_app(b).await;
    for bad in [
        json!({"name": ""}),
        json!({"name": "n".repeat(129)}),
        json!({"name": "a\u{1}b"}),
        json!({"name": "line\nbreak"}),
    ] {
        let (status, body) = app.post("/v1/service-keys", &app.admin, bad.clone()).await;
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, None);
    }
    // An array of the fields in order is not an object (serde would take it for one).
    for bad in [
        json!({}),
        json!({"name": 5}),
        json!({"name": "x", "extra": 1}),
        json!(["x"]),
    ] {
        let (status, body) = app.post("/v1/service-keys", &app.admin, bad.clone()).await;
        assert!(
            status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_REQUEST,
            "{bad} → {status}"
        );
        assert_error(status, &body, status, None);
    }
    let (status, body) = raw(
        &app,
        "POST",
        "/v1/service-keys",
        Some(&app.admin),
        Some("{\"name\":"),
        &[],
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, None);

    let (status, body) = app
        .post(
            "/v1/service-keys",
            &app.admin,
            json!({"name": "é".repeat(128)}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "128 characters are allowed: {body}"
    );
    let (_, listed) = app.get("/v1/service-keys", &app.admin).await;
    assert_eq!(
        listed["service_keys"].as_array().unwrap().len(),
        1,
        "nothing invalid was stored: {listed}"
    );
}

// ---------------------------------------------------------------------------------------------
// Devices

async fn device_create_answers_its_shape(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let (status, body) = app
        .post(
            "/v1/devices",
            &key,
            json!({"user_id": "alice", "name": "Alice's phone"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_fields(
        &body,
        &["device_id", "user_id", "name", "token", "created_at"],
    );
    assert_eq!(body["user_id"], "alice");
    assert_eq!(body["name"], "Alice's phone");
    let token = body["token"].as_str().unwrap();
    assert!(token.len() >= 32, "a high-entropy token: {token}");
    time(&body["created_at"]);

    // `name` is optional.
    let (status, unnamed) = app
        .post("/v1/devices", &key, json!({"user_id": "alice"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{unnamed}");
    assert_eq!(unnamed["name"], "");
    assert_ne!(unnamed["device_id"], body["device_id"]);
    assert_ne!(unnamed["token"], body["token"]);

    // The token is shown once: the list never has it.
    let listed = list_devices(&app, &key, "alice").await;
    assert_eq!(listed.len(), 2);
    let text = Value::Array(listed).to_string();
    assert!(!text.contains(token), "{text}");
    assert!(!text.contains("token"), "{text}");
}

async fn device_user_id_and_name_limits(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    for bad in [
        json!({"user_id": ""}),
        json!({"user_id": "u".repeat(129)}),
        json!({"user_id": "a\u{0}b"}),
        json!({"user_id": "tab\there"}),
        json!({"user_id": "ok", "name": "n".repeat(129)}),
        json!({"user_id": "ok", "name": "bell\u{7}"}),
    ] {
        let (status, body) = app.post("/v1/devices", &key, bad.clone()).await;
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, None);
    }
    for bad in [
        json!({}),
        json!({"user_id": 7}),
        json!({"user_id": "ok", "name": null}),
        json!({"user_id": "ok", "colour": "red"}),
        json!(["ok"]),
    ] {
        let (status, body) = app.post("/v1/devices", &key, bad.clone()).await;
        assert!(
            status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_REQUEST,
            "{bad} → {status} {body}"
        );
        assert_error(status, &body, status, None);
    }
    let (status, body) = raw(&app, "POST", "/v1/devices", Some(&key), Some("nope"), &[]).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, None);

    let long_user = "u".repeat(128);
    let (status, body) = app
        .post(
            "/v1/devices",
            &key,
            json!({"user_id": long_user, "name": "n".repeat(128)}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "128 characters are allowed: {body}"
    );
    assert_eq!(body["user_id"], long_user.as_str());
    let wide_user = "ü".repeat(128);
    let (status, body) = app
        .post("/v1/devices", &key, json!({"user_id": wide_user}))
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "128 characters, 256 bytes: {body}"
    );
    assert_eq!(list_devices(&app, &key, &long_user).await.len(), 1);
    assert_eq!(list_devices(&app, &key, "ok").await.len(), 0);
}

async fn device_list_shows_online_and_last_seen(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "lister").await;
    let laptop = app.device(&key, "lister").await;
    app.device(&key, "someone-else").await;
    let ws = app.connect(&phone).await;

    let listed = list_devices(&app, &key, "lister").await;
    assert_eq!(listed.len(), 2, "only this user's devices: {listed:?}");
    for d in &listed {
        assert_fields(
            d,
            &[
                "device_id",
                "user_id",
                "name",
                "created_at",
                "online",
                "last_seen",
            ],
        );
        assert_eq!(d["user_id"], "lister");
        assert_eq!(d["name"], "test");
        time(&d["created_at"]);
    }
    let of = |list: &[Value], id: &str| list.iter().find(|d| d["device_id"] == id).unwrap().clone();
    assert_eq!(of(&listed, &phone.id)["online"], true);
    assert_eq!(of(&listed, &laptop.id)["online"], false);
    assert_eq!(
        of(&listed, &laptop.id)["last_seen"],
        Value::Null,
        "never seen yet"
    );

    ws.close().await;
    eventually("the closed device is offline with a last_seen", || async {
        let d = of(&list_devices(&app, &key, "lister").await, &phone.id);
        d["online"] == false && d["last_seen"].is_string()
    })
    .await;
    let listed = list_devices(&app, &key, "lister").await;
    let seen = time(&of(&listed, &phone.id)["last_seen"]);
    assert!(millis_between(seen, SystemTime::now()).abs() < 60_000);
    assert!(of(&listed, &laptop.id)["last_seen"].is_null());

    // A user with no devices has an empty list, not an error.
    assert!(list_devices(&app, &key, "nobody").await.is_empty());
}

async fn device_list_needs_a_user_id(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    for path in ["/v1/devices", "/v1/devices?user=x"] {
        let (status, body) = app.get(path, &key).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, None);
    }
    let (status, body) = app
        .get(&format!("/v1/devices?user_id={}", "u".repeat(129)), &key)
        .await;
    assert!(
        status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY,
        "{status} {body}"
    );
    assert_error(status, &body, status, None);
}

async fn device_delete_then_again_is_404(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "deleter").await;
    let path = format!("/v1/devices/{}", phone.id);
    assert_eq!(app.delete(&path, &key).await, StatusCode::NO_CONTENT);
    let (status, body) = app.call("DELETE", &path, Some(&key), None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, Some("not_found"));
    let (status, body) = app
        .call(
            "DELETE",
            &format!("/v1/devices/{NO_SUCH_ID}"),
            Some(&key),
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, Some("not_found"));
    assert!(list_devices(&app, &key, "deleter").await.is_empty());
}

async fn deleting_a_connected_device_closes_it_and_drops_its_notifications(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "revokee").await;
    let tablet = app.device(&key, "revokee").await;
    let mut ws = app.connect(&phone).await;
    // One the phone saw but did not ack, one it never saw (posted to it, then the tablet gets a
    // copy too so the notification survives the phone's removal).
    let seen = app.notify_device(&key, &phone, json!("seen")).await;
    assert_eq!(ws.recv_notification().await["id"], seen.as_str());
    let (status, both) = app
        .notify(
            &key,
            json!({"device_ids": [phone.id, tablet.id], "payload": "both"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{both}");
    let both = both["id"].as_str().unwrap().to_owned();
    eventually("the first is marked delivered", || async {
        delivery_state(&app, &key, &seen, &phone.id)
            .await
            .as_deref()
            == Some("delivered")
    })
    .await;

    assert_eq!(
        app.delete(&format!("/v1/devices/{}", phone.id), &key).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(ws.expect_close().await, Some(4001));
    eventually("the revoked device is offline", || async {
        !app.online_ids().await.contains(&phone.id)
    })
    .await;

    // Its unacked notifications are dropped; the other device keeps its copy.
    for id in [&seen, &both] {
        let state = delivery_state(&app, &key, id, &phone.id).await;
        assert!(
            !matches!(state.as_deref(), Some("pending" | "delivered")),
            "{id} is still {state:?} for the deleted device"
        );
    }
    assert_eq!(
        delivery_state(&app, &key, &both, &tablet.id)
            .await
            .as_deref(),
        Some("pending")
    );

    // It is gone for new posts, lists and connections.
    let (status, body) = app
        .notify(&key, json!({"device_ids": [phone.id], "payload": "late"}))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        Some("unknown_device"),
    );
    let (status, posted) = app
        .notify(&key, json!({"user_id": "revokee", "payload": "late"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
    assert_eq!(posted["devices"], 1, "only the tablet: {posted}");
    let listed = list_devices(&app, &key, "revokee").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["device_id"], tablet.id.as_str());
    assert_eq!(app.connect_raw(&phone.token).await.err(), Some(401));
}

// ---------------------------------------------------------------------------------------------
// Posting notifications

async fn post_answers_202_with_its_shape(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "shape").await;
    let laptop = app.device(&key, "shape").await;
    let _ws = app.connect(&phone).await;
    let (status, posted) = app
        .notify(
            &key,
            json!({"user_ids": ["shape"], "payload": {"a": 1}, "ttl_seconds": 3600}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
    assert_fields(
        &posted,
        &["id", "created_at", "expires_at", "devices", "delivered_now"],
    );
    assert!(posted["id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(posted["devices"], 2);
    assert_eq!(posted["delivered_now"], 1, "only the phone is online");
    let created = time(&posted["created_at"]);
    let expires = time(&posted["expires_at"]);
    assert_eq!(millis_between(created, expires), 3_600_000);
    assert!(millis_between(created, SystemTime::now()).abs() < 60_000);

    // The default TTL is a day; a user target and a device target of the same device count once.
    let (status, posted) = app
        .notify(
            &key,
            json!({"user_id": "shape", "device_ids": [laptop.id, laptop.id], "payload": null}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
    assert_eq!(posted["devices"], 2, "{posted}");
    assert_eq!(
        millis_between(time(&posted["created_at"]), time(&posted["expires_at"])),
        86_400_000
    );
    // A payload may be any JSON value.
    for payload in [
        json!(null),
        json!(0),
        json!("s"),
        json!([1, [2]]),
        json!(true),
    ] {
        let (status, posted) = app
            .notify(&key, json!({"device_ids": [laptop.id], "payload": payload}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{payload}: {posted}");
        let st = status_of(&app, &key, posted["id"].as_str().unwrap()).await;
        assert_eq!(st["payload"], payload);
    }
}

async fn post_rejects_malformed_bodies(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "malformed").await;
    for text in [
        "{",
        "not json",
        "{\"payload\": 1,}",
        "",
        "{\"user_id\":\"a\",\"payload\":1} trailing",
    ] {
        let (status, body) = raw(
            &app,
            "POST",
            "/v1/notifications",
            Some(&key),
            Some(text),
            &[],
        )
        .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, None);
    }
    for bad in [
        json!({"user_id": "malformed"}),
        json!({"user_id": "malformed", "payload": 1, "ttl_seconds": "x"}),
        json!({"user_id": "malformed", "payload": 1, "ttl_seconds": 1.5}),
        json!({"user_ids": "malformed", "payload": 1}),
        json!({"user_ids": [1], "payload": 1}),
        json!({"device_ids": phone.id, "payload": 1}),
        json!({"user_id": ["malformed"], "payload": 1}),
        json!({"user_id": "malformed", "payload": 1, "priority": "high"}),
        json!(["malformed"]),
        json!([[], [phone.id], null, 1, null]),
        json!("payload"),
    ] {
        let (status, body) = app.notify(&key, bad.clone()).await;
        assert!(
            status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_REQUEST,
            "{bad} → {status} {body}"
        );
        assert_error(status, &body, status, None);
    }
    // Nothing was accepted.
    assert_eq!(app.stats().await["notifications"]["accepted"], 0);
}

async fn post_target_rules(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "targeted").await;
    for bad in [
        json!({"payload": 1}),
        json!({"user_ids": [], "device_ids": [], "payload": 1}),
        json!({"user_ids": [""], "payload": 1}),
        json!({"user_ids": ["u".repeat(129)], "payload": 1}),
        json!({"user_ids": ["ctl\u{1b}"], "payload": 1}),
        json!({"device_ids": [""], "payload": 1}),
    ] {
        let (status, body) = app.notify(&key, bad.clone()).await;
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, None);
    }

    let users: Vec<String> = (0..1001).map(|i| format!("user-{i}")).collect();
    let (status, body) = app
        .notify(&key, json!({"user_ids": users, "payload": 1}))
        .await;
    assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, None);
    let (status, body) = app
        .notify(
            &key,
            json!({"user_ids": users[..1000], "device_ids": [phone.id], "payload": 1}),
        )
        .await;
    assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, None);
    let (status, posted) = app
        .notify(
            &key,
            json!({"user_ids": users[..999], "device_ids": [phone.id], "payload": 1}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "1000 targets are allowed: {posted}"
    );
    assert_eq!(posted["devices"], 1);

    // Unknown devices are refused, even mixed with known ones.
    for ids in [
        vec![NO_SUCH_ID.to_owned()],
        vec![phone.id.clone(), NO_SUCH_ID.to_owned()],
    ] {
        let (status, body) = app
            .notify(&key, json!({"device_ids": ids, "payload": 1}))
            .await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("unknown_device"),
        );
    }

    // The single-string form, and a user without devices (nothing to deliver, but accepted).
    let (status, posted) = app
        .notify(&key, json!({"user_id": "targeted", "payload": 1}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
    assert_eq!(posted["devices"], 1);
    let (status, posted) = app
        .notify(&key, json!({"user_id": "no-devices", "payload": 1}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
    assert_eq!(posted["devices"], 0);
    assert_eq!(posted["delivered_now"], 0);
}

async fn post_ttl_bounds(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "ttl").await;
    for ttl in [json!(0), json!(-1), json!(2_592_001), json!(i64::MAX)] {
        let (status, body) = app
            .notify(
                &key,
                json!({"device_ids": [phone.id], "payload": 1, "ttl_seconds": ttl}),
            )
            .await;
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, None);
    }
    let (status, body) = app
        .notify(
            &key,
            json!({"device_ids": [phone.id], "payload": 1, "ttl_seconds": u64::MAX}),
        )
        .await;
    assert!(
        status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_REQUEST,
        "{status} {body}"
    );
    assert_error(status, &body, status, None);
    for (ttl, ms) in [(1, 1_000), (2_592_000, 2_592_000_000)] {
        let (status, posted) = app
            .notify(
                &key,
                json!({"device_ids": [phone.id], "payload": 1, "ttl_seconds": ttl}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "ttl {ttl}: {posted}");
        assert_eq!(
            millis_between(time(&posted["created_at"]), time(&posted["expires_at"])),
            ms
        );
    }
}

async fn post_payload_limit_is_413(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "big").await;
    // A string payload serializes as its characters plus two quotes.
    let at_limit = "a".repeat(64 * 1024 - 2);
    let (status, posted) = app
        .notify(&key, json!({"device_ids": [phone.id], "payload": at_limit}))
        .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "64 KiB exactly is allowed: {posted}"
    );
    let over = "a".repeat(64 * 1024 - 1);
    let (status, body) = app
        .notify(&key, json!({"device_ids": [phone.id], "payload": over}))
        .await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, None);
    let (status, body) = app
        .notify(
            &key,
            json!({"device_ids": [phone.id], "payload": {"list": vec![12345; 20_000]}}),
        )
        .await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, None);
    assert_eq!(app.stats().await["notifications"]["accepted"], 1);
}

async fn post_body_over_the_limit_is_413(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "huge").await;
    let body = json!({"device_ids": [phone.id], "payload": "a".repeat(600 * 1024)});
    let (status, body) = app.notify(&key, body).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, None);
    // Also on the other endpoints that take a body.
    let name = "n".repeat(600 * 1024);
    let (status, body) = app
        .post(
            "/v1/devices",
            &key,
            json!({"user_id": "huge", "name": name}),
        )
        .await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, None);
    // A chunked body declares no length; it is cut off at the limit all the same.
    let chunk = actix_web::web::Bytes::from(vec![b' '; 64 * 1024]);
    let chunks = std::iter::once(Ok::<_, std::io::Error>(actix_web::web::Bytes::from_static(
        b"{\"user_id\": \"huge\", \"payload\": 1",
    )))
    .chain((0..10).map(move |_| Ok(chunk.clone())))
    .chain(std::iter::once(Ok(actix_web::web::Bytes::from_static(
        b"}",
    ))));
    let mut res = app
        .http
        .post(app.url("/v1/notifications"))
        .insert_header(("Authorization", format!("Bearer {key}")))
        .insert_header(("Content-Type", "application/json"))
        .send_stream(futures_util::stream::iter(chunks))
        .await
        .expect("an answer to a chunked body");
    let bytes = res.body().await.expect("a body");
    let body: Value = serde_json::from_slice(&bytes).expect("a JSON body");
    assert_error(res.status(), &body, StatusCode::PAYLOAD_TOO_LARGE, None);
    // The server is still fine afterwards, and took none of it.
    app.notify_device(&key, &phone, json!("small")).await;
    assert_eq!(app.stats().await["notifications"]["accepted"], 1);
}

async fn idempotent_repeat_answers_the_first_answer_and_delivers_once(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "idem").await;
    let mut ws = app.connect(&phone).await;
    let body = json!({"user_ids": ["idem"], "payload": {"order": 42}});
    let (status, first) = post_idem(&app, &key, "order-42", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    assert_eq!(first["delivered_now"], 1);
    let got = ws.recv_notification().await;
    assert_eq!(got["id"], first["id"]);

    let (status, again) = post_idem(&app, &key, "order-42", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again, first, "the first answer again, byte for byte");
    ws.expect_silence(Duration::from_millis(400)).await;
    assert_eq!(app.stats().await["notifications"]["accepted"], 1);

    // Another key is another notification.
    let (status, other) = post_idem(&app, &key, "order-43", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_ne!(other["id"], first["id"]);
    assert_eq!(ws.recv_notification().await["id"], other["id"]);
}

async fn idempotent_concurrent_repeats_agree(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "racer").await;
    let mut ws = app.connect(&phone).await;
    let body = json!({"device_ids": [phone.id], "payload": "once"});
    let answers =
        futures_util::future::join_all((0..8).map(|_| post_idem(&app, &key, "same-moment", &body)))
            .await;
    for (status, answer) in &answers {
        assert_eq!(*status, StatusCode::ACCEPTED, "{answer}");
        assert_eq!(answer, &answers[0].1, "every repeat answers the same");
    }
    assert_eq!(ws.recv_notification().await["id"], answers[0].1["id"]);
    ws.expect_silence(Duration::from_millis(400)).await;
    assert_eq!(app.stats().await["notifications"]["accepted"], 1);
}

async fn idempotency_key_reused_with_another_body_is_422(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "reuse").await;
    let (status, first) = post_idem(
        &app,
        &key,
        "k1",
        &json!({"device_ids": [phone.id], "payload": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, body) = post_idem(
        &app,
        &key,
        "k1",
        &json!({"device_ids": [phone.id], "payload": 2}),
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        Some("idempotency_key_reused"),
    );
    // The first one still answers as before.
    let (status, again) = post_idem(
        &app,
        &key,
        "k1",
        &json!({"device_ids": [phone.id], "payload": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(again, first);
    assert_eq!(app.stats().await["notifications"]["accepted"], 1);
}

async fn idempotency_keys_are_per_credential(b: Backend) {
    let app = spawn_app(b).await;
    let one = app.service_key().await;
    let two = app.service_key().await;
    let phone = app.device(&one, "shared").await;
    let body = json!({"device_ids": [phone.id], "payload": "same"});
    let (s1, a) = post_idem(&app, &one, "shared-key", &body).await;
    let (s2, b2) = post_idem(&app, &two, "shared-key", &body).await;
    let (s3, c) = post_idem(&app, &app.admin, "shared-key", &body).await;
    assert_eq!(
        (s1, s2, s3),
        (
            StatusCode::ACCEPTED,
            StatusCode::ACCEPTED,
            StatusCode::ACCEPTED
        )
    );
    let ids: BTreeSet<&str> = [&a, &b2, &c]
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "three credentials, three notifications");
    // Each service reads its own.
    assert_eq!(
        status_of(&app, &two, b2["id"].as_str().unwrap()).await["id"],
        b2["id"]
    );
    // And a different body under the same key from another credential is no conflict.
    let (status, _) = post_idem(
        &app,
        &two,
        "other",
        &json!({"device_ids": [phone.id], "payload": "x"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = post_idem(
        &app,
        &one,
        "other",
        &json!({"device_ids": [phone.id], "payload": "y"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

async fn idempotency_key_length_is_checked(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "keylen").await;
    let body = json!({"device_ids": [phone.id], "payload": 1});
    for bad in ["k".repeat(129), String::new()] {
        let (status, answer) = post_idem(&app, &key, &bad, &body).await;
        assert_error(status, &answer, StatusCode::BAD_REQUEST, None);
    }
    let (status, answer) = post_idem(&app, &key, &"k".repeat(128), &body).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "128 characters are allowed: {answer}"
    );
    assert_eq!(app.stats().await["notifications"]["accepted"], 1);
}

// ---------------------------------------------------------------------------------------------
// Status

async fn status_answers_its_shape(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "status").await;
    let laptop = app.device(&key, "status").await;
    let (status, posted) = app
        .notify(
            &key,
            json!({"user_id": "status", "payload": {"deep": {"x": [1, "two", null]}}, "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let st = status_of(&app, &key, posted["id"].as_str().unwrap()).await;
    assert_fields(
        &st,
        &["id", "created_at", "expires_at", "payload", "deliveries"],
    );
    assert_eq!(st["id"], posted["id"]);
    assert_eq!(
        time(&st["created_at"]),
        time(&posted["created_at"]),
        "{st} vs {posted}"
    );
    assert_eq!(time(&st["expires_at"]), time(&posted["expires_at"]));
    assert_eq!(st["payload"], json!({"deep": {"x": [1, "two", null]}}));
    let deliveries = st["deliveries"].as_array().unwrap();
    let mut ids: Vec<&str> = deliveries
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut want = vec![phone.id.as_str(), laptop.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    for d in deliveries {
        assert_fields(d, &["device_id", "state", "delivered_at", "acked_at"]);
        assert_eq!(d["state"], "pending");
        assert!(
            d["delivered_at"].is_null() && d["acked_at"].is_null(),
            "{d}"
        );
    }
}

async fn status_of_unknown_notification_is_404(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    for id in [NO_SUCH_ID, "garbage", &"x".repeat(300)] {
        for token in [key.as_str(), app.admin.as_str()] {
            let (status, body) = app.get(&format!("/v1/notifications/{id}"), token).await;
            assert_error(status, &body, StatusCode::NOT_FOUND, Some("not_found"));
        }
    }
}

async fn status_walks_pending_delivered_acked(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "walker").await;
    let id = app.notify_device(&key, &phone, json!("walk")).await;
    assert_eq!(
        delivery_state(&app, &key, &id, &phone.id).await.as_deref(),
        Some("pending")
    );

    let mut ws = app.connect(&phone).await;
    assert_eq!(ws.recv_notification().await["id"], id.as_str());
    eventually("delivered", || async {
        delivery_state(&app, &key, &id, &phone.id).await.as_deref() == Some("delivered")
    })
    .await;
    let d = &status_of(&app, &key, &id).await["deliveries"][0];
    assert!(
        d["delivered_at"].is_string() && d["acked_at"].is_null(),
        "{d}"
    );

    ws.ack(&[&id]).await;
    eventually("acked", || async {
        delivery_state(&app, &key, &id, &phone.id).await.as_deref() == Some("acked")
    })
    .await;
    let st = status_of(&app, &key, &id).await;
    let d = &st["deliveries"][0];
    let delivered = time(&d["delivered_at"]);
    let acked = time(&d["acked_at"]);
    assert!(acked >= delivered, "{st}");
    assert!(time(&st["created_at"]) <= delivered, "{st}");
}

async fn status_turns_expired_after_the_ttl(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    app.device(&key, "expiring").await; // stays offline
    let online = app.device(&key, "expiring").await;
    let mut ws = app.connect(&online).await;
    let (status, posted) = app
        .notify(
            &key,
            json!({"user_id": "expiring", "payload": "brief", "ttl_seconds": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{posted}");
    let id = posted["id"].as_str().unwrap().to_owned();
    assert_eq!(ws.recv_notification().await["id"], id.as_str());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let st = status_of(&app, &key, &id).await;
    for d in st["deliveries"].as_array().unwrap() {
        assert_eq!(d["state"], "expired", "{st}");
    }
    assert_eq!(st["deliveries"].as_array().unwrap().len(), 2);
    // An acked delivery stays acked after expiry.
    let keeper = app
        .notify(
            &key,
            json!({"device_ids": [online.id], "payload": "ack me", "ttl_seconds": 1}),
        )
        .await
        .1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(ws.recv_notification().await["id"], keeper.as_str());
    ws.ack(&[&keeper]).await;
    eventually("acked", || async {
        delivery_state(&app, &key, &keeper, &online.id)
            .await
            .as_deref()
            == Some("acked")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        delivery_state(&app, &key, &keeper, &online.id)
            .await
            .as_deref(),
        Some("acked")
    );
}

// ---------------------------------------------------------------------------------------------
// Presence

async fn presence_counts_and_pages_every_online_device_once(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let mut online = Vec::new();
    let mut sockets = Vec::new();
    for user in ["p1", "p1", "p2", "p2", "p3"] {
        let d = app.device(&key, user).await;
        sockets.push(app.connect(&d).await);
        online.push(d);
    }
    app.device(&key, "p4").await; // never connects
    let want: BTreeSet<String> = online.iter().map(|d| d.id.clone()).collect();

    let (status, all) = app.get("/v1/presence", &app.admin).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_fields(&all, &["online_devices", "online_users", "devices", "next"]);
    assert_eq!(all["online_devices"], 5);
    assert_eq!(all["online_users"], 3);
    assert!(all["next"].is_null(), "one page holds them all: {all}");
    for d in all["devices"].as_array().unwrap() {
        assert_fields(d, &["device_id", "user_id", "name", "connected_at"]);
        let dev = online
            .iter()
            .find(|o| d["device_id"] == o.id.as_str())
            .unwrap();
        assert_eq!(d["user_id"], dev.user_id.as_str());
        assert_eq!(d["name"], "test");
        assert!(millis_between(time(&d["connected_at"]), SystemTime::now()) >= -1000);
    }

    let mut seen = Vec::new();
    let mut path = "/v1/presence?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let (status, page) = app.get(&path, &app.admin).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        assert!(pages <= 5, "paging does not end");
        let devices = page["devices"].as_array().unwrap();
        assert!(devices.len() <= 2, "{page}");
        assert_eq!(page["online_devices"], 5);
        seen.extend(
            devices
                .iter()
                .map(|d| d["device_id"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(cursor) => {
                assert!(!devices.is_empty(), "a cursor after an empty page: {page}");
                path = format!("/v1/presence?limit=2&after={cursor}");
            }
            None => {
                assert!(page["next"].is_null(), "{page}");
                break;
            }
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 5, "each online device once: {seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), want);
    drop(sockets);
}

async fn presence_filters_by_user(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let a1 = app.device(&key, "alice").await;
    let a2 = app.device(&key, "alice").await;
    let bob = app.device(&key, "bob").await;
    let _s = (
        app.connect(&a1).await,
        app.connect(&a2).await,
        app.connect(&bob).await,
    );
    let (status, page) = app.get("/v1/presence?user_id=alice", &app.admin).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let mut ids: Vec<&str> = page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["user_id"], "alice");
            d["device_id"].as_str().unwrap()
        })
        .collect();
    ids.sort();
    let mut want = vec![a1.id.as_str(), a2.id.as_str()];
    want.sort();
    assert_eq!(ids, want);

    // Paging within a user.
    let (_, first) = app
        .get("/v1/presence?user_id=alice&limit=1", &app.admin)
        .await;
    assert_eq!(first["devices"].as_array().unwrap().len(), 1);
    let cursor = first["next"].as_str().expect("a cursor").to_owned();
    let (_, second) = app
        .get(
            &format!("/v1/presence?user_id=alice&limit=1&after={cursor}"),
            &app.admin,
        )
        .await;
    assert_eq!(second["devices"].as_array().unwrap().len(), 1);
    assert_ne!(
        second["devices"][0]["device_id"],
        first["devices"][0]["device_id"]
    );
    assert!(second["next"].is_null(), "{second}");

    let (status, page) = app.get("/v1/presence?user_id=carol", &app.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page["devices"].as_array().unwrap().is_empty(), "{page}");
    assert!(page["next"].is_null());
}

async fn presence_limit_is_bounded(b: Backend) {
    let app = spawn_app(b).await;
    for q in [
        "limit=0",
        "limit=5000",
        "limit=1001",
        "limit=-1",
        "limit=abc",
    ] {
        let (status, body) = app.get(&format!("/v1/presence?{q}"), &app.admin).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, None);
    }
    for q in ["limit=1", "limit=1000"] {
        let (status, body) = app.get(&format!("/v1/presence?{q}"), &app.admin).await;
        assert_eq!(status, StatusCode::OK, "{q}: {body}");
    }
}

/// Ids and cursors are ours, short and printable: one with a control character — a NUL, which
/// PostgreSQL cannot even compare (schemathesis found a `500` on `?after=%00…`) — names nothing.
async fn ids_with_control_characters_are_never_found(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    for bad in ["%00", "a%00b", "%00%F3%86%9C%BC", "a%0Ab", "%7F"] {
        let (status, body) = app
            .get(&format!("/v1/presence?after={bad}"), &app.admin)
            .await;
        // As a bad `user_id` there: a value that breaks the field's rules.
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, None);
        let (status, body) = app.get(&format!("/v1/notifications/{bad}"), &key).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, Some("not_found"));
        assert_eq!(
            app.delete(&format!("/v1/devices/{bad}"), &key).await,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            app.delete(&format!("/v1/service-keys/{bad}"), &app.admin)
                .await,
            StatusCode::NOT_FOUND
        );
    }
    // Nothing broke: the node still answers a valid cursor.
    let (status, body) = app.get("/v1/presence?after=zzz", &app.admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn presence_of_a_user(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "dana").await;
    let laptop = app.device(&key, "dana").await;
    let before = SystemTime::now() - Duration::from_secs(1);
    let ws = app.connect(&phone).await;

    let (status, body) = app.get("/v1/presence/users/dana", &app.admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_fields(&body, &["user_id", "online", "devices"]);
    assert_eq!(body["user_id"], "dana");
    assert_eq!(body["online"], true);
    let devices = body["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{body}");
    for d in devices {
        assert_fields(
            d,
            &["device_id", "name", "online", "connected_at", "last_seen"],
        );
        assert_eq!(d["name"], "test");
        if d["device_id"] == phone.id.as_str() {
            assert_eq!(d["online"], true);
            let at = time(&d["connected_at"]);
            assert!(at >= before && at <= SystemTime::now() + Duration::from_secs(1));
        } else {
            assert_eq!(d["device_id"], laptop.id.as_str());
            assert_eq!(d["online"], false);
            assert!(d["connected_at"].is_null(), "{d}");
            assert!(d["last_seen"].is_null(), "{d}");
        }
    }

    ws.close().await;
    eventually("the user goes offline", || async {
        let (_, body) = app.get("/v1/presence/users/dana", &app.admin).await;
        body["online"] == false
            && body["devices"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["online"] == false && d["connected_at"].is_null())
    })
    .await;

    // A user nobody registered is simply offline with no devices.
    let (status, body) = app.get("/v1/presence/users/ghost", &app.admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["online"], false);
    assert!(body["devices"].as_array().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Stats

async fn stats_answer_their_shape(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let phone = app.device(&key, "counted").await;
    let mut ws = app.connect(&phone).await;
    let id = app.notify_device(&key, &phone, json!(1)).await;
    assert_eq!(ws.recv_notification().await["id"], id.as_str());
    ws.ack(&[&id]).await;

    eventually("the ack is counted", || async {
        app.stats().await["notifications"]["acked"] == 1
    })
    .await;
    let stats = app.stats().await;
    assert_fields(
        &stats,
        &["sessions", "db_pool", "notifications", "uptime_seconds"],
    );
    assert_eq!(stats["sessions"], 1, "{stats}");
    let pool = &stats["db_pool"];
    for f in ["size", "idle", "in_use", "max_in_use", "waits", "timeouts"] {
        assert!(pool[f].is_u64(), "db_pool.{f} is a count: {stats}");
    }
    let size = pool["size"].as_u64().unwrap();
    assert!(size >= 1, "{stats}");
    assert!(pool["idle"].as_u64().unwrap() <= size, "{stats}");
    assert!(pool["in_use"].as_u64().unwrap() <= size, "{stats}");
    assert!(pool["max_in_use"].as_u64().unwrap() <= size, "{stats}");
    assert!(
        pool["max_in_use"].as_u64().unwrap() >= 1,
        "the pool was used: {stats}"
    );
    let n = &stats["notifications"];
    assert_eq!(n["accepted"], 1, "{stats}");
    assert_eq!(n["delivered"], 1, "{stats}");
    assert_eq!(n["acked"], 1, "{stats}");
    assert!(stats["uptime_seconds"].is_u64(), "{stats}");

    ws.close().await;
    eventually("the session is no longer counted", || async {
        app.stats().await["sessions"] == 0
    })
    .await;
}
