//! Which deliveries the upstream has already accepted (SPEC §10: duplicates and replays).
//!
//! A delivery id is *claimed* before forwarding and *settled* with the upstream's answer:
//!
//! * accepted (2xx): remembered until the window ends; a later delivery with the same id is
//!   answered 200 by keygate and not forwarded (a sender's retry after a lost response, or a
//!   replay of a captured delivery);
//! * anything else (4xx, 5xx, timeout, connection error): forgotten, so the sender's retry is
//!   forwarded;
//! * while a delivery is in flight, a second one with the same id is refused with 409 (it is not
//!   known yet whether the first will be accepted); senders retry later.
//!
//! [`DeliveryStore`] has two variants: [`LocalStore`] (one instance) and, with `[cluster]`,
//! `Shared`: the ids live in Redis (`cluster/deliveries.rs`), so a delivery accepted through
//! one instance is a duplicate on every instance, and a retry after a failure is forwarded
//! whichever instance it reaches. While Redis cannot be asked (down, slow past `[cluster]
//! timeout`), `on_error = "local"` falls back to the instance's own store (ids accepted
//! meanwhile are known to that instance only) and `"deny"` answers 503 (the sender retries).
//! Accepted ids are also remembered locally in shared mode, so an instance still recognises
//! what it accepted itself while Redis is away.
//!
//! Ids are kept as 128-bit SHA-256 prefixes of `route id, delivery id`: fixed size whatever
//! the sender sends, and no delivery ids in memory dumps or in Redis. The local store is
//! bounded: at most `capacity` ids per route (expired ones are dropped first, then the oldest).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// Ids remembered per route by the local store, by default.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// What is known of a delivery id when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not seen (or its earlier delivery failed): forward it, then [`DeliveryStore::settle`].
    Fresh,
    /// The upstream accepted it within the window: answer 200 without forwarding.
    Accepted,
    /// Being forwarded right now by another request.
    InFlight,
    /// Cluster mode with `on_error = "deny"`: Redis cannot be asked; answer 503 (already
    /// logged).
    Unavailable,
}

type IdHash = [u8; 16];

fn id_hash(route: &str, id: &[u8]) -> IdHash {
    let mut h = Sha256::new();
    h.update((route.len() as u64).to_be_bytes());
    h.update(route.as_bytes());
    h.update(id);
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// Where seen delivery ids live.
pub enum DeliveryStore {
    Local(LocalStore),
    /// Cluster mode: Redis first, this local store as the fallback (see the module doc).
    Shared(LocalStore),
}

/// Who asks, for the operator's log line when shared state is unavailable.
pub struct Asker<'a> {
    pub client_ip: IpAddr,
    pub request_id: &'a str,
}

impl DeliveryStore {
    pub fn local(window: Duration, capacity: usize) -> Self {
        DeliveryStore::Local(LocalStore::new(window, capacity))
    }

    /// The store of a cluster member: ids in Redis (through the process' running
    /// [`Cluster`](crate::cluster::Cluster)), this instance's own store as the fallback.
    pub fn shared(window: Duration, capacity: usize) -> Self {
        DeliveryStore::Shared(LocalStore::new(window, capacity))
    }

    /// Records `id` as in flight unless it is known. In cluster mode one Redis script under
    /// `[cluster] timeout`.
    pub async fn claim(&self, route: &str, id: &[u8], asker: &Asker<'_>) -> Claim {
        let h = id_hash(route, id);
        match self {
            DeliveryStore::Local(s) => s.claim(h, Instant::now()),
            DeliveryStore::Shared(local) => {
                let Some(cluster) = crate::cluster::running() else {
                    return local.claim(h, Instant::now());
                };
                // Accepted here while Redis was away: known without asking.
                if local.is_accepted(&h, Instant::now()) {
                    return Claim::Accepted;
                }
                match cluster.delivery_claim(&h, millis(IN_FLIGHT_LIMIT)).await {
                    Ok(c) => c,
                    Err(e) => {
                        match cluster.fall_back(
                            "webhook delivery ids",
                            &e,
                            asker.client_ip,
                            asker.request_id,
                            None,
                        ) {
                            Ok(()) => local.claim(h, Instant::now()),
                            Err(_) => Claim::Unavailable,
                        }
                    }
                }
            }
        }
    }

