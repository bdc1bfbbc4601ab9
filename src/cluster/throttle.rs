//! The per-client failed-authentication budget (`[auth] failed_auth_limit`) shared by every
//! instance, so that a guesser spread over instances gets one budget, not one per instance.
//!
//! Only what costs an argon2 hash is shared: each instance still applies its own throttle
//! (`limits.rs`) first; then, before hashing, one cell is taken from the client's GCRA bucket in
//! Redis (`<prefix>fa:<client>`, a client being an IPv4 address or an IPv6 /64, as locally).
//! A token that verifies gives its cell back; a wrong one keeps it spent. So across the
//! cluster a client gets at most `failed_auth_limit` hashed wrong guesses per period (plus one
//! per instance in flight at the instant its bucket empties).
//!
//! Exemption, as on one instance (SPEC §3: a client whose key was verified before keeps
//! working, so a NAT shared with a guesser does not lock it out): each instance's verified-key
//! cache is its own, so a legitimate client's next connection landing on an instance that never
//! verified its token would meet the budget a guesser behind the same address spent elsewhere
//! (a fresh user: 429 on every instance it had not been served by yet). So an instance that
//! verifies a token records a *proof* of it (`<prefix>vk:<key id>`, [`vouch_proof`], for
//! [`VOUCH_TTL`]); an instance whose budget refuses a token looks the proof up, and a token
//! whose proof matches is verified there all the same (argon2, uncharged). A guess never
//! matches, so the budget holds for guessers; the proof only lets a token skip the budget,
//! never authentication (argon2 still decides), so whoever can write to Redis gains no key.

use std::net::IpAddr;

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use redis::{AsyncCommands, Script};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::rate::interval_us;
use super::{Cluster, ClusterError};
use crate::auth::Key;
use crate::limits::{Rate, client_key};

/// How long a recorded proof exempts its token on the other instances; each instance that
/// verifies the token writes it again.
pub const VOUCH_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What instances share about a token they verified: HMAC-SHA256 over the token, keyed with
/// the fingerprint of the key's argon2id hash (a SHA-256 of its PHC string, which only the
/// config holds). It reveals nothing of the token (≈190 bits of secret behind a keyed hash),
/// and a rotated key (new hash) makes every earlier proof stale.
pub fn vouch_proof(key: &Key, token: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key.hash.fingerprint())
        .expect("HMAC takes a key of any length");
    mac.update(token);
    mac.finalize().into_bytes().into()
}

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
            .run(move |mut c| async move {
                refund_script()
                    .key(bucket)
                    .arg(interval)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    fn vouch_entry(&self, key_id: &str) -> String {
        self.key(&["vk", key_id])
    }

    /// Records that this instance verified the token whose [`vouch_proof`] is `proof`.
    /// Best effort: without it, the token meets the budget on instances that never verified it.
    pub async fn vouch(&self, key_id: &str, proof: [u8; 32]) {
        let entry = self.vouch_entry(key_id);
        let _ = self
            .run(move |mut c| async move {
                c.set_ex::<_, _, ()>(entry, hex::encode(proof), VOUCH_TTL.as_secs())
                    .await
            })
            .await;
    }

    /// True if some instance verified the token whose proof is `proof` (constant-time
    /// compare). One `GET`, asked only when a budget is about to refuse; `false` when Redis
    /// cannot say.
    pub async fn vouched(&self, key_id: &str, proof: &[u8; 32]) -> bool {
        let entry = self.vouch_entry(key_id);
        let recorded: Option<String> = self
            .run(move |mut c| async move { c.get(entry).await })
            .await
            .ok()
            .flatten();
        let mut expected = [0u8; 64];
        hex::encode_to_slice(proof, &mut expected).expect("64 hex digits");
        recorded.is_some_and(|r| bool::from(r.as_bytes().ct_eq(&expected)))
    }
}
