//! Fuzzes `herald::http::check_notification_request`: what `POST /v1/notifications` does to a
//! request body before it touches the database (JSON parsing, then the limits of API.md).
//!
//! Asserts, for any body: no panic, the same verdict twice; a refusal is `400 invalid_json`,
//! `422 invalid_request` or `413 too_large` (API.md: bad input is never a `500`); an accepted body
//! is UTF-8, a JSON object of the documented members only, each once, with 1 to 1000 targets,
//! `user_id`s of 1–128 characters and device ids of 1–`MAX_ID_CHARS` without control characters,
//! `ttl_seconds` absent or 1–2,592,000 and a payload of at most 64 KiB; and the verdict (and the
//! code of a refusal where only one limit is broken) agrees with an independent reading of the
//! body (see `expected`), so valid posts are not refused either.
#![no_main]

use actix_web::ResponseError;
use herald::domain::MAX_ID_CHARS;
use herald::http::check_notification_request;
use herald_fuzz::{
    is_bounded_text, is_json, Entries, API_MAX_PAYLOAD_BYTES, API_MAX_TARGETS,
    API_MAX_USER_ID_CHARS, API_TTL_SECONDS,
};
use libfuzzer_sys::fuzz_target;

const MEMBERS: [&str; 5] = [
    "user_ids",
    "device_ids",
    "user_id",
    "payload",
    "ttl_seconds",
];

#[derive(Debug, PartialEq)]
enum Expect {
    Accept,
    /// Refused, with any of these codes (the first limit Herald checks decides which).
    Refuse(Vec<&'static str>),
}

fuzz_target!(|data: &[u8]| {
    let verdict = check_notification_request(data);
    assert_eq!(
        verdict.as_ref().map_err(|e| e.code()),
        check_notification_request(data)
            .as_ref()
            .map_err(|e| e.code()),
        "not deterministic"
    );
    if verdict.is_ok() {
        assert!(
            std::str::from_utf8(data).is_ok(),
            "accepted a body that is not UTF-8"
        );
    }
    if let Err(e) = &verdict {
        let status = e.status_code().as_u16();
        match e.code() {
            "invalid_json" => assert_eq!(status, 400),
            "invalid_request" => assert_eq!(status, 422),
            "too_large" => assert_eq!(status, 413),
            other => panic!("unexpected refusal {other} ({status}): {e}"),
        }
    }
    let expected = expected(data);
    match (&verdict, &expected) {
        (Ok(()), Expect::Accept) => {}
        (Err(e), Expect::Refuse(codes)) => assert!(
            codes.contains(&e.code()),
            "refused with {e}, expected one of {codes:?}: {:?}",
            String::from_utf8_lossy(data)
        ),
        (got, want) => panic!(
            "verdict {:?}, expected {want:?}, for {:?}",
            got.as_ref().map_err(|e| e.to_string()),
            String::from_utf8_lossy(data)
        ),
    }
});

/// The verdict API.md calls for, read independently of Herald's parser: the body must be one JSON
/// object of the members `user_ids` and `device_ids` (arrays of strings), `user_id` (a string or
/// null), `payload` (required, any JSON) and `ttl_seconds` (an integer or null), none twice
/// (`invalid_request`; `invalid_json` only if it is not JSON); then the limits of API.md
/// (`invalid_request`, or `too_large` for the payload).
fn expected(body: &[u8]) -> Expect {
    let Some(object) = Entries::parse(body) else {
        // Not JSON, or not an object. Which code depends on where serde first stopped: a type
        // mismatch before a syntax error is `invalid_request`.
        return if is_json(body) {
            Expect::Refuse(vec!["invalid_request", "invalid_json"])
        } else {
            Expect::Refuse(vec!["invalid_json", "invalid_request"])
        };
    };
    let mut user_ids: Vec<String> = Vec::new();
    let mut device_ids: Vec<String> = Vec::new();
    let mut ttl: Option<i64> = None;
    let mut payload_len = None;
    let mut payload_readable = true;
    // Members are read in order and the first that does not fit decides, as in any streaming
    // parser. A string that is not valid JSON text (a lone surrogate escape) is `invalid_json`.
    for (i, (name, raw)) in object.0.iter().enumerate() {
        let twice = object.0[..i].iter().any(|(n, _)| n == name);
        if !MEMBERS.contains(&name.as_str()) || twice {
            return Expect::Refuse(vec!["invalid_request"]);
        }
        let refused = |e: serde_json::Error| {
            Expect::Refuse(vec![if e.is_data() {
                "invalid_request"
            } else {
                "invalid_json"
            }])
        };
        match name.as_str() {
            "user_ids" => match serde_json::from_str::<Vec<String>>(raw.get()) {
                Ok(v) => user_ids.extend(v),
                Err(e) => return refused(e),
            },
            "device_ids" => match serde_json::from_str::<Vec<String>>(raw.get()) {
                Ok(v) => device_ids = v,
                Err(e) => return refused(e),
            },
            "user_id" => match serde_json::from_str::<Option<String>>(raw.get()) {
                Ok(v) => user_ids.extend(v),
                Err(e) => return refused(e),
            },
            "ttl_seconds" => match serde_json::from_str::<Option<i64>>(raw.get()) {
                Ok(v) => ttl = v,
                Err(e) => return refused(e),
            },
            _ => {
                payload_len = Some(raw.get().len());
                // Herald refuses a payload devices could not read back: nested deeper than 128,
                // or with a lone surrogate escape (serde_json's rules, as a device's parser).
                payload_readable = serde_json::from_str::<serde_json::Value>(raw.get()).is_ok();
            }
        }
    }
    let Some(payload_len) = payload_len else {
        return Expect::Refuse(vec!["invalid_request"]);
    };
    let mut broken = Vec::new();
    let targets = user_ids.len() + device_ids.len();
    if targets == 0 || targets > API_MAX_TARGETS {
        broken.push("invalid_request");
    }
    if !user_ids
        .iter()
        .all(|u| is_bounded_text(u, 1, API_MAX_USER_ID_CHARS))
    {
        broken.push("invalid_request");
    }
    if !device_ids
        .iter()
        .all(|d| is_bounded_text(d, 1, MAX_ID_CHARS))
    {
        broken.push("invalid_request");
    }
    if ttl.is_some_and(|t| !API_TTL_SECONDS.contains(&t)) {
        broken.push("invalid_request");
    }
    if payload_len > API_MAX_PAYLOAD_BYTES {
        broken.push("too_large");
    }
    if !payload_readable {
        broken.push("invalid_request");
    }
    if broken.is_empty() {
        Expect::Accept
    } else {
        Expect::Refuse(broken)
    }
}
