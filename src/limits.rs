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
use std::sync::{Arc, Mutex};
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
    /// Cells leased from the shared bucket in cluster mode (unused otherwise).
    lease: crate::cluster::rate::Lease,
}

impl KeyLimiter {
    pub fn new(rate: Rate, burst: u32) -> Self {
        let quota = rate.quota(burst);
        KeyLimiter {
            rate,
            burst,
            interval: quota.replenish_interval(),
            limiter: RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(),
            lease: Default::default(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// This key's lease of the shared bucket (cluster mode).
    pub fn lease(&self) -> &crate::cluster::rate::Lease {
        &self.lease
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
/// * a hard cap, `[auth] failed_auth_max_clients` clients ([`MAX_TRACKED`] by default, about
///   3 MiB), of which failures decided without hashing (malformed tokens, unknown key ids, a
///   token known to be wrong: one cheap request each) may fill only half;
/// * past the cap, a client the table does not know is charged by its *network* (IPv4 /24,
///   IPv6 /48) in a second table of up to half as many networks, with the same budget per
///   network: a newcomer is not refused merely because others filled the table (before, every
///   client not in a full table got 429 for its unverified tokens: a fresh user showed that
///   malformed tokens from 100 000 addresses, trivial with IPv6 /64s, would lock out every
///   legitimate newcomer). Only a newcomer in a network that failed its own budget is refused;
/// * only when the network table is full too (failures from more networks than it holds, all
///   within their window) is a client neither table knows treated as throttled for one
///   interval: refusing to hash is the safe side under a scan from that many networks. Each
///   overflow is counted (`keygate_failed_auth_table_full_total{action}`) and logged as event
///   `failed_auth_table_full` (at most once a minute).
pub struct FailedAuthThrottle {
    rate: Rate,
    /// Clients tracked at most (`[auth] failed_auth_max_clients`); networks: half as many.
    max_clients: usize,
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
    /// The same per network (`network_key`), for clients that found `tat` full.
    networks: HashMap<u128, u64>,
    /// Per client and per network: the last failed authentication, in whole seconds since
    /// `base`, kept for [`HISTORY`] (the verification queue's [`Standing`]).
    failed_clients: HashMap<u128, u32>,
    failed_networks: HashMap<u128, u32>,
    /// While the history is full (secs since `base`): clients it does not know are not presumed
    /// clean ([`Standing::NetworkFailed`]) until then.
    history_full_until: u32,
    /// Last prune of a full history (secs since `base`), to bound prune work under a scan.
    history_pruned: u32,
    /// Per network: verifications reserved and not yet settled. Bounded by the requests that
    /// can be in the verification queue at once.
    inflight_networks: HashMap<u128, u32>,
    /// Per client: the attempt clock (ns since `base`), see [`Priority`]; pruned once run down,
    /// at most `max_clients` clients (past that, newcomers count as no attempts).
    attempts: HashMap<u128, u64>,
    /// Size at which a failure from a new client first prunes inline.
    next_prune: usize,
    /// Last inline prune (ns since `base`), to bound prune work when the table is full.
    last_prune: u64,
    /// While both tables are full: clients in neither count as throttled until then.
    full_until: u64,
    /// Last "table full" warning (ns since `base`).
    last_full_warning: Option<u64>,
}

/// Where a client's failures are counted: its own entry, or its network's (the client table
/// was full when it came).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Client(u128),
    Network(u128),
}

/// Clients tracked at most by default (`[auth] failed_auth_max_clients`): 24 bytes each plus
/// hash-table overhead, ~3 MiB at this size.
pub const MAX_TRACKED: usize = 100_000;
/// The smallest `failed_auth_max_clients` accepted.
pub const MIN_TRACKED: usize = 16;
/// Below this many tracked clients, failures never prune inline (the periodic prune does).
const PRUNE_AT: usize = 4_096;
const SECOND_NS: u64 = 1_000_000_000;

/// How long a failed authentication lowers its client's and its network's [`Standing`].
pub const HISTORY: Duration = Duration::from_secs(15 * 60);
const HISTORY_SECS: u32 = 15 * 60;
/// Clients and networks remembered as having failed within [`HISTORY`] (~40 bytes each with
/// hash-table overhead: about 4 and 2 MiB at most).
const HISTORY_MAX_CLIENTS: usize = 100_000;
const HISTORY_MAX_NETWORKS: usize = 50_000;

/// The throttle's unit of accounting: an IPv4 address (as `::ffff:a.b.c.d`) or an IPv6 /64.
pub fn client_key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6) & !u128::from(u64::MAX),
    }
}

/// The network a client belongs to, for [`Standing`]: an IPv4 /24 or an IPv6 /48 (the usual
/// smallest allocation to a site: an attacker's fresh /64s all land in the network it holds).
fn network_key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()) & !0xff,
        IpAddr::V6(v6) => u128::from(v6) & !((1u128 << 80) - 1),
    }
}

