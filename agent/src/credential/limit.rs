//! The request-rate limit of credential issuance: a token bucket per workload (per uid for a
//! caller that is no workload), checked by [`CredentialService::issue`](super::CredentialService)
//! so every front-end that issues through it is limited alike.
//!
//! Hand-written rather than `governor`: the whole limiter is a map of two numbers a key behind
//! one lock, taken once a request whose cost (attestation, signing, a kernel map write) is far
//! larger; `governor`'s keyed limiter would add dashmap, quanta and more to the tree, and still
//! needs the same pruning of idle keys.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::identity::spiffe::SpiffeId;

/// How many requests a key may make: `count` per `per`, with bursts of up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
    pub burst: u32,
}

impl RateLimit {
    /// 200 a second per workload, bursts of 400: far above what a workload asking once a task
    /// needs, far below what the agent serves (one flooder cannot take it from the others).
    pub const DEFAULT: RateLimit = RateLimit {
        count: 200,
        per: Duration::from_secs(1),
        burst: 400,
    };

    /// The same rate with bursts of `burst` (at least 1).
    pub fn with_burst(self, burst: u32) -> RateLimit {
        RateLimit {
            burst: burst.max(1),
            ..self
        }
    }

    fn per_second(&self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.per == Duration::from_secs(60) {
            "m"
        } else {
            "s"
        };
        write!(f, "{}/{unit} (burst {})", self.count, self.burst)
    }
}

/// The limit as written: `N/s` or `N/m` (bursts of twice N), `off` or `0` for none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitSetting(pub Option<RateLimit>);

impl FromStr for RateLimitSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if matches!(t, "off" | "0" | "0/s" | "0/m") {
            return Ok(RateLimitSetting(None));
        }
        let bad = || format!("`{s}` is not a rate: write N/s or N/m (e.g. 200/s), or off");
        let (n, unit) = t.split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Ok(RateLimitSetting(None));
        }
        Ok(RateLimitSetting(Some(RateLimit {
            count,
            per,
            burst: count.saturating_mul(2),
        })))
    }
}

/// Who a bucket belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LimitKey {
    Workload(SpiffeId),
    /// A caller that maps to no workload.
    Uid(u32),
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before full (idle) ones are dropped.
const PRUNE_ABOVE: usize = 4096;

/// A token bucket per key; `None` limits nothing.
#[derive(Debug)]
pub(crate) struct Limiter {
    limit: Option<RateLimit>,
    buckets: Mutex<HashMap<LimitKey, Bucket>>,
}

impl Limiter {
    pub(crate) fn new(limit: Option<RateLimit>) -> Limiter {
        Limiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn limit(&self) -> Option<RateLimit> {
        self.limit
    }

    /// Takes one request from `key`'s bucket at `now`; `Err(wait)`: none left, the next one
    /// comes in `wait`.
    pub(crate) fn take(&self, key: &LimitKey, now: Instant) -> Result<(), Duration> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let rate = limit.per_second();
        let burst = f64::from(limit.burst.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= PRUNE_ABOVE && !buckets.contains_key(key) {
            buckets.retain(|_, b| {
                let idle = now.saturating_duration_since(b.at).as_secs_f64();
                b.tokens + idle * rate < burst
            });
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = bucket.at.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str) -> LimitKey {
        LimitKey::Workload(
            format!("spiffe://example.org/{name}")
                .parse()
                .expect("spiffe id"),
        )
    }

    #[test]
    fn settings_parse() {
        let s = |t: &str| t.parse::<RateLimitSetting>();
        assert_eq!(
            s("200/s"),
            Ok(RateLimitSetting(Some(RateLimit {
                count: 200,
                per: Duration::from_secs(1),
                burst: 400
            })))
        );
        assert_eq!(
            s(" 30/m ").map(|r| r.0.map(|l| (l.count, l.per))),
            Ok(Some((30, Duration::from_secs(60))))
        );
        for off in ["off", "0", "0/s"] {
            assert_eq!(s(off), Ok(RateLimitSetting(None)), "{off}");
        }
        for bad in ["", "200", "x/s", "-1/s", "200/h", "200/s/s"] {
            let e = s(bad).expect_err(bad);
            assert!(e.contains("N/s"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_burst_then_the_rate_and_other_keys_unaffected() {
        let limiter = Limiter::new(Some(RateLimit {
            count: 10,
            per: Duration::from_secs(1),
            burst: 5,
        }));
        let t0 = Instant::now();
        let (a, b) = (workload("a"), workload("b"));
        for i in 0..5 {
            assert_eq!(limiter.take(&a, t0), Ok(()), "burst request {i}");
        }
        let wait = limiter.take(&a, t0).expect_err("past the burst");
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another workload has its own bucket, and a uid its own.
        assert_eq!(limiter.take(&b, t0), Ok(()));
        assert_eq!(limiter.take(&LimitKey::Uid(1000), t0), Ok(()));
        // One token a tenth of a second.
        let later = t0 + Duration::from_millis(100);
        assert_eq!(limiter.take(&a, later), Ok(()));
        assert!(limiter.take(&a, later).is_err());
        // Idle time refills up to the burst, no more.
        let much_later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(limiter.take(&a, much_later), Ok(()));
        }
        assert!(limiter.take(&a, much_later).is_err());
    }

    #[test]
    fn off_limits_nothing_and_idle_buckets_are_pruned() {
        let off = Limiter::new(None);
        let now = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(off.take(&workload("a"), now), Ok(()));
        }
        let limiter = Limiter::new(Some(RateLimit::DEFAULT));
        for uid in 0..PRUNE_ABOVE as u32 {
            assert_eq!(limiter.take(&LimitKey::Uid(uid), now), Ok(()));
        }
        // A second later every bucket is full again: the next new key drops them.
        let later = now + Duration::from_secs(1);
        assert_eq!(limiter.take(&workload("new"), later), Ok(()));
        let kept = limiter.buckets.lock().map(|b| b.len()).unwrap_or(0);
        assert_eq!(kept, 1);
    }
}
