//! Quotas shared by every instance: one counter per key and calendar window in Redis
//! (`<prefix>q:<key id>:<window start>`), taken from in small leases.
//!
//! An instance that needs units asks for a lease of `n` units with one atomic script that never
//! grants past the limit; it then spends them locally. So the cluster **never overruns a quota**;
//! what it can do is under-use one: units leased and not spent when the window ends (at most
//! instances × lease size) are lost with the window. The lease size starts at 1 unit for
//! quotas up to 1 000 per window and `limit / 1000` above (at most 100), so for a `10000/day`
//! key one Redis round trip pays for 10 requests. A key in heavy use gets bigger leases: while
//! leases run out within [`BUSY`] of each other the next is twice the last, up to
//! `limit / 1000` (at most [`MAX_LEASE`]), so a busy key costs a few Redis calls per second
//! instead of hundreds, and its requests rarely wait for one; a second without a lease
//! request brings it back to the start size. A lease of 4 units or more is renewed in the
//! background when half of it is left. So the under-use bound is instances × 1.5 ×
//! `limit / 1000` units (0.15% of the quota per instance), at most instances × 15 000.
//!
//! `quota_exceeded` is logged once per key and window **cluster-wide**: the refusal that finds
//! the window's flag (`<prefix>qx:<key id>:<window start>`, `SET NX` in the lease script) unset
//! logs it. Once the shared counter is at the limit an instance refuses without asking Redis
//! until the window ends (the counter never goes down within a window), so an over-quota
//! client costs Redis nothing. While Redis is unavailable (`on_error = "local"`) each
//! instance counts and logs on its own, as without cluster mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;

use super::{Cluster, ClusterError};
use crate::quota::{Quota, QuotaState, window};

/// KEYS[1] = counter, KEYS[2] = the window's "exceeded" flag; ARGV = limit, units wanted,
/// TTL seconds, units needed now, 1 for a prefetch (a refusal then sets no flag), and the
/// counter this instance last saw in this window. Grants `wanted` (or what is left, if at
/// least `needed`) or nothing: {granted, used after, 1 when this is the window's first refusal
/// cluster-wide}. A counter below what the instance saw (Redis lost its data: restarted
/// without persistence, failed over, flushed) is raised to it first, so one instance's memory
/// re-seeds the cluster's count instead of the window starting again from zero.
/// Both keys get the TTL in the same atomic script (no key without an expiry).
const LEASE_LUA: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local seen = tonumber(ARGV[6])
if used < seen then
  redis.call('SET', KEYS[1], seen, 'EX', ARGV[3])
  used = seen
end
local avail = tonumber(ARGV[1]) - used
if avail >= tonumber(ARGV[4]) and avail > 0 then
  local grant = math.min(tonumber(ARGV[2]), avail)
  used = redis.call('INCRBY', KEYS[1], grant)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {grant, used, 0}
end
if ARGV[5] == '1' then return {0, used, 0} end
local first = redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3])
return {0, used, first and 1 or 0}
";

fn script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(LEASE_LUA))
}

/// This instance's leases, per key.
#[derive(Default)]
pub struct QuotaLeases {
    keys: Mutex<HashMap<Box<str>, KeyLease>>,
    /// One lease request at a time per key (as for rate limits, `rate.rs`): concurrent
    /// requests that find no units wait for the one in flight instead of each leasing a block.
    fetching: Mutex<HashMap<Box<str>, Arc<super::FetchGate>>>,
}

#[derive(Default, Clone, Copy)]
struct KeyLease {
    window_start: i64,
    /// Units leased and not yet spent.
    units: u64,
    /// The window's counter in Redis after this instance's last lease.
    used_shared: u64,
    /// Redis refused a lease because the counter is at the limit: later refusals in this
    /// window need not ask (the first one did, for the once-per-cluster `quota_exceeded`).
    exhausted: bool,
    /// The size of the last lease requested, and when.
    lease: u64,
    last_fetch: Option<Instant>,
    /// A background lease request is under way.
    prefetching: bool,
}

/// A new window (or a changed period) starts from an empty lease.
fn reset_on_new_window(l: &mut KeyLease, start: i64) {
    if l.window_start != start {
        *l = KeyLease {
            window_start: start,
            ..KeyLease::default()
        };
    }
}

/// Leases of at least this many units are renewed in the background when half is left.
const PREFETCH_FROM: u64 = 4;

/// Leases requested closer together than this grow (see the module doc).
const BUSY: Duration = Duration::from_millis(100);
/// Leases requested further apart than this start again from the base size.
const IDLE: Duration = Duration::from_secs(1);
/// The largest lease, in units.
pub const MAX_LEASE: u64 = 10_000;

/// The start size of a lease.
fn lease_size(q: Quota) -> u64 {
    (q.limit / 1000).clamp(1, 100)
}

