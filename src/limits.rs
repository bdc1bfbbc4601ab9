//! Per-key rate limits and per-client-IP brute-force throttling.
//!
//! governor's keyed limiter has one quota for every key, so each configured API key gets its own
//! direct limiter, built with the snapshot and carried over on reload while its quota stays the
//! same (SPEC §8: rate-limit state of keys that remain is kept). Configured keys are never
//! evicted. The per-IP throttle *is* keyed (unbounded key space), and is pruned.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// `count` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl Rate {
    fn quota(self, burst: u32) -> Quota {
        let per_cell = (self.period / self.count).max(Duration::from_nanos(1));
        Quota::with_period(per_cell)
            .expect("period is non-zero")
            .allow_burst(NonZeroU32::new(burst.max(1)).expect("burst ≥ 1"))
    }
}

/// What a rate-limit check decided, with the numbers for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// The burst size (`RateLimit-Limit`).
    pub limit: u32,
    /// Requests that could be made right now (`RateLimit-Remaining`).
    pub remaining: u32,
    /// Whole seconds until the bucket is full again (`RateLimit-Reset`).
    pub reset_secs: u64,
    /// `Some(seconds ≥ 1)` when this request is refused (`Retry-After`).
    pub retry_after: Option<u64>,
}

type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One API key's token bucket.
pub struct KeyLimiter {
    rate: Rate,
    burst: u32,
    interval: Duration,
    limiter: Direct,
}

impl KeyLimiter {
    pub fn new(rate: Rate, burst: u32) -> Self {
        let quota = rate.quota(burst);
        KeyLimiter {
            rate,
            burst,
            interval: quota.replenish_interval(),
            limiter: RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Takes one cell if there is one.
    pub fn check(&self) -> RateInfo {
        match self.limiter.check() {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                RateInfo {
                    limit: self.burst,
                    remaining,
                    reset_secs: ceil_secs(self.interval * (self.burst - remaining.min(self.burst))),
                    retry_after: None,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                RateInfo {
                    limit: self.burst,
                    remaining: 0,
                    reset_secs: ceil_secs(wait + self.interval * (self.burst - 1)),
                    retry_after: Some(ceil_secs(wait).max(1)),
                }
            }
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

type Keyed =
    RateLimiter<IpAddr, governor::state::keyed::DefaultKeyedStateStore<IpAddr>, DefaultClock>;

/// Caps failed authentications per client IP (`[auth] failed_auth_limit`). Once an IP exceeds
/// it, its unverified tokens are refused without hashing until its bucket has room again.
pub struct FailedAuthThrottle {
    rate: Rate,
    limiter: Keyed,
    /// IPs currently refused, and until when. Only touched on failures and by refused IPs.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

/// Above this many tracked IPs, a prune runs on the next failure.
const PRUNE_AT: usize = 10_000;

impl FailedAuthThrottle {
    pub fn new(rate: Rate) -> Self {
        FailedAuthThrottle {
            rate,
            limiter: RateLimiter::keyed(rate.quota(rate.count)),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// `Some(seconds)` if this IP is currently throttled.
    pub fn throttled(&self, ip: IpAddr) -> Option<u64> {
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let until = *blocked.get(&ip)?;
        let now = Instant::now();
        if until > now {
            Some(ceil_secs(until - now).max(1))
        } else {
            blocked.remove(&ip);
            None
        }
    }

    /// Records one failed authentication; returns true if the IP is now throttled.
    pub fn record_failure(&self, ip: IpAddr) -> bool {
        let outcome = self.limiter.check_key(&ip);
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if blocked.len() > PRUNE_AT {
            blocked.retain(|_, until| *until > now);
        }
        if self.limiter.len() > PRUNE_AT {
            self.limiter.retain_recent();
        }
        match outcome {
            Ok(()) => false,
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                blocked.insert(ip, now + wait);
                true
            }
        }
    }

    /// Drops state that no longer matters (full buckets, expired blocks). Called periodically.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        blocked.retain(|_, until| *until > now);
        blocked.shrink_to_fit();
    }

    /// Tracked IPs (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_limiter_counts_down_and_refuses() {
        let l = KeyLimiter::new(
            Rate {
                count: 3,
                period: Duration::from_secs(60),
            },
            3,
        );
        let a = l.check();
        assert_eq!((a.limit, a.remaining, a.retry_after), (3, 2, None));
        assert!(a.reset_secs >= 19 && a.reset_secs <= 20, "{a:?}");
        assert_eq!(l.check().remaining, 1);
        assert_eq!(l.check().remaining, 0);
        let refused = l.check();
        assert_eq!(refused.remaining, 0);
        let ra = refused.retry_after.unwrap();
        assert!((19..=20).contains(&ra), "{refused:?}");
        assert!(
            refused.reset_secs >= 59 && refused.reset_secs <= 60,
            "{refused:?}"
        );
    }

    #[test]
    fn throttle_blocks_after_limit() {
        let t = FailedAuthThrottle::new(Rate {
            count: 2,
            period: Duration::from_secs(60),
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(t.throttled(ip).is_none());
        assert!(!t.record_failure(ip));
        assert!(!t.record_failure(ip));
        assert!(t.record_failure(ip));
        assert!(t.throttled(ip).is_some());
        assert!(t.throttled("192.0.2.2".parse().unwrap()).is_none());
    }
}
