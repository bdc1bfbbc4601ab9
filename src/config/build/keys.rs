//! `[[keys]]`: each key's own fields merged over its role's (`roles.rs`), parsed once, with the
//! live state that must survive a reload carried over.
//!
//! What a key keeps, by the sequence of reloads (fresh user T3-15):
//!
//! | state | key stays | key removed, later put back | key renamed |
//! | --- | --- | --- | --- |
//! | requests in flight (`max_concurrent`) | kept | kept while any is still running (runtime table, [`KeyInFlightTable`]) | new id, new count |
//! | rate-limit bucket | kept if rate and burst are unchanged | new, full bucket | new |
//! | verified cache | kept if the hash is unchanged | verified again (one argon2 run) | new |
//! | quota usage, last use, network history | kept (`usage.rs`, by key id, persisted) | kept | new id, new history |
//!
//! The in-flight count bounds live resources (tunnels, upstream work), so no sequence may reset
//! it. A rate-limit bucket of a removed key is not kept: removing a key ends its policy, and a
//! re-added key gets at most one burst more than a key that stayed (SPEC §8 keeps the state of
//! keys that remain). In cluster mode the same holds for the shared state (docs/cluster.md): the
//! shared bucket is named by its limit (a changed limit starts a full one, `cluster/rate.rs`), a
//! quota block leased under a limit a reload lowered is clipped before use (`cluster/quota.rs`),
//! and the proof that vouches for a verified token belongs to its hash (`cluster/throttle.rs`).
//! The verified cache is a cache: losing it costs one verification. A
//! webhook route's delivery ids are kept the same way as the in-flight counts
//! (`webhooks.rs`, [`crate::webhook::replay::DeliveryStores`]): forgetting them would forward a
//! delivery the upstream already accepted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use super::Errors;
use super::roles::{BUILTIN_ROLES, Role};
use crate::access::Scope;
use crate::auth::{Key, PhcHash};
use crate::config::Snapshot;
use crate::config::raw::RawKey;
use crate::limits::{KeyLimiter, Rate};
use crate::upstream_cap::KeyInFlightTable;

/// What a key gets when neither it nor its role says otherwise (`[auth]`).
#[derive(Clone, Copy)]
pub(super) struct KeyDefaults {
    /// `auth.default_rate_limit`.
    pub rate: Option<Rate>,
    /// `auth.default_max_concurrent`.
    pub max_concurrent: u32,
}

/// Builds every key; duplicates and unknown roles are errors named by TOML path.
pub(super) fn build_keys(
    raw: &[RawKey],
    roles: &HashMap<String, Role>,
    defaults: KeyDefaults,
    previous: Option<&Snapshot>,
    in_flight: Option<&KeyInFlightTable>,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> HashMap<Box<str>, Arc<Key>> {
    if let Some(table) = in_flight {
        // The previous snapshot's counters first (the first snapshot is built before the
        // runtime and its table exist), then forget the ones nothing holds.
        if let Some(prev) = previous {
            table.adopt(prev.keys.values().map(|k| (&*k.id, &k.in_flight)));
        }
        table.prune();
    }
    let mut keys: HashMap<Box<str>, Arc<Key>> = HashMap::with_capacity(raw.len());
    for (i, k) in raw.iter().enumerate() {
        let context = (previous, in_flight);
        if let Some(key) = build_key(i, k, roles, defaults, context, errs, warnings) {
            if keys.contains_key(&*key.id) {
                errs.push(
                    format!("keys[{i}].id"),
                    format!("duplicate key id {:?}", key.id),
                );
            } else {
                keys.insert(Box::from(&*key.id), Arc::new(key));
            }
        }
    }
    keys
}

/// `methods = [...]`: HTTP methods, case-insensitive in the file.
pub(super) fn parse_methods(list: &[String], path: &str, errs: &mut Errors) -> Vec<Method> {
    list.iter()
        .enumerate()
        .filter_map(
            |(j, m)| match Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    errs.push(format!("{path}[{j}]"), format!("invalid method {m:?}"));
                    None
                }
            },
        )
        .collect()
}

/// `paths = [...]`: prefixes starting with `/`, normalised as request paths are.
pub(super) fn parse_paths(list: &[String], path: &str, errs: &mut Errors) -> Vec<String> {
    list.iter()
        .enumerate()
        .filter_map(|(j, s)| parse_path_prefix(s, &format!("{path}[{j}]"), errs))
        .collect()
}

pub(super) fn parse_path_prefix(s: &str, path: &str, errs: &mut Errors) -> Option<String> {
    if !s.starts_with('/') {
        errs.push(path, format!("path prefix {s:?} must start with '/'"));
        return None;
    }
    if s.contains(';') {
        // A servlet container reads `/a;b/` as `/a/`, others as `/a;b/`: no request could be
        // inside this prefix under every reading, so it would silently match nothing.
        errs.push(
            path,
            format!("path prefix {s:?} must not contain ';' (path parameters)"),
        );
        return None;
    }
    match crate::access::normalize_path(s) {
        Some(n) => Some(n.into_owned()),
        None => {
            errs.push(path, format!("invalid path prefix {s:?}"));
            None
        }
    }
}

/// A duration within the range of the setting `bounds_of` (`durations.rs`; e.g. every
/// `rotation_period` has the range of `state.rotation_period`), reported at `path`.
pub(super) fn parse_period(
    s: &str,
    bounds_of: &str,
    path: &str,
    errs: &mut Errors,
) -> Option<Duration> {
    match super::parse_duration(s).and_then(|d| super::durations::check(bounds_of, s, d)) {
        Ok(d) => Some(d),
        Err(m) => {
            errs.push(path, m);
            None
        }
    }
}

