//! The side runtime: one thread (`keygate-side`) with a current-thread tokio runtime of its
//! own, for the I/O whose **latency keygate turns into a health verdict**: Redis commands in
//! cluster mode (their `[cluster] timeout`, the reconnect and `PING` loop, `cluster/mod.rs`)
//! and the `/readyz` upstream probe (`admin.rs`).
//!
//! Why (fresh user T5-17): a timer on the request runtime measures the request runtime too.
//! A Redis reply that has arrived waits in that runtime's run queue until the connection's
//! driver task gets its turn; under a flood of requests (even unauthenticated ones, all 401)
//! that wait alone exceeded the 50 ms `timeout`, and the instance declared Redis unusable,
//! so anyone on the Internet could switch the cluster's shared limits off. On this thread
//! nothing else queues: the time charged to Redis is Redis' (and the network's and the
//! kernel's), not keygate's. A request hands its command over and awaits the answer; while
//! its own runtime is overloaded that await can last longer than `timeout`, which is
//! keygate's latency and is not a failure of Redis. The same trap elsewhere: Kong's Redis
//! rate limiting with a 50 ms `redis_timeout` timed out while tcpdump showed Redis answering
//! within 5 ms (Kong/kong#13473, openresty/lua-resty-redis#279: the nginx worker's event loop
//! was busy), and StackExchange.Redis's timeout guide names a busy thread pool as the usual
//! cause of its "timeouts"; Envoy's ratelimit service added a Redis circuit breaker
//! (envoyproxy/ratelimit#978) that a latency measured this way would trip the same way.
//!
//! Cost: one hand-over per call ([`run`]: a task spawned here, woken through the runtime's
//! inject queue, and the request woken back by its `JoinHandle`), which is one allocation
//! (the task) and up to two thread wake-ups. Redis calls are per lease, not per request
//! (`rate.rs`, `quota.rs`), so a request pays for it only when it renews a lease.
//! `cargo bench --bench handover`: ~10 µs wall time per round trip from an idle worker, most
//! of it the two wake-ups. The thread is started on first use (cluster mode, the first
//! `/readyz`) and lives for the process; it is idle (parked in `epoll_wait`) when there is
//! nothing to measure.
//!
//! What this does not remove: if the whole machine is CPU-starved, this thread waits for a
//! CPU like Redis itself does; a sleeping thread that wakes is scheduled ahead of busy ones
//! by the kernel, so that delay is normally well under a millisecond.

use std::future::Future;
use std::sync::OnceLock;
use std::thread::ThreadId;

use tokio::runtime::Handle;

struct Side {
    handle: Handle,
    thread: ThreadId,
}

fn side() -> &'static Side {
    static SIDE: OnceLock<Side> = OnceLock::new();
    SIDE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("keygate-side")
            .build()
            .expect("cannot build the side runtime");
        let handle = rt.handle().clone();
        let t = std::thread::Builder::new()
            .name("keygate-side".into())
            // The runtime runs while the process does; its tasks are bounded by their own
            // timeouts, so nothing needs to stop it.
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .expect("cannot start the side runtime's thread");
        Side {
            handle,
            thread: t.thread().id(),
        }
    })
}

/// Whether the caller runs on the side runtime's thread.
pub fn on_side() -> bool {
    std::thread::current().id() == side().thread
}

/// Runs `fut` on the side runtime and waits for its output (on the side runtime already: runs
/// it in place). `None` if it panicked. Dropping the returned future does not cancel `fut`: it
/// runs to its end (so a Redis command's outcome is still judged, and a lease still recorded
/// by Redis); put a timeout inside `fut`.
pub async fn run<F>(fut: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if on_side() {
        return Some(fut.await);
    }
    side().handle.spawn(fut).await.ok()
}

/// Starts `fut` on the side runtime without waiting for it (a maintenance loop).
pub fn spawn<F>(fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    side().handle.spawn(fut);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The point of the module: a timer on the side runtime is not delayed by a request runtime
    /// whose only thread is busy.
    #[tokio::test(flavor = "current_thread")]
    async fn a_blocked_request_runtime_does_not_delay_the_side_runtime() {
        let started = Instant::now();
        let timed = tokio::spawn(run(async move {
            let t = Instant::now();
            tokio::time::sleep(Duration::from_millis(20)).await;
            (t.elapsed(), on_side())
        }));
        // Hog this runtime's only thread, as a flood does, for 300 ms.
        tokio::task::yield_now().await;
        while started.elapsed() < Duration::from_millis(300) {
            std::hint::spin_loop();
        }
        let (slept, was_on_side) = timed.await.unwrap().expect("no panic");
        assert!(was_on_side);
        assert!(!on_side());
        assert!(
            slept < Duration::from_millis(250),
            "the side runtime's timer ran late by the request runtime's hog: {slept:?}"
        );
    }
}
