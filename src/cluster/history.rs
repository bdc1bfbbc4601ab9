//! Last use and per-key network history shared by every instance (SPEC §9, §11), so that
//! `keygate keys` shows the cluster's last use and `key_first_use` / `key_new_network` are
//! logged once for the cluster, not once per instance.
//!
//! Redis keys (each written with an expiry, by atomic scripts):
//!
//! * `<prefix>lu:<key id>`: `"<unix seconds> <client ip>"`, the latest use seen by any
//!   instance; kept [`LAST_USE_TTL`] after the last write (longer than the 90-day "unused"
//!   warning of `keygate keys`).
//! * `<prefix>net:<key id>`: a hash of client network (`192.0.2.0/24`, `2001:db8::/64`) →
//!   last seen (unix seconds); at most `[key_networks] max_per_key` networks (the least
//!   recently seen is dropped first), none older than `remember` (30 days by default), and the
//!   hash itself expires `remember` after its last write.
//!
//! Two paths write them:
//!
//! * **A network new to this instance** (its local history, `networks.rs`, has not seen it)
//!   asks Redis at once, in one script under `[cluster] timeout`: the script records the
//!   network and says whether the cluster knew it. Only the instance that adds it logs
//!   `key_new_network` (or `key_first_use`, when the key had neither a network nor a last use
//!   in Redis). Networks this instance already knows never ask Redis: they were added to
//!   Redis when this instance first saw them.
//! * **Everything else is written behind**: each use that changes a key's (second, client IP)
//!   is noted in memory; every [`FLUSH_EVERY`] one script call (one round trip) writes the
//!   latest use of every noted key and refreshes the last-seen time of the networks they came
//!   from (at most [`NETS_PER_FLUSH`] per key and flush).
//!
//! Bounds on "once cluster-wide": the decision is atomic in Redis, so two instances seeing the
//! same new network at the same instant log it once. An event can be logged twice when Redis
//! could not be asked (degraded: each instance decides from its own history, as without
//! cluster mode, and a network first seen then reaches Redis only with the next flush after
//! recovery), when Redis lost its data (restart without persistence: known networks are new
//! again), or after Redis dropped a network (over `max_per_key`, or unseen for `remember`)
//! that an instance still remembers. Last use written behind lags by up to [`FLUSH_EVERY`]
//! (more while Redis is unavailable; written when it is back).
//! Nothing here ever refuses a request, whatever `on_error` says.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use redis::Script;

use super::{Cluster, ClusterError};
use crate::networks::{NetworkPolicy, Sighting};

/// How often noted uses are written to Redis.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Networks per key whose last-seen time one flush refreshes.
pub const NETS_PER_FLUSH: usize = 16;
/// How long a key's last use is kept in Redis after it was written (400 days).
pub const LAST_USE_TTL: i64 = 400 * 86_400;

/// Shared Lua: drops networks of hash `k` seen before `horizon`, then the least recently
/// seen while more than `max` are left. Returns how many are left.
const PRUNE_LUA: &str = r"
local function prune(k, horizon, max)
  local all = redis.call('HGETALL', k)
  local live = {}
  for i = 1, #all, 2 do
    local t = tonumber(all[i + 1]) or 0
    if t < horizon then
      redis.call('HDEL', k, all[i])
    else
      live[#live + 1] = {all[i], t}
    end
  end
  if #live > max then
    table.sort(live, function(a, b) return a[2] < b[2] end)
    for i = 1, #live - max do redis.call('HDEL', k, live[i][1]) end
    return max
  end
  return #live
end
";

/// KEYS = net hash, last use; ARGV = network, now, horizon, max, remember (s), last-use TTL,
/// "now ip". Returns {1 if the network is new to the cluster, networks known before it,
/// 1 if this is the key's first use cluster-wide}.
const SIGHTING_LUA: &str = r"
local before = redis.call('HGET', KEYS[1], ARGV[1])
local known = before and tonumber(before) >= tonumber(ARGV[3])
local had = redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1
if not known or tonumber(before) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local left = prune(KEYS[1], tonumber(ARGV[3]), tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], ARGV[7], 'NX', 'EX', ARGV[6])
if known then return {0, 0, 0} end
return {1, math.max(left - 1, 0), had and 0 or 1}
";