/// The next lease for a key whose previous one was requested at `last`.
fn next_lease(q: Quota, l: &KeyLease, now: Instant) -> u64 {
    let base = lease_size(q);
    let cap = (q.limit / 1000).clamp(base, MAX_LEASE);
    match l.last_fetch.map(|t| now.saturating_duration_since(t)) {
        Some(d) if d < BUSY => l.lease.saturating_mul(2).clamp(base, cap),
        Some(d) if d < IDLE => l.lease.clamp(base, cap),
        _ => base,
    }
}

fn state(q: Quota, l: &KeyLease, now: i64, end: i64, refused: Option<bool>) -> QuotaState {
    // Units this instance holds are not used yet.
    let used = l.used_shared.saturating_sub(l.units).min(q.limit);
    QuotaState {
        quota: q,
        used,
        remaining: q.limit - used,
        reset_secs: u64::try_from(end - now).unwrap_or(0).max(1),
        window_secs: u64::try_from(end - l.window_start).unwrap_or(0),
        refused,
    }
}

impl Cluster {
    /// Counts `cost` units against `key_id`'s shared quota, or refuses (nothing counted). A
    /// cost of 0 always passes without asking Redis. Errors only when Redis could not be asked.
    pub async fn quota_charge(
        self: &Arc<Self>,
        key_id: &str,
        quota: Quota,
        cost: u64,
        now: i64,
    ) -> Result<QuotaState, ClusterError> {
        let (start, end) = window(quota.period, now);
        let take = |l: &mut KeyLease| {
            reset_on_new_window(l, start);
            if l.units >= cost {
                l.units -= cost;
                // Running low: lease the next block in the background (see `prefetch`).
                let low = cost > 0
                    && l.lease >= PREFETCH_FROM
                    && l.units <= l.lease / 2
                    && !l.prefetching
                    && !l.exhausted;
                l.prefetching |= low;
                Some((state(quota, l, now, end, None), low))
            } else if l.exhausted && l.used_shared >= quota.limit {
                // Used up cluster-wide: no Redis call until the window ends.
                Some((state(quota, l, now, end, Some(false)), false))
            } else {
                None
            }
        };
        let gate = self.quota_leases.fetch_gate(key_id);
        // The turn ends with this call, whatever happens below (answer, error, cancellation).
        let (held, lease, _turn) = loop {
            if let Some((s, low)) = self.quota_leases.with(key_id, take) {
                if low {
                    self.quota_prefetch(key_id, quota, now);
                }
                return Ok(s);
            }
            // Single flight, as for rate limits.
            let Some(turn) = gate.turn().await else {
                if !self.healthy() {
                    return Err(ClusterError::Degraded);
                }
                continue;
            };
            let (taken, held, lease) = self.quota_leases.with(key_id, |l| {
                let taken = take(l);
                let lease = next_lease(quota, l, Instant::now());
                if taken.is_none() {
                    l.lease = lease;
                    l.last_fetch = Some(Instant::now());
                }
                (taken, l.units, lease)
            });
            if let Some((s, low)) = taken {
                drop(turn);
                if low {
                    self.quota_prefetch(key_id, quota, now);
                }
                return Ok(s);
            }
            break (held, lease, turn);
        };
        let need = cost - held;
        let (granted, used, first) = self
            .quota_lease(key_id, quota, now, need, need.max(lease), false)
            .await?;
        Ok(self.quota_leases.with(key_id, |l| {
            reset_on_new_window(l, start);
            l.units += granted;
            l.used_shared = l.used_shared.max(used);
            if l.units >= cost {
                l.units -= cost;
                return state(quota, l, now, end, None);
            }
            l.exhausted = l.used_shared >= quota.limit;
            state(quota, l, now, end, Some(first == 1))
        }))
    }