/// How a client has behaved lately, as the argon2 verification queue orders it: better first
/// (the derived order). Legitimate clients presenting a key for the first time are almost
/// always [`Clean`](Standing::Clean); a guesser is [`Failed`](Standing::Failed) from its first
/// wrong token on, for [`HISTORY`] after its last, however slowly it guesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// Neither the client nor its network failed an authentication within [`HISTORY`].
    Clean,
    /// Its network (IPv4 /24, IPv6 /48) did, the client (IPv4 address, IPv6 /64) did not (or
    /// did while the client history was full); also every client the history does not know
    /// while the *network* history is full (a scan from more networks than it holds: then no
    /// newcomer is presumed clean).
    NetworkFailed,
    /// The client failed within [`HISTORY`]; `debt` is how many failures still count against
    /// its `failed_auth_limit` budget (fewer first: a client that mistyped once goes ahead of
    /// one guessing at the edge of its budget).
    Failed { debt: u32 },
}

/// A verification's place in the argon2 queue: its client's [`Standing`], then how many
/// verifications the client asked for lately (`attempts`, about one per attempt in the last
/// minute, refused ones included), fewer first. The second key matters within a standing:
/// addresses of a guesser that keep being refused by the queue never fail (nothing is hashed)
/// and so stay as well placed as a legitimate client in their network; their many attempts
/// put them behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Priority {
    pub standing: Standing,
    pub attempts: u32,
}

impl From<Standing> for Priority {
    fn from(standing: Standing) -> Self {
        Priority {
            standing,
            attempts: 0,
        }
    }
}

/// Each verification attempt adds this much to its client's attempt clock, which runs down in
/// real time: the attempt count is what is left, in these units.
const ATTEMPT_WEIGHT: u64 = 60 * SECOND_NS;

/// A failed-auth budget charged before an argon2 verification (see
/// [`FailedAuthThrottle::reserve`]). While it lives, the verification counts as in flight for
/// its network. It is settled by the verification's verdict ([`refund`](Self::refund) if the
/// token was right, [`confirm_failure`](Self::confirm_failure) if wrong,
/// [`refused_unhashed`](Self::refused_unhashed) if nothing was hashed), and it owns its throttle
/// so that the verdict can settle it after the request that asked is gone (see
/// `crate::auth::verify::OnVerdict`). Dropped unsettled, it keeps the charge.
#[must_use = "refund the charge if the token is right, or confirm it if wrong"]
pub struct Reservation {
    throttle: Arc<FailedAuthThrottle>,
    ip: IpAddr,
    /// The entry charged (the client's, or its network's when the table was full).
    entry: Entry,
    /// Where the verification waits (decided under the same lock as the charge).
    pub priority: Priority,
    /// This charge used the client's budget up: its next unverified token is refused.
    pub exhausted: bool,
}

impl Reservation {
    /// The token was right: the charge, and the attempt, are given back.
    pub fn refund(self) {
        self.throttle.refund(self.entry);
        let key = client_key(self.ip);
        let now = self.throttle.now();
        let mut t = self.throttle.lock();
        if let Some(clock) = t.attempts.get_mut(&key) {
            *clock = clock.saturating_sub(ATTEMPT_WEIGHT);
            if *clock <= now {
                t.attempts.remove(&key);
            }
        }
    }

    /// The verification queue refused it, nothing was hashed: the charge is given back (no
    /// failure happened), the attempt is not (see [`Priority`]).
    pub fn refused_unhashed(self) {
        self.throttle.refund(self.entry);
    }

    /// The token was wrong: remembered for the client's and its network's [`Standing`]. The
    /// budget was charged already.
    pub fn confirm_failure(self) {
        let now = self.throttle.now();
        self.throttle
            .remember_failure(&mut self.throttle.lock(), self.ip, now);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut t = self.throttle.lock();
        let net = network_key(self.ip);
        if let Some(n) = t.inflight_networks.get_mut(&net) {
            *n -= 1;
            if *n == 0 {
                t.inflight_networks.remove(&net);
            }
        }
    }
}

/// What charging one failure did.
enum Charge {
    Charged {
        exhausted: bool,
        entry: Entry,
    },
    /// Both tables are full and the client in neither: nothing charged, the client is refused.
    TableFull,
}

impl Charge {
    /// The client table had no room for this client.
    fn overflowed(&self) -> bool {
        matches!(
            self,
            Charge::TableFull
                | Charge::Charged {
                    entry: Entry::Network(_),
                    ..
                }
        )
    }
}

fn secs(ns: u64) -> u32 {
    u32::try_from(ns / SECOND_NS).unwrap_or(u32::MAX)
}

fn ceil_secs_ns(ns: u64) -> u64 {
    ns.div_ceil(SECOND_NS).max(1)
}

impl FailedAuthThrottle {
    /// A throttle at `rate` tracking at most [`MAX_TRACKED`] clients.
    pub fn new(rate: Rate) -> Self {
        Self::with_capacity(rate, MAX_TRACKED)
    }

