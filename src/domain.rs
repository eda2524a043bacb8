//! Validated values of Herald's domain: user ids, names, TTLs, secrets and times.
//!
//! Every value a client controls is parsed here once, with the limits of API.md, so the rest of
//! the code can rely on it. Nothing here touches the network or the database.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// Longest `user_id`, in characters.
pub const MAX_USER_ID_CHARS: usize = 128;
/// Longest device `name`, in characters.
pub const MAX_DEVICE_NAME_CHARS: usize = 128;
/// Longest service-key `name`, in characters.
pub const MAX_KEY_NAME_CHARS: usize = 128;
/// Longest `Idempotency-Key` header, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;
/// Largest notification payload, serialized.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Most targets (user ids plus device ids) in one post.
pub const MAX_TARGETS: usize = 1000;
/// Shortest and longest `ttl_seconds`, and the default.
pub const MIN_TTL_SECONDS: i64 = 1;
pub const MAX_TTL_SECONDS: i64 = 2_592_000;
pub const DEFAULT_TTL_SECONDS: i64 = 86_400;
/// Longest id accepted where a device or notification id is expected (ours are 36 characters).
pub const MAX_ID_CHARS: usize = 64;

/// A value that failed validation: which field and why, for a `422` answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

/// Checks a free-text value: at most `max` characters, no control characters.
fn check_text(field: &'static str, value: &str, min: usize, max: usize) -> Result<(), Invalid> {
    let chars = value.chars().count();
    if chars < min {
        return Err(invalid(
            field,
            format!("must be at least {min} character(s)"),
        ));
    }
    if chars > max {
        return Err(invalid(field, format!("must be at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// A user id: 1–128 characters, no control characters.
pub fn parse_user_id(value: &str) -> Result<(), Invalid> {
    check_text("user_id", value, 1, MAX_USER_ID_CHARS)
}

/// A device name: 0–128 characters, no control characters.
pub fn parse_device_name(value: &str) -> Result<(), Invalid> {
    check_text("name", value, 0, MAX_DEVICE_NAME_CHARS)
}

/// A service-key name: 1–128 characters, no control characters.
pub fn parse_key_name(value: &str) -> Result<(), Invalid> {
    check_text("name", value, 1, MAX_KEY_NAME_CHARS)
}

/// An id sent by a client where one of ours is expected: short and printable.
pub fn parse_id(field: &'static str, value: &str) -> Result<(), Invalid> {
    check_text(field, value, 1, MAX_ID_CHARS)
}

/// An `Idempotency-Key`: 1–128 visible ASCII characters.
pub fn parse_idempotency_key(value: &str) -> Result<(), Invalid> {
    check_text("Idempotency-Key", value, 1, MAX_IDEMPOTENCY_KEY_CHARS)
}

/// `ttl_seconds`: 1–2,592,000; absent means a day.
pub fn parse_ttl(value: Option<i64>) -> Result<i64, Invalid> {
    let ttl = value.unwrap_or(DEFAULT_TTL_SECONDS);
    if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&ttl) {
        return Err(invalid(
            "ttl_seconds",
            format!("must be between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}"),
        ));
    }
    Ok(ttl)
}

/// What kind of credential a secret is; the prefix lets a leaked secret be recognised by scanners
/// and lets authentication look in the one table that can hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    Admin,
    ServiceKey,
    DeviceToken,
}

impl SecretKind {
    pub fn prefix(self) -> &'static str {
        match self {
            SecretKind::Admin => "hadm_",
            SecretKind::ServiceKey => "hsk_",
            SecretKind::DeviceToken => "hdt_",
        }
    }

    /// The kind a presented secret claims by its prefix, if any.
    pub fn of(secret: &str) -> Option<SecretKind> {
        [
            SecretKind::ServiceKey,
            SecretKind::DeviceToken,
            SecretKind::Admin,
        ]
        .into_iter()
        .find(|k| secret.starts_with(k.prefix()))
    }
}

/// A new random secret: the kind's prefix and 256 bits from the OS generator, hex-encoded.
pub fn generate_secret(kind: SecretKind) -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random number generator failed");
    format!("{}{}", kind.prefix(), hex::encode(bytes))
}

/// The stored form of a secret: SHA-256, hex. Secrets are 256-bit random, so a fast hash is
/// enough — there is nothing to brute-force.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two hashes in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new id for a device, service key or notification: a UUIDv7, so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A stored time as RFC 3339 with milliseconds, e.g. `2026-11-24T06:18:24.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_bounded_and_printable() {
        assert!(parse_user_id("alice").is_ok());
        assert!(parse_user_id(&"é".repeat(128)).is_ok());
        assert_eq!(parse_user_id("").unwrap_err().field, "user_id");
        assert!(parse_user_id(&"a".repeat(129)).is_err());
        assert!(parse_user_id("a\u{0}b").is_err());
        assert!(parse_user_id("a\nb").is_err());
    }

    #[test]
    fn names_may_be_empty_but_not_long() {
        assert!(parse_device_name("").is_ok());
        assert!(parse_device_name(&"n".repeat(128)).is_ok());
        assert!(parse_device_name(&"n".repeat(129)).is_err());
        assert!(parse_key_name("").is_err());
    }

    #[test]
    fn ttl_defaults_to_a_day_and_is_bounded() {
        assert_eq!(parse_ttl(None), Ok(86_400));
        assert_eq!(parse_ttl(Some(1)), Ok(1));
        assert_eq!(parse_ttl(Some(2_592_000)), Ok(2_592_000));
        assert!(parse_ttl(Some(0)).is_err());
        assert!(parse_ttl(Some(-5)).is_err());
        assert!(parse_ttl(Some(2_592_001)).is_err());
    }

    #[test]
    fn secrets_are_prefixed_random_and_hashed() {
        let a = generate_secret(SecretKind::ServiceKey);
        let b = generate_secret(SecretKind::ServiceKey);
        assert_ne!(a, b);
        assert_eq!(SecretKind::of(&a), Some(SecretKind::ServiceKey));
        assert_eq!(a.len(), "hsk_".len() + 64);
        let h = hash_secret(&a);
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&a[4..]));
        assert!(constant_time_eq(h.as_bytes(), hash_secret(&a).as_bytes()));
        assert!(!constant_time_eq(h.as_bytes(), hash_secret(&b).as_bytes()));
    }

    #[test]
    fn times_render_as_rfc3339_millis() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
