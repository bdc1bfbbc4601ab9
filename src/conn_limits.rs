//! The connection table: how many client connections keygate holds, and for whom (accept, in
//! `server.rs`, takes a [`ConnSlot`] here before anything else is done with a socket).
//!
//! * `server.max_connections` slots in all, and at most `server.max_connections_per_ip` for one
//!   client address. An address is an IPv4 /32 or an IPv6 /64: one host is routinely given a
//!   whole /64, so counting /128s would let it take every slot.
//! * When the table is full, a newcomer reclaims a slot instead of being refused: first the
//!   oldest connection stuck in its TLS handshake (or PROXY header) for over a second, then
//!   the connection idle longest (open, no request in flight), then the oldest younger
//!   handshake ([`Inner::pick_victim`]). Only when every connection is busy with a request is
//!   the newcomer refused. This is nginx's answer to a full
//!   `worker_connections` (it closes idle keep-alive connections to make room), extended to
//!   connections that never start TLS: holding a socket open costs an attacker nothing, so it
//!   must not buy a slot that a client with a request needs.
//! * Trusted proxies (`access.trusted_proxies`) are not capped per address: their connections
//!   carry many clients. Behind the PROXY protocol the address its header names is counted
//!   instead ([`ConnSlot::rebind`]).
//!
//! Refusals and reclaims are counted in metrics (`keygate_connections_refused_total`,
//! `keygate_connections_reclaimed_total`) and logged as `connection_limited` events, at most
//! one line per reason every [`LOG_EVERY`], with the number of occurrences since the last line,
//! and within the client's log budget ([`ClientEvent::ConnectionLimited`]), so that a flood of
//! connections cannot become a flood of log lines.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::log::{ClientEvent, client_event};
use crate::metrics;
use crate::pipeline::Conn;
use tracing::Level;

/// At most one `connection_limited` log line per reason per interval.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a connection may be in its TLS handshake (or PROXY header) before a full table
/// reclaims it ahead of idle connections ([`Inner::pick_victim`]).
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(1);

/// The share of `max_connections` one address may hold when `max_connections_per_ip` is not
/// set: 1/16 (256 of the default 4,096), but at least 64 (or all, for tables under 64).
pub const DEFAULT_PER_IP_DIVISOR: usize = 16;

/// An address as counted for the per-address cap: IPv4 /32 or IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrKey {
    V4(u32),
    V6Net64(u64),
}

impl AddrKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddrKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => AddrKey::V6Net64((u128::from(v6) >> 64) as u64),
        }
    }
}

/// Why a connection was refused or reclaimed (metric label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// The address already holds `max_connections_per_ip`.
    PerIp,
    /// The table is full and every connection is busy with a request.
    Full,
    /// A connection that had not completed its TLS handshake was closed to make room.
    ReclaimedHandshake,
    /// An idle keep-alive connection was closed to make room.
    ReclaimedIdle,
}

impl Limited {
    pub fn as_str(self) -> &'static str {
        match self {
            Limited::PerIp => "per_ip",
            Limited::Full => "full",
            Limited::ReclaimedHandshake => "handshake",
            Limited::ReclaimedIdle => "idle",
        }
    }
}

const HANDSHAKE: u8 = 0;
const OPEN: u8 = 1;

/// What the table knows of one connection, shared with its task.
struct Tracker {
    id: u64,
    accepted: Instant,
    phase: AtomicU8,
    /// Set once the handshake is done: in-flight count and last activity (idle ordering).
    conn: OnceLock<Arc<Conn>>,
    reclaimed: AtomicBool,
    reclaim: Notify,
}

impl Tracker {
    /// Since when the connection has had no admitted request (`pipeline::Admitted`): the end of
    /// its last one, or its TLS handshake; `None` while one is in flight.
    fn idle_since(&self) -> Option<Instant> {
        let conn = self.conn.get()?;
        (conn.admitted.load(Relaxed) == 0)
            .then(|| conn.opened + Duration::from_millis(conn.last_admitted_ms.load(Relaxed)))
    }
}

