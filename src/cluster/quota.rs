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
//! the quota used up (nothing left to lease, nothing held by the instance) and the window's
//! flag (`<prefix>qx:<key id>:<window start>`, `SET NX` in the lease script) unset logs it; a
//! refusal of a request costing more than is left sets no flag (fresh user T5-18). Once the shared counter is at the limit an instance refuses without asking Redis
//! until the window ends (the counter never goes down within a window), so an over-quota
//! client costs Redis nothing.
//!
//! While Redis is unavailable (`on_error = "local"`) an instance continues from the cluster
//! usage it last saw for the key and window ([`Cluster::quota_charge_degraded`]), not from
//! zero (fresh user T5-10: a `40/day` key with 9 units left was served 50 more times during a
//! 1 s stall); what it admits is added to the shared counter before shared counting resumes.
//! Every instance re-asserts the highest counter it has seen for each live window on the
//! write-behind tick ([`Cluster::quota_sync`], a max-merge), so Redis losing its data does not
//! hand the window to the first instance that leases (fresh user T5-2).
//!
//! `used` as shown (introspection, `RateLimit`) is the shared counter minus this instance's
//! unspent lease plus its unsynced local units: other instances' unspent leases count as used
//! (ahead of real spending by at most (instances − 1) × lease size, docs/cluster.md).
//!
//! A lease is bounded by the limit it was granted under (fresh user T5-20: `100000/day` cut to
//! `5/day` by a reload, and the instance holding a block of 100 served 98 more). When the key's
//! limit is now lower than the one its units were leased under, the next charge first reads the
//! window's counter `C` (one `GET`, under the key's single flight) and keeps of its `u` unspent
//! units only `min(u, limit − (C + local − u))`: what the new limit leaves after everything
//! leased anywhere (others' unspent blocks counted as spent) except its own block
//! ([`clip_lease`]). The rest stays in the counter, written off (this instance's figures do not
//! count it as used). So the lowered limit holds across the cluster as soon as the instances
//! have the new config: if one instance keeps `k > 0` units, the counter minus `u` plus `k` is
//! the limit, and with several instances each keeping `k_i`, the total is the limit minus the
//! others' blocks, never more (each counts the others' blocks as spent). What it can cost is
//! under-admission, at most the other instances' unspent blocks. A raised limit needs nothing:
//! the lease script grants against the new limit. While Redis is unavailable the clip uses the
//! highest counter this instance saw.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;

use super::{Cluster, ClusterError};
use crate::quota::{Quota, QuotaState, window};

/// KEYS[1] = counter, KEYS[2] = the window's "exceeded" flag; ARGV = limit, units wanted,
/// TTL seconds, units needed now, 1 for a prefetch or when the instance still holds units (a
/// refusal then sets no flag), and the
/// counter this instance last saw in this window. Grants `wanted` (or what is left, if at
/// least `needed`) or nothing: {granted, used after, 1 when this is the window's first refusal
/// cluster-wide}. A counter below what the instance saw (Redis lost its data: restarted
/// without persistence, failed over, flushed) is raised to it first, so one instance's memory
/// re-seeds the cluster's count instead of the window starting again from zero.
/// KEYS[3] = this instance's receipt for the key and window: a grant writes
/// `"<ARGV[7]> <granted>"` there (TTL ARGV[8]), so that a lease whose reply was lost (a
/// timeout: a stalled Redis runs the script when it wakes) is recognised by the next sync and
/// its units are not counted twice (see [`Cluster::quota_sync`]).
/// Every key gets a TTL in the same atomic script (no key without an expiry).
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
  redis.call('SET', KEYS[3], ARGV[7] .. ' ' .. grant, 'EX', ARGV[8])
  return {grant, used, 0}
end
if ARGV[5] == '1' or avail > 0 then return {0, used, 0} end
local first = redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3])
return {0, used, first and 1 or 0}
";

