//! The OpenAPI description (`GET /openapi.json`): served without a token, OpenAPI 3.x, listing
//! every route of API.md with its method and nothing else, the `Allow` header of a `405` taken
//! from it, and the real answers of every endpoint matching the schemas it gives them (field
//! names, required and nullable fields; `scripts/schemathesis` checks types and values too).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use awc::http::StatusCode;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    openapi_is_served_without_a_token_and_lists_every_route,
    wrong_method_answers_405_with_the_documented_allow,
    real_answers_match_their_schemas,
);

/// Every route of API.md, and the document's own.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/service-keys"),
    ("GET", "/v1/service-keys"),
    ("DELETE", "/v1/service-keys/{id}"),
    ("POST", "/v1/devices"),
    ("GET", "/v1/devices"),
    ("DELETE", "/v1/devices/{id}"),
    ("POST", "/v1/notifications"),
    ("GET", "/v1/notifications/{id}"),
    ("GET", "/v1/presence"),
    ("GET", "/v1/presence/users/{user_id}"),
    ("GET", "/v1/stats"),
    ("GET", "/metrics"),
    ("GET", "/v1/ws"),
];

/// Served without a credential.
const PUBLIC: &[&str] = &["/healthz", "/readyz", "/openapi.json"];

async fn document(app: &TestApp) -> Value {
    let (status, headers, doc) = app.call_raw("GET", "/openapi.json", None, None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let ctype = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    doc
}

async fn openapi_is_served_without_a_token_and_lists_every_route(b: Backend) {
    let app = spawn_app(b).await;
    let doc = document(&app).await;
    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3."), "not OpenAPI 3.x: {version:?}");
    assert_eq!(doc["info"]["title"], "Herald");
    assert!(doc["info"]["version"].is_string());

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            documented.insert((method.to_ascii_uppercase(), path.clone()));
            let label = format!("{} {path}", method.to_ascii_uppercase());
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|s| s.starts_with('2') || s == "101"),
                "{label}: no success answer"
            );
            assert!(!responses.contains_key("500"), "{label}: documents a 500");
            // Every error answer is the JSON error body; a 429 or 503 says when to retry.
            for (status, response) in responses {
                if status.starts_with('2') || status == "101" {
                    continue;
                }
                let r = resolve(&doc, response);
                assert_eq!(
                    r["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{label} {status}"
                );
                if status == "429" || status == "503" {
                    assert_eq!(r["headers"]["Retry-After"]["required"], true, "{label}");
                }
            }
            let security = op["security"].as_array().cloned().unwrap_or_default();
            if PUBLIC.contains(&path.as_str()) {
                assert!(security.is_empty(), "{label} needs no credential");
            } else {
                assert!(
                    security.iter().any(|s| s.get("bearer").is_some()),
                    "{label} takes a bearer token"
                );
                assert!(responses.contains_key("401"), "{label}: no 401");
                assert!(responses.contains_key("403"), "{label}: no 403");
            }
            if method == "post" {
                let body = &op["requestBody"]["content"]["application/json"]["schema"];
                let schema = resolve(&doc, body);
                assert_eq!(
                    schema["additionalProperties"], false,
                    "{label}: unknown fields are refused"
                );
                for status in ["400", "413", "422"] {
                    assert!(responses.contains_key(status), "{label}: no {status}");
                }
            }
        }
    }
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, expected,
        "the documented operations are the routes"
    );

    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    let ws = &doc["paths"]["/v1/ws"]["get"]["responses"];
    for status in ["101", "400", "401", "403"] {
        assert!(ws.get(status).is_some(), "/v1/ws: no {status}");
    }
    assert!(
        doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
            .as_object()
            .unwrap()
            .keys()
            .all(|t| t.starts_with("text/plain"))
    );
    let idempotency = doc["paths"]["/v1/notifications"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Idempotency-Key")
        .expect("the Idempotency-Key header is described");
    assert_eq!(idempotency["in"], "header");
    assert_eq!(idempotency["schema"]["maxLength"], 128);

    // The same document with a token.
    let (status, with_token) = app.get("/openapi.json", &app.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(with_token, doc);
}

async fn wrong_method_answers_405_with_the_documented_allow(b: Backend) {
    let app = spawn_app(b).await;
    for (method, path, allow) in [
        ("PUT", "/v1/devices", "GET, POST"),
        ("PATCH", "/v1/devices/some-id", "DELETE"),
        ("POST", "/v1/service-keys/some-id", "DELETE"),
        ("DELETE", "/v1/notifications", "POST"),
        ("TRACE", "/healthz", "GET"),
        ("POST", "/openapi.json", "GET"),
        ("OPTIONS", "/v1/presence/users/alice", "GET"),
    ] {
        let (status, headers, body) = app
            .call_raw(method, path, Some(&app.admin), None, &[])
            .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(
            body["error"]["code"], "method_not_allowed",
            "{method} {path}"
        );
        assert_eq!(
            headers.get("allow").and_then(|v| v.to_str().ok()),
            Some(allow),
            "{method} {path}"
        );
    }
}

async fn real_answers_match_their_schemas(b: Backend) {
    let app = spawn_app(b).await;
    let doc = document(&app).await;
    let admin = app.admin.clone();
    let check = |method: &str, path: &str, status: u16, body: &Value| {
        let key = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .find(|p| template_matches(p, path.split('?').next().unwrap()))
            .unwrap_or_else(|| panic!("{path} is not documented"));
        let response = resolve(
            &doc,
            &doc["paths"][key][method.to_ascii_lowercase()]["responses"][status.to_string()],
        );
        let schema = &response["content"]["application/json"]["schema"];
        assert!(
            !schema.is_null(),
            "{method} {key} {status} has no JSON schema"
        );
        conforms(&doc, schema, body, &format!("{method} {path} {status}"));
    };

    let (status, created_key) = app
        .post("/v1/service-keys", &admin, json!({"name": "docs"}))
        .await;
    check("POST", "/v1/service-keys", status.as_u16(), &created_key);
    let (status, keys) = app.get("/v1/service-keys", &admin).await;
    check("GET", "/v1/service-keys", status.as_u16(), &keys);
    let key = created_key["key"].as_str().unwrap().to_owned();

    let (status, created) = app
        .post(
            "/v1/devices",
            &key,
            json!({"user_id": "ada", "name": "phone"}),
        )
        .await;
    check("POST", "/v1/devices", status.as_u16(), &created);
    let online = Device {
        id: created["device_id"].as_str().unwrap().to_owned(),
        user_id: "ada".into(),
        token: created["token"].as_str().unwrap().to_owned(),
    };
    let offline = app.device(&key, "ada").await;
    let mut ws = app.connect(&online).await;

    let (status, posted) = app
        .notify(
            &key,
            json!({"user_ids": ["ada"], "payload": {"n": 1}, "ttl_seconds": 60}),
        )
        .await;
    check("POST", "/v1/notifications", status.as_u16(), &posted);
    let id = posted["id"].as_str().unwrap().to_owned();
    let pushed = ws.recv_notification().await;
    ws.ack(&[pushed["id"].as_str().unwrap()]).await;
    let status_path = format!("/v1/notifications/{id}");
    let start = Instant::now();
    let answer = loop {
        let (status, body) = app.get(&status_path, &key).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["state"] == "acked")
        {
            break body;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the ack is not recorded: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    check("GET", &status_path, 200, &answer);
    assert!(
        answer["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["device_id"] == offline.id.as_str() && d["acked_at"].is_null()),
        "{answer}"
    );

    for path in [
        "/v1/devices?user_id=ada",
        "/v1/presence",
        "/v1/presence?user_id=ada&limit=1",
        "/v1/presence/users/ada",
        "/v1/presence/users/nobody",
        "/v1/stats",
        "/healthz",
        "/readyz",
    ] {
        let (status, body) = app.get(path, &admin).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        check("GET", path, 200, &body);
    }
    let (_, presence) = app.get("/v1/presence", &admin).await;
    assert_eq!(presence["online_devices"], 1, "{presence}");

    // Errors: the documented error body.
    let (status, body) = app.get("/v1/notifications/nope", &key).await;
    check("GET", "/v1/notifications/nope", status.as_u16(), &body);
    let (status, body) = app.get("/v1/stats", &key).await;
    check("GET", "/v1/stats", status.as_u16(), &body);
    let (status, body) = app
        .post("/v1/devices", &key, json!({"user_id": "ada", "extra": 1}))
        .await;
    check("POST", "/v1/devices", status.as_u16(), &body);
    ws.close().await;
}

/// Whether the OpenAPI path template `template` (`/v1/devices/{id}`) matches `path`.
fn template_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| t == p || (t.starts_with('{') && !p.is_empty()))
}

/// The schema a `$ref` points to, or the schema itself.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling {r}")),
        None => schema,
    }
}

