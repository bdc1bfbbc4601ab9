//! The per-client failed-authentication budget (`[auth] failed_auth_limit`) shared by every
//! instance, so that a guesser spread over instances gets one budget, not one per instance.
//!
//! Only what costs an argon2 hash is shared: each instance still applies its own throttle
//! (`limits.rs`) first; then, before hashing, one cell is taken from the client's GCRA bucket in
//! Redis (`<prefix>fa:<client>`, a client being an IPv4 address or an IPv6 /64, as locally).
//! A token that verifies gives its cell back; a wrong one keeps it spent. So across the
//! cluster a client gets at most `failed_auth_limit` hashed wrong guesses per period (plus one
//! per instance in flight at the instant its bucket empties).

use std::net::IpAddr;

use redis::Script;

use super::{Cluster, ClusterError};
use crate::limits::{Rate, client_key};

/// KEYS[1] bucket; ARGV = interval µs, burst. Returns µs to wait (0 = a cell was taken).
const TAKE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat + interval - now > burst * interval then
  return tat - (burst - 1) * interval - now
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return 0
";

/// KEYS[1] bucket; ARGV = interval µs. Gives one cell back.
const REFUND_LUA: &str = r"
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', tat - tonumber(ARGV[1])), 'KEEPTTL')
end
return 0
";

fn scripts() -> &'static (Script, Script) {
    static S: std::sync::OnceLock<(Script, Script)> = std::sync::OnceLock::new();
    S.get_or_init(|| (Script::new(TAKE_LUA), Script::new(REFUND_LUA)))
}

fn interval_us(rate: Rate) -> u64 {
    u64::try_from((rate.period / rate.count.max(1)).as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Cluster {
    fn guess_bucket(&self, ip: IpAddr) -> String {
        self.key(&["fa", &format!("{:032x}", client_key(ip))])
    }

    /// Takes one cell of the client's shared guess budget before hashing: `Ok(None)` taken,
    /// `Ok(Some(seconds ≥ 1))` the budget is used up cluster-wide.
    pub async fn guess_reserve(&self, ip: IpAddr, rate: Rate) -> Result<Option<u64>, ClusterError> {
        let bucket = self.guess_bucket(ip);
        let interval = interval_us(rate);
        let burst = rate.count.max(1);
        let wait_us: u64 = self
            .run(|mut c| async move {
                scripts()
                    .0
                    .key(bucket)
                    .arg(interval)
                    .arg(burst)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok((wait_us > 0).then(|| wait_us.div_ceil(1_000_000).max(1)))
    }

    /// Gives the cell back (the token was right). Best effort: a failure only costs the client
    /// one cell of its budget.
    pub async fn guess_refund(&self, ip: IpAddr, rate: Rate) {
        let bucket = self.guess_bucket(ip);
        let interval = interval_us(rate);
        let _ = self
            .run(|mut c| async move {
                scripts()
                    .1
                    .key(bucket)
                    .arg(interval)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }
}
