//! Issue 4's targets, judged on one report: for each target that the run can speak to, what was
//! measured, what was wanted, whether it was met and, if not, by how much. The same targets and
//! the full account are in docs/BENCHMARKS.md ("Against the targets").

use serde_json::{json, Value};

use crate::report::round;

/// Idle sessions: server RSS per session, at most (bytes).
const MAX_RSS_PER_SESSION_B: f64 = 10_000.0;
/// Notifications delivered and acked per second, end to end: on SQLite, on PostgreSQL.
const MIN_RATE_SQLITE: f64 = 40_000.0;
const MIN_RATE_POSTGRES: f64 = 20_000.0;
/// The offered rate at which the latency targets apply (posts per second).
const LATENCY_AT_RATE: f64 = 10_000.0;
/// End-to-end delivery latency at that rate, at most (ms).
const MAX_P99_MS: f64 = 5.0;
const MAX_P999_MS: f64 = 20.0;
/// Herald's delivered-and-acked rate over Mosquitto's QoS 1 rate in the same run, at least.
const MIN_RATIO_TO_MQTT: f64 = 1.0;

enum Want {
    AtMost(f64),
    AtLeast(f64),
}

/// `unit` follows the number as written (`" ms"`, `"/s"`, `""`). Judged on `measured` as given;
/// shown to 3 decimals (see [`verdict_to`]).
fn verdict(target: &str, measured: Option<f64>, want: Want, unit: &str) -> Option<Value> {
    verdict_to(target, measured, want, unit, 3)
}

/// [`verdict`] shown to `digits` decimals (the percentage to `digits - 2`), for a measure whose
/// misses are small fractions (a ratio of 0.9998 must not show as 1, missed by 0).
fn verdict_to(
    target: &str,
    measured: Option<f64>,
    want: Want,
    unit: &str,
    digits: i32,
) -> Option<Value> {
    let m = measured?;
    let (limit, op, by) = match want {
        Want::AtMost(t) => (t, "<=", m - t),
        Want::AtLeast(t) => (t, ">=", t - m),
    };
    let met = by <= 0.0;
    let wanted = format!("{op} {}{unit}", num(limit));
    Some(json!({
        "target": target,
        "wanted": wanted,
        "measured": round(m, digits),
        "met": met,
        "missed_by": if met { Value::Null } else { json!(round(by, digits)) },
        "missed_by_percent": match met {
            true => Value::Null,
            // Percent of the target; a target of zero (nothing lost) has no percentage.
            false if limit == 0.0 => Value::Null,
            false => json!(round(by / limit * 100.0, (digits - 2).max(1))),
        },
    }))
}

/// A target the run cannot speak to, and why (e.g. it offered less than the target rate).
fn untested(target: &str, why: String) -> Value {
    json!({"target": target, "met": null, "not_tested": why})
}

/// A number as a person writes it: no `.0` on whole numbers.
fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// The throughput target for the backend the report's `--label` names (`sqlite`, `pg` or
/// `postgres`); none for another label.
fn rate_target(label: &str) -> Option<(f64, &'static str)> {
    let l = label.to_ascii_lowercase();
    if l.starts_with("sqlite") {
        Some((MIN_RATE_SQLITE, "SQLite"))
    } else if l.starts_with("pg") || l.starts_with("postgres") {
        Some((MIN_RATE_POSTGRES, "PostgreSQL"))
    } else {
        None
    }
}

/// The verdicts of a delivery run (deliver, replay, a `sum` of several, or Herald's half of
/// compare). `label` names the backend (see [`rate_target`]).
fn delivery(r: &Value, label: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let offered = r["params"]["rate_per_s"].as_f64().unwrap_or(0.0);
    if let Some((rate, backend)) = rate_target(label) {
        let name = format!("delivered and acked per second on {backend}");
        // Deliveries offered: posts per second times targets per post.
        let per_post = r["params"]["targets_per_post"].as_f64().unwrap_or(1.0);
        if offered * per_post >= rate {
            out.extend(verdict(
                &name,
                r["rates"]["acks_per_s"].as_f64(),
                Want::AtLeast(rate),
                "/s",
            ));
        } else {
            // A run offered less than the target says nothing about reaching it.
            out.push(untested(
                &name,
                format!("offered {}/s", num(offered * per_post)),
            ));
        }
    }
    // The latency targets are set at 10,000/s; a run at another rate says nothing about them.
    if (offered - LATENCY_AT_RATE).abs() < 1.0 {
        // An overloaded run may answer nothing sent after the warm-up: then all of it counts.
        let e2e = match r["e2e_delivery"]["count"].as_u64() {
            Some(0) => &r["e2e_delivery_incl_warmup"],
            _ => &r["e2e_delivery"],
        };
        out.extend(verdict(
            "end-to-end p99 at 10,000/s",
            e2e["p99_ms"].as_f64(),
            Want::AtMost(MAX_P99_MS),
            " ms",
        ));
        out.extend(verdict(
            "end-to-end p99.9 at 10,000/s",
            e2e["p999_ms"].as_f64(),
            Want::AtMost(MAX_P999_MS),
            " ms",
        ));
    }
    out.extend(verdict(
        "notifications lost",
        r["deliveries"]["lost"].as_f64(),
        Want::AtMost(0.0),
        "",
    ));
    out
}

