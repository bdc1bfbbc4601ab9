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

use super::rate::interval_us;
use super::{Cluster, ClusterError};
use crate::limits::{Rate, client_key};

/// KEYS[1] bucket; ARGV = interval µs. Gives one cell back.
const REFUND_LUA: &str = r"
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', tat - tonumber(ARGV[1])), 'KEEPTTL')
end
return 0
";

fn refund_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(REFUND_LUA))
}

impl Cluster {
    fn guess_bucket(&self, ip: IpAddr) -> String {
        self.key(&["fa", &format!("{:032x}", client_key(ip))])
    }

    /// Takes one cell of the client's shared guess budget before hashing: `Ok(None)` taken,
    /// `Ok(Some(seconds ≥ 1))` the budget is used up cluster-wide.
    pub async fn guess_reserve(&self, ip: IpAddr, rate: Rate) -> Result<Option<u64>, ClusterError> {
        let bucket = self.guess_bucket(ip);
        let (_, _, wait_us) = self
            .gcra_take(bucket, interval_us(rate), rate.count.max(1), 1)
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
                refund_script()
                    .key(bucket)
                    .arg(interval)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }
}