struct Entry {
    /// `None`: exempt from the per-address cap (a trusted proxy).
    addr: Option<AddrKey>,
    tracker: Arc<Tracker>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    per_addr: HashMap<AddrKey, u32>,
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        if let Some(a) = e.addr {
            self.uncount(a);
        }
        Some(e)
    }

    fn uncount(&mut self, a: AddrKey) {
        if let Some(n) = self.per_addr.get_mut(&a) {
            *n -= 1;
            if *n == 0 {
                self.per_addr.remove(&a);
            }
        }
    }

    /// The connection to close to make room, if any, in this order (O(open connections), only
    /// when the table is full):
    /// 1. the oldest connection still in its handshake after [`HANDSHAKE_GRACE`] (stalled: a
    ///    handshake takes one or two round trips);
    /// 2. the connection idle longest (no request in flight: an idle keep-alive connection,
    ///    one that completed TLS and sent nothing, or one trickling an unfinished head);
    /// 3. the oldest handshake younger than that.
    ///
    /// So a newcomer's handshake is never cut while an idle connection can go: attackers that
    /// complete TLS and then sit idle (and reconnect when closed) only ever take each other's
    /// slots (a fresh user's finding: with handshakes always first, their reconnects closed
    /// every legitimate newcomer in its handshake, 4 of 24 got through). A flood of new
    /// connections faster than one table's worth per `HANDSHAKE_GRACE` closes idle ones
    /// first, LRU, as nginx does with its reusable connections; a newcomer's handshake then
    /// goes only after every older one.
    fn pick_victim(&self) -> Option<(u64, Limited)> {
        let now = Instant::now();
        let mut stalled: Option<(Instant, u64)> = None;
        let mut young: Option<(Instant, u64)> = None;
        let mut idle: Option<(Instant, u64)> = None;
        for (id, e) in &self.entries {
            let t = &e.tracker;
            if t.phase.load(Relaxed) == HANDSHAKE {
                let tier = if now.saturating_duration_since(t.accepted) >= HANDSHAKE_GRACE {
                    &mut stalled
                } else {
                    &mut young
                };
                if tier.is_none_or(|(at, _)| t.accepted < at) {
                    *tier = Some((t.accepted, *id));
                }
            } else if let Some(since) = t.idle_since()
                && idle.is_none_or(|(at, _)| since < at)
            {
                idle = Some((since, *id));
            }
        }
        stalled
            .map(|(_, id)| (id, Limited::ReclaimedHandshake))
            .or(idle.map(|(_, id)| (id, Limited::ReclaimedIdle)))
            .or(young.map(|(_, id)| (id, Limited::ReclaimedHandshake)))
    }
}

/// The table of open client connections. One per process (`max_connections` is restart-only);
/// the per-address cap is passed on each admission, so a reload changes it.
pub struct ConnTable {
    max_total: usize,
    inner: Mutex<Inner>,
    log: [RateLog; 4],
}

impl ConnTable {
    pub fn new(max_total: usize) -> Arc<Self> {
        Arc::new(ConnTable {
            max_total: max_total.max(1),
            inner: Mutex::default(),
            log: Default::default(),
        })
    }

