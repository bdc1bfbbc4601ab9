//! `[cluster]` (SPEC §11): the Redis server shared by the instances of one cluster.

use std::path::Path;
use std::time::Duration;

use super::Errors;
use crate::cluster::{ClusterSettings, OnError};
use crate::config::raw::RawCluster;

/// Bounds of `[cluster] timeout`: Redis on the same network answers in well under a
/// millisecond; above a few seconds the "never hold a request past timeout" promise means
/// little.
const TIMEOUT_MIN: Duration = Duration::from_millis(1);
const TIMEOUT_MAX: Duration = Duration::from_secs(5);

/// Validates `[cluster]`; `None` when absent (single instance, no Redis) or invalid (the
/// problems are in `errs`, each with its TOML path).
pub(super) fn build(
    raw: Option<&RawCluster>,
    base: &Path,
    errs: &mut Errors,
) -> Option<ClusterSettings> {
    let c = raw?;
    let before = errs.0.len();
    let url = match c.redis.as_deref() {
        None => {
            errs.push("cluster.redis", "missing (e.g. \"redis://127.0.0.1:6379\")");
            String::new()
        }
        Some(u) => {
            check_url(u, errs);
            u.to_string()
        }
    };
    let password = c.password.as_ref().and_then(|r| match r.resolve(base) {
        Ok(s) => Some(s),
        Err(m) => {
            errs.push("cluster.password", m);
            None
        }
    });
    let key_prefix = c.key_prefix.clone().unwrap_or_else(|| "keygate:".into());
    if key_prefix.is_empty()
        || key_prefix.len() > 64
        || !key_prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
    {
        errs.push(
            "cluster.key_prefix",
            "must be 1-64 printable ASCII characters without spaces or braces",
        );
    }
    let timeout = super::duration_or(&c.timeout, "50ms", "cluster.timeout", errs);
    if !(TIMEOUT_MIN..=TIMEOUT_MAX).contains(&timeout) {
        errs.push("cluster.timeout", "must be between 1ms and 5s");
    }
    let on_error = match c.on_error.as_deref().unwrap_or("local") {
        "local" => OnError::Local,
        "deny" => OnError::Deny,
        other => {
            errs.push(
                "cluster.on_error",
                format!("must be \"local\" or \"deny\", not {other:?}"),
            );
            OnError::Local
        }
    };
    let instance = c.instance.clone().unwrap_or_else(host_name);
    if instance.is_empty()
        || instance.len() > 64
        || !instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        errs.push(
            "cluster.instance",
            "must be 1-64 characters of A-Z a-z 0-9 . _ -",
        );
    }
    (errs.0.len() == before).then_some(ClusterSettings {
        url,
        password,
        key_prefix,
        timeout,
        on_error,
        instance,
    })
}

/// The URL schemes accepted (redis-rs also reads `valkey://`, `valkeys://`, `valkey+unix://`:
/// a Valkey server is reached with the `redis` spellings).
const SCHEMES: &str = "must start with redis://, rediss://, redis+unix:// or unix://";

/// What a password in the URL is told (the URL itself is never repeated: it may hold one).
const NO_PASSWORD: &str =
    "must not contain a password: write cluster.password = { env = \"NAME\" } (or file/credential)";

/// The query parameters redis-rs reads that carry no secret: `db` (the database of a unix
/// socket URL) and `protocol` (`resp2`/`resp3`).
const QUERY_ALLOWED: [&str; 2] = ["db", "protocol"];

