//! Per-key rate limits and per-client-IP brute-force throttling.
//!
//! governor's keyed limiter has one quota for every key, so each configured API key gets its own
//! direct limiter, built with the snapshot and carried over on reload while its quota stays the
//! same (SPEC §8: rate-limit state of keys that remain is kept). Configured keys are never
//! evicted. The per-client-IP throttle has an unbounded key space (anyone can connect), so it is
//! a pruned table with a hard size cap: see [`FailedAuthThrottle`].

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

/// Caps failed authentications per client (`[auth] failed_auth_limit`, SPEC §3). A client that
/// has used up its budget gets its unverified tokens refused without hashing until the budget
/// refills (one failure back every `period / count`), so its long-run rate of guesses is the
/// configured rate. Tokens already in the verified cache never consult this.
///
/// Why not a governor keyed limiter: the table must be bounded whatever the attack, and the
/// decision "is this client blocked?" must not itself create state. This is the same GCRA, one
/// `u64` per client in a `HashMap` (SipHash: keys are attacker-chosen), with
///
/// * a client being an IPv4 address or an IPv6 /64 (one host commonly holds a whole /64, so
///   per-address state would hand an IPv6 attacker unlimited budgets and unlimited memory);
/// * pruning of entries whose budget is full again (they hold no information): periodically
///   ([`prune`](Self::prune)), and inline when the table has doubled since the last prune, so
///   the cost stays amortised O(1) per failure;
/// * a hard cap, [`MAX_TRACKED`] clients (about 3 MiB). When the table is full of clients that
///   are all still within their window, a client it does not know is treated as throttled for
///   one interval (its unverified tokens get 429; verified clients are unaffected) and a warning
///   is logged: refusing to hash is the safe side when under a scan from that many addresses.
pub struct FailedAuthThrottle {
    rate: Rate,
    /// GCRA emission interval (`period / count`) and tolerance (`(count - 1) × interval`), ns.
    interval: u64,
    tolerance: u64,
    base: Instant,
    table: Mutex<Table>,
}

struct Table {
    /// Per client: the GCRA theoretical arrival time, in ns since `base`. Throttled while it is
    /// more than `tolerance` ahead of now; prunable once it is not ahead of now.
    tat: HashMap<u128, u64>,
    /// Size at which a failure from a new client first prunes inline.
    next_prune: usize,
    /// Last inline prune (ns since `base`), to bound prune work when the table is full.
    last_prune: u64,
    /// While the table is full: clients not in it count as throttled until then.
    full_until: u64,
    /// Last "table full" warning (ns since `base`).
    last_full_warning: Option<u64>,
}

/// Clients tracked at most: 24 bytes each plus hash-table overhead, ~3 MiB at this size.
pub const MAX_TRACKED: usize = 100_000;
/// Below this many tracked clients, failures never prune inline (the periodic prune does).
const PRUNE_AT: usize = 4_096;
const SECOND_NS: u64 = 1_000_000_000;

/// The throttle's unit of accounting: an IPv4 address (as `::ffff:a.b.c.d`) or an IPv6 /64.
fn client_key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6) & !u128::from(u64::MAX),
    }
}

fn ceil_secs_ns(ns: u64) -> u64 {
    ns.div_ceil(SECOND_NS).max(1)
}