/// Checks the shape of `value` against `schema`: objects have every required property and no
/// undeclared one where `additionalProperties` is false, `null` only where the type allows it,
/// arrays' items recursively.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(doc, schema);
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(), // any value
    };
    match value {
        Value::Null => assert!(
            types.is_empty() || types.contains(&"null"),
            "{at}: null where the schema says {types:?}"
        ),
        Value::Object(map) => {
            assert!(
                types.is_empty() || types.contains(&"object"),
                "{at}: an object"
            );
            for name in schema["required"].as_array().into_iter().flatten() {
                let name = name.as_str().unwrap();
                assert!(map.contains_key(name), "{at}: `{name}` is required");
            }
            let props = schema["properties"].as_object();
            for (name, v) in map {
                match props.and_then(|p| p.get(name)) {
                    Some(p) => conforms(doc, p, v, &format!("{at}.{name}")),
                    None => assert!(
                        schema["additionalProperties"] != false,
                        "{at}: `{name}` is not in the schema"
                    ),
                }
            }
        }
        Value::Array(items) => {
            assert!(
                types.is_empty() || types.contains(&"array"),
                "{at}: an array"
            );
            for (i, item) in items.iter().enumerate() {
                conforms(doc, &schema["items"], item, &format!("{at}[{i}]"));
            }
        }
        Value::String(_) => assert!(types.is_empty() || types.contains(&"string"), "{at}"),
        Value::Bool(_) => assert!(types.is_empty() || types.contains(&"boolean"), "{at}"),
        Value::Number(n) => assert!(
            types.is_empty()
                || types.contains(&"number")
                || (types.contains(&"integer") && (n.is_i64() || n.is_u64())),
            "{at}: {n} where the schema says {types:?}"
        ),
    }
}
