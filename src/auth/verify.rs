//! Verifying a presented token against its key's argon2id hash, cheaply.
//!
//! * A keyed digest (HMAC-SHA256 with a per-process random key) of the token is what caches hold,
//!   never the token. Steady state: one HMAC and a constant-time compare, no argon2.
//! * argon2 runs on `verify_concurrency` dedicated threads (`keygate-argon2`), never on the async
//!   workers; waiting for a slot is async, so a flood of bad tokens queues instead of starving
//!   the workers. The slot travels with the job and is released when the hash is done, so a
//!   request abandoned mid-verification cannot let more hashes run at once than the bound.
//! * The wait is a priority queue, not FIFO ([`VerifyQueue`]): clients with no recent failed
//!   authentication go ahead of guessers, and nobody waits longer than [`MAX_WAIT`] (503, no
//!   hash). CPU for hashing stays bounded by `verify_concurrency` threads whatever the flood.
//! * A short negative cache remembers digests of wrong tokens, so the same bad token is not
//!   hashed twice within a minute.
//! * Requests presenting the same token while it is being verified wait for that one
//!   verification ([`Verifier::join`]) instead of each queueing (and each being charged to the
//!   client's failed-auth budget): a client that opens 50 requests at once with its valid key
//!   right after a restart is verified once and served 50 times.
//! * A verification belongs to everyone waiting for it, not to the request that started it
//!   ([`Verification`]): it runs in a task of its own, and the argon2 job publishes its verdict
//!   itself (caches first, then the waiters). So when the request that started it is abandoned
//!   (its client went away), the others still get its verdict: a hash in progress finishes and
//!   answers them, and a verification still queued keeps its place in the queue while anyone
//!   waits for it (it is given up, unhashed, only when nobody does). Before, the waiters were
//!   woken empty-handed and one of them queued and hashed again, doubling their wait (a fresh
//!   user: 2.4 s instead of 1.3 s; under a flood, the 2 s queue deadline and a 503).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::Key;
use crate::limits::Priority;
#[cfg(test)]
use crate::limits::Standing;

/// A keyed digest of a token. Not reversible, useless outside this process.
pub type Digest = [u8; 32];

/// A token's digest together with the fingerprint of the hash it is checked against: what the
/// negative cache and the shared verification are keyed by, so that a verdict reached against
/// a hash a reload has since replaced can neither answer requests against the new one nor
/// linger in the negative cache (a second fresh user's rotated key was refused for a minute:
/// a verification started before the reload remembered its "wrong" after `forget_bad` ran).
/// The positive cache needs no such tag: it lives in the [`Key`], which a new hash replaces.
type Subject = (Digest, [u8; 32]);

fn subject(key: &Key, digest: &Digest) -> Subject {
    (*digest, key.hash.fingerprint())
}

const NEGATIVE_TTL: Duration = Duration::from_secs(60);
const NEGATIVE_CAP: usize = 4096;

pub struct Verifier {
    mac: Hmac<Sha256>,
    queue: Arc<VerifyQueue>,
    negative: Arc<NegativeCache>,
    argon2: Argon2Threads,
    /// Verifications in progress, by token digest and hash: where requests with the same token
    /// wait. At most one entry per verification (bounded like the queue).
    pending: Arc<PendingMap>,
}

/// The sender side of each verification in progress; a request joining one subscribes to it,
/// so only requests that wait hold a receiver ([`Verification::run`] gives a queued
/// verification up when none is left).
type PendingMap = Mutex<HashMap<Subject, tokio::sync::watch::Sender<Option<Settled>>>>;

/// Recently wrong tokens (per token and hash), for [`NEGATIVE_TTL`].
type NegativeCache = Mutex<HashMap<Subject, Instant>>;

/// How a verification others waited for ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Valid,
    Invalid,
    /// The queue refused it unhashed: those who waited get the same 503.
    Busy,
}

