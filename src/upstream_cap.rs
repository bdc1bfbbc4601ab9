//! Caps on what keygate asks of the upstream (issue 9 §2), between the pipeline's checks and
//! [`crate::forward::Upstream::send`]:
//!
//! ```text
//! … rate limit → key's concurrency slot → (small body buffered) → upstream permit → send
//! ```
//!
//! * [`KeySlot`]: one API key's requests in flight, at most its `max_concurrent`
//!   (`[[keys]] max_concurrent`, default `[auth] default_max_concurrent`). Beyond it: 429.
//! * [`UpstreamCap`]: requests using an upstream connection at once, at most
//!   `[upstream] max_connections`. A request beyond it waits in a queue, at most
//!   `[upstream] queue_timeout` and behind at most [`queue_limit`] others; then 503.
//!
//! Both are held until the response body has been sent (an upstream connection is busy until
//! then), or for the life of an upgraded connection. Each request holds exactly one permit
//! however many upstream attempts it makes, so the upstream sees at most `max_connections`
//! connections in use (the pool keeps idle ones for reuse, never more than were in use).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default `[upstream] max_connections`: Envoy's circuit-breaker default (`max_connections`,
/// `max_requests`, `max_pending_requests` are all 1,024).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default `[upstream] queue_timeout`.
pub const DEFAULT_QUEUE_TIMEOUT: &str = "5s";
/// Requests that may wait for an upstream connection at once: `max_connections`, but at least
/// 1,024 (Envoy's `max_pending_requests` default). Past it a request gets 503 without waiting.
pub fn queue_limit(max_connections: usize) -> usize {
    max_connections.max(1024)
}

/// Default `[auth] default_max_concurrent`: a quarter of `[upstream] max_connections` (256
/// with its default 1,024, and never more), at least 1, so no single key (a leaked one, say)
/// can take every upstream connection.
pub fn default_key_max_concurrent(upstream_max_connections: usize) -> u32 {
    (upstream_max_connections / 4).clamp(1, 256) as u32
}

/// One key's count of requests in flight (upgraded connections for their whole life). Owned by
/// the runtime's [`KeyInFlightTable`], not by a config snapshot: a reload, or any sequence of
/// reloads, must not reset it while requests it counts are still running.
#[derive(Debug, Default)]
pub struct KeyInFlight(AtomicU32);

/// The in-flight counters of every key id, for the life of the process (like [`UpstreamCap`],
/// runtime state beside the config). A snapshot's keys take their counter from here when the
/// snapshot is built, so a key removed by one reload and put back by a later one finds the
/// count its tunnels and requests still hold (fresh user T3-15: with the count carried only
/// from the previous snapshot, a `max_concurrent = 2` key had four tunnels open after a
/// remove-then-re-add). The table holds its entries weakly: an entry lives while a snapshot's
/// key or a request's [`KeySlot`] holds it, and is dropped from the table at the next build
/// after that (a removed key with nothing in flight costs nothing; put back later it starts
/// at 0, which is then its true count). Never on the request path: only config builds lock it.
#[derive(Debug, Default)]
pub struct KeyInFlightTable(Mutex<std::collections::HashMap<Box<str>, Weak<KeyInFlight>>>);

impl KeyInFlightTable {
    /// The counter of key `id`: the live one if anything still holds it, else a new one.
    pub fn counter(&self, id: &str) -> Arc<KeyInFlight> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = map.get(id).and_then(Weak::upgrade) {
            return live;
        }
        let fresh = Arc::new(KeyInFlight::default());
        map.insert(id.into(), Arc::downgrade(&fresh));
        fresh
    }

    /// Enters counters made without the table (the first snapshot, built before the runtime).
    pub fn adopt<'a>(&self, keys: impl IntoIterator<Item = (&'a str, &'a Arc<KeyInFlight>)>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (id, c) in keys {
            map.insert(id.into(), Arc::downgrade(c));
        }
    }

    /// Drops the entries nothing holds any more (called once per config build).
    pub fn prune(&self) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
    }

    /// Entries in the table (live or not yet pruned).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl KeyInFlight {
    pub fn get(&self) -> u32 {
        self.0.load(Relaxed)
    }

    /// Takes a slot if fewer than `max` requests of this key are in flight.
    pub fn try_acquire(self: &Arc<Self>, max: u32) -> Option<KeySlot> {
        let prev = self.0.fetch_add(1, Relaxed);
        if prev >= max {
            self.0.fetch_sub(1, Relaxed);
            return None;
        }
        Some(KeySlot(self.clone()))
    }
}

/// A key's request in flight; released on drop.
#[derive(Debug)]
pub struct KeySlot(Arc<KeyInFlight>);

impl Drop for KeySlot {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Relaxed);
    }
}

/// Global budget of request-body bytes held by buffering (`server.request_buffer_bytes` per
/// request): 64 MiB. Past it, bodies stream as if buffering were off.
pub const REQUEST_BUFFER_BUDGET: usize = 64 * 1024 * 1024;

