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

/// `redis://[user@]host[:port][/db]`, `rediss://…` or `redis+unix:///path`; a password in the
/// URL is refused without repeating the URL (it belongs in `cluster.password`, by reference).
fn check_url(u: &str, errs: &mut Errors) {
    let Some((scheme, rest)) = u.split_once("://") else {
        errs.push(
            "cluster.redis",
            "must start with redis://, rediss:// or redis+unix://",
        );
        return;
    };
    if !matches!(scheme, "redis" | "rediss" | "redis+unix" | "unix") {
        errs.push(
            "cluster.redis",
            "must start with redis://, rediss:// or redis+unix://",
        );
        return;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && userinfo.contains(':')
    {
        errs.push(
                "cluster.redis",
                "must not contain a password: write cluster.password = { env = \"NAME\" } (or file/credential)",
            );
        return;
    }
    if u.contains("password=") {
        errs.push(
            "cluster.redis",
            "must not contain a password: write cluster.password = { env = \"NAME\" } (or file/credential)",
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