/// [`Verifier::join`]'s answer.
pub enum Joined {
    /// Nobody is verifying this token: the caller does, and tells the others through the guard.
    Lead(Leading),
    /// Another request verified this token meanwhile; `None` if that verification ended
    /// without a verdict (its request was abandoned before it was handed to
    /// [`Verifier::verify`], or it was given up with nobody waiting): the caller should try
    /// again, and may lead.
    Waited(Option<Settled>),
}

/// The right to decide a token's verification for everyone presenting it: the request that
/// got it from [`Verifier::join`] either [`settle`](Self::settle)s it at once (the client is
/// throttled, or the token is known to be wrong) or hands it to [`Verifier::verify`], after
/// which the verification owns it. Dropped unsettled, it wakes the waiters with nothing, and
/// one of them leads instead.
pub struct Leading {
    subject: Subject,
    tx: tokio::sync::watch::Sender<Option<Settled>>,
    pending: Arc<PendingMap>,
}

impl Leading {
    pub fn settle(self, outcome: Settled) {
        // Stored even if nobody waits any more (`send` would drop it then).
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.subject);
    }
}

/// What a verification settles with its verdict, exactly once, whether or not the request that
/// started it still waits: that request's failed-auth charge (`pipeline.rs`: refunded for a
/// right token, kept for a wrong one). `None`: no verdict and nothing hashed (given up while
/// queued because nobody waited any more, or the argon2 threads are gone). Called before the
/// waiters are told, from an argon2 thread or a runtime task; it must not block.
///
/// Why here and not in the request: a request abandoned while its verification was pending (a
/// client timeout, an HTTP/2 reset) never saw the verdict, so its charge stayed as a failure:
/// a fresh user's 25 abandoned requests with a valid key throttled its address, and the valid
/// key then got 429.
pub type OnVerdict = Box<dyn FnOnce(Option<Settled>) + Send>;

/// An [`OnVerdict`] that runs once: with the verdict, or with `None` when dropped without one.
struct Settlement(Option<OnVerdict>);

impl Settlement {
    fn settle(mut self, verdict: Settled) {
        if let Some(f) = self.0.take() {
            f(Some(verdict));
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(None);
        }
    }
}

/// One verification of a token against a key's hash, on behalf of every request waiting for
/// it: a task of its own, independent of the request that started it.
struct Verification {
    queue: Arc<VerifyQueue>,
    negative: Arc<NegativeCache>,
    jobs: std::sync::mpsc::Sender<Job>,
    key: Arc<Key>,
    secret: Zeroizing<Vec<u8>>,
    digest: Digest,
    priority: Priority,
    leading: Leading,
    settlement: Settlement,
}