/// Per key, KEYS = counter, "exceeded" flag, this instance's lease receipt; ARGV = the counter
/// this instance saw, units it admitted locally, TTL seconds, 1 to set the flag, the nonce of
/// a lease whose reply was lost (0: none). A lease the receipt shows was granted after all
/// (`late` units, already in the counter) pays for the local units first. Then a counter
/// below what the instance saw is raised to it (never lowered), and the rest of the local
/// units are added; the flag is set `NX`. Returns {counter after, late} per key.
const SYNC_LUA: &str = r"
local out = {}
for i = 1, #KEYS, 3 do
  local a = (i - 1) / 3 * 5
  local seen = tonumber(ARGV[a + 1])
  local add = tonumber(ARGV[a + 2])
  local late = 0
  if ARGV[a + 5] ~= '0' then
    local r = redis.call('GET', KEYS[i + 2])
    if r then
      local sp = string.find(r, ' ')
      if sp and string.sub(r, 1, sp - 1) == ARGV[a + 5] then
        late = tonumber(string.sub(r, sp + 1))
      end
    end
  end
  add = math.max(0, add - late)
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used < seen or add > 0 then
    used = math.max(used, seen) + add
    redis.call('SET', KEYS[i], used, 'EX', ARGV[a + 3])
  end
  if ARGV[a + 4] == '1' then
    redis.call('SET', KEYS[i + 1], '1', 'NX', 'EX', ARGV[a + 3])
  end
  out[#out + 1] = {used, late}
end
return out
";

/// How long a lease receipt is kept (at most the window's TTL): a lease whose reply was
/// lost and that no sync resolves within this is counted as used, as before receipts.
const RECEIPT_TTL: i64 = 86_400;

/// A fresh nonce for a lease receipt: random per process, then counting (never 0).
fn lease_nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    let n = NEXT
        .get_or_init(|| AtomicU64::new(rand::random::<u64>() >> 1 | 1))
        .fetch_add(1, Ordering::Relaxed);
    n.max(1)
}

/// Keys per sync script call (bounds how long one call holds Redis: ~1 µs per key).
pub const SYNC_BATCH: usize = 500;

fn sync_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(SYNC_LUA))
}

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
    /// Unix second the window ends (for the TTL of what [`Cluster::quota_sync`] writes).
    window_end: i64,
    /// Units leased and not yet spent.
    units: u64,
    /// The highest value of the window's counter in Redis this instance has seen (lease and
    /// sync replies): a lower bound of the cluster's usage, re-asserted by every sync.
    used_shared: u64,
    /// Units admitted beyond the lease while Redis was unavailable (`on_error = "local"`),
    /// not yet added to the shared counter (the next sync adds them).
    local: u64,
    /// `quota_exceeded` was logged by this instance while Redis was unavailable.
    local_refused: bool,
    /// A refusal found the quota used up (nothing left in Redis, nothing held here) and asked
    /// Redis for the window's `quota_exceeded` flag. A refusal while units remain (a request
    /// costing more than is left) does not: the event is for the quota used up (T5-18).
    flag_asked: bool,
    /// Redis refused a lease because the counter is at the limit: later refusals in this
    /// window need not ask (the first one did, for the once-per-cluster `quota_exceeded`).
    exhausted: bool,
    /// The size of the last lease requested, and when.
    lease: u64,
    last_fetch: Option<Instant>,
    /// A background lease request is under way.
    prefetching: bool,
    /// The nonce of a lease request whose reply never came (timeout, connection lost): Redis
    /// may have granted it; the next sync finds out from the receipt.
    uncertain: u64,
    /// The highest limit under which the units held were leased: above the key's limit now
    /// (a reload lowered it), the lease is clipped before it is spent ([`clip_lease`]).
    granted_under: u64,
    /// The key's limit at its last charge here (for units of a lease that turns out granted
    /// after its reply was lost).
    limit: u64,
    /// Units in the shared counter that this instance leased and gave up when a reload
    /// lowered the limit: never spent, so not shown as used by this instance.
    written_off: u64,
}

/// A lease granted under a higher limit than the key has now must be clipped before use.
fn needs_clip(l: &KeyLease, q: Quota) -> bool {
    l.units > 0 && l.granted_under > q.limit
}

/// Keeps of the unspent lease only what `q`'s (lowered) limit leaves after everything else the
/// window's counter holds (`counter`: fresh from Redis, or the highest this instance saw), this
/// instance's unsynced local units included; the rest is written off (module doc).
fn clip_lease(l: &mut KeyLease, q: Quota, counter: u64) {
    l.used_shared = l.used_shared.max(counter);
    let elsewhere = (l.used_shared + l.local).saturating_sub(l.units);
    let keep = l.units.min(q.limit.saturating_sub(elsewhere));
    l.written_off += l.units - keep;
    l.units = keep;
    l.granted_under = q.limit;
}

