//! Cluster mode (SPEC §11): several keygate instances behind an L4 balancer share their
//! per-key rate limits (`rate.rs`), quotas (`quota.rs`), the failed-auth budget
//! (`throttle.rs`), webhook delivery ids (`deliveries.rs`), last use and network history
//! (`history.rs`) through one Redis server. Keys and config stay files, deployed alike to every
//! instance. Every Redis key written carries an expiry, set by the same atomic script.
//!
//! Place in the request path: the rate-limit stage of `pipeline.rs` asks [`Cluster`] instead
//! of the key's local bucket while Redis is healthy. Redis is never on the path of a request
//! that does not need shared state, and a slow Redis never holds a request much longer than
//! `[cluster] timeout`:
//!
//! * one multiplexed connection (commands from all requests are pipelined on it);
//! * every command runs under `timeout`; a failure or timeout marks the cluster *degraded*
//!   (`cluster_degraded` event, `keygate_cluster_degraded` gauge) and from then on requests do
//!   not wait for Redis at all: `on_error = "local"` uses each instance's own limits,
//!   `"deny"` refuses with 503;
//! * a maintenance task reconnects (every [`RECONNECT_EVERY`]) and probes with `PING`; when it
//!   answers, shared counting resumes (`cluster_recovered`), no restart needed.
//!
//! **Where Redis' latency is measured** (fresh user T5-17): the connection, its driver task,
//! every command's `timeout` and the reconnect/`PING` loop live on the side runtime
//! ([`crate::side_runtime`]: one thread with a tokio runtime of its own), never on the
//! request workers. A request hands its command over ([`Cluster::run`]: one task spawned on
//! the side runtime) and awaits the verdict. Before, the timeout ran on the request's own
//! runtime, so a reply that had arrived but waited in the run queue behind a flood of
//! (unauthenticated, all-401) requests counted as Redis latency, and a flood made the
//! instance declare Redis unusable (503 for every rate-limited key under `"deny"`,
//! per-instance limits and a forgotten webhook-delivery history under `"local"`). Now the
//! degraded state says something about Redis only; a request's own wait can exceed
//! `timeout` while its runtime is overloaded, which is keygate's latency and refuses
//! nothing. Alternatives weighed: confirming a timeout with a `PING` from an unqueued task
//! before degrading (still needs an unqueued place to measure from, and doubles the time to
//! notice a real stall), or degrading after N failures (an attacker sustains the flood).
//!
//! Cost of the hand-over: per Redis command one task allocation and up to two thread
//! wake-ups (a few µs of CPU). Commands are per lease, not per request (a busy key renews its
//! lease a few times per second), so the steady hot path (a request served from its lease)
//! has no hand-over at all. `cargo bench --bench handover`: ~10 µs wall time per round trip
//! (most of it waking idle threads); `bench/cluster.sh` before/after: no difference in CPU per
//! request that a loaded 2-CPU machine resolves (docs/cluster.md, "Cost").
//!
//! Why one hand-managed connection rather than redis-rs' `ConnectionManager`: the manager
//! cannot be created while Redis is down, and keygate must start (and serve, with local limits)
//! when Redis is unreachable.

pub mod deliveries;
pub mod history;
pub mod quota;
pub mod rate;
pub mod throttle;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use tracing::Level;

use crate::log::{ClientEvent, client_event};
use crate::metrics;
use crate::reject::Reject;

/// Single flight for lease requests (rate-limit cells, quota units) of one key on one instance:
/// one caller fetches, the others wait for it to end and then all take from the new lease at
/// once (no hand-over from waiter to waiter, which on one runtime thread queues hundreds of
/// requests behind each other).
#[derive(Default)]
pub struct FetchGate {
    busy: AtomicBool,
    done: tokio::sync::Notify,
}

/// The right to fetch; dropping it (fetch done, or the request cancelled) wakes every waiter.
pub struct FetchTurn<'a>(&'a FetchGate);

impl FetchGate {
    /// `Some` when it is this caller's turn to fetch; `None` once the fetch in flight ended
    /// (the caller then looks at the lease again).
    pub async fn turn(&self) -> Option<FetchTurn<'_>> {
        let notified = self.done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(t) = self.try_turn() {
            return Some(t);
        }
        notified.await;
        None
    }

    /// `Some` if no fetch is in flight (for prefetches, which never wait).
    pub fn try_turn(&self) -> Option<FetchTurn<'_>> {
        self.busy
            .compare_exchange(false, true, std::sync::atomic::Ordering::AcqRel, Relaxed)
            .ok()
            .map(|_| FetchTurn(self))
    }
}

