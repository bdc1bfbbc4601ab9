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
//!
//! The proof is written again while the token is in use (fresh user T6-5: it was written only
//! when argon2 ran, so a token served from the verified caches was never proved again, and after
//! Redis lost its data, or after [`VOUCH_TTL`], its exemption was gone for good): an instance
//! that serves a token from its verified cache writes the proof again when it has not written it
//! in the current *vouch round* ([`VouchMark`]). A round ends every [`VOUCH_REFRESH`], when the
//! instance sees that Redis lost its data (the random `<prefix>epoch` marker is gone or
//! replaced, [`Cluster::vouch_tick`]) and when the cluster recovers from degraded. So each
//! instance writes each key's proof at most once per round (one `SET`, in a task of its own,
//! off the request's path; the request itself does two atomic loads), and at the first use of
//! the key after a loss is seen (within one write-behind tick, 2 s).
//!
//! A proof belongs to a key *and its hash*: the round mark lives in the key's verified cache
//! ([`crate::auth::Verified`]), which a new hash replaces, and the proof is keyed by the hash's
//! fingerprint, so a proof made under a replaced hash (a key rotated, or removed and re-added
//! with a new hash) never matches a token again; the new hash's first verification overwrites
//! it. A key removed from the config leaves its proof to expire: nothing consults it (an unknown
//! key id is a guess). The same key removed and re-added with the same hash keeps its proof,
//! which is still true.
//!
//! A reload that changes `failed_auth_limit` carries each client's outstanding failures over
//! as a count, as the local throttle does (`limits.rs`, fresh user T8-1): the bucket stores
//! its emission interval with its TAT (`"<tat µs> <interval µs>"`), and a take at another
//! interval re-scales the TAT to the failures it stands for, capped at the new budget. So a
//! raised limit gives a throttled client the difference at once (before, the TAT in intervals
//! of the old rate held it back: `2/h` raised to `20/h` refused for an hour, T5-21's kind), and
//! a limit tightened during an attack keeps every throttled client throttled.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use redis::{AsyncCommands, Script};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::rate::interval_us;
use super::{Cluster, ClusterError};
use crate::auth::{Key, Verified};
use crate::limits::{Rate, client_key};

/// How long a recorded proof exempts its token on the other instances; each instance that
/// verifies or serves the token writes it again (at most once per vouch round).
pub const VOUCH_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A vouch round lasts at most this long: an instance serving a token writes its proof again
/// at most this often (and after Redis lost its data, see the module doc).
pub const VOUCH_REFRESH: Duration = Duration::from_secs(600);

/// A mark on a key's verified cache: the vouch round in which this instance last wrote the
/// token's proof (0: never; `u64::MAX`: a write is under way).
#[derive(Debug, Default)]
pub struct VouchMark(AtomicU64);

const IN_FLIGHT: u64 = u64::MAX;

/// The instance's vouch round and what ends it (see the module doc). Part of [`Cluster`].
pub struct VouchRounds {
    /// The current round (≥ 1, never [`IN_FLIGHT`]).
    round: AtomicU64,
    /// For [`Cluster::vouch_tick`] only.
    tick: Mutex<TickState>,
}

struct TickState {
    /// The epoch marker's value as this instance last read it.
    seen: Option<String>,
    round_started: Instant,
    /// Whether the cluster was healthy at the last tick; `None` before it first was (the
    /// first connection is no recovery: a degraded instance writes no proof and marks none).
    was_healthy: Option<bool>,
}

impl Default for VouchRounds {
    fn default() -> Self {
        VouchRounds {
            round: AtomicU64::new(1),
            tick: Mutex::new(TickState {
                seen: None,
                round_started: Instant::now(),
                was_healthy: None,
            }),
        }
    }
}

/// KEYS[1] = the epoch marker; ARGV = a fresh value, TTL seconds. Returns the marker's value,
/// set to the fresh one if it is missing (Redis lost its data, or no instance ran for the TTL).
/// An instance that reads a value other than the one it read before knows that Redis lost its
/// data since.
const EPOCH_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return ARGV[1]
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return v
";

fn epoch_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(EPOCH_LUA))
}

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

/// Reads a guess bucket `"<tat> <interval>"` (a bare TAT, as before intervals were stored, is
/// taken at ARGV[1]) into `tat`, `iv`.
const GUESS_READ_LUA: &str = r"
local function read(v, default_iv)
  if not v then return 0, default_iv end
  local sp = string.find(v, ' ')
  if not sp then return tonumber(v) or 0, default_iv end
  return tonumber(string.sub(v, 1, sp - 1)) or 0, tonumber(string.sub(v, sp + 1)) or default_iv
end
";

/// KEYS[1] bucket; ARGV = interval µs, burst. Takes one cell: {1, cells left, 0} or
/// {0, 0, µs until the next cell}. State kept at another interval (the limit changed) is
/// re-scaled first: its outstanding cells, capped at the burst, at the new interval.
const GUESS_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat, iv = read(redis.call('GET', KEYS[1]), interval)
if tat < now then
  tat = now
elseif iv ~= interval then
  tat = now + math.min(math.ceil((tat - now) / iv), burst) * interval
end
local avail = math.floor((now + burst * interval - tat) / interval)
if avail < 1 then
  return {0, 0, tat - (burst - 1) * interval - now}
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f %d', tat, interval), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {1, avail - 1, 0}
";

/// KEYS[1] bucket; ARGV = interval µs. Gives one cell back (at the interval it was kept at).
const REFUND_LUA: &str = r"
local tat, iv = read(redis.call('GET', KEYS[1]), tonumber(ARGV[1]))
if tat > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f %d', tat - iv, iv), 'KEEPTTL')
end
return 0
";