fn build_key(
    i: usize,
    k: &RawKey,
    roles: &HashMap<String, Role>,
    defaults: KeyDefaults,
    (previous, in_flight): (Option<&Snapshot>, Option<&KeyInFlightTable>),
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> Option<Key> {
    let before = errs.0.len();
    let p = |f: &str| format!("keys[{i}].{f}");
    if !crate::auth::token::is_valid_id(&k.id) {
        // Echoed only when too short to be a token (≥ 43 characters) pasted into the wrong field.
        let shown = if k.id.chars().count() <= 32 {
            format!("{:?} ", k.id)
        } else {
            String::new()
        };
        errs.push(
            p("id"),
            format!("invalid key id {shown}(use [a-z0-9-], 1 to 32 characters)"),
        );
    }
    // Never echo the value: it may be a plaintext token pasted by mistake.
    let hash = match PhcHash::parse(&k.hash) {
        Ok(h) => {
            if let Some(w) = h.weakness() {
                warnings.push(format!("{}: {w}", p("hash")));
            }
            Some(h)
        }
        Err(m) => {
            errs.push(p("hash"), m);
            None
        }
    };
    let no_role = Role::default();
    let role = match &k.role {
        None => &no_role,
        Some(name) => match roles.get(name) {
            Some(r) => r,
            None => {
                let mut defined: Vec<&str> = roles
                    .keys()
                    .map(String::as_str)
                    .filter(|n| !BUILTIN_ROLES.contains(n))
                    .collect();
                defined.sort_unstable();
                let defined = if defined.is_empty() {
                    String::new()
                } else {
                    format!(", defined: {}", defined.join(", "))
                };
                // A role name is not secret; shown if it is short enough not to be a token.
                let shown = if name.chars().count() <= 32 {
                    format!("{name:?} ")
                } else {
                    String::new()
                };
                errs.push(
                    p("role"),
                    format!(
                        "unknown role {shown}(built-in: {}{defined})",
                        BUILTIN_ROLES.join(", ")
                    ),
                );
                &no_role
            }
        },
    };
    let rate = match &k.rate_limit {
        Some(s) => match super::parse_rate(s) {
            Ok(r) => Some(r),
            Err(m) => {
                errs.push(p("rate_limit"), m);
                None
            }
        },
        None => role.rate.or(defaults.rate),
    };
    if k.burst == Some(0) {
        errs.push(p("burst"), "must be at least 1");
    }
    if k.max_concurrent == Some(0) {
        errs.push(p("max_concurrent"), "must be at least 1");
    }
    let max_concurrent = k
        .max_concurrent
        .or(role.max_concurrent)
        .unwrap_or(defaults.max_concurrent);
    let burst = k.burst.or(role.burst);
    if burst.is_some() && rate.is_none() {
        let at = if k.burst.is_some() {
            p("burst")
        } else {
            format!("roles.{}.burst", k.role.as_deref().unwrap_or_default())
        };
        errs.push(at, "needs rate_limit (or auth.default_rate_limit)");
    }
    let allow = match &k.allow {
        Some(l) => Some(super::cidr_list(l, &p("allow"), errs)),
        None => role.allow.clone(),
    };
    let methods = match &k.methods {
        Some(ms) => Some(parse_methods(ms, &p("methods"), errs)),
        None => role.methods.clone(),
    };
    let paths = match &k.paths {
        Some(ps) => Some(parse_paths(ps, &p("paths"), errs)),
        None => role.paths.clone(),
    };
    let quota = match &k.quota {
        Some(s) => crate::quota::parse_quota(s)
            .map_err(|m| errs.push(p("quota"), m))
            .ok(),
        None => role.quota,
    };
    let rotation_period = match &k.rotation_period {
        Some(s) => parse_period(s, "state.rotation_period", &p("rotation_period"), errs),
        None => role.rotation_period,
    };
    let expires = k
        .expires
        .as_ref()
        .and_then(|e| match super::parse_instant(&e.as_text()) {
            Ok(t) => Some(t),
            Err(m) => {
                errs.push(p("expires"), m);
                None
            }
        });
    let created = k
        .created
        .as_ref()
        .and_then(|e| match super::parse_instant(&e.as_text()) {
            Ok(t) => Some(t),
            Err(m) => {
                errs.push(p("created"), m);
                None
            }
        });
    if errs.0.len() != before {
        return None;
    }
    let hash = hash?;
    let old = previous.and_then(|s| s.keys.get(k.id.as_str()));
    // Carry over what must survive a reload: the verified cache (only if the hash is the same)
    // and the rate-limit bucket (only if the quota is the same).
    let verified = match old {
        Some(o) if o.hash.fingerprint() == hash.fingerprint() => o.verified.clone(),
        _ => Default::default(),
    };
    let limiter = rate.map(|r| {
        let burst = burst.unwrap_or(r.count);
        match old.and_then(|o| o.limiter.as_ref()) {
            Some(l) if l.rate() == r && l.burst() == burst => l.clone(),
            _ => Arc::new(KeyLimiter::new(r, burst)),
        }
    });
    Some(Key {
        max_concurrent,
        // Requests in flight stay counted across any sequence of reloads.
        in_flight: match in_flight {
            Some(table) => table.counter(&k.id),
            None => old.map(|o| o.in_flight.clone()).unwrap_or_default(),
        },
        id: k.id.as_str().into(),
        id_header: http::HeaderValue::from_str(&k.id).ok()?,
        hash,
        verified,
        limiter,
        allow,
        scope: Scope::new(methods, paths),
        expires,
        created,
        disabled: k.disabled,
        role: k.role.as_deref().map(Arc::from),
        quota,
        rotation_period,
    })
}
