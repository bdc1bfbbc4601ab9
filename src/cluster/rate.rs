//! Per-key rate limits shared by every instance: one GCRA bucket per key in Redis, taken from
//! in small leases so that a request rarely waits for Redis.
//!
//! The bucket is the same GCRA as the local one (`limits.rs`): a theoretical arrival time
//! (TAT, µs on Redis' own clock, so instance clocks do not matter) advanced by one emission
//! interval per request, admitted while `TAT - now ≤ (burst - 1) × interval`. An instance takes
//! `n` cells at once (one `EVALSHA`, atomic) and spends them locally:
//!
//! * `n` is about 10 ms worth of the key's rate (at least 1, at most a quarter of the burst), so
//!   a 100/s key costs one Redis round trip per request, a 100 000/s key one per ~1 000;
//! * one lease request at a time per key and instance (concurrent requests that find the lease
//!   empty wait for it and share its cells), and a lease of 4 cells or more is renewed in the
//!   background when half of it is left, so a busy key's requests do not wait for Redis;
//! * a lease not spent within [`LEASE_TTL`] is dropped (cells wasted, never over-admitted);
//! * a refusal tells when the next cell will exist; until then the instance refuses locally
//!   without asking Redis (exact: no other instance can make that time earlier).
//!
//! Accuracy: admissions never exceed the shared GCRA except by cells leased but spent later
//! than their lease time, at most `instances × 2n` at any instant (≈ 20 ms of rate per
//! instance, with the block renewed ahead).
//! Unspent leases can only under-admit.
//!
//! The bucket is named by the limit it enforces: `<prefix>rl:<key id>:<interval µs>:<burst>`.
//! A reload that changes a key's `rate_limit` or `burst` (its own or its role's) therefore
//! starts a new, full bucket on every instance that loads it, as without cluster mode (the
//! key's local bucket is kept only while its rate and burst are unchanged): a TAT stored in
//! intervals of the old rate would hold a raised limit back for up to burst × old interval
//! (fresh user T5-21: `1/min, burst 2` raised to `100/s` still refused for 118 s). Lowering a
//! limit likewise gives the key one full burst at the new rate, then the new rate. The cells
//! this instance leased under the old limit go with the old [`KeyLimiter`]. During a rolling
//! reload, instances on the old and the new limit count in different buckets, so for those
//! seconds the key can get up to both limits together (never more than the sum); the old
//! bucket expires once it would be full again (at most burst × old interval + 1 s).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;

use super::{Cluster, ClusterError};
use crate::limits::{KeyLimiter, Rate, RateInfo};

/// A lease's cells expire this long after they were granted.
pub const LEASE_TTL: Duration = Duration::from_secs(1);
/// How much of the key's rate one lease may carry.
const LEASE_SPAN: Duration = Duration::from_millis(10);
/// Leases of at least this many cells are renewed in the background when half is left.
const PREFETCH_FROM: u32 = 4;

/// GCRA lease. KEYS[1] = bucket; ARGV = interval µs, burst, cells wanted.
/// Returns {granted, remaining after, µs until the next cell when none was granted}.
const LEASE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local avail = math.floor((now + burst * interval - tat) / interval)
if avail < 1 then
  return {0, 0, tat - (burst - 1) * interval - now}
end
local n = math.min(want, avail)
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {n, avail - n, 0}
";

fn script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(LEASE_LUA))
}

/// The instance-local part of a key's shared bucket: cells leased and not yet spent. Lives in
/// the key's [`KeyLimiter`], so it is carried over on reload with it.
#[derive(Default)]
pub struct Lease {
    state: Mutex<LeaseState>,
    /// One lease request at a time per key and instance: concurrent requests that find the
    /// lease empty wait for the one in flight and share its cells, instead of each leasing a
    /// block (hundreds of requests in flight would otherwise take hundreds of blocks at once,
    /// draining the shared bucket into leases that expire unspent).
    gate: super::FetchGate,
}

#[derive(Default)]
struct LeaseState {
    cells: u32,
    expires: Option<Instant>,
    /// Cells the shared bucket had left after the last lease (for `RateLimit-Remaining`).
    shared_remaining: u32,
    /// No cell exists in the shared bucket before this instant.
    refused_until: Option<Instant>,
    /// A background lease request (prefetch) is under way.
    prefetching: bool,
}

