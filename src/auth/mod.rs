//! Authentication: the token format (`token`), argon2id hashes, and verification with the
//! verified-key cache (`verify`).

pub mod token;
pub mod verify;

use std::fmt;
use std::sync::{Arc, OnceLock};

use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Params, Version};
use sha2::{Digest as _, Sha256};

use crate::access::{IpList, Scope};
use crate::limits::KeyLimiter;

pub use token::{NewToken, Token, TokenError};
pub use verify::{Digest, Verifier};

/// A parsed argon2id PHC string. Parsed once at config load; `Debug` never shows it.
#[derive(Clone)]
pub struct PhcHash {
    inner: PasswordHash,
    fingerprint: [u8; 32],
}

/// The PHC form keygate names in its errors (config errors mask every other `$argon2…` text).
pub const PHC_FORMAT_HINT: &str = "$argon2id$v=19$m=…,t=…,p=…$salt$hash";

/// OWASP's minimum for argon2id (2023 cheat sheet): m=19 MiB, t=2, p=1.
pub const OWASP_M_COST: u32 = 19_456;
pub const OWASP_T_COST: u32 = 2;

impl PhcHash {
    /// Accepts only `$argon2id$v=19$…` with a salt and an output. The error never quotes the
    /// value, which could be a plaintext token pasted by mistake.
    pub fn parse(s: &str) -> Result<Self, String> {
        let not_phc = || {
            format!(
                "not an argon2id PHC hash ({PHC_FORMAT_HINT}); make one with `keygate hash` or `keygate keygen`"
            )
        };
        if !s.starts_with("$argon2id$") {
            return Err(not_phc());
        }
        let inner = PasswordHash::new(s).map_err(|_| not_phc())?;
        if inner.algorithm.as_str() != "argon2id" || inner.salt.is_none() || inner.hash.is_none() {
            return Err(not_phc());
        }
        if inner.version.is_some_and(|v| v != 0x13) {
            return Err("argon2id version must be 19 (v=19)".to_string());
        }
        Params::try_from(&inner).map_err(|_| "argon2id parameters out of range".to_string())?;
        Ok(PhcHash {
            fingerprint: Sha256::digest(s.as_bytes()).into(),
            inner,
        })
    }

    /// Identifies the hash without revealing it (for carrying cache entries over a reload).
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// A warning if the parameters are below OWASP's minimum.
    pub fn weakness(&self) -> Option<String> {
        let p = Params::try_from(&self.inner).ok()?;
        (p.m_cost() < OWASP_M_COST || p.t_cost() < OWASP_T_COST).then(|| {
            format!(
                "argon2id parameters m={},t={} are below OWASP's minimum (m={OWASP_M_COST},t={OWASP_T_COST}); re-hash with `keygate hash`",
                p.m_cost(),
                p.t_cost()
            )
        })
    }

    /// Like [`PhcHash::verify_blocking`], but argon2's memory (m_cost KiB) is a buffer kept by
    /// the calling thread and reused, instead of a fresh allocation per verification that
    /// glibc's per-thread arenas then keep around: after a flood of wrong tokens keygate's RSS
    /// stays at about `verify_concurrency` × m_cost above its base. For the dedicated argon2
    /// threads only. Slow on purpose; never call on an async worker.
    pub fn verify_reusing_memory(&self, token: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let (Some(salt), Some(expected)) = (&self.inner.salt, &self.inner.hash) else {
            return false;
        };
        let Ok(params) = Params::try_from(&self.inner) else {
            return false;
        };
        let need = params.block_count();
        let expected = expected.as_bytes();
        let mut out = [0u8; 64];
        let Some(out) = out.get_mut(..expected.len()) else {
            return false;
        };
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        BLOCKS.with(|blocks| {
            let Ok(mut blocks) = blocks.try_borrow_mut() else {
                return false;
            };
            if blocks.len() < need {
                if blocks.capacity() < need {
                    // Only the `need` blocks argon2 fills become resident.
                    *blocks = Vec::with_capacity(need.max(MIN_BUFFER_BLOCKS));
                }
                blocks.resize(need, argon2::Block::default());
            }
            argon2
                .hash_password_into_with_memory(token, salt.as_ref(), out, &mut blocks[..need])
                .is_ok()
                && bool::from(out.ct_eq(expected))
        })
    }

    /// Slow on purpose (tens of milliseconds). Never call on an async worker.
    pub fn verify_blocking(&self, token: &[u8]) -> bool {
        use argon2::password_hash::PasswordVerifier;
        Argon2::default()
            .verify_password(token, &self.inner)
            .is_ok()
    }
}

thread_local! {
    /// argon2's working memory on this (argon2) thread, reused while verifications keep coming.
    static BLOCKS: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer is allocated with room for at least this many 1 KiB blocks: above glibc's largest
/// dynamic mmap threshold (32 MiB), so it is always a mapping of its own and dropping it hands the
/// memory back to the OS, rather than to an arena that keeps it.
const MIN_BUFFER_BLOCKS: usize = 33 * 1024;

/// Frees this thread's argon2 buffer (the argon2 threads call it when idle), so keygate's RSS
/// returns to its base once a burst of verifications is over.
pub fn release_verify_memory() {
    BLOCKS.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            *b = Vec::new();
        }
    });
}