    /// Admits a newly accepted connection from `ip`, or refuses it (`None`: close the socket).
    /// `max_per_ip` bounds the connections of one address (/32, /64); `exempt` peers (trusted
    /// proxies) are not counted per address. May reclaim another connection's slot (see the
    /// module docs).
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_per_ip: usize,
        exempt: bool,
    ) -> Option<ConnSlot> {
        let addr = (!exempt).then(|| AddrKey::of(ip));
        let mut reclaimed = None;
        let slot = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(a) = addr
                && inner.per_addr.get(&a).copied().unwrap_or(0) as usize >= max_per_ip
            {
                drop(inner);
                self.limited(Limited::PerIp, ip);
                return None;
            }
            if inner.entries.len() >= self.max_total {
                let Some((victim, why)) = inner.pick_victim() else {
                    drop(inner);
                    self.limited(Limited::Full, ip);
                    return None;
                };
                if let Some(e) = inner.remove(victim) {
                    e.tracker.reclaimed.store(true, Relaxed);
                    e.tracker.reclaim.notify_one();
                    reclaimed = Some(why);
                }
            }
            let id = inner.next_id;
            inner.next_id += 1;
            let tracker = Arc::new(Tracker {
                id,
                accepted: Instant::now(),
                phase: AtomicU8::new(HANDSHAKE),
                conn: OnceLock::new(),
                reclaimed: AtomicBool::new(false),
                reclaim: Notify::new(),
            });
            if let Some(a) = addr {
                *inner.per_addr.entry(a).or_insert(0) += 1;
            }
            inner.entries.insert(
                id,
                Entry {
                    addr,
                    tracker: tracker.clone(),
                },
            );
            ConnSlot {
                table: self.clone(),
                tracker,
            }
        };
        if let Some(why) = reclaimed {
            self.limited(why, ip);
        }
        Some(slot)
    }

    /// Connections in the table now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&self, id: u64) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Metric always; a log line at most once per [`LOG_EVERY`] per reason.
    fn limited(&self, why: Limited, ip: IpAddr) {
        metrics::global().connection_limited(why.as_str());
        let i = why as usize;
        if let Some(count) = self.log[i].tick() {
            let ip = ip.to_canonical();
            match why {
                Limited::PerIp | Limited::Full => client_event!(
                    ClientEvent::ConnectionLimited,
                    ip,
                    Level::WARN,
                    event = "connection_limited",
                    reason = why.as_str(),
                    client_ip = %ip,
                    count,
                    "connection refused at accept: {}",
                    match why {
                        Limited::PerIp => "this address holds server.max_connections_per_ip connections",
                        _ => "server.max_connections reached and every connection is busy",
                    }
                ),
                _ => client_event!(
                    ClientEvent::ConnectionLimited,
                    ip,
                    Level::INFO,
                    event = "connection_limited",
                    reason = why.as_str(),
                    client_ip = %ip,
                    count,
                    "server.max_connections reached: a {} connection was closed to admit a new one",
                    if why == Limited::ReclaimedIdle { "idle keep-alive" } else { "not yet TLS-established" }
                ),
            }
        }
    }
}

/// One connection's place in the table, released on drop (panics included).
pub struct ConnSlot {
    table: Arc<ConnTable>,
    tracker: Arc<Tracker>,
}

impl ConnSlot {
    /// The TLS handshake is done: from now on the connection is reclaimed only when idle.
    pub fn established(&self, conn: Arc<Conn>) {
        let _ = self.tracker.conn.set(conn);
        self.tracker.phase.store(OPEN, Relaxed);
    }

    /// Resolves when the table has taken this slot back for a newcomer: the connection must
    /// close (right away if idle or still in its handshake).
    pub async fn reclaimed(&self) {
        self.tracker.reclaim.notified().await;
    }

    /// Whether the slot has been taken back (the connection should close).
    pub fn is_reclaimed(&self) -> bool {
        self.tracker.reclaimed.load(Relaxed)
    }

    /// Behind the PROXY protocol: counts the connection against the client address the header
    /// named (`exempt`: that address is itself a trusted proxy). `false`: that address is at its
    /// cap, close the connection.
    pub fn rebind(&self, ip: IpAddr, max_per_ip: usize, exempt: bool) -> bool {
        let addr = (!exempt).then(|| AddrKey::of(ip));
        let mut inner = self.table.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(old) = inner.entries.get(&self.tracker.id).map(|e| e.addr) else {
            return false; // reclaimed meanwhile
        };
        if old == addr {
            return true;
        }
        if let Some(a) = addr {
            if inner.per_addr.get(&a).copied().unwrap_or(0) as usize >= max_per_ip {
                drop(inner);
                self.table.limited(Limited::PerIp, ip);
                return false;
            }
            *inner.per_addr.entry(a).or_insert(0) += 1;
        }
        if let Some(o) = old {
            inner.uncount(o);
        }
        if let Some(e) = inner.entries.get_mut(&self.tracker.id) {
            e.addr = addr;
        }
        true
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if !self.tracker.reclaimed.load(Relaxed) {
            self.table.release(self.tracker.id);
        }
    }
}

/// "At most one line per interval": `tick` returns the number of events since the last line
/// when a line is due.
#[derive(Default)]
struct RateLog {
    /// Milliseconds since `origin()` of the last line, +1 (0: never).
    last_ms: AtomicU64,
    since: AtomicU64,
}

fn origin() -> Instant {
    static O: OnceLock<Instant> = OnceLock::new();
    *O.get_or_init(Instant::now)
}

impl RateLog {
    fn tick(&self) -> Option<u64> {
        self.tick_at(origin().elapsed().as_millis() as u64 + 1)
    }

