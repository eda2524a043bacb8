//! `GET /metrics`: Prometheus text that a real parser reads, names prefixed `herald_`, counters
//! ending `_total`, and figures that move when traffic flows.

use std::collections::HashMap;

use awc::http::StatusCode;
use serde_json::json;

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    metrics_parse_and_move_with_traffic,
    metrics_are_for_the_admin_only
);

/// Scrapes `/metrics` and parses it with `prometheus-parse`; samples by `name{labels}`.
async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let text = app.metrics_text().await;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let parsed =
        prometheus_parse::Scrape::parse(lines).expect("the Prometheus text parser reads it");
    assert!(!parsed.samples.is_empty());
    let mut out = HashMap::new();
    for s in parsed.samples {
        assert!(
            s.metric.starts_with("herald_"),
            "unprefixed metric {}",
            s.metric
        );
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => h.last().map(|b| b.count).unwrap_or(0.0),
            prometheus_parse::Value::Summary(_) => continue,
        };
        let key = if labels.is_empty() {
            s.metric
        } else {
            format!("{}{{{}}}", s.metric, labels.join(","))
        };
        out.insert(key, value);
    }
    for (name, doc) in &parsed.docs {
        assert!(!doc.is_empty(), "{name} has no help text");
    }
    out
}

async fn metrics_parse_and_move_with_traffic(b: Backend) {
    let app = spawn_app(b).await;
    let before = scrape(&app).await;
    for name in [
        "herald_sessions_open",
        "herald_session_connects_total",
        "herald_notifications_accepted_total",
        "herald_notifications_delivered_total",
        "herald_notifications_acked_total",
        "herald_notifications_expired_total",
        "herald_db_pool_size_connections",
        "herald_db_pool_idle_connections",
        "herald_db_pool_in_use_connections",
        "herald_db_pool_waits_total",
        "herald_db_pool_timeouts_total",
        "herald_executor_queue_depth_jobs",
        "herald_executor_rejected_total",
        "herald_delivery_latency_seconds_count",
        "herald_executor_job_duration_seconds_count",
    ] {
        assert!(before.contains_key(name), "{name} missing: {before:?}");
    }
    assert_eq!(before["herald_db_pool_size_connections"], 4.0);

    let key = app.service_key().await;
    let phone = app.device(&key, "mia").await;
    let mut ws = app.connect(&phone).await;
    // The first may come through the session's replay; once it has come, the session is live
    // and the second is pushed live (the only path the delivery-latency histogram measures).
    let first = app.notify_device(&key, &phone, json!("hi")).await;
    assert_eq!(ws.recv_notification().await["id"], first.as_str());
    let id = app.notify_device(&key, &phone, json!("again")).await;
    assert_eq!(ws.recv_notification().await["id"], id.as_str());
    ws.ack(&[&first, &id]).await;
    eventually("the acks are counted", || async {
        app.stats().await["notifications"]["acked"] == 2
    })
    .await;
    let during = scrape(&app).await;
    assert_eq!(during["herald_sessions_open"], 1.0);
    assert_eq!(during["herald_session_connects_total"], 1.0);
    assert_eq!(during["herald_notifications_accepted_total"], 2.0);
    assert_eq!(during["herald_notifications_delivered_total"], 2.0);
    assert_eq!(during["herald_notifications_acked_total"], 2.0);
    assert!(during["herald_delivery_latency_seconds_count"] >= 1.0);
    assert!(
        during["herald_executor_job_duration_seconds_count"]
            > before["herald_executor_job_duration_seconds_count"]
    );
    let posts = "herald_http_requests_total{route=/v1/notifications,status=202}";
    assert_eq!(during.get(posts), Some(&2.0), "{during:?}");
    assert!(
        during
            .keys()
            .all(|k| !k.contains(&id) && !k.contains(&phone.id)),
        "ids never become labels"
    );

    ws.close().await;
    eventually("the session end is counted", || async {
        scrape(&app)
            .await
            .get("herald_session_disconnects_total{code=1000}")
            == Some(&1.0)
    })
    .await;
    assert_eq!(scrape(&app).await["herald_sessions_open"], 0.0);
}

async fn metrics_are_for_the_admin_only(b: Backend) {
    let app = spawn_app(b).await;
    let key = app.service_key().await;
    let (status, body) = app.call("GET", "/metrics", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = app.call("GET", "/metrics", Some(&key), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
}
