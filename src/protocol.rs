//! The WebSocket wire protocol of API.md: frames in both directions, close codes, and the decoder
//! for what devices send. Pure functions only — no sockets, no actors — so it can be fuzzed.

use serde::{Deserialize, Serialize};

use crate::domain::{self, MAX_ID_CHARS};

/// Close codes (API.md). 1000–1009 are RFC 6455's; 4000s are Herald's own.
pub mod close {
    /// Normal closure (also used when a silent peer misses its heartbeat).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down; reconnect to another node or later.
    pub const GOING_AWAY: u16 = 1001;
    /// The client sent a binary frame; Herald speaks text only.
    pub const UNSUPPORTED: u16 = 1003;
    /// The client kept sending frames Herald could not use.
    pub const POLICY: u16 = 1008;
    /// A frame was larger than the configured maximum.
    pub const TOO_BIG: u16 = 1009;
    /// A bug in Herald ended the session (logged); reconnect.
    pub const INTERNAL: u16 = 1011;
    /// Herald could not serve the session (database unavailable); try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The device was revoked; do not reconnect with this token.
    pub const REVOKED: u16 = 4001;
    /// A newer session of the same device replaced this one.
    pub const REPLACED: u16 = 4002;
    /// The device did not read and its outbound buffer filled up.
    pub const TOO_SLOW: u16 = 4008;
}

/// Most notification ids one `ack` frame may carry.
pub const MAX_ACK_IDS: usize = 1000;

/// What a device may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Acknowledges notifications by id.
    Ack { ids: Vec<String> },
    /// Asks for a `pong`.
    Ping,
}

/// Why a client frame was refused: sent back to the client as an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
}

fn frame_error(code: &'static str, message: impl Into<String>) -> FrameError {
    FrameError {
        code,
        message: message.into(),
    }
}

#[derive(Deserialize)]
struct RawFrame {
    #[serde(rename = "type")]
    kind: Option<String>,
    ids: Option<serde_json::Value>,
}

/// Decodes one text frame from a device. Unknown fields are ignored so that newer clients can
/// talk to older servers; everything else that is wrong is named in the error.
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let not_json = || frame_error("invalid_json", "frames must be JSON objects");
    // serde would also fill `RawFrame` from an array of its fields in order (`["ping"]`).
    let json_whitespace = [' ', '\t', '\n', '\r'];
    if !text.trim_start_matches(json_whitespace).starts_with('{') {
        return Err(not_json());
    }
    let raw: RawFrame = serde_json::from_str(text).map_err(|_| not_json())?;
    match raw.kind.as_deref() {
        None => Err(frame_error("missing_type", "the frame has no \"type\"")),
        Some("ping") => Ok(ClientFrame::Ping),
        Some("ack") => {
            let Some(serde_json::Value::Array(values)) = raw.ids else {
                return Err(frame_error(
                    "invalid_ack",
                    "\"ids\" must be an array of notification ids",
                ));
            };
            if values.len() > MAX_ACK_IDS {
                return Err(frame_error(
                    "too_many_ids",
                    format!("at most {MAX_ACK_IDS} ids per ack"),
                ));
            }
            let mut ids = Vec::with_capacity(values.len());
            for value in values {
                match value {
                    serde_json::Value::String(id) if domain::parse_id("ids", &id).is_ok() => {
                        ids.push(id)
                    }
                    _ => {
                        return Err(frame_error(
                            "invalid_ack",
                            format!("each id must be a string of 1 to {MAX_ID_CHARS} characters"),
                        ))
                    }
                }
            }
            Ok(ClientFrame::Ack { ids })
        }
        Some(_) => Err(frame_error(
            "unknown_type",
            "\"type\" must be \"ack\" or \"ping\"",
        )),
    }
}

/// The first frame of every session.
#[derive(Debug, Serialize)]
pub struct Hello<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub session_id: &'a str,
    pub device_id: &'a str,
    pub user_id: &'a str,
    pub heartbeat_interval_ms: u64,
}

pub fn hello_frame(session_id: &str, device_id: &str, user_id: &str, heartbeat_ms: u64) -> String {
    serde_json::to_string(&Hello {
        kind: "hello",
        session_id,
        device_id,
        user_id,
        heartbeat_interval_ms: heartbeat_ms,
    })
    .expect("a hello frame always serializes")
}

/// A notification frame. `id` is one of Herald's UUIDs and `payload` is JSON that was validated
/// when it was posted, so both go in as they are; built once per notification and shared by
/// every session it goes to.
pub fn notification_frame(id: &str, created_at: i64, expires_at: i64, payload: &str) -> String {
    format!(
        r#"{{"type":"notification","id":"{id}","created_at":"{}","expires_at":"{}","payload":{payload}}}"#,
        domain::rfc3339(created_at),
        domain::rfc3339(expires_at),
    )
}

pub const PONG_FRAME: &str = r#"{"type":"pong"}"#;

pub fn error_frame(err: &FrameError) -> String {
    serde_json::json!({"type": "error", "code": err.code, "message": err.message}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_two_client_frames() {
        assert_eq!(
            decode_client_frame(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping)
        );
        assert_eq!(
            decode_client_frame(r#"{"type":"ack","ids":["a","b"],"extra":1}"#),
            Ok(ClientFrame::Ack {
                ids: vec!["a".into(), "b".into()]
            })
        );
    }

    #[test]
    fn names_what_is_wrong() {
        let code = |t: &str| decode_client_frame(t).unwrap_err().code;
        assert_eq!(code("not json"), "invalid_json");
        assert_eq!(code("[1,2]"), "invalid_json");
        assert_eq!(code(r#"["ping"]"#), "invalid_json");
        assert_eq!(code(r#" ["ack",["a"]]"#), "invalid_json");
        assert_eq!(code(r#"{"type":5}"#), "invalid_json");
        assert_eq!(code("{}"), "missing_type");
        assert_eq!(code(r#"{"type":"subscribe"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"ack"}"#), "invalid_ack");
        assert_eq!(code(r#"{"type":"ack","ids":"x"}"#), "invalid_ack");
        assert_eq!(code(r#"{"type":"ack","ids":[1]}"#), "invalid_ack");
        assert_eq!(code(r#"{"type":"ack","ids":[""]}"#), "invalid_ack");
        let many = format!(
            r#"{{"type":"ack","ids":[{}]}}"#,
            vec![r#""x""#; 1001].join(",")
        );
        assert_eq!(code(&many), "too_many_ids");
    }

    #[test]
    fn notification_frames_are_json() {
        let f = notification_frame("id-1", 0, 1000, r#"{"a":[1,"x"]}"#);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["type"], "notification");
        assert_eq!(v["payload"]["a"][1], "x");
        assert_eq!(v["expires_at"], "1970-01-01T00:00:01.000Z");
    }
}