impl Verification {
    /// Waits for an argon2 slot at the starting request's priority while anyone waits for the
    /// verdict, then hands the hash to an argon2 thread, which publishes the verdict: the
    /// caches first (positive in the key, negative per token and hash), then the waiters. From
    /// there on nobody can cancel it (argon2 cannot be interrupted): its result is used.
    async fn run(self) {
        let Verification {
            queue,
            negative,
            jobs,
            key,
            secret,
            digest,
            priority,
            leading,
            settlement,
        } = self;
        let slot = tokio::select! {
            slot = queue.acquire(priority) => slot,
            // Nobody waits for the verdict any more: give the place up, nothing hashed. (A
            // request joining right now finds no verdict and verifies anew.)
            () = leading.tx.closed() => return,
        };
        let Ok(slot) = slot else {
            settlement.settle(Settled::Busy);
            leading.settle(Settled::Busy);
            return;
        };
        // Another verification of this token against this hash may have ended while we
        // waited (one that started before this one's leader joined was not joined).
        if Verifier::is_cached(&key, &digest) {
            settlement.settle(Settled::Valid);
            leading.settle(Settled::Valid);
            return;
        }
        if known_bad(&negative, &subject(&key, &digest)) {
            settlement.settle(Settled::Invalid);
            leading.settle(Settled::Invalid);
            return;
        }
        let job: Job = Box::new(move || {
            let ok = key.hash.verify_reusing_memory(&secret);
            drop(slot);
            crate::metrics::global().argon2_verified(ok);
            if ok {
                // Only one token can match a hash, so a set-once slot is enough.
                let _ = key.verified.digest.set(digest);
                settlement.settle(Settled::Valid);
                leading.settle(Settled::Valid);
            } else {
                remember_bad(&negative, subject(&key, &digest));
                settlement.settle(Settled::Invalid);
                leading.settle(Settled::Invalid);
            }
        });
        // The threads are gone only while the verifier is dropped: the job, and with it the
        // leader, is dropped, and the waiters learn that no verdict came.
        let _ = jobs.send(job);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The threads that run argon2. Why not tokio's blocking pool: it hands each job to whichever of
/// its (up to 512) threads is idle, and glibc's malloc gives threads arenas of their own, so every
/// thread that ever ran a verification kept its ~19 MiB of argon2 memory: under a flood of wrong
/// tokens from many addresses keygate grew to ~430 MiB with `verify_concurrency = 1`
/// (`bench/flood.sh`). A fixed set of threads caps that near `verify_concurrency` × m_cost, and
/// shows argon2's CPU per thread (`top -H`). The threads end when the [`Verifier`] is dropped.
/// An argon2 thread idle this long frees its working memory.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

struct Argon2Threads {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Argon2Threads {
    fn new(n: usize) -> Self {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..n {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name("keygate-argon2".into())
                .spawn(move || {
                    loop {
                        let next = rx
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .recv_timeout(IDLE_RELEASE);
                        let job = match next {
                            Ok(job) => job,
                            // Quiet for a second: give argon2's memory back.
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                super::release_verify_memory();
                                continue;
                            }
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                        };
                        // A panic in one verification must not shrink the pool.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })
                .expect("cannot start the argon2 threads");
        }
        Argon2Threads { jobs }
    }
}

/// The outcome of checking a token's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Matched (from cache or by argon2).
    Valid,
    /// Did not match.
    Invalid,
}

impl Verifier {
    pub fn new(concurrency: usize) -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS random number generator failed");
        Verifier {
            mac: Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length"),
            queue: Arc::new(VerifyQueue::new(concurrency.max(1))),
            negative: Arc::new(Mutex::new(HashMap::new())),
            argon2: Argon2Threads::new(concurrency.max(1)),
            pending: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Joins the verification of this token already in progress, if any, waiting for its end;
    /// else makes the caller its leader. Waiting is bounded by the verification's own (the
    /// queue's [`MAX_WAIT`] plus one hash), whether or not the request that started it is
    /// still there.
    pub async fn join(&self, key: &Key, digest: &Digest) -> Joined {
        let subject = subject(key, digest);
        let mut rx = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.get(&subject) {
                Some(tx) => tx.subscribe(),
                None => {
                    let (tx, _) = tokio::sync::watch::channel(None);
                    pending.insert(subject, tx.clone());
                    return Joined::Lead(Leading {
                        subject,
                        tx,
                        pending: self.pending.clone(),
                    });
                }
            }
        };
        let settled = rx.wait_for(Option::is_some).await.ok().and_then(|v| *v);
        Joined::Waited(settled)
    }

    pub fn digest(&self, token: &[u8]) -> Digest {
        let mut mac = self.mac.clone();
        mac.update(token);
        mac.finalize().into_bytes().into()
    }

    /// True if this exact token was verified for this key before (and the key's hash has not
    /// changed since: a changed hash makes a new, empty slot).
    pub fn is_cached(key: &Key, digest: &Digest) -> bool {
        key.verified
            .digest
            .get()
            .is_some_and(|known| bool::from(known.ct_eq(digest)))
    }

    /// True if this token was found wrong within the last minute.
    pub fn is_known_bad(&self, key: &Key, digest: &Digest) -> bool {
        known_bad(&self.negative, &subject(key, digest))
    }

    /// Runs argon2 off the async workers, bounded, after waiting in the queue at the client's
    /// `priority`, for the caller and every request that joined `leading`'s verification.
    /// Remembers the result either way. `Err(Busy)`: the queue refused it (full of
    /// better-placed requests, or waited [`MAX_WAIT`]); nothing was hashed.
    ///
    /// The verification outlives the caller: if the caller is dropped (its client went away),
    /// it goes on for the requests that joined it (see [`Verification`]), and its verdict
    /// runs `on_verdict` (the caller's failed-auth charge) either way.
    pub async fn verify(
        &self,
        leading: Leading,
        key: &Arc<Key>,
        token: &[u8],
        digest: Digest,
        priority: Priority,
        on_verdict: OnVerdict,
    ) -> Result<Outcome, Busy> {
        let mut verdict = leading.tx.subscribe();
        let verification = Verification {
            queue: self.queue.clone(),
            negative: self.negative.clone(),
            jobs: self.argon2.jobs.clone(),
            key: key.clone(),
            secret: Zeroizing::new(token.to_vec()),
            digest,
            priority,
            leading,
            settlement: Settlement(Some(on_verdict)),
        };
        tokio::spawn(verification.run());
        match verdict
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| *v)
        {
            Some(Settled::Valid) => Ok(Outcome::Valid),
            Some(Settled::Invalid) => Ok(Outcome::Invalid),
            // No verdict without a hash (the argon2 threads are gone): nothing was decided.
            Some(Settled::Busy) | None => Err(Busy),
        }
    }

    /// Forgets every remembered wrong token. Called when a reload is swapped in: a token that
    /// was wrong for the old hash may be right for a key's new one (a hash replaced in place).
    pub fn forget_bad(&self) {
        self.negative
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Verifications waiting for an argon2 thread right now.
    pub fn waiting(&self) -> usize {
        self.queue.lock().waiting.len()
    }
}

fn known_bad(negative: &NegativeCache, subject: &Subject) -> bool {
    let neg = negative.lock().unwrap_or_else(|p| p.into_inner());
    neg.get(subject).is_some_and(|t| t.elapsed() < NEGATIVE_TTL)
}

fn remember_bad(negative: &NegativeCache, subject: Subject) {
    let mut neg = negative.lock().unwrap_or_else(|p| p.into_inner());
    if neg.len() >= NEGATIVE_CAP {
        neg.retain(|_, t| t.elapsed() < NEGATIVE_TTL);
        if neg.len() >= NEGATIVE_CAP {
            neg.clear();
        }
    }
    neg.insert(subject, Instant::now());
}

/// The verification queue refused a request: it would have waited too long, or the queue is
/// full of better-placed requests. Nothing was hashed; the client gets 503 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// Longest a verification waits for an argon2 thread before it is refused (503) unhashed. A
/// legitimate first authentication waits behind at most the hashes of clients at least as
/// clean as itself; this bounds what a guesser's request can hold (a connection, a queue slot)
/// and how stale a hash can be by the time it runs.
pub const MAX_WAIT: Duration = Duration::from_secs(2);
/// Verifications waiting at most (each a few dozen bytes): when full, a newcomer placed better
/// than the worst waiter takes its place (that one gets 503), otherwise the newcomer gets 503.
pub const MAX_WAITING: usize = 1024;

/// Who runs next on the argon2 threads: a priority queue by [`Priority`]: its standing (clean
/// clients first, then clients whose network failed recently, then clients that failed,
/// fewest failures first), then fewest recent attempts, then first come first served.
///
/// Why: with a FIFO wait, 200 guessing addresses, each under `failed_auth_limit`, kept ~200
/// hashes queued, and a legitimate client presenting its key for the first time waited 6.9 s
/// behind them (issue 9), growing with the number of addresses. Now it waits for the hash in
/// progress plus the hashes of clients at least as clean as itself. What an attacker with N
/// addresses can still do is in docs/access.md ("Verification queue").
///
/// Why not a global guess budget on top: the argon2 threads are the budget. At most
/// `verify_concurrency` hashes run at once, so hashing never takes more than that many cores;
/// a lower cap would only refuse legitimate first authentications sooner.
pub struct VerifyQueue {
    slots: usize,
    state: Mutex<QueueState>,
}

struct QueueState {
    /// Hashes holding a slot (running or handed to an argon2 thread).
    running: usize,
    seq: u64,
    /// In order of service. A waiter is woken by a `()` that hands it a slot already counted in
    /// `running`; dropping its sender (eviction) tells it `Busy`.
    waiting: std::collections::BTreeMap<(Priority, u64), tokio::sync::oneshot::Sender<()>>,
}

/// The right to run one hash; handed to the next waiter when dropped.
pub struct Slot(Arc<VerifyQueue>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A request waiting in the queue. If it is dropped (the client went away), its place is given
/// up, or, if it was granted a slot in the meantime, the slot is passed on.
struct Waiter {
    queue: Arc<VerifyQueue>,
    place: (Priority, u64),
    rx: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Waiter {
    /// After the wait ended without a grant (timeout): leave the queue, or take the slot if it
    /// was granted at the last moment.
    fn settle(&mut self) -> Result<Slot, Busy> {
        let Some(mut rx) = self.rx.take() else {
            return Err(Busy);
        };
        let removed = self.queue.remove(&self.place);
        if !removed && rx.try_recv().is_ok() {
            return Ok(Slot(self.queue.clone()));
        }
        Err(Busy)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            let removed = self.queue.remove(&self.place);
            if !removed && rx.try_recv().is_ok() {
                self.queue.release();
            }
        }
    }
}

impl VerifyQueue {
    pub fn new(slots: usize) -> Self {
        VerifyQueue {
            slots: slots.max(1),
            state: Mutex::new(QueueState {
                running: 0,
                seq: 0,
                waiting: std::collections::BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot at `standing` (see [`MAX_WAIT`], [`MAX_WAITING`]).
    pub async fn acquire(self: &Arc<Self>, priority: Priority) -> Result<Slot, Busy> {
        let (place, rx) = {
            let mut st = self.lock();
            if st.running < self.slots && st.waiting.is_empty() {
                st.running += 1;
                return Ok(Slot(self.clone()));
            }
            if st.waiting.len() >= MAX_WAITING {
                let worst = st.waiting.last_key_value().map(|(k, _)| k.0);
                if worst.is_none_or(|w| priority >= w) {
                    crate::metrics::global().verify_refused();
                    return Err(Busy);
                }
                // Dropping the evicted waiter's sender wakes it with `Busy`.
                st.waiting.pop_last();
                crate::metrics::global().verify_refused();
            }
            st.seq += 1;
            let place = (priority, st.seq);
            let (tx, rx) = tokio::sync::oneshot::channel();
            st.waiting.insert(place, tx);
            crate::metrics::global().set_verify_waiting(st.waiting.len());
            (place, rx)
        };
        let mut waiter = Waiter {
            queue: self.clone(),
            place,
            rx: Some(rx),
        };
        let granted = {
            let rx = waiter.rx.as_mut().expect("set above");
            tokio::time::timeout(MAX_WAIT, rx).await
        };
        match granted {
            Ok(Ok(())) => {
                waiter.rx = None;
                Ok(Slot(self.clone()))
            }
            // Evicted (counted there).
            Ok(Err(_)) => {
                waiter.rx = None;
                Err(Busy)
            }
            Err(_) => {
                let got = waiter.settle();
                if got.is_err() {
                    crate::metrics::global().verify_refused();
                }
                got
            }
        }
    }

    /// Takes a waiter out of the queue; false if it was not there (granted or evicted).
    fn remove(&self, place: &(Priority, u64)) -> bool {
        let mut st = self.lock();
        let removed = st.waiting.remove(place).is_some();
        crate::metrics::global().set_verify_waiting(st.waiting.len());
        removed
    }

    /// A slot is free: hand it to the best waiter still there, or count it free.
    fn release(&self) {
        let mut st = self.lock();
        while let Some((_, tx)) = st.waiting.pop_first() {
            if tx.send(()).is_ok() {
                crate::metrics::global().set_verify_waiting(st.waiting.len());
                return;
            }
        }
        crate::metrics::global().set_verify_waiting(0);
        st.running = st.running.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(debt: u32) -> Priority {
        Standing::Failed { debt }.into()
    }

    /// Waits until `n` requests are queued.
    async fn queued(q: &VerifyQueue, n: usize) {
        while q.lock().waiting.len() < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn clean_clients_are_served_before_guessers_that_queued_first() {
        let q = Arc::new(VerifyQueue::new(1));
        let held = q.acquire(Standing::Clean.into()).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let spawn = |name: &'static str, s: Priority| {
            let (q, order) = (q.clone(), order.clone());
            tokio::spawn(async move {
                let slot = q.acquire(s).await.unwrap();
                order.lock().unwrap().push(name);
                drop(slot);
            })
        };
        for _ in 0..5 {
            tasks.push(spawn("guesser", standing(3)));
        }
        queued(&q, 5).await;
        tasks.push(spawn("typo", standing(1)));
        tasks.push(spawn("neighbour", Standing::NetworkFailed.into()));
        tasks.push(spawn("clean", Standing::Clean.into()));
        queued(&q, 8).await;
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(
            order[..4],
            ["clean", "neighbour", "typo", "guesser"],
            "{order:?}"
        );
        assert_eq!(q.lock().running, 0, "every slot given back");
    }

    #[tokio::test]
    async fn a_full_queue_evicts_the_worst_for_a_better_newcomer() {
        let q = Arc::new(VerifyQueue::new(1));
        let _held = q.acquire(Standing::Clean.into()).await.unwrap();
        let mut guessers = Vec::new();
        for _ in 0..MAX_WAITING {
            let q = q.clone();
            guessers.push(tokio::spawn(
                async move { q.acquire(standing(5)).await.is_ok() },
            ));
        }
        queued(&q, MAX_WAITING).await;
        // Another guesser no better than the worst: refused at once, nothing evicted.
        assert_eq!(q.acquire(standing(5)).await.err(), Some(Busy));
        // A clean client takes the last guesser's place; that one is told Busy.
        let clean = {
            let q = q.clone();
            tokio::spawn(async move { q.acquire(Standing::Clean.into()).await.is_ok() })
        };
        let last = guessers.pop().unwrap();
        assert!(
            !last.await.unwrap(),
            "the most recent worst waiter is evicted"
        );
        assert_eq!(q.lock().waiting.len(), MAX_WAITING);
        drop(_held);
        assert!(clean.await.unwrap());
        for g in guessers {
            g.abort();
        }
    }

    #[tokio::test]
    async fn an_abandoned_waiter_gives_up_its_place_and_any_slot_it_was_given() {
        let q = Arc::new(VerifyQueue::new(1));
        let held = q.acquire(Standing::Clean.into()).await.unwrap();
        let gone = {
            let q = q.clone();
            tokio::spawn(async move { q.acquire(Standing::Clean.into()).await.map(|_| ()) })
        };
        queued(&q, 1).await;
        gone.abort();
        let _ = gone.await;
        assert_eq!(q.lock().waiting.len(), 0, "its place is given up");
        drop(held);
        assert_eq!(q.lock().running, 0);
        // Nothing leaked: the one slot is available again.
        let again = q.acquire(standing(9)).await;
        assert!(again.is_ok());
    }

    #[tokio::test]
    async fn nobody_waits_longer_than_max_wait() {
        let q = Arc::new(VerifyQueue::new(1));
        let _held = q.acquire(Standing::Clean.into()).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(q.acquire(Standing::Clean.into()).await.err(), Some(Busy));
        assert!(started.elapsed() >= MAX_WAIT);
        assert_eq!(q.lock().waiting.len(), 0);
    }
}
