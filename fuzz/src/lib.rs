//! What the fuzz targets share: an independent reading of JSON input, which the targets compare
//! Herald's own decoding against (a differential oracle), and the limits of API.md restated.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The members of a JSON object in the order they appear, duplicates kept, each value unparsed.
pub struct Entries(pub Vec<(String, Box<RawValue>)>);

impl Entries {
    /// `None` unless `text` is one syntactically valid JSON object (whatever its values hold).
    pub fn parse(text: &[u8]) -> Option<Entries> {
        serde_json::from_slice(text).ok()
    }

    pub fn count(&self, key: &str) -> usize {
        self.0.iter().filter(|(k, _)| k == key).count()
    }

    /// The value of the first member called `key`.
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }
}

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(Entries(members))
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

/// Whether `text` is JSON at all: any value, any depth, without building it.
pub fn is_json(text: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok()
}

/// Text of `min..=max` characters (not bytes) and no control characters: how API.md bounds a
/// `user_id` and how Herald bounds the ids clients send.
pub fn is_bounded_text(s: &str, min: usize, max: usize) -> bool {
    let chars = s.chars().count();
    (min..=max).contains(&chars) && !s.chars().any(char::is_control)
}

/// API.md, "Limits": at most 1000 targets per post.
pub const API_MAX_TARGETS: usize = 1000;
/// API.md, "Limits": `user_id` is 1–128 characters.
pub const API_MAX_USER_ID_CHARS: usize = 128;
/// API.md, "Limits": a payload is at most 64 KiB serialized.
pub const API_MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// API.md, "Limits": `ttl_seconds` is 1–2,592,000.
pub const API_TTL_SECONDS: std::ops::RangeInclusive<i64> = 1..=2_592_000;