impl fmt::Debug for PhcHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PhcHash(<redacted>)")
    }
}

/// Hashes a token with argon2id at OWASP's parameters (m=19456 KiB, t=2, p=1) and a random salt.
pub fn hash_token(token: &[u8]) -> String {
    hash_token_with(token, OWASP_M_COST, OWASP_T_COST)
}

/// Same with explicit costs (tests use cheap ones).
pub fn hash_token_with(token: &[u8], m_cost: u32, t_cost: u32) -> String {
    use argon2::password_hash::PasswordHasher;
    let params = Params::new(m_cost, t_cost, 1, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(token)
        .expect("argon2 hashing with a random salt")
        .to_string()
}

/// A configured API key, as the request path needs it.
#[derive(Debug)]
pub struct Key {
    pub id: Arc<str>,
    /// The id as the identity header's value, made once.
    pub id_header: http::HeaderValue,
    pub hash: PhcHash,
    /// The verified cache of this key and hash: the keyed digest of the one token known to
    /// match `hash`, once verified. Shared with the next snapshot when the hash is unchanged; a
    /// removed key or a new hash takes it with it.
    pub verified: Arc<Verified>,
    pub limiter: Option<Arc<KeyLimiter>>,
    /// Requests of this key in flight at once, at most (`max_concurrent`, 429 beyond).
    pub max_concurrent: u32,
    /// Requests of this key in flight now: the runtime's counter for this id
    /// ([`crate::upstream_cap::KeyInFlightTable`]), the same across any sequence of reloads.
    pub in_flight: Arc<crate::upstream_cap::KeyInFlight>,
    pub allow: Option<IpList>,
    pub scope: Scope,
    pub expires: Option<jiff::Timestamp>,
    pub created: Option<jiff::Timestamp>,
    pub disabled: bool,
    /// The role it names (`role = "…"`), if any; its fields are already merged in.
    pub role: Option<Arc<str>>,
    /// Spend limit (its own or its role's).
    pub quota: Option<crate::quota::Quota>,
    /// Its own or its role's; `None`: `[state] rotation_period` applies.
    pub rotation_period: Option<std::time::Duration>,
}

/// A key's verified cache (per key and hash, see [`Key::verified`]).
#[derive(Debug, Default)]
pub struct Verified {
    /// The keyed digest ([`Verifier::digest`]) of the one token known to match the hash. Only
    /// one token can match a hash, so a set-once slot is enough.
    pub digest: OnceLock<Digest>,
    /// Cluster mode: when this instance last wrote the token's proof for the other instances
    /// (`cluster/throttle.rs`, T6-5: written again when the token is used later, so that the
    /// proof outlives a Redis data loss and its own TTL).
    pub vouched: crate::cluster::throttle::VouchMark,
}

impl Key {
    pub fn is_expired(&self, now: jiff::Timestamp) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }
}

impl fmt::Debug for KeyLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyLimiter({:?}, burst {})", self.rate(), self.burst())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_roundtrip_and_rejections() {
        let h = hash_token_with(b"kg_a_secret", 64, 1);
        let p = PhcHash::parse(&h).unwrap();
        assert!(p.verify_blocking(b"kg_a_secret"));
        assert!(!p.verify_blocking(b"kg_a_secreT"));
        // The buffer-reusing path agrees with the reference one, across parameter changes
        // (the thread's buffer grows, then is reused for a smaller hash).
        assert!(p.verify_reusing_memory(b"kg_a_secret"));
        assert!(!p.verify_reusing_memory(b"kg_a_secreT"));
        let bigger = PhcHash::parse(&hash_token_with(b"kg_b_other", 1024, 2)).unwrap();
        assert!(bigger.verify_reusing_memory(b"kg_b_other"));
        assert!(!bigger.verify_reusing_memory(b"kg_a_secret"));
        assert!(p.verify_reusing_memory(b"kg_a_secret"));
        let strong = PhcHash::parse(&hash_token(b"kg_c_strong")).unwrap();
        assert!(strong.verify_reusing_memory(b"kg_c_strong"));
        assert!(!strong.verify_reusing_memory(b"kg_c_strOng"));
        assert!(p.weakness().is_some());
        assert!(format!("{p:?}").contains("redacted"));
        for bad in [
            "kg_a_secret",
            "$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
            "$2b$12$abc",
            "",
        ] {
            let e = PhcHash::parse(bad).unwrap_err();
            assert!(!e.contains(bad) || bad.is_empty(), "{e}");
        }
        let strong = hash_token(b"x");
        assert!(
            strong.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{strong}"
        );
        assert!(PhcHash::parse(&strong).unwrap().weakness().is_none());
    }
}