impl Lease {
    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Cells per lease for a key: ~[`LEASE_SPAN`] of its rate, 1 ≤ n ≤ max(1, burst / 4).
fn lease_size(limiter: &KeyLimiter) -> u32 {
    let r = limiter.rate();
    let per_span = (u128::from(r.count) * LEASE_SPAN.as_nanos() / r.period.as_nanos().max(1))
        .min(u128::from(u32::MAX)) as u32;
    per_span.clamp(1, (limiter.burst() / 4).max(1))
}

/// The GCRA emission interval of `rate` in µs (≥ 1).
pub(super) fn interval_us(r: Rate) -> u64 {
    (u64::try_from((r.period / r.count.max(1)).as_micros()).unwrap_or(u64::MAX)).max(1)
}

fn info(limiter: &KeyLimiter, remaining: u32, retry_after: Option<u64>) -> RateInfo {
    let burst = limiter.burst();
    let used = u64::from(burst.saturating_sub(remaining.min(burst)));
    let reset_us = interval_us(limiter.rate()).saturating_mul(used);
    RateInfo {
        limit: burst,
        remaining,
        reset_secs: reset_us.div_ceil(1_000_000),
        retry_after,
    }
}

impl Cluster {
    /// Takes up to `want` cells of the GCRA bucket `bucket` (one atomic script on Redis'
    /// clock): `(granted, remaining after, µs until the next cell when none was granted)`.
    pub(super) async fn gcra_take(
        &self,
        bucket: String,
        interval_us: u64,
        burst: u32,
        want: u32,
    ) -> Result<(u32, u32, u64), ClusterError> {
        self.run(move |mut c| async move {
            script()
                .key(bucket)
                .arg(interval_us)
                .arg(burst)
                .arg(want)
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    /// Takes one cell of `key_id`'s shared bucket: from this instance's lease if it has one,
    /// else by leasing from Redis. Errors only when Redis could not be asked (the caller falls
    /// back per `on_error`).
    pub async fn rate_check(
        self: &Arc<Self>,
        key_id: &str,
        limiter: &Arc<KeyLimiter>,
    ) -> Result<RateInfo, ClusterError> {
        let lease = limiter.lease();
        loop {
            if let Some((info, low)) = Self::from_lease(lease, limiter) {
                if low {
                    self.prefetch(key_id, limiter);
                }
                return Ok(info);
            }
            // Single flight: one request leases, the others wait for it (bounded by its Redis
            // call, the cluster timeout) and then take from the new lease.
            match lease.gate.turn().await {
                Some(turn) => {
                    if let Some((info, low)) = Self::from_lease(lease, limiter) {
                        drop(turn);
                        if low {
                            self.prefetch(key_id, limiter);
                        }
                        return Ok(info);
                    }
                    let got = self.lease_more(key_id, limiter, true).await;
                    drop(turn);
                    return got;
                }
                None if !self.healthy() => return Err(ClusterError::Degraded),
                None => {}
            }
        }
    }

    /// Leases the next block in the background when this one runs low, so that in steady
    /// use no request waits for Redis: one prefetch at a time per key, only for leases of
    /// [`PREFETCH_FROM`] cells or more (a key leasing 1 cell at a time is slow enough to ask).
    fn prefetch(self: &Arc<Self>, key_id: &str, limiter: &Arc<KeyLimiter>) {
        let (cluster, limiter, key_id) = (self.clone(), limiter.clone(), key_id.to_owned());
        tokio::spawn(async move {
            let lease = limiter.lease();
            // A fetch already in flight will do.
            if let Some(_turn) = lease.gate.try_turn() {
                let _ = cluster.lease_more(&key_id, &limiter, false).await;
            }
            lease.lock().prefetching = false;
        });
    }

    /// A cell from this instance's lease, or the refusal it already knows (and whether the
    /// lease runs low: at most half a block left); `None` when Redis must be asked.
    fn from_lease(lease: &Lease, limiter: &KeyLimiter) -> Option<(RateInfo, bool)> {
        let now = Instant::now();
        {
            let mut s = lease.lock();
            if s.expires.is_some_and(|e| e <= now) {
                s.cells = 0;
                s.expires = None;
            }
            if s.cells > 0 {
                s.cells -= 1;
                let remaining = s.cells.saturating_add(s.shared_remaining);
                let size = lease_size(limiter);
                let low = size >= PREFETCH_FROM
                    && s.cells <= size / 2
                    && !s.prefetching
                    && s.refused_until.is_none();
                s.prefetching |= low;
                return Some((info(limiter, remaining, None), low));
            }
            if let Some(until) = s.refused_until {
                if until > now {
                    let wait = until - now;
                    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    return Some((info(limiter, 0, Some(secs.max(1))), false));
                }
                s.refused_until = None;
            }
        }
        None
    }

    /// Leases a block from Redis; `take_one`: and takes one cell of it for the caller.
    async fn lease_more(
        &self,
        key_id: &str,
        limiter: &KeyLimiter,
        take_one: bool,
    ) -> Result<RateInfo, ClusterError> {
        let lease = limiter.lease();
        let interval = interval_us(limiter.rate());
        let limit = format!("{interval}:{}", limiter.burst());
        let bucket = self.key(&["rl", key_id, &limit]);
        let (granted, remaining, wait_us) = self
            .gcra_take(bucket, interval, limiter.burst(), lease_size(limiter))
            .await?;
        let mut s = lease.lock();
        if granted == 0 {
            let wait = Duration::from_micros(wait_us.max(1));
            s.refused_until = Some(Instant::now() + wait);
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Ok(info(limiter, 0, Some(secs.max(1))));
        }
        // Concurrent requests may have leased too: keep every granted cell.
        s.cells = s.cells.saturating_add(granted - u32::from(take_one));
        s.expires = Some(Instant::now() + LEASE_TTL);
        s.shared_remaining = remaining;
        let remaining = s.cells.saturating_add(remaining);
        Ok(info(limiter, remaining, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Rate;

    #[test]
    fn lease_sizes() {
        let l = |count, secs, burst| {
            lease_size(&KeyLimiter::new(
                Rate {
                    count,
                    period: Duration::from_secs(secs),
                },
                burst,
            ))
        };
        assert_eq!(l(100, 1, 100), 1);
        assert_eq!(l(100_000, 1, 100_000), 1_000);
        assert_eq!(
            l(100_000, 1, 8),
            2,
            "never more than a quarter of the burst"
        );
        assert_eq!(l(20, 60, 20), 1);
    }
}