    fn tick_at(&self, now: u64) -> Option<u64> {
        let n = self.since.fetch_add(1, Relaxed) + 1;
        let last = self.last_ms.load(Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= LOG_EVERY.as_millis() as u64;
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.since.fetch_sub(n, Relaxed);
            return Some(n);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        assert_eq!(
            AddrKey::of(ip("2001:db8:1:2::1")),
            AddrKey::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            AddrKey::of(ip("2001:db8:1:2::1")),
            AddrKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            AddrKey::of(ip("::ffff:10.0.0.1")),
            AddrKey::of(ip("10.0.0.1"))
        );
    }

    #[tokio::test]
    async fn per_address_cap_and_release() {
        let t = ConnTable::new(100);
        let a: Vec<_> = (0..3)
            .map(|_| t.admit(ip("10.0.0.1"), 3, false).unwrap())
            .collect();
        assert!(t.admit(ip("10.0.0.1"), 3, false).is_none());
        // The same /64 is one address.
        let b: Vec<_> = (0..3)
            .map(|i| t.admit(ip(&format!("2001:db8::{i}")), 3, false).unwrap())
            .collect();
        assert!(t.admit(ip("2001:db8::ff"), 3, false).is_none());
        // Exempt peers are not counted per address.
        let ex: Vec<_> = (0..5)
            .map(|_| t.admit(ip("10.0.0.1"), 3, true).unwrap())
            .collect();
        assert_eq!(t.len(), 11);
        drop(a);
        assert!(t.admit(ip("10.0.0.1"), 3, false).is_some());
        drop((b, ex));
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn full_table_reclaims_idle_then_young_handshakes_never_busy() {
        let t = ConnTable::new(3);
        let peer: SocketAddr = "10.0.0.9:1".parse().unwrap();
        let busy = t.admit(ip("10.0.0.1"), 10, false).unwrap();
        let busy_conn = Arc::new(Conn::new(peer));
        busy_conn.admitted.store(1, Relaxed);
        busy.established(busy_conn);
        let idle = t.admit(ip("10.0.0.2"), 10, false).unwrap();
        idle.established(Arc::new(Conn::new(peer)));
        let bare = t.admit(ip("10.0.0.3"), 10, false).unwrap();

        // Full: the idle connection goes first (the bare one is a handshake younger than
        // HANDSHAKE_GRACE: it may be a newcomer's), then the bare one; the busy one never.
        let n1 = t.admit(ip("10.0.0.4"), 10, false).unwrap();
        assert!(idle.is_reclaimed() && !bare.is_reclaimed());
        tokio::time::timeout(Duration::from_secs(1), idle.reclaimed())
            .await
            .unwrap();
        n1.established(Arc::new(Conn::new(peer)));
        n1.tracker.conn.get().unwrap().admitted.store(1, Relaxed);
        let n2 = t.admit(ip("10.0.0.5"), 10, false).unwrap();
        assert!(bare.is_reclaimed() && !busy.is_reclaimed());
        n2.established(Arc::new(Conn::new(peer)));
        n2.tracker.conn.get().unwrap().admitted.store(1, Relaxed);
        assert!(t.admit(ip("10.0.0.6"), 10, false).is_none());
        assert_eq!(t.len(), 3);
        // Reclaimed slots are not released twice.
        drop((bare, idle));
        assert_eq!(t.len(), 3);
        drop((busy, n1, n2));
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn rebind_moves_the_count_to_the_proxied_address() {
        let t = ConnTable::new(10);
        let s1 = t.admit(ip("192.0.2.1"), 1, true).unwrap();
        let s2 = t.admit(ip("192.0.2.1"), 1, true).unwrap();
        assert!(s1.rebind(ip("203.0.113.5"), 1, false));
        assert!(!s2.rebind(ip("203.0.113.5"), 1, false));
        assert!(s2.rebind(ip("203.0.113.6"), 1, false));
        drop(s1);
        assert!(t.admit(ip("203.0.113.5"), 1, false).is_some());
    }

    #[test]
    fn rate_log_says_how_many_were_suppressed() {
        let r = RateLog::default();
        let every = LOG_EVERY.as_millis() as u64;
        assert_eq!(r.tick_at(5), Some(1));
        assert_eq!(r.tick_at(6), None);
        assert_eq!(r.tick_at(4 + every), None);
        assert_eq!(r.tick_at(5 + every), Some(3));
        assert_eq!(r.tick_at(6 + every), None);
    }
}
