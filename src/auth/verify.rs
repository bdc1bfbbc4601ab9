//! Verifying a presented token against its key's argon2id hash, cheaply.
//!
//! * A keyed digest (HMAC-SHA256 with a per-process random key) of the token is what caches hold,
//!   never the token. Steady state: one HMAC and a constant-time compare, no argon2.
//! * argon2 runs on `verify_concurrency` dedicated threads (`keygate-argon2`), never on the async
//!   workers; waiting for a permit is async, so a flood of bad tokens queues instead of starving
//!   the workers. The permit travels with the job and is released when the hash is done, so a
//!   request abandoned mid-verification cannot let more hashes run at once than the bound.
//! * A short negative cache remembers digests of wrong tokens, so the same bad token is not
//!   hashed twice within a minute.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::Key;

/// A keyed digest of a token. Not reversible, useless outside this process.
pub type Digest = [u8; 32];

const NEGATIVE_TTL: Duration = Duration::from_secs(60);
const NEGATIVE_CAP: usize = 4096;

pub struct Verifier {
    mac: Hmac<Sha256>,
    permits: Arc<Semaphore>,
    negative: Mutex<HashMap<Digest, Instant>>,
    argon2: Argon2Threads,
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
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            negative: Mutex::new(HashMap::new()),
            argon2: Argon2Threads::new(concurrency.max(1)),
        }
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
            .get()
            .is_some_and(|known| bool::from(known.ct_eq(digest)))
    }

    /// True if this token was found wrong within the last minute.
    pub fn is_known_bad(&self, digest: &Digest) -> bool {
        let neg = self.negative.lock().unwrap_or_else(|p| p.into_inner());
        neg.get(digest).is_some_and(|t| t.elapsed() < NEGATIVE_TTL)
    }

    /// Runs argon2 off the async workers, bounded. Remembers the result either way.
    pub async fn verify(&self, key: &Arc<Key>, token: &[u8], digest: Digest) -> Outcome {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return Outcome::Invalid;
        };
        // Re-check: another request with the same token may have verified it while we waited.
        if Self::is_cached(key, &digest) {
            return Outcome::Valid;
        }
        let secret = Zeroizing::new(token.to_vec());
        let k = key.clone();
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let ok = k.hash.verify_reusing_memory(&secret);
            drop(permit);
            let _ = done.send(ok);
        });
        if self.argon2.jobs.send(job).is_err() {
            return Outcome::Invalid;
        }
        let ok = result.await.unwrap_or(false);
        if ok {
            // Only one token can match a hash, so a set-once slot is enough.
            let _ = key.verified.set(digest);
            Outcome::Valid
        } else {
            self.remember_bad(digest);
            Outcome::Invalid
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

    fn remember_bad(&self, digest: Digest) {
        let mut neg = self.negative.lock().unwrap_or_else(|p| p.into_inner());
        if neg.len() >= NEGATIVE_CAP {
            neg.retain(|_, t| t.elapsed() < NEGATIVE_TTL);
            if neg.len() >= NEGATIVE_CAP {
                neg.clear();
            }
        }
        neg.insert(digest, Instant::now());
    }

    /// Argon2 verifications running or waiting right now is not tracked; this is the bound.
    pub fn available_permits(&self) -> usize {
        self.permits.available_permits()
    }
}