    /// One lease script call: `(granted, used after, first refusal of the window)`. A
    /// prefetch never sets the window's `quota_exceeded` flag (no request was refused).
    async fn quota_lease(
        &self,
        key_id: &str,
        quota: Quota,
        now: i64,
        need: u64,
        want: u64,
        prefetch: bool,
    ) -> Result<(u64, u64, u8), ClusterError> {
        let (start, end) = window(quota.period, now);
        let counter = self.key(&["q", key_id, &start.to_string()]);
        let flag = self.key(&["qx", key_id, &start.to_string()]);
        let ttl = (end - now).max(1) + 86_400;
        let seen = self.quota_leases.with(key_id, |l| {
            if l.window_start == start {
                l.used_shared
            } else {
                0
            }
        });
        self.run(|mut c| async move {
            script()
                .key(counter)
                .key(flag)
                .arg(quota.limit)
                .arg(want)
                .arg(ttl)
                .arg(need)
                .arg(u8::from(prefetch))
                .arg(seen)
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    /// Leases the key's next block in the background when its units run low (half of the
    /// last lease left), so that a busy key's requests do not wait for Redis. One at a time
    /// per key; only for leases of [`PREFETCH_FROM`] units or more.
    fn quota_prefetch(self: &Arc<Self>, key_id: &str, quota: Quota, now: i64) {
        let (cluster, key_id) = (self.clone(), key_id.to_owned());
        tokio::spawn(async move {
            let gate = cluster.quota_leases.fetch_gate(&key_id);
            let (start, _) = window(quota.period, now);
            // A fetch already in flight will do.
            if let Some(_turn) = gate.try_turn() {
                let lease = cluster.quota_leases.with(&key_id, |l| {
                    let lease = next_lease(quota, l, Instant::now());
                    l.lease = lease;
                    l.last_fetch = Some(Instant::now());
                    lease
                });
                if let Ok((granted, used, _)) = cluster
                    .quota_lease(&key_id, quota, now, 1, lease, true)
                    .await
                {
                    cluster.quota_leases.with(&key_id, |l| {
                        if l.window_start == start {
                            l.units += granted;
                            l.used_shared = l.used_shared.max(used);
                        }
                    });
                }
            }
            cluster
                .quota_leases
                .with(&key_id, |l| l.prefetching = false);
        });
    }

    /// The shared state without counting (introspection): the window's counter in Redis.
    pub async fn quota_peek(
        &self,
        key_id: &str,
        quota: Quota,
        now: i64,
    ) -> Result<QuotaState, ClusterError> {
        let (start, end) = window(quota.period, now);
        let counter = self.key(&["q", key_id, &start.to_string()]);
        let used: Option<u64> = self
            .run(|mut c| async move {
                redis::cmd("GET")
                    .arg(counter)
                    .query_async::<Option<u64>>(&mut c)
                    .await
            })
            .await?;
        Ok(self.quota_leases.with(key_id, |l| {
            if l.window_start != start {
                *l = KeyLease {
                    window_start: start,
                    ..KeyLease::default()
                };
            }
            l.used_shared = l.used_shared.max(used.unwrap_or(0));
            state(quota, l, now, end, None)
        }))
    }
}

impl super::Cluster {
    /// Gives back `cost` units charged at unix second `now` to a request that never reached the
    /// upstream (`pipeline.rs`): they return to this instance's lease, and so to the next
    /// request of the key here, if the window has not changed meanwhile. No Redis call.
    pub fn quota_refund(&self, key_id: &str, quota: Quota, cost: u64, now: i64) {
        let (start, _) = window(quota.period, now);
        self.quota_leases.with(key_id, |l| {
            if l.window_start == start {
                l.units = l.units.saturating_add(cost);
            }
        });
    }
}

impl QuotaLeases {
    fn fetch_gate(&self, key_id: &str) -> Arc<super::FetchGate> {
        let mut g = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = g.get(key_id) {
            return m.clone();
        }
        g.entry(key_id.into()).or_default().clone()
    }

    /// Runs `f` on the key's lease (created empty the first time) under the lock; never held
    /// across a Redis call. No allocation once the key has a lease.
    fn with<T>(&self, key_id: &str, f: impl FnOnce(&mut KeyLease) -> T) -> T {
        let mut g = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = g.get_mut(key_id) {
            return f(l);
        }
        f(g.entry(key_id.into()).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::parse_quota;

    #[test]
    fn leases_grow_for_busy_keys_within_a_thousandth_of_the_quota() {
        let t0 = Instant::now();
        let busy = |q: Quota, rounds: u32| {
            let mut l = KeyLease::default();
            let mut at = t0;
            for _ in 0..rounds {
                l.lease = next_lease(q, &l, at);
                l.last_fetch = Some(at);
                at += Duration::from_millis(10);
            }
            (l, at)
        };
        // Small quotas never lease more than their base (1 unit up to 1 000 per window).
        let small = parse_quota("30/day").unwrap();
        assert_eq!(busy(small, 20).0.lease, 1);
        let mid = parse_quota("10000/day").unwrap();
        assert_eq!(busy(mid, 20).0.lease, 10);
        // A big quota in heavy use: 100, 200, 400, … up to limit / 1000, at most 10 000.
        let big = parse_quota("1000000000/month").unwrap();
        let (l, at) = busy(big, 3);
        assert_eq!(l.lease, 400);
        let (l, at2) = busy(big, 20);
        assert_eq!(l.lease, MAX_LEASE);
        let capped = parse_quota("2000000/day").unwrap();
        assert_eq!(busy(capped, 20).0.lease, 2000);
        // Idle for a second: back to the base.
        assert_eq!(next_lease(big, &l, at2 + Duration::from_secs(2)), 100);
        let _ = at;
    }
}