/// A new window starts from an empty lease. The counter is named by the window's start, so a
/// reload that changes the period keeps the lease when the new window starts at the same
/// instant (`/day` to `/month`, or back, on the 1st of a month): what was counted since then
/// is the new window's usage too; only its end moves.
fn reset_on_new_window(l: &mut KeyLease, start: i64, end: i64) {
    if l.window_start != start {
        *l = KeyLease {
            window_start: start,
            window_end: end,
            ..KeyLease::default()
        };
    } else {
        l.window_end = end;
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
    // Units this instance holds are not used yet; units it admitted while Redis was
    // unavailable are, though the shared counter does not show them yet.
    let used = (l.used_shared + l.local)
        .saturating_sub(l.units + l.written_off)
        .min(q.limit);
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
            reset_on_new_window(l, start, end);
            l.limit = quota.limit;
            if needs_clip(l, quota) {
                // Leased under a higher limit (a reload lowered it): clipped first, below.
                None
            } else if l.units >= cost {
                l.units -= cost;
                // Running low: lease the next block in the background (see `prefetch`).
                let low = cost > 0
                    && l.lease >= PREFETCH_FROM
                    && l.units <= l.lease / 2
                    && !l.prefetching
                    && !l.exhausted;
                l.prefetching |= low;
                Some((state(quota, l, now, end, None), low))
            } else if l.exhausted && l.used_shared >= quota.limit && (l.units > 0 || l.flag_asked) {
                // Used up cluster-wide: no Redis call until the window ends (once the flag of
                // the window has been asked for, with this instance's units spent).
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
            // A reload lowered the limit since this block was leased: clip it against the
            // counter as it is now, then look again.
            if self.quota_leases.with(key_id, |l| {
                reset_on_new_window(l, start, end);
                needs_clip(l, quota)
            }) {
                let counter = self.quota_counter(key_id, start).await?;
                self.quota_leases.with(key_id, |l| {
                    if l.window_start == start && needs_clip(l, quota) {
                        clip_lease(l, quota, counter);
                    }
                });
                drop(turn);
                continue;
            }
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
        // Units still held here: a refusal is not the quota used up, and sets no flag.
        let (granted, used, first) = self
            .quota_lease(key_id, quota, now, need, need.max(lease), held > 0)
            .await?;
        Ok(self.quota_leases.with(key_id, |l| {
            reset_on_new_window(l, start, end);
            l.units += granted;
            if granted > 0 {
                l.granted_under = l.granted_under.max(quota.limit);
            }
            l.used_shared = l.used_shared.max(used);
            if l.units >= cost {
                l.units -= cost;
                return state(quota, l, now, end, None);
            }
            l.exhausted = l.used_shared >= quota.limit;
            l.flag_asked |= held == 0 && l.exhausted;
            state(quota, l, now, end, Some(first == 1))
        }))
    }

    /// One lease script call: `(granted, used after, first refusal of the window)`. With
    /// `no_flag` (a prefetch: no request was refused; or units still held here: the quota is
    /// not used up) a refusal never sets the window's `quota_exceeded` flag.
    async fn quota_lease(
        &self,
        key_id: &str,
        quota: Quota,
        now: i64,
        need: u64,
        want: u64,
        no_flag: bool,
    ) -> Result<(u64, u64, u8), ClusterError> {
        let (start, end) = window(quota.period, now);
        let counter = self.key(&["q", key_id, &start.to_string()]);
        let flag = self.key(&["qx", key_id, &start.to_string()]);
        let ttl = (end - now).max(1) + 86_400;
        let receipt = self.receipt_key(key_id, start);
        let seen = self.quota_leases.with(key_id, |l| {
            if l.window_start == start {
                l.used_shared
            } else {
                0
            }
        });
        let nonce = lease_nonce();
        let reply = self
            .run(move |mut c| async move {
                script()
                    .key(counter)
                    .key(flag)
                    .key(receipt)
                    .arg(quota.limit)
                    .arg(want)
                    .arg(ttl)
                    .arg(need)
                    .arg(u8::from(no_flag))
                    .arg(seen)
                    .arg(nonce)
                    .arg(ttl.min(RECEIPT_TTL))
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        // Sent, and no answer (a refusal while degraded sent nothing).
        if matches!(reply, Err(ClusterError::Timeout | ClusterError::Redis(_))) {
            self.quota_leases.with(key_id, |l| {
                if l.window_start == start {
                    l.uncertain = nonce;
                }
            });
        }
        reply
    }

    /// `<prefix>ql:<key id>:<window start>:<instance>`: this instance's last lease receipt.
    fn receipt_key(&self, key_id: &str, start: i64) -> String {
        self.key(&["ql", key_id, &start.to_string(), &self.settings.instance])
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
                            if granted > 0 {
                                // Under the limit the prefetch began with (a reload since
                                // may have lowered it: the next charge clips).
                                l.granted_under = l.granted_under.max(quota.limit);
                            }
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
        let used = self.quota_counter(key_id, start).await?;
        Ok(self.quota_leases.with(key_id, |l| {
            reset_on_new_window(l, start, end);
            l.used_shared = l.used_shared.max(used);
            state(quota, l, now, end, None)
        }))
    }

    /// The window's shared counter as Redis holds it now (0 if it has none). One `GET`.
    async fn quota_counter(&self, key_id: &str, start: i64) -> Result<u64, ClusterError> {
        let counter = self.key(&["q", key_id, &start.to_string()]);
        let used: Option<u64> = self
            .run(move |mut c| async move {
                redis::cmd("GET")
                    .arg(counter)
                    .query_async::<Option<u64>>(&mut c)
                    .await
            })
            .await?;
        Ok(used.unwrap_or(0))
    }

    /// What this instance knows of the key's window without asking Redis: the highest shared
    /// counter it saw, plus what it admitted locally since, minus its unspent lease. For the
    /// introspection endpoint while Redis is unavailable; `None` when this instance has not
    /// seen the window (its own local counters are then all it knows).
    pub fn quota_known(&self, key_id: &str, quota: Quota, now: i64) -> Option<QuotaState> {
        let (start, end) = window(quota.period, now);
        self.quota_leases.with(key_id, |l| {
            (l.window_start == start && (l.used_shared > 0 || l.local > 0))
                .then(|| state(quota, l, now, end, None))
        })
    }

    /// Counts `cost` units while Redis is unavailable (`on_error = "local"`), continuing from
    /// what this instance last knew of the cluster's usage: its unspent lease first (those
    /// units are its own), then units beyond it while the highest shared counter it saw plus
    /// what it admitted locally stays within the limit. So during an outage each instance
    /// admits at most what was left when it last heard from Redis (an instance that never
    /// leased for this window knows nothing and starts from zero), and what it admitted is
    /// added to the shared counter by the next [`quota_sync`](Self::quota_sync) (at the
    /// latest when Redis answers again, before shared counting resumes). `refused` is
    /// `Some(true)` for this instance's first refusal in the window that finds nothing left
    /// (logged `quota_exceeded` on its own, as without cluster mode), unless the cluster
    /// already logged it. No Redis
    /// call, no await.
    pub fn quota_charge_degraded(
        &self,
        key_id: &str,
        quota: Quota,
        cost: u64,
        now: i64,
    ) -> QuotaState {
        let (start, end) = window(quota.period, now);
        self.quota_leases.with(key_id, |l| {
            reset_on_new_window(l, start, end);
            l.limit = quota.limit;
            if needs_clip(l, quota) {
                // Lowered by a reload: clipped against the highest counter this instance saw.
                clip_lease(l, quota, 0);
            }
            if l.units >= cost {
                l.units -= cost;
                return state(quota, l, now, end, None);
            }
            let extra = cost - l.units;
            if l.used_shared.saturating_add(l.local).saturating_add(extra) <= quota.limit {
                l.units = 0;
                l.local += extra;
                return state(quota, l, now, end, None);
            }
            // Only a refusal that finds nothing left is the quota used up (T5-18).
            if l.units > 0 || l.used_shared.saturating_add(l.local) < quota.limit {
                return state(quota, l, now, end, Some(false));
            }
            let first = !l.flag_asked && !l.local_refused;
            l.local_refused = true;
            state(quota, l, now, end, Some(first))
        })
    }

    /// Re-asserts, for every live window this instance has counted in, the highest shared
    /// counter it has seen (a max-merge: a counter is raised to it, never lowered), and adds
    /// the units it admitted while Redis was unavailable; keys of windows it saw refused get
    /// their `quota_exceeded` flag back. One script call per [`SYNC_BATCH`] keys. Called on
    /// the write-behind tick (`history.rs`, every 2 s), when Redis answers again (before
    /// shared counting resumes, `mod.rs`) and at shutdown. So when Redis loses its data
    /// (restarted without persistence, flushed, failed over to a lagging replica), every
    /// running instance puts back what it saw within one tick, instead of the first instance
    /// to lease resetting the window to its own count. `force` runs it on a connection that
    /// is not yet marked healthy (the reconnect). Errors leave the local units to the next
    /// sync; a reply lost after Redis ran the script (a timeout) counts them again there
    /// (an over-count of at most what was admitted locally; never an under-count).
    pub async fn quota_sync(&self, now: i64, force: bool) -> Result<(), ClusterError> {
        let live: Vec<(Box<str>, KeyLease)> = {
            let g = self
                .quota_leases
                .keys
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            g.iter()
                .filter(|(_, l)| {
                    l.window_end > now && (l.used_shared > 0 || l.local > 0 || l.uncertain != 0)
                })
                .map(|(k, l)| (k.clone(), *l))
                .collect()
        };
        for batch in live.chunks(SYNC_BATCH) {
            let mut script = sync_script().prepare_invoke();
            for (id, l) in batch {
                let start = l.window_start.to_string();
                script
                    .key(self.key(&["q", id, &start]))
                    .key(self.key(&["qx", id, &start]))
                    .key(self.receipt_key(id, l.window_start))
                    .arg(l.used_shared)
                    .arg(l.local)
                    .arg((l.window_end - now).max(1) + 86_400)
                    .arg(u8::from(l.flag_asked || l.local_refused))
                    .arg(l.uncertain);
            }
            let invoke = move |mut c: redis::aio::MultiplexedConnection| async move {
                script.invoke_async::<Vec<(u64, u64)>>(&mut c).await
            };
            let counters = if force {
                self.run_forced(invoke).await?
            } else {
                self.run(invoke).await?
            };
            let mut g = self
                .quota_leases
                .keys
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for ((id, sent), (used, late)) in batch.iter().zip(counters) {
                if let Some(l) = g.get_mut(id)
                    && l.window_start == sent.window_start
                {
                    l.used_shared = l.used_shared.max(used);
                    l.local = l.local.saturating_sub(sent.local);
                    // A lease granted after its reply was lost paid for the local units
                    // first (the script added only the rest); what is left of it is ours
                    // (granted under the limit of the time: clipped if it was lowered since).
                    let ours = late.saturating_sub(sent.local);
                    if ours > 0 {
                        l.units += ours;
                        l.granted_under = l.granted_under.max(sent.limit);
                    }
                    if l.uncertain == sent.uncertain {
                        l.uncertain = 0;
                    }
                }
            }
        }
        Ok(())
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
    fn a_lease_granted_under_a_higher_limit_is_clipped_to_the_lowered_one() {
        let old = parse_quota("100000/day").unwrap();
        let new = parse_quota("5/day").unwrap();
        // One instance leased 100 and spent 2 (fresh user T5-20): 3 left of the new limit.
        let mut l = KeyLease {
            units: 98,
            used_shared: 100,
            granted_under: old.limit,
            ..KeyLease::default()
        };
        assert!(needs_clip(&l, new) && !needs_clip(&l, old));
        clip_lease(&mut l, new, 100);
        assert_eq!((l.units, l.written_off), (3, 95));
        assert!(!needs_clip(&l, new));
        let s = state(new, &l, 0, 86_400, None);
        assert_eq!((s.used, s.remaining), (2, 3), "what this instance shows");
        // Another instance leased too (counter 200, its block of 100 counted as spent): the
        // new limit leaves nothing here.
        let mut l = KeyLease {
            units: 98,
            used_shared: 100,
            granted_under: old.limit,
            ..KeyLease::default()
        };
        clip_lease(&mut l, new, 200);
        assert_eq!(l.units, 0);
        // Several instances clipping against one counter never keep more than the limit
        // allows: 3 instances holding 40, 30, 20 of a counter of 100 (10 spent), cut to 60.
        let cut = parse_quota("60/day").unwrap();
        let kept: u64 = [40, 30, 20]
            .iter()
            .map(|&u| {
                let mut l = KeyLease {
                    units: u,
                    used_shared: 100,
                    granted_under: 1000,
                    ..KeyLease::default()
                };
                clip_lease(&mut l, cut, 100);
                l.units
            })
            .sum();
        assert!(10 + kept <= 60, "spent 10, kept {kept}");
        // Units admitted locally during an outage count as spent.
        let mut l = KeyLease {
            units: 10,
            used_shared: 10,
            local: 4,
            granted_under: 1000,
            ..KeyLease::default()
        };
        clip_lease(&mut l, parse_quota("8/day").unwrap(), 10);
        assert_eq!(l.units, 4);
    }

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