/// KEYS = (last use, net hash) per key; ARGV = horizon, max, remember (s), last-use TTL, then
/// per key: unix seconds, "seconds ip", number of networks, then (network, seconds) pairs.
const FLUSH_LUA: &str = r"
local horizon, max = tonumber(ARGV[1]), tonumber(ARGV[2])
local a = 5
for i = 1, #KEYS, 2 do
  local t = tonumber(ARGV[a])
  local old = redis.call('GET', KEYS[i])
  if not old or (tonumber(string.match(old, '^%d+')) or 0) < t then
    redis.call('SET', KEYS[i], ARGV[a + 1], 'EX', ARGV[4])
  end
  local n = tonumber(ARGV[a + 2])
  a = a + 3
  for j = 1, n do
    local seen = tonumber(ARGV[a + 1])
    if (tonumber(redis.call('HGET', KEYS[i + 1], ARGV[a]) or '0') or 0) < seen then
      redis.call('HSET', KEYS[i + 1], ARGV[a], seen)
    end
    a = a + 2
  end
  if n > 0 then
    prune(KEYS[i + 1], horizon, max)
    redis.call('EXPIRE', KEYS[i + 1], ARGV[3])
  end
end
return 0
";

fn sighting_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(&format!("{PRUNE_LUA}{SIGHTING_LUA}")))
}

fn flush_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(&format!("{PRUNE_LUA}{FLUSH_LUA}")))
}

/// Uses noted since the last flush, by key id. Bounded by the number of configured keys
/// (only authenticated keys are noted) × [`NETS_PER_FLUSH`].
#[derive(Default)]
pub struct PendingUses {
    keys: Mutex<HashMap<Box<str>, Noted>>,
}

struct Noted {
    last_used: i64,
    ip: IpAddr,
    nets: Vec<(IpNet, i64)>,
}

/// A key's figures as Redis holds them (for `keygate keys`).
#[derive(Debug, Default, Clone)]
pub struct SharedUsage {
    /// Unix seconds and client IP of the latest use.
    pub last_used: Option<(i64, String)>,
    /// Units used in the current quota window, when the key has a quota.
    pub quota_used: Option<u64>,
    /// (CIDR, last seen) of the networks in the key's history.
    pub networks: Vec<(String, i64)>,
}

impl Cluster {
    /// Notes a use for the next flush: called when a key's (second, client IP) changed, so at
    /// most once per second per key and client address. No Redis call. `used_at` is the real
    /// clock (last use), `seen_at` the network-history clock (`clock.rs`).
    pub fn note_use(
        &self,
        key_id: &str,
        ip: IpAddr,
        used_at: i64,
        seen_at: i64,
        policy: &NetworkPolicy,
    ) {
        self.note(key_id, ip, used_at, &[(policy.network(ip), seen_at)]);
    }

    fn note(&self, key_id: &str, ip: IpAddr, used_at: i64, nets: &[(IpNet, i64)]) {
        let mut g = self
            .pending_uses
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let noted = match g.get_mut(key_id) {
            Some(n) => n,
            None => g.entry(key_id.into()).or_insert(Noted {
                last_used: used_at,
                ip,
                nets: Vec::new(),
            }),
        };
        if used_at >= noted.last_used {
            noted.last_used = used_at;
            noted.ip = ip;
        }
        for &(net, seen_at) in nets {
            if let Some((_, seen)) = noted.nets.iter_mut().find(|(n, _)| *n == net) {
                *seen = (*seen).max(seen_at);
            } else if noted.nets.len() < NETS_PER_FLUSH {
                noted.nets.push((net, seen_at));
            }
        }
    }