/// What a request holds until its response body is done (or its upgraded connection closes).
#[derive(Default)]
pub struct Held {
    pub key: Option<KeySlot>,
    pub upstream: Option<UpstreamPermit>,
    /// Bytes reserved in the request-buffer budget.
    pub buffer: Option<crate::buffer_budget::BufferReservation>,
    /// The connection is busy with an admitted request (not reclaimable when the table is full).
    pub admitted: Option<crate::pipeline::Admitted>,
}

/// Why no upstream permit was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Saturated {
    #[error("upstream.max_connections in use and the wait queue is full")]
    QueueFull,
    #[error("upstream.max_connections in use for all of upstream.queue_timeout")]
    QueueTimeout,
}

impl Saturated {
    pub fn as_str(self) -> &'static str {
        match self {
            Saturated::QueueFull => "queue_full",
            Saturated::QueueTimeout => "queue_timeout",
        }
    }

    /// The one `upstream_saturated` line (under the client's log budget) and the client's 503,
    /// for every path that asks for an upstream permit: keyed requests (`key_id`), webhook
    /// deliveries (`route`), forwarded CORS preflights (neither).
    pub fn refuse(
        self,
        caps: &crate::config::Caps,
        client_ip: std::net::IpAddr,
        request_id: &http::HeaderValue,
        key_id: Option<&str>,
        route: Option<&str>,
    ) -> crate::reject::Reject {
        crate::log::client_event!(
            crate::log::ClientEvent::UpstreamSaturated,
            client_ip,
            tracing::Level::WARN,
            event = "upstream_saturated",
            reason = self.as_str(),
            request_id = crate::log::request_id_str(request_id),
            key_id,
            route,
            max_connections = caps.upstream_max_connections,
            "no upstream connection free: {self}"
        );
        crate::reject::Reject::Unavailable { retry_after: 1 }
    }
}

/// The upstream connection cap: one per process, owned by the runtime (not the config
/// snapshot), resized when a reload changes `max_connections`.
pub struct UpstreamCap {
    sem: Arc<Semaphore>,
    /// The size the semaphore has been set to.
    size: Mutex<usize>,
    waiting: AtomicUsize,
}

/// An upstream connection in use; released on drop.
pub struct UpstreamPermit {
    _permit: OwnedSemaphorePermit,
}

impl Drop for UpstreamPermit {
    fn drop(&mut self) {
        crate::metrics::global().upstream_in_use(-1);
    }
}

impl UpstreamCap {
    pub fn new(max: usize) -> Self {
        UpstreamCap {
            sem: Arc::new(Semaphore::new(max)),
            size: Mutex::new(max),
            waiting: AtomicUsize::new(0),
        }
    }

    /// A permit to use an upstream connection: at once if fewer than `max` are in use, else
    /// after waiting in line (at most `queue_limit` waiting, at most `queue_timeout`).
    /// [`acquire`](Self::acquire) with the configured `[upstream] max_connections`, its queue
    /// bound and `queue_timeout`; a refusal is counted in `keygate_upstream_saturated_total`
    /// (the caller logs it, with what it knows of the request).
    pub async fn acquire_for(
        &self,
        caps: &crate::config::Caps,
    ) -> Result<UpstreamPermit, Saturated> {
        let max = caps.upstream_max_connections;
        let got = self
            .acquire(max, queue_limit(max), caps.upstream_queue_timeout)
            .await;
        if let Err(why) = &got {
            crate::metrics::global().upstream_saturated(why.as_str());
        }
        got
    }

    pub async fn acquire(
        &self,
        max: usize,
        queue_limit: usize,
        queue_timeout: Duration,
    ) -> Result<UpstreamPermit, Saturated> {
        self.resize(max);
        let permit = match self.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Relaxed) >= queue_limit {
                    self.waiting.fetch_sub(1, Relaxed);
                    return Err(Saturated::QueueFull);
                }
                // The place in the queue is given back however the wait ends: granted, timed
                // out, or abandoned (the client went away and this future was dropped; a
                // fresh user's finding: counted after the `.await`, abandoned places stayed
                // counted until the queue read full and every request got 503 at once).
                let _place = QueuePlace::new(&self.waiting);
                // Boxed: only a request that waits pays for the wait's state (a timer and a
                // semaphore waiter, ~250 bytes), which would otherwise be part of every
                // forwarded request's future (issue 10).
                let got = Box::pin(tokio::time::timeout(
                    queue_timeout,
                    self.sem.clone().acquire_owned(),
                ))
                .await;
                match got {
                    Ok(Ok(p)) => p,
                    _ => return Err(Saturated::QueueTimeout),
                }
            }
        };
        crate::metrics::global().upstream_in_use(1);
        Ok(UpstreamPermit { _permit: permit })
    }

    /// Requests waiting for a permit now (`keygate_upstream_queue`).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// After a reload: grows at once; shrinks as permits come back (a background task takes
    /// the surplus as it is released, so requests in flight are never cut).
    fn resize(&self, max: usize) {
        let mut size = self.size.lock().unwrap_or_else(|p| p.into_inner());
        if *size == max {
            return;
        }
        if max > *size {
            self.sem.add_permits(max - *size);
        } else {
            let surplus = u32::try_from(*size - max).unwrap_or(u32::MAX);
            let sem = self.sem.clone();
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many_owned(surplus).await {
                    p.forget();
                }
            });
        }
        *size = max;
    }
}

