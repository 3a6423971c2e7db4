//! Per-API-key request rate limit: a token bucket refilled at `rate` per second holding at most
//! one second's worth (at least one request).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::auth::KeyId;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Shared by every connection, so a key cannot escape its limit by opening more connections.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<KeyId, Bucket>>,
}

impl RateLimiter {
    /// `rate` requests per second; 0 disables the limit.
    pub fn new(rate: f64) -> Self {
        Self {
            rate,
            burst: rate.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `key`'s bucket at time `now`; `false` if it is empty.
    pub fn allow(&self, key: KeyId, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now.max(b.at);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_refills_at_the_rate() {
        let limiter = RateLimiter::new(2.0);
        let (a, b) = (KeyId::of("a"), KeyId::of("b"));
        let t0 = Instant::now();
        assert!(limiter.allow(a, t0));
        assert!(limiter.allow(a, t0));
        assert!(!limiter.allow(a, t0));
        // Keys are independent.
        assert!(limiter.allow(b, t0));
        assert!(!limiter.allow(a, t0 + Duration::from_millis(400)));
        assert!(limiter.allow(a, t0 + Duration::from_millis(600)));
        assert!(!limiter.allow(a, t0 + Duration::from_millis(700)));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let limiter = RateLimiter::new(0.0);
        let now = Instant::now();
        assert!((0..10_000).all(|_| limiter.allow(KeyId::of("k"), now)));
    }
}