impl Drop for FetchTurn<'_> {
    fn drop(&mut self) {
        self.0
            .busy
            .store(false, std::sync::atomic::Ordering::Release);
        self.0.done.notify_waiters();
    }
}

/// The process' cluster client, once `run` has made it (see [`install`]).
static RUNNING: OnceLock<Arc<Cluster>> = OnceLock::new();

/// Makes `cluster` reachable from state that is built with the config rather than beside it
/// (the webhook routes' delivery stores). Called once, at start; later calls are ignored (the
/// connection is fixed for the life of the process).
pub fn install(cluster: Arc<Cluster>) {
    let _ = RUNNING.set(cluster);
}

/// The running cluster client, if this process serves with `[cluster]`.
pub fn running() -> Option<&'static Arc<Cluster>> {
    RUNNING.get()
}

/// How often a degraded cluster tries to reconnect, and a healthy one probes with `PING`.
pub const RECONNECT_EVERY: Duration = Duration::from_millis(500);

/// What to do with a request that needs shared state while Redis is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Fall back to per-instance limits (the default: availability first).
    Local,
    /// Refuse with 503 (limits first).
    Deny,
}

/// `[cluster]`, validated.
#[derive(Clone)]
pub struct ClusterSettings {
    /// `redis://host:port/db` or `rediss://…`, never with a password in it.
    pub url: String,
    /// From `[cluster] password` (a secret reference), if any.
    pub password: Option<crate::config::secret::Secret>,
    /// Prefix of every Redis key keygate writes (default `keygate:`), so that several clusters
    /// can share one Redis.
    pub key_prefix: String,
    /// Upper bound on any one Redis command, connecting included (default 50 ms, 1 ms–5 s).
    pub timeout: Duration,
    pub on_error: OnError,
    /// This instance's name in logs and metrics (default: the host name).
    pub instance: String,
}

impl PartialEq for ClusterSettings {
    fn eq(&self, o: &Self) -> bool {
        self.url == o.url
            && self.key_prefix == o.key_prefix
            && self.timeout == o.timeout
            && self.on_error == o.on_error
            && self.instance == o.instance
            && self.password.as_ref().map(|p| p.expose().to_vec())
                == o.password.as_ref().map(|p| p.expose().to_vec())
    }
}

/// Why a shared-state operation did not happen. Never shown to clients.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis unusable (cluster degraded)")]
    Degraded,
    #[error("Redis did not answer within the cluster timeout")]
    Timeout,
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The shared-state client of one keygate process; lives across reloads.
pub struct Cluster {
    /// This cluster itself, for the tasks it hands to the side runtime (which must own what
    /// they use); set by [`Cluster::new`].
    me: Weak<Cluster>,
    settings: ClusterSettings,
    client: redis::Client,
    conn: ArcSwapOption<MultiplexedConnection>,
    degraded: AtomicBool,
    /// A `cluster_degraded` event was logged and its `cluster_recovered` is still owed.
    announced: AtomicBool,
    quota_leases: quota::QuotaLeases,
    pending_uses: history::PendingUses,
    /// When verified tokens are vouched for again (`throttle.rs`).
    vouch_rounds: throttle::VouchRounds,
}