impl FailedAuthThrottle {
    pub fn new(rate: Rate) -> Self {
        let interval = u64::try_from((rate.period / rate.count.max(1)).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        FailedAuthThrottle {
            rate,
            interval,
            tolerance: interval.saturating_mul(u64::from(rate.count.max(1) - 1)),
            base: Instant::now(),
            table: Mutex::new(Table {
                tat: HashMap::new(),
                next_prune: PRUNE_AT,
                last_prune: 0,
                full_until: 0,
                last_full_warning: None,
            }),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(seconds ≥ 1)` if this client is currently throttled. Creates no state.
    pub fn throttled(&self, ip: IpAddr) -> Option<u64> {
        let now = self.now();
        let t = self.lock();
        match t.tat.get(&client_key(ip)) {
            Some(&tat) => {
                let free_at = tat.saturating_sub(self.tolerance);
                (free_at > now).then(|| ceil_secs_ns(free_at - now))
            }
            None => (t.full_until > now).then(|| ceil_secs_ns(t.full_until - now)),
        }
    }

    /// Records one failed authentication; returns true if the client is now throttled (its
    /// budget is used up: the next unverified attempt is refused without hashing).
    pub fn record_failure(&self, ip: IpAddr) -> bool {
        let key = client_key(ip);
        let now = self.now();
        let mut t = self.lock();
        if !t.tat.contains_key(&key)
            && t.tat.len() >= t.next_prune
            && now.saturating_sub(t.last_prune) >= SECOND_NS
        {
            t.tat.retain(|_, tat| *tat > now);
            t.next_prune = (t.tat.len() * 2).clamp(PRUNE_AT, MAX_TRACKED);
            t.last_prune = now;
        }
        let tracked = t.tat.len();
        let tat = match t.tat.get_mut(&key) {
            Some(tat) => {
                *tat = (*tat).max(now).saturating_add(self.interval);
                *tat
            }
            None if tracked < MAX_TRACKED => {
                let tat = now.saturating_add(self.interval);
                t.tat.insert(key, tat);
                tat
            }
            None => {
                // Full of clients still inside their window: fail closed for newcomers.
                t.full_until = now.saturating_add(self.interval);
                let warn = t
                    .last_full_warning
                    .is_none_or(|w| now.saturating_sub(w) >= 60 * SECOND_NS);
                if warn {
                    t.last_full_warning = Some(now);
                }
                drop(t);
                if warn {
                    tracing::warn!(
                        tracked = MAX_TRACKED,
                        "failed-auth table full: unverified tokens from client addresses not in it get 429 until it drains (a scan from very many addresses?)"
                    );
                }
                return true;
            }
        };
        tat.saturating_sub(self.tolerance) > now
    }

    /// Drops clients whose budget is full again. Called periodically.
    pub fn prune(&self) {
        let now = self.now();
        let mut t = self.lock();
        t.tat.retain(|_, tat| *tat > now);
        t.tat.shrink_to_fit();
        t.next_prune = (t.tat.len() * 2).clamp(PRUNE_AT, MAX_TRACKED);
        t.last_prune = now;
    }

    /// Clients tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.lock().tat.len()
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
    fn throttle_blocks_after_exactly_the_limit_and_lifts() {
        let t = FailedAuthThrottle::new(Rate {
            count: 2,
            period: Duration::from_secs(60),
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(t.throttled(ip).is_none());
        assert_eq!(t.tracked(), 0, "asking creates no state");
        assert!(!t.record_failure(ip));
        assert!(t.throttled(ip).is_none());
        assert!(
            t.record_failure(ip),
            "the 2nd of 2 failures uses the budget up"
        );
        let wait = t.throttled(ip).unwrap();
        assert!((29..=30).contains(&wait), "{wait}");
        assert!(t.throttled("192.0.2.2".parse().unwrap()).is_none());
        assert!(t.throttled("::ffff:192.0.2.1".parse().unwrap()).is_some());

        let t = FailedAuthThrottle::new(Rate {
            count: 1,
            period: Duration::from_millis(200),
        });
        assert!(t.record_failure(ip));
        assert_eq!(t.throttled(ip), Some(1));
        std::thread::sleep(Duration::from_millis(250));
        assert!(t.throttled(ip).is_none(), "lifts after the interval");
        t.prune();
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn ipv6_is_throttled_per_64() {
        let t = FailedAuthThrottle::new(Rate {
            count: 2,
            period: Duration::from_secs(60),
        });
        assert!(!t.record_failure("2001:db8::1".parse().unwrap()));
        assert!(t.record_failure("2001:db8::ffff:2".parse().unwrap()));
        assert!(t.throttled("2001:db8::3".parse().unwrap()).is_some());
        assert!(t.throttled("2001:db8:0:1::1".parse().unwrap()).is_none());
        assert_eq!(t.tracked(), 1);
    }

    #[test]
    fn throttle_table_is_bounded_and_pruned() {
        let rate = Rate {
            count: 20,
            period: Duration::from_secs(60),
        };
        let t = FailedAuthThrottle::new(rate);
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..(MAX_TRACKED as u32 + 500) {
            t.record_failure(ip(i));
        }
        assert_eq!(t.tracked(), MAX_TRACKED);
        // Full of live entries: newcomers are refused, known clients are judged as before.
        assert!(t.throttled(ip(MAX_TRACKED as u32 + 1000)).is_some());
        assert!(t.throttled(ip(0)).is_none());

        // Entries whose budget has refilled are dropped, inline or periodically.
        let t = FailedAuthThrottle::new(Rate {
            count: 10,
            period: Duration::from_millis(10),
        });
        for i in 0..(2 * PRUNE_AT as u32) {
            t.record_failure(ip(i));
        }
        std::thread::sleep(Duration::from_millis(20));
        t.prune();
        assert_eq!(t.tracked(), 0);
        assert!(t.throttled(ip(1)).is_none());
    }
}