/// `redis://[user@]host[:port][/db]`, `rediss://…`, `redis+unix:///path[?db=N]` or
/// `unix:///path`, read with the parser that connects (`redis::parse_redis_url`, which
/// percent-decodes query names as redis-rs does). Refused, without repeating the URL:
/// * a password anywhere redis-rs takes one: userinfo (`redis://:pw@host`) and the unix forms'
///   `?pass=` (their `?user=` too: with a password it would be half a credential);
/// * any other query parameter than [`QUERY_ALLOWED`]: an allow-list, so a parameter a later
///   redis-rs learns to read is refused rather than silently carrying a secret (a fresh user:
///   `redis+unix:///run/redis.sock?pass=…` passed `check` and was used as the password, SPEC §6);
/// * any fragment: `rediss://host#insecure` turns certificate validation off, which keygate
///   never does (docs/cluster.md).
fn check_url(u: &str, errs: &mut Errors) {
    let Some(url) = redis::parse_redis_url(u) else {
        errs.push("cluster.redis", SCHEMES);
        return;
    };
    if !matches!(url.scheme(), "redis" | "rediss" | "redis+unix" | "unix") {
        errs.push("cluster.redis", SCHEMES);
        return;
    }
    if url.password().is_some() {
        errs.push("cluster.redis", NO_PASSWORD);
        return;
    }
    for (n, (name, _)) in url.query_pairs().enumerate() {
        if QUERY_ALLOWED.contains(&name.as_ref()) {
            continue;
        }
        let lower = name.to_ascii_lowercase();
        if ["pass", "user", "auth", "secret", "token", "key"]
            .iter()
            .any(|s| lower.contains(s))
        {
            errs.push("cluster.redis", NO_PASSWORD);
        } else {
            // The name is not repeated either: it could be the secret itself (`?hunter2`).
            errs.push(
                "cluster.redis",
                format!(
                    "query parameter {} is not accepted (only db and protocol)",
                    n + 1
                ),
            );
        }
        return;
    }
    if url.fragment().is_some() {
        errs.push(
            "cluster.redis",
            "must not have a #fragment (rediss://…#insecure would turn certificate validation off)",
        );
        return;
    }
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u) {
        errs.push(
            "cluster.redis",
            format!("invalid Redis URL ({:?})", e.kind()),
        );
    }
}

/// The kernel's host name (the default instance name), or `keygate`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "keygate".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(u: &str) -> Vec<String> {
        let mut errs = Errors(Vec::new());
        check_url(u, &mut errs);
        errs.0.iter().map(ToString::to_string).collect()
    }

    /// Every place redis-rs reads a password, and every parameter it reads beyond the two
    /// harmless ones, in every scheme spelling: refused, and never echoed.
    #[test]
    fn no_secret_can_ride_in_the_url() {
        for u in [
            "redis://:LeakMe1@127.0.0.1:6379",
            "redis://user:LeakMe1@127.0.0.1",
            "rediss://:LeakMe1@redis.example:6380/0",
            "redis://127.0.0.1:6379/0?password=LeakMe1",
            "redis+unix:///run/redis.sock?pass=LeakMe1",
            "unix:///run/redis.sock?pass=LeakMe1",
            "redis+unix:///run/redis.sock?db=1&pass=LeakMe1",
            "redis+unix:///run/redis.sock?p%61ss=LeakMe1",
            "redis+unix:///run/redis.sock?user=admin&pass=LeakMe1",
            "rediss://127.0.0.1:6380/?pass=LeakMe1",
            "redis://127.0.0.1/?LeakMe1",
            "redis://127.0.0.1/?x=LeakMe1",
            "rediss://redis.example:6380#insecure",
            "redis://127.0.0.1#LeakMe1",
            "valkey://:LeakMe1@127.0.0.1",
            "http://127.0.0.1:6379",
            "127.0.0.1:6379",
        ] {
            let p = problems(u);
            assert_eq!(p.len(), 1, "{u}: {p:?}");
            assert!(p[0].contains("cluster.redis"), "{u}: {p:?}");
            assert!(!p[0].contains("LeakMe1"), "{u}: {p:?}");
        }
        for u in [
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1:6379/2",
            "redis://keygate@10.0.0.20:6379/0",
            "rediss://redis.example:6380",
            "redis://[::1]:6379?protocol=resp3",
            "redis+unix:///run/redis.sock",
            "redis+unix:///run/redis.sock?db=3",
            "unix:///run/redis.sock?db=3&protocol=resp2",
        ] {
            assert_eq!(problems(u), Vec::<String>::new(), "{u}");
        }
    }
}