impl Cluster {
    /// Builds the client without connecting (see [`Cluster::maintain`]). Errors name what is
    /// wrong with the URL, never a password.
    pub fn new(settings: ClusterSettings) -> Result<Arc<Cluster>, String> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())
            .map_err(|e| format!("invalid Redis URL ({:?})", e.kind()))?;
        if let Some(p) = &settings.password {
            let p = std::str::from_utf8(p.expose())
                .map_err(|_| "the Redis password is not UTF-8".to_string())?;
            let redis_settings = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(redis_settings);
        }
        let client = redis::Client::open(info).map_err(|e| format!("Redis client: {e}"))?;
        Ok(Arc::new_cyclic(|me| Cluster {
            me: me.clone(),
            settings,
            client,
            conn: ArcSwapOption::empty(),
            // Degraded until the first connection succeeds: requests do not wait for it.
            degraded: AtomicBool::new(true),
            announced: AtomicBool::new(false),
            quota_leases: Default::default(),
            pending_uses: Default::default(),
            vouch_rounds: Default::default(),
        }))
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub fn on_error(&self) -> OnError {
        self.settings.on_error
    }

    /// The one place a request decides what to do when shared state could not be used
    /// (Redis down, slow or erroring): `Ok(())` to carry on with this instance's own state
    /// (`on_error = "local"`), or a 503 (`"deny"`, logged under the client's log budget, since
    /// every request a client sends while Redis is down would write one). `what` names the
    /// shared state in the operator's log line; the client sees the generic 503 only.
    pub fn fall_back(
        &self,
        what: &'static str,
        error: &ClusterError,
        client_ip: IpAddr,
        request_id: &str,
        key_id: Option<&str>,
    ) -> Result<(), Reject> {
        match self.settings.on_error {
            OnError::Local => Ok(()),
            OnError::Deny => {
                client_event!(ClientEvent::ClusterUnavailable, client_ip, Level::WARN, event = "cluster_unavailable", request_id, client_ip = %client_ip, key_id, shared_state = what, error = %error, "shared state unavailable; refused (cluster.on_error = deny)");
                Err(Reject::Unavailable { retry_after: 1 })
            }
        }
    }

    /// Whether shared state is in use right now.
    pub fn healthy(&self) -> bool {
        !self.degraded.load(Relaxed)
    }

    /// `prefix + parts…`: the Redis key for a piece of shared state.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut k = String::with_capacity(
            self.settings.key_prefix.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>(),
        );
        k.push_str(&self.settings.key_prefix);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(':');
            }
            k.push_str(p);
        }
        k
    }

    /// Runs one command (or pipeline) under the cluster timeout, on the side runtime (see the
    /// module doc: the timeout measures Redis, not this request's runtime). Any failure marks
    /// the cluster degraded; while degraded this returns [`ClusterError::Degraded`] at once,
    /// without a hand-over. The caller waits for the verdict however long its own runtime
    /// takes to come back to it; dropping the returned future does not cancel the command
    /// (it ends within `timeout` on the side runtime, and its failure still counts).
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, ClusterError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut + Send + 'static,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        if !self.healthy() {
            return Err(ClusterError::Degraded);
        }
        self.on_side(false, op).await
    }

    /// [`run`](Self::run) on the current connection even while the cluster is marked
    /// degraded: for the work that must be done before shared counting resumes (the quota
    /// sync on reconnect).
    async fn run_forced<T, F, Fut>(&self, op: F) -> Result<T, ClusterError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut + Send + 'static,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.on_side(true, op).await
    }

    /// The hand-over: [`run_measured`](Self::run_measured) as a task of the side runtime (in
    /// place when already there, as the maintenance loop is).
    async fn on_side<T, F, Fut>(&self, forced: bool, op: F) -> Result<T, ClusterError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut + Send + 'static,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let Some(me) = self.me.upgrade() else {
            return Err(ClusterError::Degraded);
        };
        crate::side_runtime::run(async move { me.run_measured(forced, op).await })
            .await
            // The command panicked (a bug in a reply conversion): nothing was decided.
            .unwrap_or(Err(ClusterError::Degraded))
    }

    /// On the side runtime: the command under `timeout`, and the health verdict from it.
    async fn run_measured<T, F, Fut>(&self, forced: bool, op: F) -> Result<T, ClusterError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        debug_assert!(crate::side_runtime::on_side());
        let Some(conn) = self.conn.load_full().filter(|_| forced || self.healthy()) else {
            return Err(ClusterError::Degraded);
        };
        match tokio::time::timeout(self.settings.timeout, op((*conn).clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.degrade(&ClusterError::Redis(e.clone()));
                Err(ClusterError::Redis(e))
            }
            Err(_) => {
                self.degrade(&ClusterError::Timeout);
                Err(ClusterError::Timeout)
            }
        }
    }

    fn degrade(&self, why: &ClusterError) {
        if !self.degraded.swap(true, Relaxed) {
            self.announced.store(true, Relaxed);
            metrics::global().set_cluster_degraded(true);
            tracing::warn!(
                event = "cluster_degraded",
                instance = %self.settings.instance,
                on_error = match self.settings.on_error {
                    OnError::Local => "local",
                    OnError::Deny => "deny",
                },
                error = %why,
                "shared state unavailable: falling back until Redis answers again"
            );
        }
    }

    fn recover(&self) {
        if self.degraded.swap(false, Relaxed) {
            metrics::global().set_cluster_degraded(false);
            if self.announced.swap(false, Relaxed) {
                tracing::info!(
                    event = "cluster_recovered",
                    instance = %self.settings.instance,
                    "Redis answers again: shared limits resumed"
                );
            } else {
                tracing::info!(
                    instance = %self.settings.instance,
                    "cluster connected: limits shared through Redis"
                );
            }
        }
    }

    /// Starts the maintenance loop on the side runtime (once, at start): it keeps the
    /// connection alive for the life of the process (connects, probes with `PING` every
    /// [`RECONNECT_EVERY`], reconnects after failures). The connection's driver task is
    /// spawned by redis-rs on the runtime that connects, so it lives on the side runtime too.
    pub fn start(self: &Arc<Self>) {
        crate::side_runtime::spawn(self.clone().maintain());
    }

    async fn maintain(self: Arc<Self>) {
        let mut first = true;
        loop {
            if self.conn.load().is_none() || !self.healthy() {
                match self
                    .connect(self.settings.timeout.max(RECONNECT_EVERY))
                    .await
                {
                    // What this instance counted while Redis was unavailable goes to the
                    // shared counters (and what it saw is re-asserted) before shared
                    // counting resumes; if that fails, it stays degraded and tries again.
                    Ok(()) => {
                        if self.quota_sync(crate::clock::now(), true).await.is_ok() {
                            self.recover();
                        }
                    }
                    Err(e) => {
                        if first {
                            self.announce_down(&e);
                        }
                    }
                }
                first = false;
            } else {
                // Probe: a dead connection is found here even when no request needs Redis.
                let _ = self
                    .run(move |mut c| async move {
                        redis::cmd("PING").query_async::<String>(&mut c).await
                    })
                    .await;
            }
            tokio::time::sleep(RECONNECT_EVERY).await;
        }
    }

    /// One connection attempt (connect, `PING`) within `within`; on success the connection
    /// is the one commands use. Does not change the degraded state (see [`Cluster::maintain`];
    /// one-shot users such as `keygate keys` call [`Cluster::connect_once`]).
    async fn connect(&self, within: Duration) -> Result<(), ClusterError> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(within))
            .set_response_timeout(Some(self.settings.timeout));
        let attempt = async {
            let mut c = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut c).await?;
            Ok::<_, redis::RedisError>(c)
        };
        match tokio::time::timeout(within, attempt).await {
            Ok(Ok(c)) => {
                self.conn.store(Some(Arc::new(c)));
                Ok(())
            }
            Ok(Err(e)) => Err(ClusterError::Redis(e)),
            Err(_) => Err(ClusterError::Timeout),
        }
    }

    /// Connects once, for a command that reads shared state and exits (`keygate keys`): no
    /// events, no reconnect task.
    pub async fn connect_once(&self, within: Duration) -> Result<(), ClusterError> {
        let Some(me) = self.me.upgrade() else {
            return Err(ClusterError::Degraded);
        };
        crate::side_runtime::run(async move { me.connect(within).await })
            .await
            .unwrap_or(Err(ClusterError::Degraded))?;
        self.degraded.store(false, Relaxed);
        Ok(())
    }

    /// At start Redis may simply be down: say so once, as a degradation.
    fn announce_down(&self, why: &ClusterError) {
        self.degraded.store(false, Relaxed);
        self.degrade(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fetch_turn_dropped_by_a_cancelled_request_wakes_every_waiter() {
        let gate = Arc::new(FetchGate::default());
        let turn = gate.turn().await;
        assert!(turn.is_some(), "first caller fetches");
        assert!(gate.try_turn().is_none(), "one fetch at a time");
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let g = gate.clone();
                tokio::spawn(async move { g.turn().await.is_none() })
            })
            .collect();
        tokio::task::yield_now().await;
        drop(turn); // e.g. the fetching request's client went away
        for w in waiters {
            let woke = tokio::time::timeout(Duration::from_secs(5), w).await;
            assert!(woke.expect("waiter woken").unwrap(), "waiters look again");
        }
        assert!(gate.try_turn().is_some(), "free again");
    }
}
