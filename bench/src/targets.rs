//! Issue 4's targets, judged on one report: for each target that the run can speak to, what was
//! measured, what was wanted, whether it was met and, if not, by how much. The same targets and
//! the full account are in docs/BENCHMARKS.md ("Against the targets").

use serde_json::{json, Value};

use crate::report::round;

/// Idle sessions: server RSS per session, at most (bytes).
pub const MAX_RSS_PER_SESSION_B: f64 = 10_000.0;
/// Notifications delivered and acked per second, end to end: on SQLite, on PostgreSQL.
pub const MIN_RATE_SQLITE: f64 = 40_000.0;
pub const MIN_RATE_POSTGRES: f64 = 20_000.0;
/// The offered rate at which the latency targets apply (posts per second).
pub const LATENCY_AT_RATE: f64 = 10_000.0;
/// End-to-end delivery latency at that rate, at most (ms).
pub const MAX_P99_MS: f64 = 5.0;
pub const MAX_P999_MS: f64 = 20.0;
/// Herald's delivered-and-acked rate over Mosquitto's QoS 1 rate in the same run, at least.
pub const MIN_RATIO_TO_MQTT: f64 = 1.0;

enum Want {
    AtMost(f64),
    AtLeast(f64),
}

fn verdict(target: &str, measured: Option<f64>, want: Want, unit: &str) -> Option<Value> {
    let m = measured?;
    let (met, by, limit, op) = match want {
        Want::AtMost(t) => (m <= t, m - t, t, "<="),
        Want::AtLeast(t) => (m >= t, t - m, t, ">="),
    };
    let wanted = format!("{op} {limit} {unit}").trim_end().to_owned();
    Some(json!({
        "target": target,
        "wanted": wanted,
        "measured": round(m, 3),
        "met": met,
        "missed_by": if met { Value::Null } else { json!(round(by, 3)) },
        "missed_by_percent": match met {
            true => Value::Null,
            // Percent of the target; a target of zero (nothing lost) has no percentage.
            false if limit == 0.0 => Value::Null,
            false => json!(round(by / limit * 100.0, 1)),
        },
    }))
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

/// The verdicts of a delivery run (deliver, replay, or Herald's half of compare).
fn delivery(r: &Value, label: &str) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some((rate, backend)) = rate_target(label) {
        out.extend(verdict(
            &format!("delivered and acked per second on {backend}"),
            r["rates"]["acks_per_s"].as_f64(),
            Want::AtLeast(rate),
            "/s",
        ));
    }
    let offered = r["params"]["rate_per_s"].as_f64().unwrap_or(0.0);
    // The latency targets are set at 10,000/s; a run at another rate says nothing about them.
    if (offered - LATENCY_AT_RATE).abs() < 1.0 {
        let e2e = &r["e2e_delivery"];
        out.extend(verdict(
            "end-to-end p99 at 10,000/s",
            e2e["p99_ms"].as_f64(),
            Want::AtMost(MAX_P99_MS),
            "ms",
        ));
        out.extend(verdict(
            "end-to-end p99.9 at 10,000/s",
            e2e["p999_ms"].as_f64(),
            Want::AtMost(MAX_P999_MS),
            "ms",
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

/// Every verdict the report can speak to, as a JSON array.
pub fn judge(r: &Value) -> Value {
    let label = r["label"].as_str().unwrap_or("");
    let verdicts: Vec<Value> = match r["scenario"].as_str() {
        Some("connect") => verdict(
            "idle server RSS per session",
            r["server"]["rss_bytes_per_session_after_hold"].as_f64(),
            Want::AtMost(MAX_RSS_PER_SESSION_B),
            "B",
        )
        .into_iter()
        .collect(),
        Some("deliver") | Some("replay") => delivery(r, label),
        Some("compare") => {
            let mut v = delivery(&r["herald"], label);
            v.extend(verdict(
                "Herald's delivered+acked rate / Mosquitto QoS 1's",
                r["ratio_acked_per_s"].as_f64(),
                Want::AtLeast(MIN_RATIO_TO_MQTT),
                "",
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
            let head = format!(
                "{} {} (want {})",
                v["target"].as_str().unwrap_or("?"),
                v["measured"],
                v["wanted"].as_str().unwrap_or("?")
            );
            if v["met"].as_bool() == Some(true) {
                format!("{head}: met")
            } else {
                match v["missed_by_percent"].as_f64() {
                    Some(pct) => format!("{head}: MISSED by {} ({pct:.1}%)", v["missed_by"]),
                    None => format!("{head}: MISSED by {}", v["missed_by"]),
                }
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
            "params": {"rate_per_s": rate},
            "rates": {"acks_per_s": acks},
            "e2e_delivery": {"p99_ms": p99, "p999_ms": p999},
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
    fn a_run_at_10k_on_sqlite_is_judged_on_rate_latency_and_loss() {
        let v = judge(&deliver("sqlite", 10_000.0, 9_994.0, 7.2, 11.2, 0));
        assert_eq!(v.as_array().unwrap().len(), 4);
        let rate = find(&v, "delivered and acked per second on SQLite");
        assert_eq!(rate["met"], false);
        assert_eq!(rate["missed_by"], 30_006.0);
        assert_eq!(rate["missed_by_percent"], 75.0);
        let p99 = find(&v, "end-to-end p99 at");
        assert_eq!(p99["met"], false);
        assert_eq!(p99["missed_by"], 2.2);
        assert_eq!(find(&v, "end-to-end p99.9")["met"], true);
        assert_eq!(find(&v, "end-to-end p99.9")["missed_by"], Value::Null);
        assert_eq!(find(&v, "notifications lost")["met"], true);
        let text = line(&v);
        assert!(
            text.contains("end-to-end p99 at 10,000/s 7.2 (want <= 5 ms): MISSED by 2.2 (44.0%)"),
            "{text}"
        );
        assert!(
            text.contains("end-to-end p99.9 at 10,000/s 11.2 (want <= 20 ms): met"),
            "{text}"
        );
    }

    #[test]
    fn latency_is_judged_only_at_10k_and_the_rate_by_the_labels_backend() {
        let v = judge(&deliver("pg", 5_000.0, 25_000.0, 50.0, 90.0, 3));
        assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
        assert_eq!(
            find(&v, "delivered and acked per second on PostgreSQL")["met"],
            true
        );
        let lost = find(&v, "notifications lost");
        assert_eq!(
            (lost["met"].as_bool(), lost["missed_by"].as_f64()),
            (Some(false), Some(3.0))
        );
        // A label that names no backend: no throughput target to judge against.
        let v = judge(&deliver("node-2", 10_000.0, 10_000.0, 4.0, 9.0, 0));
        assert!(v
            .as_array()
            .unwrap()
            .iter()
            .all(|x| !x["target"].as_str().unwrap().starts_with("delivered")));
        assert_eq!(find(&v, "end-to-end p99 at")["met"], true);
    }

    #[test]
    fn idle_memory_and_the_ratio_to_mosquitto() {
        let v = judge(&json!({
            "scenario": "connect", "label": "sqlite",
            "server": {"rss_bytes_per_session_after_hold": 4454.0},
        }));
        assert_eq!(find(&v, "idle server RSS")["met"], true);
        let v = judge(&json!({
            "scenario": "compare", "label": "sqlite", "ratio_acked_per_s": 0.999,
            "herald": deliver("sqlite", 10_000.0, 9_994.0, 7.2, 11.2, 0),
        }));
        let ratio = find(&v, "Herald's delivered+acked rate");
        assert_eq!(ratio["met"], false);
        assert_eq!(ratio["missed_by_percent"], 0.1);
        assert_eq!(v.as_array().unwrap().len(), 5);
        // A scenario with no target, and an empty list, print nothing.
        assert_eq!(judge(&json!({"scenario": "fanout"})), json!([]));
        assert_eq!(line(&json!([])), "");
    }
}