/// The backend of a `sum` report: its processes' label, if they all have the same one.
fn sum_label(r: &Value) -> &str {
    let mut labels = r["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["label"].as_str().unwrap_or(""));
    match labels.next() {
        Some(first) if labels.all(|l| l == first) => first,
        _ => "",
    }
}

/// Every verdict the report can speak to, as a JSON array.
pub fn judge(r: &Value) -> Value {
    let label = r["label"].as_str().unwrap_or("");
    let verdicts: Vec<Value> = match r["scenario"].as_str() {
        Some("connect") => verdict(
            "idle server RSS per session",
            r["server"]["rss_bytes_per_session_after_hold"].as_f64(),
            Want::AtMost(MAX_RSS_PER_SESSION_B),
            " B",
        )
        .into_iter()
        .collect(),
        Some("deliver") | Some("replay") => delivery(r, label),
        Some("deliver-sum") => delivery(r, sum_label(r)),
        Some("compare") => {
            let mut v = delivery(&r["herald"], label);
            v.extend(verdict_to(
                "Herald's delivered+acked rate / Mosquitto QoS 1's",
                r["ratio_acked_per_s"].as_f64(),
                Want::AtLeast(MIN_RATIO_TO_MQTT),
                "",
                5,
            ));
            v
        }
        _ => Vec::new(),
    };
    Value::Array(verdicts)
}

/// `targets: …` for the summary line: each verdict, and by how much a missed one was missed.
pub fn line(verdicts: &Value) -> String {
    let Some(list) = verdicts.as_array().filter(|l| !l.is_empty()) else {
        return String::new();
    };
    let parts: Vec<String> = list
        .iter()
        .map(|v| {
            let target = v["target"].as_str().unwrap_or("?");
            if let Some(why) = v["not_tested"].as_str() {
                return format!("{target}: not tested ({why})");
            }
            let head = format!(
                "{target}: {} (want {})",
                v["measured"]
                    .as_f64()
                    .map(num)
                    .unwrap_or_else(|| "?".into()),
                v["wanted"].as_str().unwrap_or("?")
            );
            if v["met"].as_bool() == Some(true) {
                return format!("{head} met");
            }
            let by = v["missed_by"]
                .as_f64()
                .map(num)
                .unwrap_or_else(|| "?".into());
            match v["missed_by_percent"].as_f64() {
                // One decimal, unless the miss is smaller (a ratio short by 0.028 %).
                Some(pct) if pct.abs() >= 0.1 => format!("{head} MISSED by {by} ({pct:.1}%)"),
                Some(pct) => format!("{head} MISSED by {by} ({}%)", num(pct)),
                None => format!("{head} MISSED by {by}"),
            }
        })
        .collect();
    format!("targets: {}", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(label: &str, rate: f64, acks: f64, p99: f64, p999: f64, lost: u64) -> Value {
        json!({
            "scenario": "deliver", "label": label,
            "params": {"rate_per_s": rate, "targets_per_post": 1},
            "rates": {"acks_per_s": acks},
            "e2e_delivery": {"count": 1000, "p99_ms": p99, "p999_ms": p999},
            "deliveries": {"lost": lost},
        })
    }

    fn find<'a>(v: &'a Value, prefix: &str) -> &'a Value {
        v.as_array()
            .unwrap()
            .iter()
            .find(|x| x["target"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no verdict {prefix} in {v}"))
    }

    #[test]
    fn a_run_at_10k_is_judged_on_latency_and_loss_not_on_a_rate_it_never_offered() {
        let v = judge(&deliver("sqlite", 10_000.0, 9_994.0, 7.2, 11.2, 0));
        assert_eq!(v.as_array().unwrap().len(), 4, "{v}");
        let rate = find(&v, "delivered and acked per second on SQLite");
        assert_eq!(rate["met"], Value::Null);
        assert_eq!(rate["not_tested"], "offered 10000/s");
        let p99 = find(&v, "end-to-end p99 at");
        assert_eq!(p99["met"], false);
        assert_eq!(p99["missed_by"], 2.2);
        assert_eq!(p99["missed_by_percent"], 44.0);
        assert_eq!(find(&v, "end-to-end p99.9")["met"], true);
        assert_eq!(find(&v, "end-to-end p99.9")["missed_by"], Value::Null);
        assert_eq!(find(&v, "notifications lost")["met"], true);
        let text = line(&v);
        for part in [
            "delivered and acked per second on SQLite: not tested (offered 10000/s)",
            "end-to-end p99 at 10,000/s: 7.2 (want <= 5 ms) MISSED by 2.2 (44.0%)",
            "end-to-end p99.9 at 10,000/s: 11.2 (want <= 20 ms) met",
            "notifications lost: 0 (want <= 0) met",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
    }

    #[test]
    fn the_rate_is_judged_when_offered_against_the_labels_backend() {
        // 2,000 posts/s to 10 devices each offers 20,000 deliveries/s: PostgreSQL's target.
        let mut r = deliver("pg", 2_000.0, 19_136.0, 50.0, 90.0, 3);
        r["params"]["targets_per_post"] = json!(10);
        let v = judge(&r);
        assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
        let rate = find(&v, "delivered and acked per second on PostgreSQL");
        assert_eq!(rate["met"], false);
        assert_eq!(rate["missed_by"], 864.0);
        assert_eq!(rate["missed_by_percent"], 4.3);
        let lost = find(&v, "notifications lost");
        assert_eq!(lost["met"], false);
        assert_eq!(lost["missed_by"], 3.0);
        assert_eq!(lost["missed_by_percent"], Value::Null);
        assert!(
            line(&v).ends_with("notifications lost: 3 (want <= 0) MISSED by 3"),
            "{}",
            line(&v)
        );
        assert_eq!(
            find(
                &judge(&deliver("sqlite", 40_000.0, 40_000.0, 1.0, 2.0, 0)),
                "delivered"
            )["met"],
            true
        );
        // A label that names no backend: no throughput target at all.
        let v = judge(&deliver("node-2", 10_000.0, 10_000.0, 4.0, 9.0, 0));
        assert!(v
            .as_array()
            .unwrap()
            .iter()
            .all(|x| !x["target"].as_str().unwrap().starts_with("delivered")));
        assert_eq!(find(&v, "end-to-end p99 at")["met"], true);
    }

    #[test]
    fn an_overloaded_run_and_a_sum_of_processes_are_judged_too() {
        // Nothing sent after the warm-up was answered: the latency of everything counts.
        let mut r = deliver("sqlite", 10_000.0, 6_000.0, 0.0, 0.0, 0);
        r["e2e_delivery"] = json!({"count": 0});
        r["e2e_delivery_incl_warmup"] = json!({"count": 9, "p99_ms": 2_500.0, "p999_ms": 2_600.0});
        assert_eq!(find(&judge(&r), "end-to-end p99 at")["measured"], 2_500.0);
        // `sum`: the backend comes from its processes' labels, when they agree.
        let mut r = deliver("2 processes", 40_000.0, 38_000.0, 3.0, 9.0, 0);
        r["scenario"] = json!("deliver-sum");
        r["processes"] = json!([{"label": "sqlite"}, {"label": "sqlite"}]);
        assert_eq!(
            find(&judge(&r), "delivered and acked per second on SQLite")["missed_by"],
            2_000.0
        );
        r["processes"] = json!([{"label": "sqlite"}, {"label": "pg"}]);
        assert!(judge(&r)
            .as_array()
            .unwrap()
            .iter()
            .all(|x| !x["target"].as_str().unwrap().starts_with("delivered")));
    }

    #[test]
    fn idle_memory_and_the_ratio_to_mosquitto() {
        let v = judge(&json!({
            "scenario": "connect", "label": "sqlite",
            "server": {"rss_bytes_per_session_after_hold": 4454.0},
        }));
        assert_eq!(find(&v, "idle server RSS")["met"], true);
        assert!(
            line(&v).contains("idle server RSS per session: 4454 (want <= 10000 B) met"),
            "{}",
            line(&v)
        );
        let v = judge(&json!({
            "scenario": "compare", "label": "sqlite", "ratio_acked_per_s": 0.999,
            "herald": deliver("sqlite", 10_000.0, 9_994.0, 7.2, 11.2, 0),
        }));
        let ratio = find(&v, "Herald's delivered+acked rate");
        assert_eq!(ratio["met"], false);
        assert_eq!(ratio["missed_by_percent"], 0.1);
        assert_eq!(v.as_array().unwrap().len(), 5);
        // Both keep up, Herald 2 deliveries/s short: missed, and shown so.
        let v = judge(&json!({
            "scenario": "compare", "label": "sqlite", "ratio_acked_per_s": 9_997.8 / 9_999.6,
            "herald": deliver("sqlite", 10_000.0, 9_997.8, 5.0, 11.0, 0),
        }));
        let ratio = find(&v, "Herald's delivered+acked rate");
        assert_eq!(ratio["met"], false);
        assert_eq!(ratio["measured"], 0.99982);
        assert_eq!(ratio["missed_by_percent"], 0.018);
        assert!(
            line(&v).ends_with("0.99982 (want >= 1) MISSED by 0.00018 (0.018%)"),
            "{}",
            line(&v)
        );
        // A scenario with no target, and an empty list, print nothing.
        assert_eq!(judge(&json!({"scenario": "fanout"})), json!([]));
        assert_eq!(line(&json!([])), "");
    }
}
