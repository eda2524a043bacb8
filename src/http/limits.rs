//! Per-client-address limits on what costs the server without proving anything: WebSocket
//! connection attempts, and failed authentications. Each address has a token bucket; an empty
//! bucket is a `429` with `Retry-After`. The map of addresses is bounded: buckets that have
//! refilled are forgotten when it grows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::HttpRequest;

/// Addresses tracked before refilled buckets are first swept out; after a sweep, the next one
/// comes when the map has doubled again, so sweeping costs O(1) per address on average.
const SWEEP_AT: usize = 10_000;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per address: `burst` tokens, refilled at `per_second`. A rate of 0 disables it.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    map: HashMap<IpAddr, Bucket>,
    sweep_at: usize,
}

/// The key an address is limited under: IPv4 (also when mapped into IPv6) as it is, IPv6 by
/// its /64 — one host can take any address of its /64, so finer keys would not limit it.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: u32) -> Self {
        RateLimiter {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    fn enabled(&self) -> bool {
        self.per_second > 0.0
    }

    /// The bucket of `ip`, refilled up to now.
    fn refilled(&self, b: Bucket, now: Instant) -> Bucket {
        let tokens = b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_second;
        Bucket {
            tokens: tokens.min(self.burst),
            at: now,
        }
    }

    /// How long until `ip` has a token again, if its bucket is empty now.
    fn wait(&self, b: Bucket) -> Option<Duration> {
        (b.tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - b.tokens) / self.per_second))
    }

    /// Whether `ip` may go on; `Err(wait)` if its bucket is empty. Takes a token if `take`.
    fn check(&self, ip: IpAddr, take: bool) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let ip = key(ip);
        let now = Instant::now();
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let buckets = &mut *guard;
        if buckets.map.len() >= buckets.sweep_at.max(SWEEP_AT) && !buckets.map.contains_key(&ip) {
            buckets
                .map
                .retain(|_, b| self.refilled(*b, now).tokens < self.burst);
            buckets.sweep_at = buckets.map.len() * 2;
        }
        let full = Bucket {
            tokens: self.burst,
            at: now,
        };
        let bucket = buckets.map.entry(ip).or_insert(full);
        *bucket = self.refilled(*bucket, now);
        if let Some(wait) = self.wait(*bucket) {
            return Err(wait);
        }
        if take {
            bucket.tokens -= 1.0;
        }
        Ok(())
    }

    /// Takes a token for `ip`, or tells how long to wait for one.
    pub fn acquire(&self, ip: IpAddr) -> Result<(), Duration> {
        self.check(ip, true)
    }

    /// Whether `ip` has a token left, without taking it.
    pub fn peek(&self, ip: IpAddr) -> Result<(), Duration> {
        self.check(ip, false)
    }

    /// Takes a token for `ip` if one is left (records a failure).
    pub fn record(&self, ip: IpAddr) {
        let _ = self.check(ip, true);
    }
}

/// Whose request this is: the peer address, or — when the peer is a trusted proxy — the address
/// that proxy appended to `X-Forwarded-For` (the right-most entry; the ones before it were
/// written by the client and prove nothing).
pub fn client_ip(req: &HttpRequest, trusted_proxies: &[IpAddr]) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip().to_canonical();
    if !trusted_proxies.contains(&peer) {
        return Some(peer);
    }
    let forwarded = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .last();
    Some(forwarded.and_then(|s| s.parse().ok()).unwrap_or(peer))
}

/// The limits of one node, shared by its HTTP workers.
pub struct Limits {
    pub connects: RateLimiter,
    pub auth_failures: RateLimiter,
    pub trusted_proxies: Vec<IpAddr>,
}

impl Limits {
    /// No limits: for embedding and for tests that measure.
    pub fn unlimited() -> Self {
        Limits {
            connects: RateLimiter::new(0.0, 1),
            auth_failures: RateLimiter::new(0.0, 1),
            trusted_proxies: Vec::new(),
        }
    }
}

/// Whole seconds to put in `Retry-After` for a wait.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_empties_and_refills() {
        let limiter = RateLimiter::new(1000.0, 3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            limiter.acquire(ip).unwrap();
        }
        assert!(
            limiter.acquire(ip).is_err(),
            "a fourth attempt at once is refused"
        );
        assert!(
            limiter.acquire(other).is_ok(),
            "other addresses are not affected"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(limiter.acquire(ip).is_ok(), "the bucket refills");
    }

    #[test]
    fn peek_does_not_take() {
        let limiter = RateLimiter::new(0.001, 1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            limiter.peek(ip).unwrap();
        }
        limiter.record(ip);
        let wait = limiter.peek(ip).unwrap_err();
        assert!(wait > Duration::from_secs(100));
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }

    #[test]
    fn ipv6_is_limited_by_its_64_and_mapped_ipv4_as_ipv4() {
        let limiter = RateLimiter::new(0.001, 1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        limiter.acquire(a).unwrap();
        assert!(limiter.acquire(b).is_err(), "the same /64");
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        limiter.acquire(v4).unwrap();
        assert!(
            limiter.acquire(mapped).is_err(),
            "a mapped address is the same"
        );
    }

    #[test]
    fn a_zero_rate_disables_the_limit() {
        let limiter = RateLimiter::new(0.0, 1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..100 {
            limiter.acquire(ip).unwrap();
        }
    }
}