    /// The upstream's answer for a claimed id: `accepted` (2xx) keeps it for the window,
    /// otherwise it is released so a retry is forwarded. In cluster mode both the local store
    /// and Redis are told (a claim may have fallen back to the local store, and Redis may
    /// have come back since); a Redis failure here is not retried: an acceptance it loses
    /// makes a later duplicate look fresh on other instances, a release it loses keeps the id
    /// in flight until the claim expires (10 minutes).
    pub async fn settle(&self, route: &str, id: &[u8], accepted: bool) {
        let h = id_hash(route, id);
        match self {
            DeliveryStore::Local(s) => s.settle(h, accepted, Instant::now()),
            DeliveryStore::Shared(local) => {
                local.settle(h, accepted, Instant::now());
                if let Some(cluster) = crate::cluster::running() {
                    let _ = cluster
                        .delivery_settle(&h, accepted, millis(local.window))
                        .await;
                }
            }
        }
    }

    /// Ids held now by this instance (for tests and metrics).
    pub fn len(&self) -> usize {
        match self {
            DeliveryStore::Local(s) | DeliveryStore::Shared(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any id in it is still in flight or within the window (so dropping the store
    /// would forget something).
    pub fn has_live(&self) -> bool {
        match self {
            DeliveryStore::Local(s) | DeliveryStore::Shared(s) => s.has_live(Instant::now()),
        }
    }

    /// A store with other settings that knows the ids this one knows (each judged live or not
    /// under the new window; the newest kept when the new capacity is smaller).
    pub fn resettled(&self, window: Duration, capacity: usize, shared: bool) -> Self {
        let (DeliveryStore::Local(old) | DeliveryStore::Shared(old)) = self;
        let store = LocalStore::new(window, capacity);
        {
            let from = old.lock();
            let mut to = store.lock();
            let now = Instant::now();
            for &(id, at) in &from.order {
                if let Some(&(state, since)) = from.entries.get(&id)
                    && since == at
                {
                    store.insert(&mut to, id, state, since.min(now));
                }
            }
        }
        if shared {
            DeliveryStore::Shared(store)
        } else {
            DeliveryStore::Local(store)
        }
    }

    /// The window, capacity and whether the store is shared, to decide whether a reload can
    /// keep this store.
    pub fn settings(&self) -> (Duration, usize, bool) {
        match self {
            DeliveryStore::Local(s) => (s.window, s.capacity, false),
            DeliveryStore::Shared(s) => (s.window, s.capacity, true),
        }
    }
}

/// The delivery-id stores of every webhook route id, for the life of the process (runtime state
/// beside the config, like the keys' in-flight counts): a route removed by one reload and put
/// back by a later one finds the ids it accepted or has in flight, so a sender's retry of a
/// delivery the upstream already took is still answered as a duplicate instead of forwarded
/// again (the same kind as fresh user T3-15's in-flight counts). A removed route's store is
/// kept while any of its ids is live (in flight, or accepted within `dedupe_window`), then
/// dropped at the next config build. Only config builds touch it.
#[derive(Default)]
pub struct DeliveryStores(Mutex<HashMap<Box<str>, std::sync::Arc<DeliveryStore>>>);

impl DeliveryStores {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, std::sync::Arc<DeliveryStore>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the stores of `routes` (the snapshot being replaced).
    pub fn adopt<'a>(&self, routes: impl IntoIterator<Item = &'a crate::webhook::Route>) {
        let mut map = self.lock();
        for r in routes {
            map.insert((*r.id).into(), r.deliveries.clone());
        }
    }

    /// The kept store of route `id`, if any.
    pub fn get(&self, id: &str) -> Option<std::sync::Arc<DeliveryStore>> {
        self.lock().get(id).cloned()
    }

    /// Drops the stores of routes not in `configured` that hold nothing live any more.
    pub fn prune(&self, configured: impl Fn(&str) -> bool) {
        self.lock()
            .retain(|id, store| configured(id) || store.has_live());
    }

    /// Route ids with a kept store.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy)]
enum State {
    InFlight,
    Accepted,
}

/// An in-process, bounded store.
pub struct LocalStore {
    window: Duration,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<IdHash, (State, Instant)>,
    /// Insertion order, for eviction; may hold ids already removed (skipped when popped).
    order: VecDeque<(IdHash, Instant)>,
}

/// An in-flight marker older than this is treated as lost (the request that set it ended
/// without settling, e.g. its task was cancelled) and the id is free again.
const IN_FLIGHT_LIMIT: Duration = Duration::from_secs(600);

impl LocalStore {
    pub fn new(window: Duration, capacity: usize) -> Self {
        LocalStore {
            window,
            capacity: capacity.max(1),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, state: State, since: Instant, now: Instant) -> bool {
        let ttl = match state {
            State::InFlight => IN_FLIGHT_LIMIT,
            State::Accepted => self.window,
        };
        now.saturating_duration_since(since) < ttl
    }

    fn claim(&self, id: IdHash, now: Instant) -> Claim {
        let mut g = self.lock();
        if let Some(&(state, since)) = g.entries.get(&id)
            && self.live(state, since, now)
        {
            return match state {
                State::InFlight => Claim::InFlight,
                State::Accepted => Claim::Accepted,
            };
        }
        self.insert(&mut g, id, State::InFlight, now);
        Claim::Fresh
    }

    fn has_live(&self, now: Instant) -> bool {
        let g = self.lock();
        g.entries
            .values()
            .any(|&(state, since)| self.live(state, since, now))
    }

    fn is_accepted(&self, id: &IdHash, now: Instant) -> bool {
        let g = self.lock();
        g.entries.get(id).is_some_and(|&(state, since)| {
            matches!(state, State::Accepted) && self.live(state, since, now)
        })
    }

    fn settle(&self, id: IdHash, accepted: bool, now: Instant) {
        let mut g = self.lock();
        if accepted {
            self.insert(&mut g, id, State::Accepted, now);
        } else {
            g.entries.remove(&id);
        }
    }

    fn insert(&self, g: &mut Inner, id: IdHash, state: State, now: Instant) {
        // Drop expired entries from the front, then the oldest while full.
        while let Some(&(old, at)) = g.order.front() {
            let expired = g
                .entries
                .get(&old)
                .is_none_or(|&(s, since)| since != at || !self.live(s, since, now));
            if expired || g.entries.len() >= self.capacity {
                g.order.pop_front();
                if g.entries.get(&old).is_some_and(|&(_, since)| since == at) {
                    g.entries.remove(&old);
                }
            } else {
                break;
            }
        }
        // The order queue holds at most two entries per live id (in flight, then accepted);
        // stale ones are skipped above, and it is compacted if it grows past that.
        if g.order.len() > 2 * self.capacity + 16 {
            let entries = &g.entries;
            let kept: VecDeque<_> = g
                .order
                .iter()
                .copied()
                .filter(|(k, at)| entries.get(k).is_some_and(|&(_, s)| s == *at))
                .collect();
            g.order = kept;
        }
        g.entries.insert(id, (state, now));
        g.order.push_back((id, now));
    }

    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_ids_are_remembered_failed_ones_released() {
        let s = LocalStore::new(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        let a = id_hash("r", b"a");
        assert_eq!(s.claim(a, t0), Claim::Fresh);
        assert_eq!(s.claim(a, t0), Claim::InFlight);
        s.settle(a, false, t0);
        assert_eq!(s.claim(a, t0), Claim::Fresh);
        s.settle(a, true, t0);
        assert_eq!(s.claim(a, t0 + Duration::from_secs(59)), Claim::Accepted);
        assert_eq!(s.claim(a, t0 + Duration::from_secs(61)), Claim::Fresh);
        // The same delivery id on another route is another delivery.
        assert_eq!(s.claim(id_hash("other", b"a"), t0), Claim::Fresh);
    }

    #[test]
    fn memory_is_bounded() {
        let s = LocalStore::new(Duration::from_secs(3600), 100);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let id = id_hash("r", &i.to_be_bytes());
            assert_eq!(s.claim(id, t0), Claim::Fresh);
            s.settle(id, true, t0);
            let g = s.lock();
            assert!(g.entries.len() <= 100, "{}", g.entries.len());
            assert!(g.order.len() <= 2 * 100 + 17, "{}", g.order.len());
        }
        // The newest are still known.
        assert_eq!(
            s.claim(id_hash("r", &9_999u32.to_be_bytes()), t0),
            Claim::Accepted
        );
    }
}
