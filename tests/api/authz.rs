//! Authorization as a matrix: every endpoint of API.md's HTTP table and `GET /v1/ws` (token in the
//! header and in `?token=`) × every kind of credential — none, a bad one, a revoked device token, a
//! revoked service key, a device token, a service key, the admin token — answers exactly API.md's
//! role table: `401` for a wrong or missing credential, `403` for a right one of the wrong role,
//! the success code otherwise; and a refused call changes nothing. Then the finer rules: a service
//! cannot read another's notification, a device cannot ack another's, and no secret ever shows in
//! an answer, in `/metrics`, in `/v1/stats` or in the server's log (at `RUST_LOG=debug`).
//!
//! Failed authentications are counted (a node may rate-limit them per IP): the matrix makes 56
//! (14 authenticated rows × 4 refused credentials), each refused credential from its own
//! loopback source address (127.0.0.10–13), so no address fails more than 14 times.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use awc::http::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::MaybeTlsStream;

use crate::both_backends;
use crate::helpers::*;
use crate::process::Server;

both_backends!(
    every_endpoint_answers_the_role_table_for_every_credential,
    a_service_cannot_read_another_services_notification,
    a_device_cannot_ack_another_devices_notification,
    no_secret_appears_in_the_debug_log,
);

// ---------------------------------------------------------------------------------------------
// Credentials, secrets, clients

/// The columns of the matrix.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cred {
    None,
    Bad,
    RevokedDevice,
    RevokedService,
    Device,
    Service,
    Admin,
}

const CREDS: [Cred; 7] = [
    Cred::None,
    Cred::Bad,
    Cred::RevokedDevice,
    Cred::RevokedService,
    Cred::Device,
    Cred::Service,
    Cred::Admin,
];

impl Cred {
    fn label(self) -> &'static str {
        match self {
            Cred::None => "none",
            Cred::Bad => "bad",
            Cred::RevokedDevice => "rev-dev",
            Cred::RevokedService => "rev-svc",
            Cred::Device => "device",
            Cred::Service => "service",
            Cred::Admin => "admin",
        }
    }

    /// A credential that must be refused with `401` wherever one is needed.
    fn refused(self) -> bool {
        matches!(
            self,
            Cred::None | Cred::Bad | Cred::RevokedDevice | Cred::RevokedService
        )
    }

    /// The loopback address this column's calls come from.
    fn source(self) -> Ipv4Addr {
        let i = CREDS.iter().position(|c| *c == self).unwrap() as u8;
        Ipv4Addr::new(127, 0, 0, 10 + i)
    }
}

/// Who may call an endpoint, after API.md's table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// No credential needed (and whatever is presented is ignored).
    Anyone,
    Admin,
    /// Admin or service.
    Service,
    /// Admin, or the service that posted the notification.
    Poster,
    Device,
}

/// Lower-case hex SHA-256, as the server stores secrets.
fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A fresh random token of the server's shape (`prefix` + 64 hex digits) that names nothing.
fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).unwrap();
    format!("{prefix}{}", hex::encode(bytes))
}

/// The secrets of a test, and the strings that would show one leaked: the secret, its random
/// part without the prefix, its SHA-256 and that hash's first 16 digits.
#[derive(Default)]
struct Secrets(Vec<String>);

impl Secrets {
    fn add(&mut self, secret: &str) {
        assert!(secret.len() >= 16, "a secret worth hiding: {secret:?}");
        self.0.push(secret.to_owned());
    }

    fn needles(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for s in &self.0 {
            let hash = sha256_hex(s);
            out.push((s.clone(), format!("the secret {s}")));
            if let Some((_, rest)) = s.split_once('_') {
                if rest.len() >= 16 {
                    out.push((rest.to_owned(), format!("the random part of {s}")));
                }
            }
            out.push((hash.clone(), format!("the SHA-256 of {s}")));
            out.push((
                hash[..16].to_owned(),
                format!("a prefix of the SHA-256 of {s}"),
            ));
        }
        out
    }