fn guess_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(&format!("{GUESS_READ_LUA}{GUESS_LUA}")))
}

fn refund_script() -> &'static Script {
    static S: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    S.get_or_init(|| Script::new(&format!("{GUESS_READ_LUA}{REFUND_LUA}")))
}

impl Cluster {
    fn guess_bucket(&self, ip: IpAddr) -> String {
        self.key(&["fa", &format!("{:032x}", client_key(ip))])
    }

    /// Takes one cell of the client's shared guess budget before hashing: `Ok(None)` taken,
    /// `Ok(Some(seconds ≥ 1))` the budget is used up cluster-wide.
    pub async fn guess_reserve(&self, ip: IpAddr, rate: Rate) -> Result<Option<u64>, ClusterError> {
        let bucket = self.guess_bucket(ip);
        let (interval, burst) = (interval_us(rate), rate.count.max(1));
        let (_, _, wait_us): (u32, u32, u64) = self
            .run(move |mut c| async move {
                guess_script()
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

    /// Records, for the other instances, that this instance verified the token whose
    /// [`vouch_proof`] is `proof` (argon2 just said so): written in a task of its own, unless
    /// this round's write is done or under way. Best effort: a failed write is tried again by
    /// the token's next use here.
    pub fn vouch(self: &Arc<Self>, verified: &Arc<Verified>, key_id: &Arc<str>, proof: [u8; 32]) {
        if let Some((round, before)) = self.vouch_claim(verified) {
            self.vouch_write(verified.clone(), key_id.clone(), proof, round, before);
        }
    }

    /// For a token served from this instance's verified cache: writes its proof again if this
    /// instance has not written it in the current round (module doc, T6-5). The steady path
    /// (written this round, or the cluster degraded) is two atomic loads: no allocation, no
    /// Redis call. Otherwise one HMAC here and a task that writes the proof.
    pub fn vouch_again(self: &Arc<Self>, key: &Key, token: &[u8]) {
        if let Some((round, before)) = self.vouch_claim(&key.verified) {
            let proof = vouch_proof(key, token);
            self.vouch_write(key.verified.clone(), key.id.clone(), proof, round, before);
        }
    }

    /// The right to write the proof in this round: `(round, the mark before)`; `None` when it
    /// is written or being written, or Redis cannot be asked now.
    fn vouch_claim(&self, verified: &Verified) -> Option<(u64, u64)> {
        let round = self.vouch_rounds.round.load(Relaxed);
        let mark = &verified.vouched.0;
        let before = mark.load(Relaxed);
        if before == round || before == IN_FLIGHT || !self.healthy() {
            return None;
        }
        mark.compare_exchange(before, IN_FLIGHT, Relaxed, Relaxed)
            .ok()
            .map(|_| (round, before))
    }

    fn vouch_write(
        self: &Arc<Self>,
        verified: Arc<Verified>,
        key_id: Arc<str>,
        proof: [u8; 32],
        round: u64,
        before: u64,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            verified.vouched.0.store(before, Relaxed);
            return;
        };
        let cluster = self.clone();
        runtime.spawn(async move {
            let entry = cluster.vouch_entry(&key_id);
            let done = cluster
                .run(move |mut c| async move {
                    c.set_ex::<_, _, ()>(entry, hex::encode(proof), VOUCH_TTL.as_secs())
                        .await
                })
                .await;
            // A failed write is tried again by the token's next use.
            let mark = if done.is_ok() { round } else { before };
            verified.vouched.0.store(mark, Relaxed);
        });
    }

    /// Ends the vouch round when due: [`VOUCH_REFRESH`] after it began, when the cluster has
    /// recovered since the last tick, or when the `<prefix>epoch` marker (a random value that
    /// any instance sets when it is missing, kept [`VOUCH_TTL`] and refreshed by every tick)
    /// reads other than before: Redis lost its data (restarted without persistence, flushed,
    /// failed over to a replica without it), proofs included; logged `cluster_data_lost`. One
    /// script call; called on the write-behind tick (`history.rs`, every 2 s).
    pub async fn vouch_tick(&self) {
        let healthy = self.healthy();
        // A value never used before: a marker set from it is new to every instance.
        let fresh = format!("{:032x}", rand::random::<u128>());
        {
            let mut t = self
                .vouch_rounds
                .tick
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let recovered = healthy && t.was_healthy == Some(false);
            if healthy || t.was_healthy.is_some() {
                t.was_healthy = Some(healthy);
            }
            if recovered || t.round_started.elapsed() >= VOUCH_REFRESH {
                t.round_started = Instant::now();
                self.vouch_rounds.round.fetch_add(1, Relaxed);
            }
        }
        if !healthy {
            return;
        }
        let marker = self.key(&["epoch"]);
        let read = self
            .run(move |mut c| async move {
                epoch_script()
                    .key(marker)
                    .arg(fresh)
                    .arg(VOUCH_TTL.as_secs())
                    .invoke_async::<String>(&mut c)
                    .await
            })
            .await;
        let Ok(value) = read else { return };
        let mut t = self
            .vouch_rounds
            .tick
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if t.seen.as_ref().is_some_and(|s| *s != value) {
            t.round_started = Instant::now();
            self.vouch_rounds.round.fetch_add(1, Relaxed);
            tracing::warn!(
                event = "cluster_data_lost",
                instance = %self.settings.instance,
                "Redis lost its data (its epoch marker is new): verified tokens are vouched for again as they are used"
            );
        }
        t.seen = Some(value);
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
