//! Fuzzes `herald::protocol::decode_client_frame`, the decoder of every text frame a device sends.
//!
//! Asserts, for any input: the decoder does not panic and is deterministic; an `ack` it returns
//! holds at most `MAX_ACK_IDS` ids, each 1..=`MAX_ID_CHARS` characters without control characters,
//! and re-encoding it decodes to the same frame; a refusal has one of the documented codes and
//! becomes an `error` frame (`protocol::error_frame`) that is a JSON object
//! `{"type":"error","code","message"}`, short and not echoing the input. Then it compares the
//! result with an independent reading of the frame (see `expected`).
#![no_main]

use herald::domain::MAX_ID_CHARS;
use herald::protocol::{decode_client_frame, error_frame, ClientFrame, FrameError, MAX_ACK_IDS};
use herald_fuzz::{is_bounded_text, Entries};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Every code the decoder may answer with.
const CODES: [&str; 5] = [
    "invalid_json",
    "missing_type",
    "unknown_type",
    "invalid_ack",
    "too_many_ids",
];

fuzz_target!(|data: &[u8]| {
    // The WebSocket layer only hands the decoder text frames, which are UTF-8 (RFC 6455).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let decoded = decode_client_frame(text);
    assert_eq!(decoded, decode_client_frame(text), "not deterministic");
    match &decoded {
        Ok(ClientFrame::Ping) => {}
        Ok(ClientFrame::Ack { ids }) => {
            assert!(ids.len() <= MAX_ACK_IDS, "{} ids in one ack", ids.len());
            for id in ids {
                assert!(is_bounded_text(id, 1, MAX_ID_CHARS), "ack id {id:?}");
            }
            let again = serde_json::json!({"type": "ack", "ids": ids}).to_string();
            assert_eq!(
                decode_client_frame(&again),
                decoded,
                "ack re-encoded as {again}"
            );
        }
        Err(e) => check_error_frame(e),
    }
    if let Some(expected) = expected(text) {
        match (&decoded, expected) {
            (Err(got), Err(code)) => assert_eq!(got.code, code, "refused {text:?}"),
            (got, want) => assert_eq!(
                got.as_ref().map_err(|e| e.code),
                want.as_ref().map_err(|c| *c),
                "decoded {text:?}"
            ),
        }
    }
});

fn check_error_frame(e: &FrameError) {
    assert!(CODES.contains(&e.code), "unknown code {:?}", e.code);
    assert!(!e.message.is_empty(), "empty message for {}", e.code);
    let frame = error_frame(e);
    assert!(frame.len() <= 256, "error frame of {} bytes", frame.len());
    let v: Value = serde_json::from_str(&frame).expect("an error frame is JSON");
    let object = v.as_object().expect("an error frame is a JSON object");
    assert_eq!(object.len(), 3, "{frame}");
    assert_eq!(v["type"], "error");
    assert_eq!(v["code"], e.code);
    assert_eq!(v["message"], e.message.as_str());
}

/// What API.md and the decoder's documentation say `text` should decode to: frames are JSON
/// objects with a `"type"` (`missing_type` without one, `invalid_json` if it is not a string,
/// `unknown_type` unless `ack` or `ping`); other members are ignored except `ids`, which an `ack`
/// needs as an array (`invalid_ack`) of at most 1000 (`too_many_ids`) ids, each a string of 1 to
/// `MAX_ID_CHARS` characters without control characters (`invalid_ack`). A member given twice is
/// `invalid_json`. `None` where that does not settle it.
fn expected(text: &str) -> Option<Result<ClientFrame, &'static str>> {
    let Some(frame) = Entries::parse(text.as_bytes()) else {
        // Not JSON, or JSON but not an object (an array, a string, …), or an object whose member
        // names do not parse as strings: none of them is a frame.
        return Some(Err("invalid_json"));
    };
    if frame.count("type") > 1 || frame.count("ids") > 1 {
        return Some(Err("invalid_json"));
    }
    let kind = match frame.get("type") {
        None => None,
        Some(raw) => match serde_json::from_str::<Option<String>>(raw.get()) {
            Ok(kind) => kind,
            Err(_) => return Some(Err("invalid_json")),
        },
    };
    // The decoder reads `ids` as a JSON value whatever the type, at one level of nesting inside
    // the frame: wrapping it in an array reads it at the same depth.
    let ids = match frame.get("ids") {
        None => None,
        Some(raw) => match serde_json::from_str::<[Value; 1]>(&format!("[{}]", raw.get())) {
            Ok([ids]) => Some(ids),
            Err(_) => return Some(Err("invalid_json")),
        },
    };
    match kind.as_deref() {
        None => Some(Err("missing_type")),
        Some("ping") => Some(Ok(ClientFrame::Ping)),
        Some("ack") => {
            let Some(Value::Array(values)) = ids else {
                return Some(Err("invalid_ack"));
            };
            if values.len() > 1000 {
                return Some(Err("too_many_ids"));
            }
            let mut ids = Vec::new();
            for v in values {
                match v {
                    Value::String(id) if is_bounded_text(&id, 1, MAX_ID_CHARS) => ids.push(id),
                    _ => return Some(Err("invalid_ack")),
                }
            }
            Some(Ok(ClientFrame::Ack { ids }))
        }
        Some(_) => Some(Err("unknown_type")),
    }
}