/// One request's place in the upstream wait queue: counted (and shown in
/// `keygate_upstream_queue`) from its creation until it is dropped, whichever way the wait ends.
struct QueuePlace<'a>(&'a AtomicUsize);

impl<'a> QueuePlace<'a> {
    /// `waiting` has already been incremented by the caller (it checks the limit with the same
    /// `fetch_add`).
    fn new(waiting: &'a AtomicUsize) -> Self {
        crate::metrics::global().upstream_waiting(1);
        QueuePlace(waiting)
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
        crate::metrics::global().upstream_waiting(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_are_bounded_and_released() {
        let k = Arc::new(KeyInFlight::default());
        let a = k.try_acquire(2).unwrap();
        let _b = k.try_acquire(2).unwrap();
        assert!(k.try_acquire(2).is_none());
        assert_eq!(k.get(), 2);
        drop(a);
        assert!(k.try_acquire(2).is_some());
        assert_eq!(k.get(), 1);
    }

    /// T3-15, the kind: whatever the sequence of builds, a key id finds the counter its slots
    /// still hold; an entry nothing holds is dropped.
    #[test]
    fn the_table_keeps_a_counter_while_slots_hold_it_and_drops_it_after() {
        let table = KeyInFlightTable::default();
        let first = table.counter("small");
        let a = first.try_acquire(2).unwrap();
        let _b = first.try_acquire(2).unwrap();
        // Removed from the config: the snapshot's reference goes, the slots stay.
        drop(first);
        table.prune();
        assert_eq!(table.len(), 1, "held by two slots");
        // Put back by a later build: the same count.
        let again = table.counter("small");
        assert_eq!(again.get(), 2);
        assert!(again.try_acquire(2).is_none());
        drop(a);
        assert!(again.try_acquire(2).is_some());
        // Nothing holds it any more: pruned; a later re-add starts at 0, its true count.
        drop((again, _b));
        table.prune();
        assert_eq!(table.len(), 0);
        assert_eq!(table.counter("small").get(), 0);
    }

    #[tokio::test]
    async fn waits_in_line_then_times_out_and_the_line_is_bounded() {
        let cap = Arc::new(UpstreamCap::new(1));
        let t = Duration::from_millis(50);
        let held = cap.acquire(1, 1, t).await.unwrap();
        assert_eq!(
            cap.acquire(1, 1, t).await.err(),
            Some(Saturated::QueueTimeout)
        );
        // One waiter fills a line of one; the next is refused without waiting.
        let c2 = cap.clone();
        let waiter =
            tokio::spawn(async move { c2.acquire(1, 1, Duration::from_secs(30)).await.is_ok() });
        while cap.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            cap.acquire(1, 1, Duration::from_secs(30)).await.err(),
            Some(Saturated::QueueFull)
        );
        drop(held);
        assert!(waiter.await.unwrap(), "the waiter gets the released permit");
    }

    /// A waiter that goes away (its future dropped: the client left) gives its place back;
    /// before, 1,050 abandoned waits left the line full for good.
    #[tokio::test]
    async fn an_abandoned_wait_gives_its_place_back() {
        let cap = Arc::new(UpstreamCap::new(1));
        let held = cap.acquire(1, 2, Duration::from_millis(10)).await.unwrap();
        for _ in 0..5 {
            let c2 = cap.clone();
            let waiter =
                tokio::spawn(
                    async move { c2.acquire(1, 2, Duration::from_secs(30)).await.is_ok() },
                );
            while cap.waiting() == 0 {
                tokio::task::yield_now().await;
            }
            waiter.abort();
            let _ = waiter.await;
            assert_eq!(cap.waiting(), 0);
        }
        // The line of 2 is all there: two wait, the third is refused.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let c2 = cap.clone();
                tokio::spawn(async move { c2.acquire(1, 2, Duration::from_secs(30)).await.is_ok() })
            })
            .collect();
        while cap.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            cap.acquire(1, 2, Duration::from_secs(30)).await.err(),
            Some(Saturated::QueueFull)
        );
        drop(held);
        let mut granted = 0;
        for w in waiters {
            // The first gets the permit and drops it at once, then the second.
            granted += usize::from(w.await.unwrap());
        }
        assert_eq!(granted, 2);
    }

    #[tokio::test]
    async fn resizing_grows_now_and_shrinks_as_permits_return() {
        let cap = UpstreamCap::new(1);
        let t = Duration::from_millis(20);
        let a = cap.acquire(2, 2, t).await.unwrap();
        let b = cap.acquire(2, 2, t).await.unwrap();
        assert!(cap.acquire(2, 2, t).await.is_err());
        // Shrink to 1 with two in use: neither is cut; once both are back only one fits.
        assert!(cap.acquire(1, 1, t).await.is_err());
        drop((a, b));
        let _one = cap.acquire(1, 1, Duration::from_secs(5)).await.unwrap();
        assert!(cap.acquire(1, 1, t).await.is_err());
    }
}