    /// A throttle at `rate` tracking at most `max_clients` clients (at least [`MIN_TRACKED`])
    /// and half as many networks.
    pub fn with_capacity(rate: Rate, max_clients: usize) -> Self {
        let max_clients = max_clients.max(MIN_TRACKED);
        let interval = u64::try_from((rate.period / rate.count.max(1)).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        FailedAuthThrottle {
            rate,
            max_clients,
            interval,
            tolerance: interval.saturating_mul(u64::from(rate.count.max(1) - 1)),
            base: Instant::now(),
            table: Mutex::new(Table {
                tat: HashMap::new(),
                networks: HashMap::new(),
                next_prune: PRUNE_AT.min(max_clients),
                last_prune: 0,
                full_until: 0,
                last_full_warning: None,
                failed_clients: HashMap::new(),
                failed_networks: HashMap::new(),
                history_full_until: 0,
                history_pruned: 0,
                inflight_networks: HashMap::new(),
                attempts: HashMap::new(),
            }),
        }
    }

    /// A throttle at the new `rate` and `max_clients` that keeps what `previous` knows, for a
    /// reload that changes `[auth] failed_auth_limit` or `failed_auth_max_clients` (a fresh
    /// table would hand every throttled client a full budget, also when the operator tightens
    /// the limit during an attack). Each client's and network's outstanding failures are kept
    /// as a count: `n` failures still counting under the old rule count as `n` under the new
    /// one (the GCRA theoretical arrival time is re-scaled from the old emission interval to
    /// the new), capped at the new budget, so a client throttled before is throttled after
    /// (for at most one new interval when the new budget is smaller than its debt) and a
    /// raised limit gives it only the difference. The failure history ([`Standing`]) and the
    /// attempt clocks carry over as they are. Verifications in flight settle on `previous`
    /// (their reservation holds it), so its in-flight counts are not copied.
    pub fn carried_over(previous: &FailedAuthThrottle, rate: Rate, max_clients: usize) -> Self {
        let mut next = Self::with_capacity(rate, max_clients);
        next.base = previous.base;
        let now = previous.now();
        let (old_interval, new_interval) = (previous.interval, next.interval);
        let cap = next.tolerance.saturating_add(next.interval);
        let rescale = |tat: u64| -> Option<u64> {
            let debt = tat.checked_sub(now).filter(|d| *d > 0)?;
            // Outstanding failures, rounded up so a partly refilled one still counts.
            let failures = debt.div_ceil(old_interval);
            Some(now.saturating_add(failures.saturating_mul(new_interval).min(cap)))
        };
        let prev = previous.lock();
        let t = next.table.get_mut().unwrap_or_else(|p| p.into_inner());
        t.tat = prev
            .tat
            .iter()
            .filter_map(|(k, tat)| Some((*k, rescale(*tat)?)))
            .collect();
        t.networks = prev
            .networks
            .iter()
            .filter_map(|(k, tat)| Some((*k, rescale(*tat)?)))
            .collect();
        t.failed_clients = prev.failed_clients.clone();
        t.failed_networks = prev.failed_networks.clone();
        t.history_full_until = prev.history_full_until;
        t.history_pruned = prev.history_pruned;
        t.attempts = prev.attempts.clone();
        t.full_until = prev.full_until;
        t.last_full_warning = prev.last_full_warning;
        t.last_prune = prev.last_prune;
        t.next_prune = (t.tat.len() * 2).clamp(PRUNE_AT.min(next.max_clients), next.max_clients);
        drop(prev);
        next
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Clients tracked at most (`[auth] failed_auth_max_clients`).
    pub fn max_clients(&self) -> usize {
        self.max_clients
    }

    fn max_networks(&self) -> usize {
        self.max_clients / 2
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
        self.throttled_in(&self.lock(), ip, now)
    }

    /// `Some(seconds ≥ 1)` if this client, or the network it is counted by, has used up its
    /// own budget; unlike [`throttled`](Self::throttled), a full table alone refuses nobody.
    /// For failures that cost no hash (webhook signatures, `webhook/mod.rs`): refusing a
    /// stranger there protects nothing, and would let many addresses lock out every sender.
    /// Creates no state.
    pub fn over_budget(&self, ip: IpAddr) -> Option<u64> {
        let now = self.now();
        let t = self.lock();
        let tat = t
            .tat
            .get(&client_key(ip))
            .or_else(|| t.networks.get(&network_key(ip)))?;
        let free_at = tat.saturating_sub(self.tolerance);
        (free_at > now).then(|| ceil_secs_ns(free_at - now))
    }

    /// A client in the table is judged by its own budget; one that is not, by its network's
    /// (if the table was full when its network failed), then by whether both tables are full.
    fn throttled_in(&self, t: &Table, ip: IpAddr, now: u64) -> Option<u64> {
        let wait = |tat: u64| {
            let free_at = tat.saturating_sub(self.tolerance);
            (free_at > now).then(|| ceil_secs_ns(free_at - now))
        };
        if let Some(&tat) = t.tat.get(&client_key(ip)) {
            return wait(tat);
        }
        if let Some(&tat) = t.networks.get(&network_key(ip)) {
            return wait(tat);
        }
        (t.full_until > now).then(|| ceil_secs_ns(t.full_until - now))
    }

    /// Records one failed authentication that was decided without hashing (malformed, unknown
    /// id, a token already known to be wrong); returns true if the client is now throttled (its
    /// budget is used up: the next unverified attempt is refused without hashing).
    pub fn record_failure(&self, ip: IpAddr) -> bool {
        let now = self.now();
        let mut t = self.lock();
        self.remember_failure(&mut t, ip, now);
        let charge = self.charge(&mut t, ip, now, true);
        drop(t);
        self.exhausted(charge)
    }

    /// Charges one failure to the client's budget *before* an argon2 verification, if the
    /// budget has room; `Err(retry_after_secs)` if it has not (or the table is full). Checking
    /// and charging under one lock is what makes the budget hold however many requests a client
    /// has in flight: with a check before hashing and a count after, 200 concurrent wrong tokens
    /// from one address all passed the check (issue 9: 219 hashes against a budget of 20).
    /// Then [`Reservation::refund`] if the token was right (or never hashed), or
    /// [`Reservation::confirm_failure`] if it was wrong, whether or not the request that asked
    /// is still there: the verification's own verdict settles it (a fresh user's 25 abandoned
    /// requests with a *valid* key left 25 failures charged, and its valid key got 429). The reservation also carries the request's
    /// [`Standing`] in the verification queue, decided with the charge.
    pub fn reserve(self: &Arc<Self>, ip: IpAddr) -> Result<Reservation, u64> {
        let key = client_key(ip);
        let now = self.now();
        let mut t = self.lock();
        if let Some(wait) = self.throttled_in(&t, ip, now) {
            return Err(wait);
        }
        let charge = self.charge(&mut t, ip, now, false);
        if charge.overflowed() {
            drop(t);
            self.overflowed(&charge);
            t = self.lock();
        }
        match charge {
            Charge::Charged { exhausted, entry } => {
                *t.inflight_networks.entry(network_key(ip)).or_insert(0) += 1;
                let standing = self.standing_in(&t, ip, now);
                let attempts =
                    if t.attempts.len() < self.max_clients || t.attempts.contains_key(&key) {
                        let clock = t.attempts.entry(key).or_insert(now);
                        *clock = (*clock).max(now).saturating_add(ATTEMPT_WEIGHT);
                        u32::try_from((*clock - now).div_ceil(ATTEMPT_WEIGHT)).unwrap_or(u32::MAX)
                    } else {
                        0
                    };
                Ok(Reservation {
                    throttle: self.clone(),
                    ip,
                    entry,
                    priority: Priority { standing, attempts },
                    exhausted,
                })
            }
            Charge::TableFull => Err(ceil_secs_ns(self.interval)),
        }
    }

    /// Gives a charge back.
    fn refund(&self, entry: Entry) {
        let now = self.now();
        let mut t = self.lock();
        let (map, key) = match entry {
            Entry::Client(key) => (&mut t.tat, key),
            Entry::Network(key) => (&mut t.networks, key),
        };
        if let Some(tat) = map.get_mut(&key) {
            *tat = tat.saturating_sub(self.interval);
            if *tat <= now {
                map.remove(&key);
            }
        }
    }

    /// Where a verification for this client would wait now, were it reserved (see
    /// [`Standing`]; [`reserve`](Self::reserve) decides it with the charge). Creates no state.
    pub fn standing(&self, ip: IpAddr) -> Standing {
        self.standing_in(&self.lock(), ip, self.now())
    }

    /// A client is [`Failed`](Standing::Failed) if it failed within [`HISTORY`] or has more
    /// than one verification charged (in flight, or failures still in its budget); its network
    /// counts as failed if it failed within [`HISTORY`] or has more than one verification in
    /// flight. So a network nobody in it failed from yields one clean request at a time: a
    /// burst of guesses from a fresh network does not all go ahead of legitimate clients.
    fn standing_in(&self, t: &Table, ip: IpAddr, now: u64) -> Standing {
        let now_s = secs(now);
        let recent = |m: &HashMap<u128, u32>, k: u128| {
            m.get(&k)
                .is_some_and(|&s| now_s.saturating_sub(s) < HISTORY_SECS)
        };
        let key = client_key(ip);
        let net = network_key(ip);
        let entry = t.tat.get(&key).or_else(|| t.networks.get(&net));
        let debt = entry.map_or(0, |&tat| {
            u32::try_from(tat.saturating_sub(now).div_ceil(self.interval)).unwrap_or(u32::MAX)
        });
        let inflight = t.inflight_networks.get(&net).copied().unwrap_or(0);
        if recent(&t.failed_clients, key) || debt > 1 {
            Standing::Failed { debt }
        } else if recent(&t.failed_networks, net) || inflight > 1 || t.history_full_until > now_s {
            Standing::NetworkFailed
        } else {
            Standing::Clean
        }
    }

    fn remember_failure(&self, t: &mut Table, ip: IpAddr, now: u64) {
        let now_s = secs(now);
        let t = &mut *t;
        let full_client = !t.failed_clients.contains_key(&client_key(ip))
            && t.failed_clients.len() >= HISTORY_MAX_CLIENTS;
        let full_network = !t.failed_networks.contains_key(&network_key(ip))
            && t.failed_networks.len() >= HISTORY_MAX_NETWORKS;
        if (full_client || full_network) && t.history_pruned != now_s {
            t.history_pruned = now_s;
            t.failed_clients
                .retain(|_, s| now_s.saturating_sub(*s) < HISTORY_SECS);
            t.failed_networks
                .retain(|_, s| now_s.saturating_sub(*s) < HISTORY_SECS);
        }
        // A full client history loses only the distinction between a client that failed and
        // its network's other clients: every failure's network is still recorded, so a
        // newcomer from a network with no failures is still clean. (Before, a full client
        // history, which 100 000 cheap malformed tokens from the /64s of one IPv6 /48 fill in
        // 15 minutes, made every newcomer anywhere rank as "network failed".) Only a full
        // network history leaves keygate unable to tell a clean network.
        let client = client_key(ip);
        if t.failed_clients.len() < HISTORY_MAX_CLIENTS || t.failed_clients.contains_key(&client) {
            t.failed_clients.insert(client, now_s);
        }
        let net = network_key(ip);
        if t.failed_networks.len() < HISTORY_MAX_NETWORKS || t.failed_networks.contains_key(&net) {
            t.failed_networks.insert(net, now_s);
        } else {
            t.history_full_until = now_s.saturating_add(HISTORY_SECS);
        }
    }

    /// One failure onto the GCRA state of the client, or of its network when the client table
    /// has no room for it (`cheap`: a failure decided without hashing, which may take only
    /// half of the client table).
    fn charge(&self, t: &mut Table, ip: IpAddr, now: u64, cheap: bool) -> Charge {
        let key = client_key(ip);
        let max = self.max_clients;
        if !t.tat.contains_key(&key)
            && t.tat.len() >= t.next_prune.min(if cheap { max / 2 } else { max })
            && now.saturating_sub(t.last_prune) >= SECOND_NS
        {
            t.tat.retain(|_, tat| *tat > now);
            t.networks.retain(|_, tat| *tat > now);
            t.next_prune = (t.tat.len() * 2).clamp(PRUNE_AT.min(max), max);
            t.last_prune = now;
        }
        let room = if cheap { max / 2 } else { max };
        let (map, key, entry) = if t.tat.contains_key(&key) || t.tat.len() < room {
            (&mut t.tat, key, Entry::Client(key))
        } else {
            let net = network_key(ip);
            if !t.networks.contains_key(&net) && t.networks.len() >= self.max_networks() {
                // Both full of entries still inside their window: fail closed for newcomers.
                t.full_until = now.saturating_add(self.interval);
                return Charge::TableFull;
            }
            (&mut t.networks, net, Entry::Network(net))
        };
        let tat = map.entry(key).or_insert(now);
        *tat = (*tat).max(now).saturating_add(self.interval);
        let tat = *tat;
        crate::metrics::global().set_failed_auth_tracked(t.tat.len(), t.networks.len());
        Charge::Charged {
            exhausted: tat.saturating_sub(self.tolerance) > now,
            entry,
        }
    }

    /// Whether a charge left the client throttled (see [`overflowed`](Self::overflowed)).
    fn exhausted(&self, charge: Charge) -> bool {
        self.overflowed(&charge);
        match charge {
            Charge::Charged { exhausted, .. } => exhausted,
            Charge::TableFull => true,
        }
    }

    /// Counts a charge the client table had no room for, and warns (at most once a minute).
    fn overflowed(&self, charge: &Charge) {
        if !charge.overflowed() {
            return;
        }
        let action = match charge {
            Charge::TableFull => "refused",
            Charge::Charged { .. } => "by_network",
        };
        crate::metrics::global().failed_auth_table_full(action);
        let now = self.now();
        let (warn, clients, networks) = {
            let mut t = self.lock();
            let warn = t
                .last_full_warning
                .is_none_or(|w| now.saturating_sub(w) >= 60 * SECOND_NS);
            if warn {
                t.last_full_warning = Some(now);
            }
            (warn, t.tat.len(), t.networks.len())
        };
        if warn {
            tracing::warn!(
                event = "failed_auth_table_full",
                action,
                clients,
                networks,
                max_clients = self.max_clients,
                "failed-auth table full (a scan from very many addresses?): clients not in it are counted by network (IPv4 /24, IPv6 /48); when the network table is full too, their unverified tokens get 429 until it drains"
            );
        }
    }

    /// Drops clients whose budget is full again. Called periodically.
    pub fn prune(&self) {
        let now = self.now();
        let now_s = secs(now);
        let mut t = self.lock();
        t.tat.retain(|_, tat| *tat > now);
        t.tat.shrink_to_fit();
        t.networks.retain(|_, tat| *tat > now);
        t.networks.shrink_to_fit();
        crate::metrics::global().set_failed_auth_tracked(t.tat.len(), t.networks.len());
        t.failed_clients
            .retain(|_, s| now_s.saturating_sub(*s) < HISTORY_SECS);
        t.failed_clients.shrink_to_fit();
        t.failed_networks
            .retain(|_, s| now_s.saturating_sub(*s) < HISTORY_SECS);
        t.failed_networks.shrink_to_fit();
        t.attempts.retain(|_, clock| *clock > now);
        t.attempts.shrink_to_fit();
        t.next_prune = (t.tat.len() * 2).clamp(PRUNE_AT.min(self.max_clients), self.max_clients);
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
        let t = Arc::new(FailedAuthThrottle::new(Rate {
            count: 2,
            period: Duration::from_secs(60),
        }));
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

        let t = Arc::new(FailedAuthThrottle::new(Rate {
            count: 1,
            period: Duration::from_millis(200),
        }));
        assert!(t.record_failure(ip));
        assert_eq!(t.throttled(ip), Some(1));
        std::thread::sleep(Duration::from_millis(250));
        assert!(t.throttled(ip).is_none(), "lifts after the interval");
        t.prune();
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn a_changed_limit_keeps_each_clients_outstanding_failures() {
        let per_min = |count| Rate {
            count,
            period: Duration::from_secs(60),
        };
        let (a, b, fresh): (IpAddr, IpAddr, IpAddr) = (
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
        );
        let old = FailedAuthThrottle::new(per_min(22));
        for _ in 0..22 {
            old.record_failure(a);
        }
        for _ in 0..3 {
            old.record_failure(b);
        }
        assert!(old.throttled(a).is_some());

        // Raised by one: `a` gets one more failure, not 23 (fresh user T8-1).
        let raised = Arc::new(FailedAuthThrottle::carried_over(&old, per_min(23), 100));
        assert_eq!(raised.standing(a), old.standing(a), "history kept");
        assert!(raised.throttled(a).is_none(), "one failure of room");
        assert!(raised.record_failure(a), "the 23rd uses it up");
        assert!(raised.throttled(a).is_some());
        assert!(raised.throttled(fresh).is_none());

        // Tightened during an attack: `a` stays throttled, for at most one new interval.
        let tight = FailedAuthThrottle::carried_over(
            &old,
            Rate {
                count: 5,
                period: Duration::from_secs(3600),
            },
            100,
        );
        let wait = tight.throttled(a).expect("still throttled");
        assert!(
            (719..=720).contains(&wait),
            "one interval of 5/h, not 22 of them: {wait}"
        );
        // `b` had 3 failures outstanding: 2 of 5 left.
        assert!(!tight.record_failure(b));
        assert!(tight.record_failure(b), "3 + 2 = 5 uses the budget up");

        // Unchanged rule, another table size: the same state.
        let same = FailedAuthThrottle::carried_over(&old, per_min(22), 1000);
        assert!(same.throttled(a).is_some());
        assert!(!same.record_failure(b));
    }

    #[test]
    fn ipv6_is_throttled_per_64() {
        let t = Arc::new(FailedAuthThrottle::new(Rate {
            count: 2,
            period: Duration::from_secs(60),
        }));
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
            period: Duration::from_secs(3600),
        };
        let t = Arc::new(FailedAuthThrottle::new(rate));
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        // Hashed failures from 100 500 addresses: the client table fills, the rest
        // are counted by network.
        for i in 0..(MAX_TRACKED as u32 + 500) {
            if let Ok(r) = t.reserve(ip(i)) {
                r.confirm_failure();
            }
        }
        assert_eq!(t.tracked(), MAX_TRACKED);
        assert_eq!(t.lock().networks.len(), 3, "the last 500 are in three /24s");
        // Known clients are judged as before.
        assert!(t.throttled(ip(0)).is_none());

        // Entries whose budget has refilled are dropped, inline or periodically.
        let t = Arc::new(FailedAuthThrottle::new(Rate {
            count: 10,
            period: Duration::from_millis(10),
        }));
        for i in 0..(2 * PRUNE_AT as u32) {
            t.record_failure(ip(i));
        }
        std::thread::sleep(Duration::from_millis(20));
        t.prune();
        assert_eq!(t.tracked(), 0);
        assert!(t.throttled(ip(1)).is_none());
    }

    /// A fresh user: the table (100 000 clients) can be filled at no hashing cost, with one
    /// malformed token per address (trivial from IPv6 /64s), and then every unverified token
    /// from an address not in it got 429: legitimate newcomers were locked out. Now cheap
    /// failures fill at most half of it, and past the cap newcomers are counted by network
    /// (IPv4 /24, IPv6 /48): only the flooding networks run out of budget.
    #[test]
    fn a_full_table_counts_newcomers_by_network_instead_of_refusing_them() {
        // Per hour rather than per minute: nothing expires while the test fills the table.
        let t = Arc::new(FailedAuthThrottle::new(Rate {
            count: 20,
            period: Duration::from_secs(3600),
        }));
        // 2001:db8:0::/47: two /48s, 131 072 /64s; one hashed failure from each of 100 000.
        let attacker = |i: u32| {
            IpAddr::from(std::net::Ipv6Addr::from(
                (0x2001_0db8_0000_u128 << 80) | (u128::from(i) << 64) | 1,
            ))
        };
        for i in 0..MAX_TRACKED as u32 {
            t.reserve(attacker(i)).unwrap().confirm_failure();
        }
        assert_eq!(t.tracked(), MAX_TRACKED);
        // A newcomer from another network: not refused, its token is hashed, counted alone.
        let newcomer: IpAddr = "2001:db8:ffff::1".parse().unwrap();
        assert_eq!(t.throttled(newcomer), None);
        let r = t
            .reserve(newcomer)
            .expect("a newcomer from elsewhere is not refused");
        r.refund();
        assert_eq!(t.throttled(newcomer), None);
        // The attacker's next /64s share one budget per /48: 20 more, then its /48 is throttled.
        let more: Vec<_> = (MAX_TRACKED as u32..MAX_TRACKED as u32 + 100)
            .filter_map(|i| t.reserve(attacker(i)).ok())
            .collect();
        assert_eq!(more.len(), 20, "one budget for the attacker's /48");
        for r in more {
            r.confirm_failure();
        }
        assert!(t.throttled(attacker(MAX_TRACKED as u32 + 200)).is_some());
        // A client already in the table keeps its own budget.
        assert_eq!(t.throttled(attacker(7)), None);
        let ipv4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(t.throttled(ipv4), None);
        assert!(
            !t.record_failure(ipv4),
            "counted by its /24, one failure of 20"
        );
        assert_eq!(t.lock().networks.len(), 2);

        // Failures decided without hashing (malformed tokens, unknown key ids) fill only half.
        let t = Arc::new(FailedAuthThrottle::with_capacity(
            Rate {
                count: 2,
                period: Duration::from_secs(60),
            },
            64,
        ));
        for i in 0..200 {
            t.record_failure(attacker(i));
        }
        assert_eq!(t.tracked(), 32, "cheap failures take at most half");
        assert!(t.throttled(attacker(500)).is_some(), "the flood's /48");
        // Room is left for hashed failures of newcomers, which stay per client.
        let r = t.reserve("2001:db8:1234::1".parse().unwrap()).unwrap();
        assert_eq!(
            r.entry,
            Entry::Client(client_key("2001:db8:1234::1".parse().unwrap()))
        );
        r.confirm_failure();
        assert_eq!(t.tracked(), 33);

        // Both tables full (more flooding networks than the network table holds): newcomers
        // in neither are refused, as the safe side.
        let t = Arc::new(FailedAuthThrottle::with_capacity(
            Rate {
                count: 2,
                period: Duration::from_secs(60),
            },
            16,
        ));
        let net = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)));
        for i in 0..100 {
            let _ = t.reserve(net(i)).map(Reservation::confirm_failure);
        }
        assert_eq!((t.tracked(), t.lock().networks.len()), (16, 8));
        assert!(t.throttled(net(1000)).is_some());
    }

    /// Same kind as the full throttle table: 100 000 malformed tokens from the /64s of one
    /// IPv6 /48 (about 110 a second for the 15-minute history) filled the client history, and
    /// then every newcomer anywhere ranked "network failed" in the verification queue,
    /// alongside a flood's fresh addresses. Now only a full *network* history does that.
    #[test]
    fn a_full_client_history_does_not_demote_newcomers_from_clean_networks() {
        let t = Arc::new(FailedAuthThrottle::new(Rate {
            count: 20,
            period: Duration::from_secs(3600),
        }));
        let attacker = |i: u32| {
            IpAddr::from(std::net::Ipv6Addr::from(
                (0x2001_0db8_0000_u128 << 80) | (u128::from(i) << 64) | 1,
            ))
        };
        for i in 0..=(HISTORY_MAX_CLIENTS as u32) {
            t.record_failure(attacker(i));
        }
        assert_eq!(t.lock().failed_clients.len(), HISTORY_MAX_CLIENTS);
        let newcomer: IpAddr = "2001:db8:ffff::1".parse().unwrap();
        assert_eq!(t.standing(newcomer), Standing::Clean);
        // The flood's own networks, and its clients the history could not hold, are not.
        assert_ne!(
            t.standing(attacker(HISTORY_MAX_CLIENTS as u32 + 10)),
            Standing::Clean
        );
        assert!(matches!(t.standing(attacker(3)), Standing::Failed { .. }));
    }

    #[test]
    fn reservations_hold_the_budget_however_many_are_in_flight() {
        let t = Arc::new(FailedAuthThrottle::new(Rate {
            count: 20,
            period: Duration::from_secs(60),
        }));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        // 200 requests in flight at once: every one reserves before any hash is done.
        let mut granted: Vec<_> = (0..200).filter_map(|_| t.reserve(ip).ok()).collect();
        assert_eq!(granted.len(), 20, "exactly the budget is hashed");
        assert!(granted[..19].iter().all(|r| !r.exhausted));
        assert!(granted[19].exhausted, "the 20th charge uses the budget up");
        assert_eq!(granted[0].priority.standing, Standing::Clean);
        assert_eq!(granted[0].priority.attempts, 1);
        assert_eq!(
            granted[1].priority.standing,
            Standing::Failed { debt: 2 },
            "a second one in flight from the same client is not clean"
        );
        assert_eq!(granted[19].priority.attempts, 20);
        assert!(t.throttled(ip).is_some());
        // A right token gives its charge back: the client is no longer throttled.
        granted.pop().unwrap().refund();
        assert!(t.throttled(ip).is_none());
        granted.push(t.reserve(ip).unwrap());
        for r in granted {
            r.refund();
        }
        assert_eq!(t.tracked(), 0, "refunded down to nothing: no state left");
        assert!(t.lock().inflight_networks.is_empty());
        assert!(
            t.lock().attempts.is_empty(),
            "right tokens are not held against it"
        );
    }

    #[test]
    fn standing_orders_clean_then_network_then_failed() {
        let t = Arc::new(FailedAuthThrottle::new(Rate {
            count: 20,
            period: Duration::from_secs(60),
        }));
        let guesser: IpAddr = "198.51.100.10".parse().unwrap();
        let neighbour: IpAddr = "198.51.100.99".parse().unwrap();
        let elsewhere: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(t.standing(guesser), Standing::Clean);
        let r = t.reserve(guesser).unwrap();
        assert_eq!(r.priority.standing, Standing::Clean);
        // While it is in flight, a second request from the same network is not clean.
        let n = t.reserve(neighbour).unwrap();
        assert_eq!(n.priority.standing, Standing::NetworkFailed);
        n.refund();
        assert_eq!(
            t.standing(neighbour),
            Standing::Clean,
            "no longer in flight"
        );
        r.confirm_failure();
        assert_eq!(t.standing(guesser), Standing::Failed { debt: 1 });
        t.record_failure(guesser);
        assert_eq!(t.standing(guesser), Standing::Failed { debt: 2 });
        assert_eq!(t.standing(neighbour), Standing::NetworkFailed);
        assert_eq!(t.standing(elsewhere), Standing::Clean);
        assert!(Standing::Clean < Standing::NetworkFailed);
        assert!(Standing::NetworkFailed < Standing::Failed { debt: 0 });
        assert!(Standing::Failed { debt: 1 } < Standing::Failed { debt: 2 });
        // Within a standing, fewer recent attempts first (refused ones count too; right
        // tokens do not).
        for _ in 0..5 {
            t.reserve(neighbour).unwrap().refused_unhashed();
        }
        for _ in 0..5 {
            t.reserve("198.51.100.200".parse().unwrap())
                .unwrap()
                .refund();
        }
        let busy = t.reserve(neighbour).unwrap();
        let quiet = t.reserve("198.51.100.200".parse().unwrap()).unwrap();
        assert_eq!(busy.priority.standing, quiet.priority.standing);
        assert!(
            quiet.priority < busy.priority,
            "{:?} {:?}",
            quiet.priority,
            busy.priority
        );
        busy.refund();
        quiet.refund();
        // IPv6: the client is its /64, the network its /48.
        t.record_failure("2001:db8:1:2::1".parse().unwrap());
        assert!(matches!(
            t.standing("2001:db8:1:2::ffff".parse().unwrap()),
            Standing::Failed { .. }
        ));
        assert_eq!(
            t.standing("2001:db8:1:3::1".parse().unwrap()),
            Standing::NetworkFailed
        );
        assert_eq!(
            t.standing("2001:db8:2::1".parse().unwrap()),
            Standing::Clean
        );
        // The history outlives the budget: a slow guesser stays Failed after its budget refills.
        t.prune();
        assert!(matches!(t.standing(guesser), Standing::Failed { .. }));
        // A reservation dropped unsettled (its client went away mid-hash) keeps the charge but
        // no longer counts as in flight.
        drop(t.reserve(elsewhere).unwrap());
        assert!(t.lock().inflight_networks.is_empty());
        assert_eq!(t.standing(elsewhere), Standing::Clean);
    }
}