    /// Panics if `text` (named `what`) holds any secret or hash.
    #[track_caller]
    fn assert_absent(&self, what: &str, text: &str) {
        for (needle, name) in self.needles() {
            if let Some(at) = text.find(&needle) {
                let from = text[..at]
                    .char_indices()
                    .rev()
                    .nth(80)
                    .map_or(0, |(i, _)| i);
                let to = (at + needle.len() + 80).min(text.len());
                let to = (to..=text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap();
                panic!(
                    "{what} leaks {name}: …{}…",
                    &text[from..to].replace('\n', "⏎")
                );
            }
        }
    }
}

/// An HTTP client whose connections come from `source`.
fn client_from(source: Ipv4Addr) -> awc::Client {
    let connector = awc::Connector::new()
        .local_address(IpAddr::V4(source))
        .conn_keep_alive(Duration::from_secs(2));
    awc::Client::builder()
        .connector(connector)
        .timeout(Duration::from_secs(30))
        .finish()
}

/// A request with an optional bearer token and JSON body: status and body text.
async fn request(
    http: &awc::Client,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, String) {
    let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = http.request(method, format!("{base}{path}"));
    if let Some(t) = token {
        req = req.insert_header(("Authorization", format!("Bearer {t}")));
    }
    let mut res = match body {
        Some(b) => req.send_json(b).await,
        None => req.send().await,
    }
    .unwrap_or_else(|e| panic!("{path}: an answer, got {e}"));
    let bytes = res.body().limit(16 << 20).await.expect("a readable body");
    (
        res.status().as_u16(),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// Opens `GET /v1/ws` from `source`, the token in the header or in `?token=`; the refusal's
/// status and body if the upgrade is refused.
async fn ws_from(
    source: Ipv4Addr,
    port: u16,
    token: Option<&str>,
    in_query: bool,
) -> Result<WsClient, (u16, String)> {
    let url = match (token, in_query) {
        (Some(t), true) => format!("ws://127.0.0.1:{port}/v1/ws?token={t}"),
        _ => format!("ws://127.0.0.1:{port}/v1/ws"),
    };
    let mut req = url.into_client_request().unwrap();
    if let (Some(t), false) = (token, in_query) {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    let tcp = socket
        .connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .await
        .expect("TCP connect");
    match tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp)).await {
        Ok((stream, _)) => Ok(WsClient {
            stream,
            hello: Value::Null,
        }),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            let body = res
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((res.status().as_u16(), body))
        }
        Err(e) => panic!("WebSocket connect failed: {e}"),
    }
}

/// The `error.code` of an error body, if it has the JSON error shape.
fn error_code(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    v["error"]["message"].as_str()?;
    v["error"]["code"].as_str().map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------
// The matrix

/// What a row's path names.
#[derive(Clone, Copy, Debug)]
enum Target {
    Fixed(&'static str),
    /// A service key made for this call, so a `204` for one column leaves the others theirs.
    FreshServiceKey,
    /// A device made for this call (of user `victim-<column>`).
    FreshDevice,
    /// The notification the matrix's service key posted.
    Notification,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Http(&'static str, Target, Option<fn() -> Value>),
    WsHeader,
    WsQuery,
}

struct Row {
    name: &'static str,
    kind: Kind,
    role: Role,
    success: u16,
}

fn rows() -> Vec<Row> {
    use Kind::*;
    use Target::*;
    let row = |name, kind, role, success| Row {
        name,
        kind,
        role,
        success,
    };
    vec![
        row(
            "GET /healthz",
            Http("GET", Fixed("/healthz"), None),
            Role::Anyone,
            200,
        ),
        row(
            "GET /readyz",
            Http("GET", Fixed("/readyz"), None),
            Role::Anyone,
            200,
        ),
        row(
            "POST /v1/service-keys",
            Http(
                "POST",
                Fixed("/v1/service-keys"),
                Some(|| json!({"name": "matrix"})),
            ),
            Role::Admin,
            201,
        ),
        row(
            "GET /v1/service-keys",
            Http("GET", Fixed("/v1/service-keys"), None),
            Role::Admin,
            200,
        ),
        row(
            "DELETE /v1/service-keys/{id}",
            Http("DELETE", FreshServiceKey, None),
            Role::Admin,
            204,
        ),
        row(
            "POST /v1/devices",
            Http(
                "POST",
                Fixed("/v1/devices"),
                Some(|| json!({"user_id": "matrix", "name": "m"})),
            ),
            Role::Service,
            201,
        ),
        row(
            "GET /v1/devices?user_id=U",
            Http("GET", Fixed("/v1/devices?user_id=matrix-target"), None),
            Role::Service,
            200,
        ),
        row(
            "DELETE /v1/devices/{id}",
            Http("DELETE", FreshDevice, None),
            Role::Service,
            204,
        ),
        row(
            "POST /v1/notifications",
            Http(
                "POST",
                Fixed("/v1/notifications"),
                Some(|| json!({"user_id": "matrix-target", "payload": {"matrix": true}})),
            ),
            Role::Service,
            202,
        ),
        row(
            "GET /v1/notifications/{id}",
            Http("GET", Notification, None),
            Role::Poster,
            200,
        ),
        row(
            "GET /v1/presence",
            Http("GET", Fixed("/v1/presence"), None),
            Role::Admin,
            200,
        ),
        row(
            "GET /v1/presence/users/{u}",
            Http("GET", Fixed("/v1/presence/users/matrix-target"), None),
            Role::Admin,
            200,
        ),
        row(
            "GET /v1/stats",
            Http("GET", Fixed("/v1/stats"), None),
            Role::Admin,
            200,
        ),
        row(
            "GET /metrics",
            Http("GET", Fixed("/metrics"), None),
            Role::Admin,
            200,
        ),
        row("GET /v1/ws (header)", WsHeader, Role::Device, 101),
        row("GET /v1/ws?token=", WsQuery, Role::Device, 101),
    ]
}

/// What API.md says `cred` gets from a row of role `role`.
fn expected(role: Role, cred: Cred, success: u16) -> u16 {
    if role == Role::Anyone {
        return success;
    }
    if cred.refused() {
        return 401;
    }
    let allowed = match role {
        Role::Anyone => true,
        Role::Admin => cred == Cred::Admin,
        Role::Service | Role::Poster => matches!(cred, Cred::Admin | Cred::Service),
        Role::Device => cred == Cred::Device,
    };
    if allowed {
        success
    } else {
        403
    }
}

/// One answered cell.
struct Cell {
    want: u16,
    got: u16,
    /// Why the cell is wrong beyond its status, if it is.
    problem: Option<String>,
}

fn render(rows: &[Row], cells: &[Vec<Cell>]) -> String {
    let mut out = format!("{:<30}", "endpoint \\ credential");
    for c in CREDS {
        out += &format!(" {:>9}", c.label());
    }
    out.push('\n');
    for (row, cells) in rows.iter().zip(cells) {
        out += &format!("{:<30}", row.name);
        for cell in cells {
            let text = if cell.got != cell.want {
                format!("{}≠{}", cell.got, cell.want)
            } else if cell.problem.is_some() {
                format!("{}!", cell.got)
            } else {
                cell.got.to_string()
            };
            out += &format!(" {text:>9}");
        }
        out.push('\n');
    }
    out += "(a≠b: got a, API.md says b; a!: right status, wrong body or side effect, see below)\n";
    for (row, cells) in rows.iter().zip(cells) {
        for (cred, cell) in CREDS.iter().zip(cells) {
            if let Some(p) = &cell.problem {
                out += &format!("  {} × {}: {p}\n", row.name, cred.label());
            }
        }
    }
    out
}

async fn every_endpoint_answers_the_role_table_for_every_credential(b: Backend) {
    let app = spawn_app(b).await;
    let admin = app.admin.clone();
    let mut secrets = Secrets::default();
    secrets.add(&admin);

    // The credentials. The doomed ones are used first, so the node has them cached when they
    // are revoked.
    let (status, created) = app
        .post("/v1/service-keys", &admin, json!({"name": "service"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let (status, doomed_key) = app
        .post("/v1/service-keys", &admin, json!({"name": "doomed"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{doomed_key}");
    let revoked_key = doomed_key["key"].as_str().unwrap().to_owned();
    let phone = app.device(&key, "matrix-device").await;
    let doomed_phone = app.device(&key, "matrix-doomed").await;
    let target = app.device(&key, "matrix-target").await;
    let notification = app.notify_device(&key, &target, json!("status me")).await;
    let (status, _) = app
        .get("/v1/devices?user_id=matrix-target", &revoked_key)
        .await;
    assert_eq!(status, StatusCode::OK, "the doomed key works before");
    app.connect(&doomed_phone).await.close().await;
    let revoked_path = format!("/v1/service-keys/{}", doomed_key["id"].as_str().unwrap());
    assert_eq!(
        app.delete(&revoked_path, &admin).await,
        StatusCode::NO_CONTENT
    );
    let doomed_path = format!("/v1/devices/{}", doomed_phone.id);
    assert_eq!(app.delete(&doomed_path, &key).await, StatusCode::NO_CONTENT);
    let bad = [
        "not a token at all".to_owned(),
        random_token("hsk_"),
        random_token("hdt_"),
        random_token("hadm_"),
    ];
    for s in [
        &key,
        &revoked_key,
        &phone.token,
        &doomed_phone.token,
        &target.token,
    ] {
        secrets.add(s);
    }
    for s in &bad {
        secrets.add(s);
    }
    let accepted_before = app.stats().await["notifications"]["accepted"]
        .as_u64()
        .unwrap();

    let rows = rows();
    let mut cells: Vec<Vec<Cell>> = Vec::new();
    let mut texts: Vec<(String, String)> = Vec::new(); // everything answered, to search for leaks
    let mut failed_auth = 0;
    for (r, row) in rows.iter().enumerate() {
        let mut line = Vec::new();
        for cred in CREDS {
            let token: Option<String> = match cred {
                Cred::None => None,
                Cred::Bad => Some(bad[r % bad.len()].clone()),
                Cred::RevokedDevice => Some(doomed_phone.token.clone()),
                Cred::RevokedService => Some(revoked_key.clone()),
                Cred::Device => Some(phone.token.clone()),
                Cred::Service => Some(key.clone()),
                Cred::Admin => Some(admin.clone()),
            };
            let want = expected(row.role, cred, row.success);
            if want == 401 {
                failed_auth += 1;
            }
            let mut problem = None;
            let got = match row.kind {
                Kind::Http(method, target, body) => {
                    // A victim of its own for each delete, checked afterwards.
                    let mut victim = None;
                    let path = match target {
                        Target::Fixed(p) => p.to_owned(),
                        Target::Notification => format!("/v1/notifications/{notification}"),
                        Target::FreshServiceKey => {
                            let (s, v) = app
                                .post("/v1/service-keys", &admin, json!({"name": "victim"}))
                                .await;
                            assert_eq!(s, StatusCode::CREATED, "{v}");
                            secrets.add(v["key"].as_str().unwrap());
                            let id = v["id"].as_str().unwrap().to_owned();
                            victim = Some(id.clone());
                            format!("/v1/service-keys/{id}")
                        }
                        Target::FreshDevice => {
                            let d = app.device(&key, &format!("victim-{}", cred.label())).await;
                            secrets.add(&d.token);
                            victim = Some(d.id.clone());
                            format!("/v1/devices/{}", d.id)
                        }
                    };
                    let http = client_from(cred.source());
                    let body = body.map(|f| f());
                    let (got, text) = request(
                        &http,
                        &app.base,
                        method,
                        &path,
                        token.as_deref(),
                        body.as_ref(),
                    )
                    .await;
                    // What a successful call made holds new secrets; everything else is searched.
                    match serde_json::from_str::<Value>(&text) {
                        Ok(v) if got == 201 => {
                            for field in ["key", "token"] {
                                if let Some(s) = v[field].as_str() {
                                    secrets.add(s);
                                }
                            }
                        }
                        _ => {
                            texts.push((format!("{} as {}", row.name, cred.label()), text.clone()))
                        }
                    }
                    if got == 401 || got == 403 {
                        let want_code = if got == 401 {
                            "unauthorized"
                        } else {
                            "forbidden"
                        };
                        if error_code(&text).as_deref() != Some(want_code) {
                            problem = Some(format!("not the `{want_code}` error body: {text}"));
                        }
                    }
                    if got == 200 && row.name == "GET /metrics" && !text.contains("herald_") {
                        problem = Some(format!("not the metrics text: {text:.200}"));
                    }
                    // A refused delete deleted nothing; an accepted one did.
                    if let (Some(id), Target::FreshServiceKey) = (&victim, target) {
                        let (_, listed) = app.get("/v1/service-keys", &admin).await;
                        let present = listed.to_string().contains(id.as_str());
                        if present == (got == 204) {
                            problem =
                                Some(format!("answered {got}, but the key present={present}"));
                        }
                    }
                    if let (Some(id), Target::FreshDevice) = (&victim, target) {
                        let (_, listed) = app
                            .get(
                                &format!("/v1/devices?user_id=victim-{}", cred.label()),
                                &key,
                            )
                            .await;
                        let present = listed.to_string().contains(id.as_str());
                        if present == (got == 204) {
                            problem =
                                Some(format!("answered {got}, but the device present={present}"));
                        }
                    }
                    got
                }
                Kind::WsHeader | Kind::WsQuery => {
                    let in_query = matches!(row.kind, Kind::WsQuery);
                    match ws_from(cred.source(), app.port, token.as_deref(), in_query).await {
                        Ok(mut ws) => {
                            let hello = ws.recv_json().await;
                            if hello["type"] != "hello" || hello["device_id"] != phone.id.as_str() {
                                problem = Some(format!("not this device's hello: {hello}"));
                            }
                            ws.close().await;
                            101
                        }
                        Err((status, text)) => {
                            let want_code = match status {
                                401 => Some("unauthorized"),
                                403 => Some("forbidden"),
                                _ => None,
                            };
                            if let Some(want_code) = want_code {
                                if !text.is_empty()
                                    && error_code(&text).as_deref() != Some(want_code)
                                {
                                    problem =
                                        Some(format!("not the `{want_code}` error body: {text}"));
                                }
                            }
                            texts.push((format!("{} as {}", row.name, cred.label()), text));
                            status
                        }
                    }
                }
            };
            line.push(Cell { want, got, problem });
        }
        cells.push(line);
    }
    let matrix = render(&rows, &cells);
    println!("authorization matrix [{b:?}], {failed_auth} refused credentials:\n{matrix}");
    let wrong = cells
        .iter()
        .flatten()
        .filter(|c| c.got != c.want || c.problem.is_some())
        .count();
    assert_eq!(wrong, 0, "{wrong} cell(s) differ from API.md:\n{matrix}");

    // The token in `?token=` is treated exactly as in the header.
    let by_name = |n: &str| rows.iter().position(|r| r.name == n).unwrap();
    let (h, q) = (by_name("GET /v1/ws (header)"), by_name("GET /v1/ws?token="));
    let header: Vec<u16> = cells[h].iter().map(|c| c.got).collect();
    let query: Vec<u16> = cells[q].iter().map(|c| c.got).collect();
    assert_eq!(header, query, "?token= behaves as the header\n{matrix}");

    // Refused calls created nothing; the two allowed posts (admin, service) went through.
    let (_, keys) = app.get("/v1/service-keys", &admin).await;
    let minted = keys["service_keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["name"] == "matrix")
        .count();
    assert_eq!(minted, 1, "only the admin minted a key: {keys}");
    let (_, devices) = app.get("/v1/devices?user_id=matrix", &key).await;
    assert_eq!(
        devices["devices"].as_array().unwrap().len(),
        2,
        "only the admin and the service made devices: {devices}"
    );
    let stats = app.stats().await;
    assert_eq!(
        stats["notifications"]["accepted"].as_u64().unwrap(),
        accepted_before + 2,
        "only the admin and the service posted: {stats}"
    );

    // Nothing secret in any answer, listing, status, stats or metrics.
    for path in [
        "/v1/service-keys".to_owned(),
        "/v1/devices?user_id=matrix".to_owned(),
        "/v1/devices?user_id=matrix-device".to_owned(),
        "/v1/presence".to_owned(),
        "/v1/presence/users/matrix-target".to_owned(),
        format!("/v1/notifications/{notification}"),
    ] {
        let (status, body) = app.get(&path, &admin).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        texts.push((format!("GET {path}"), body.to_string()));
    }
    texts.push(("GET /v1/stats".into(), stats.to_string()));
    texts.push(("GET /metrics".into(), app.metrics_text().await));
    for (what, text) in &texts {
        secrets.assert_absent(what, text);
    }
}

// ---------------------------------------------------------------------------------------------
// Finer rules

async fn a_service_cannot_read_another_services_notification(b: Backend) {
    let app = spawn_app(b).await;
    let mine = app.service_key().await;
    let theirs = app.service_key().await;
    let phone = app.device(&mine, "owner").await;
    let id = app
        .notify_device(&mine, &phone, json!({"secret": "s3cr3t-payload"}))
        .await;
    let own = app.get(&format!("/v1/notifications/{id}"), &mine).await;
    assert_eq!(own.0, StatusCode::OK, "{}", own.1);

    // README: 403 `forbidden` (a valid credential, not the poster); nothing of it in the body.
    let (status, body) = app.get(&format!("/v1/notifications/{id}"), &theirs).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1, "only `error`: {body}");
    let text = body.to_string();
    for leak in [
        "s3cr3t-payload",
        phone.id.as_str(),
        own.1["created_at"].as_str().unwrap(),
        own.1["expires_at"].as_str().unwrap(),
        "deliver",
        "pending",
    ] {
        assert!(!text.contains(leak), "the refusal leaks {leak:?}: {body}");
    }
    // Nor by what the admin posted.
    let by_admin = app
        .notify_device(&app.admin, &phone, json!("admin's"))
        .await;
    let (status, body) = app
        .get(&format!("/v1/notifications/{by_admin}"), &theirs)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(!body.to_string().contains("admin's"), "{body}");
    // Asking did not change the delivery.
    let (_, after) = app.get(&format!("/v1/notifications/{id}"), &mine).await;
    assert_eq!(after["deliveries"], own.1["deliveries"]);
}

/// The state of `device`'s delivery of notification `id`.
async fn state_of(app: &TestApp, key: &str, id: &str, device: &Device) -> String {
    let (status, body) = app.get(&format!("/v1/notifications/{id}"), key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device.id.as_str())
        .unwrap_or_else(|| panic!("a delivery to {}: {body}", device.id))["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn a_device_cannot_ack_another_devices_notification(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let mine = app.device(&key, "uma").await; // the acker
    let sibling = app.device(&key, "uma").await; // same user, stays offline
    let other = app.device(&key, "vic").await; // another user, online
    let others = app.notify_device(&key, &other, json!("vic's")).await;
    let shared = {
        let (status, body) = app
            .notify(&key, json!({"user_id": "uma", "payload": "uma's two"}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    };
    let own = app.notify_device(&key, &mine, json!("mine")).await;

    let mut ws_other = app.connect(&other).await;
    assert_eq!(ws_other.recv_notification().await["id"], others.as_str());
    eventually("vic's notification is marked delivered", || async {
        state_of(&app, &key, &others, &other).await == "delivered"
    })
    .await;

    let mut ws = app.connect(&mine).await;
    let got: BTreeSet<String> = [ws.recv_notification().await, ws.recv_notification().await]
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, BTreeSet::from([shared.clone(), own.clone()]));
    // Another device's notification, then the shared one and its own: only its own deliveries
    // change.
    ws.ack(&[&others]).await;
    ws.ack(&[&others, &shared, &own]).await;
    eventually("its own ack is stored", || async {
        state_of(&app, &key, &own, &mine).await == "acked"
    })
    .await;
    assert_eq!(state_of(&app, &key, &shared, &mine).await, "acked");
    assert_eq!(
        state_of(&app, &key, &others, &other).await,
        "delivered",
        "vic's delivery is untouched"
    );
    assert_eq!(
        state_of(&app, &key, &shared, &sibling).await,
        "pending",
        "the sibling's delivery of the shared notification is untouched"
    );
    // The session is fine, and nothing came back for the foreign id.
    ws.send_json(json!({"type": "ping"})).await;
    let next = ws.recv_json().await;
    assert_eq!(
        next["type"], "pong",
        "acking a foreign id does nothing: {next}"
    );

    // The others still get theirs.
    ws_other.close().await;
    let mut ws_other = app.connect(&other).await;
    assert_eq!(ws_other.recv_notification().await["id"], others.as_str());
    let mut ws_sibling = app.connect(&sibling).await;
    assert_eq!(ws_sibling.recv_notification().await["id"], shared.as_str());
}

// ---------------------------------------------------------------------------------------------
// The log

async fn no_secret_appears_in_the_debug_log(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(b);
    let token_file = dir.path().join("admin.token");
    let mut node = Server::start(
        dir.path(),
        &db.url,
        &[
            ("RUST_LOG", "debug"),
            ("HERALD_ADMIN_TOKEN_FILE", token_file.to_str().unwrap()),
            ("HERALD_WORKERS", "2"),
        ],
    )
    .await;
    let admin = std::fs::read_to_string(&token_file)
        .expect("the generated admin token file")
        .trim()
        .to_owned();
    let app = node.app(&admin);
    let mut secrets = Secrets::default();
    secrets.add(&admin);

    let key = app.service_key().await;
    let (status, other) = app
        .post("/v1/service-keys", &admin, json!({"name": "other"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{other}");
    let other_key = other["key"].as_str().unwrap().to_owned();
    let phone = app.device(&key, "logged").await;
    let browser = app.device(&key, "logged").await;
    let bad = random_token("hdt_");
    for s in [&key, &other_key, &phone.token, &browser.token, &bad] {
        secrets.add(s);
    }

    // Every path a secret takes: creation, use in the header and in `?token=`, refusals of
    // every kind, revocation, and use after it.
    let mut ws = app.connect(&phone).await;
    let mut ws_browser = ws_from(Ipv4Addr::LOCALHOST, app.port, Some(&browser.token), true)
        .await
        .map_err(|e| e.0)
        .expect("the upgrade with ?token=");
    assert_eq!(ws_browser.recv_json().await["type"], "hello");
    let (status, _, body) = app
        .call_raw(
            "POST",
            "/v1/notifications",
            Some(&key),
            Some(
                json!({"user_id": "logged", "payload": "p"})
                    .to_string()
                    .into_bytes(),
            ),
            &[("Idempotency-Key", "log-test")],
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    ws.recv_notification().await;
    ws.ack(&[&id]).await;
    ws.send_text("not json").await;
    assert_eq!(ws.recv_json().await["type"], "error");
    assert_eq!(
        app.get("/v1/devices?user_id=logged", &bad).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.get("/v1/stats", &key).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        app.get("/v1/stats", &phone.token).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.get(&format!("/v1/notifications/{id}"), &other_key)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(app.connect_raw(&key).await.err(), Some(403));
    assert_eq!(
        ws_from(Ipv4Addr::LOCALHOST, app.port, Some(&bad), true)
            .await
            .err()
            .map(|e| e.0),
        Some(401)
    );
    assert_eq!(
        app.delete(&format!("/v1/devices/{}", browser.id), &key)
            .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(ws_browser.expect_close().await, Some(4001));
    assert_eq!(app.connect_raw(&browser.token).await.err(), Some(401));
    assert_eq!(
        app.delete(
            &format!("/v1/service-keys/{}", other["id"].as_str().unwrap()),
            &admin
        )
        .await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.get("/v1/service-keys", &other_key).await.0,
        StatusCode::UNAUTHORIZED
    );
    app.stats().await;
    app.metrics_text().await;
    ws.close().await;

    // Stopped the orderly way, so the shutdown is logged too.
    node.signal("-TERM");
    assert!(node.exited(Duration::from_secs(15)).await.success());
    let log = node.log_text();
    let out = std::fs::read_to_string(dir.path().join("serve.out")).unwrap_or_default();
    assert!(
        log.contains("DEBUG") && log.contains(&token_file.display().to_string()),
        "a debug log that names the token file:\n{log}"
    );
    secrets.assert_absent("the server's log (stderr)", &log);
    secrets.assert_absent("the server's stdout", &out);
    println!(
        "debug log [{b:?}]: {} lines, {} bytes, no secret among {} needles",
        log.lines().count(),
        log.len(),
        secrets.needles().len()
    );
}