    /// A network this instance has not seen for `key_id` (its local sighting `local` is not
    /// `Known`): records it in Redis and says what the cluster makes of it.
    pub async fn network_sighting(
        &self,
        key_id: &str,
        ip: IpAddr,
        now: i64,
        policy: &NetworkPolicy,
        local: Sighting,
    ) -> Result<Sighting, ClusterError> {
        let net = policy.network(ip).to_string();
        let nets = self.key(&["net", key_id]);
        let last = self.key(&["lu", key_id]);
        let horizon = now - policy.remember_secs;
        let max = policy.max_per_key.max(1);
        let remember = policy.remember_secs.max(1);
        let use_value = format!(
            "{} {}",
            jiff::Timestamp::now().as_second(),
            ip.to_canonical()
        );
        let (new, previous, first): (u8, usize, u8) = self
            .run(move |mut c| async move {
                sighting_script()
                    .key(nets)
                    .key(last)
                    .arg(net)
                    .arg(now)
                    .arg(horizon)
                    .arg(max)
                    .arg(remember)
                    .arg(LAST_USE_TTL)
                    .arg(use_value)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(match (new, first, local) {
            (0, _, _) => Sighting::Known,
            // The cluster never saw the key, but this instance's history did (e.g. cluster
            // mode turned on for keys in use): not a first use.
            (_, 1, Sighting::FirstUse) => Sighting::FirstUse,
            _ => Sighting::NewNetwork { previous },
        })
    }

    /// Writes the noted uses (one script call); a failure drops them (see the module doc).
    pub async fn flush_uses(&self, policy: &NetworkPolicy, now: i64) -> Result<(), ClusterError> {
        let noted = std::mem::take(
            &mut *self
                .pending_uses
                .keys
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if noted.is_empty() {
            return Ok(());
        }
        let mut script = flush_script().prepare_invoke();
        script
            .arg(now - policy.remember_secs)
            .arg(policy.max_per_key.max(1))
            .arg(policy.remember_secs.max(1))
            .arg(LAST_USE_TTL);
        for (id, n) in &noted {
            script
                .key(self.key(&["lu", id]))
                .key(self.key(&["net", id]));
            script
                .arg(n.last_used)
                .arg(format!("{} {}", n.last_used, n.ip.to_canonical()))
                .arg(n.nets.len());
            for (net, seen) in &n.nets {
                script.arg(net.to_string()).arg(*seen);
            }
        }
        let written = self
            .run(move |mut c| async move { script.invoke_async::<i64>(&mut c).await })
            .await
            .map(|_| ());
        if written.is_err() {
            // Kept for the next flush (merged with what was noted meanwhile): bounded by the
            // number of keys, so an outage costs no memory growth and loses nothing.
            for (id, n) in noted {
                self.note(&id, n.ip, n.last_used, &n.nets);
            }
        }
        written
    }

    /// Flushes noted uses every [`FLUSH_EVERY`] for the life of the process. `policy` reads
    /// the current `[key_networks]` (it may change on reload).
    pub async fn write_behind(self: Arc<Self>, policy: impl Fn() -> NetworkPolicy) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = self.flush_uses(&policy(), crate::clock::now()).await;
            // Quota counters: local units added, what this instance saw re-asserted.
            let _ = self.quota_sync(crate::clock::now(), false).await;
            // Verified tokens' proofs: a new round when due or when Redis lost its data.
            self.vouch_tick().await;
        }
    }

    /// The cluster's figures for `keys` (id, current quota window start if the key has a
    /// quota), in one pipelined round trip (for `keygate keys`).
    pub async fn shared_usage(
        &self,
        keys: &[(&str, Option<i64>)],
    ) -> Result<Vec<SharedUsage>, ClusterError> {
        let mut pipe = redis::pipe();
        for (id, window) in keys {
            pipe.get(self.key(&["lu", id]));
            match window {
                Some(start) => pipe.get(self.key(&["q", id, &start.to_string()])),
                None => pipe.cmd("PING"),
            };
            pipe.hgetall(self.key(&["net", id]));
        }
        type Row = (Option<String>, redis::Value, HashMap<String, i64>);
        let rows: Vec<redis::Value> = self
            .run(move |mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let mut out = Vec::with_capacity(keys.len());
        for (chunk, (_, window)) in rows.chunks(3).zip(keys) {
            let row: Row = match chunk {
                [a, b, c] => (
                    redis::from_redis_value(a.clone()).unwrap_or_default(),
                    b.clone(),
                    redis::from_redis_value(c.clone()).unwrap_or_default(),
                ),
                _ => break,
            };
            let last_used = row.0.and_then(|v| {
                let (t, ip) = v.split_once(' ')?;
                Some((t.parse().ok()?, ip.to_string()))
            });
            let quota_used = window.map(|_| {
                redis::from_redis_value::<Option<u64>>(row.1)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            });
            let mut networks: Vec<(String, i64)> = row.2.into_iter().collect();
            networks.sort();
            out.push(SharedUsage {
                last_used,
                quota_used,
                networks,
            });
        }
        Ok(out)
    }
}
