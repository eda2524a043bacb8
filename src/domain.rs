//! Validated values of Herald's domain: user ids, names, TTLs, secrets and times.
//!
//! Every value a client controls is parsed here once, with the limits of API.md, so the rest of
//! the code can rely on it. Nothing here touches the network or the database.

use std::time::{SystemTime, UNIX_EPOCH};

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
    // Every authenticated request hashes its secret: hex into a buffer, not char by char.
    let mut hex = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(secret.as_bytes()), &mut hex).expect("32 bytes fit");
    String::from_utf8(hex.to_vec()).expect("hex is ASCII")
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
/// Times before 1970 render as 1970, after 9999 as 9999's last millisecond.
///
/// Written out by hand (days to a civil date as in H. Hinnant's `civil_from_days`): every post
/// formats two of these for its answer and two for each device's frame, and a general-purpose
/// formatter cost ~2,300 instructions a time.
pub fn rfc3339(ms: i64) -> String {
    const LAST_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = ms.clamp(0, LAST_MS);
    let (days, ms_of_day) = (ms / 86_400_000, ms % 86_400_000);
    let z = days + 719_468; // days since 0000-03-01
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1_000 % 60,
        ms_of_day % 1_000,
    );
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, h);
    put(14, 2, m);
    put(17, 2, s);
    put(20, 3, milli);
    String::from_utf8(out.to_vec()).expect("digits and ASCII punctuation")
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
        // The stored form must never change: every token hash in a database depends on it.
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
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
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
        // Against a general-purpose formatter: leap years, century rules, month ends, and a
        // spread of times up to year 9999.
        let mut ms: i64 = 0;
        let mut checked = 0;
        while ms <= 253_402_300_799_999 {
            for t in [ms, ms + 86_399_999, ms + 43_200_001] {
                let t = t.min(253_402_300_799_999);
                let want = humantime::format_rfc3339_millis(
                    UNIX_EPOCH + std::time::Duration::from_millis(t as u64),
                )
                .to_string();
                assert_eq!(rfc3339(t), want, "at {t} ms");
                checked += 1;
            }
            ms += 86_400_000 * 37 + 1_234;
        }
        assert!(checked > 200_000, "{checked}");
    }
}
