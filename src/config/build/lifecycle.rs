//! Key-lifecycle sections: `[quota_costs]`, `[key_networks]`, `[introspection]`.

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;

use super::Errors;
use crate::auth::Key;
use crate::config::raw::{RawIntrospection, RawKeyNetworks, RawQuotaCosts};
use crate::networks::NetworkPolicy;
use crate::quota::{CostRule, CostTable};

/// The introspection endpoint's default path (an RFC 8615 well-known URI).
pub const DEFAULT_INTROSPECTION_PATH: &str = "/.well-known/keygate/key";

/// `[quota_costs]`, and a warning for every cost above the whole quota of a key that may send
/// such a request (its scope allows a method and path of the rule): that request can never
/// pass, which `check` should say before a client finds out (fresh user T5-18).
pub(super) fn quota_costs(
    raw: &RawQuotaCosts,
    keys: &HashMap<Box<str>, Arc<Key>>,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> CostTable {
    let rules: Vec<(usize, CostRule)> = raw
        .rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let p = |f: &str| format!("quota_costs.rules[{i}].{f}");
            let methods = r
                .methods
                .as_ref()
                .map(|m| super::keys::parse_methods(m, &p("methods"), errs));
            let path = super::keys::parse_path_prefix(&r.path, &p("path"), errs)?;
            Some((
                i,
                CostRule {
                    methods,
                    path,
                    cost: r.cost,
                },
            ))
        })
        .collect();
    let default = raw.default.unwrap_or(1);
    let mut ids: Vec<&Arc<Key>> = keys.values().filter(|k| k.quota.is_some()).collect();
    ids.sort_by(|a, b| a.id.cmp(&b.id));
    let over = |cost: u64, reaches: &dyn Fn(&Key) -> bool| -> Vec<String> {
        ids.iter()
            .filter(|k| !k.disabled && k.quota.is_some_and(|q| cost > q.limit) && reaches(k))
            .map(|k| {
                let q = k.quota.expect("filtered");
                let role = k
                    .role
                    .as_ref()
                    .map(|r| format!(", role \"{r}\""))
                    .unwrap_or_default();
                format!("key \"{}\" ({}/{}{role})", k.id, q.limit, q.period.as_str())
            })
            .collect()
    };
    let warn = |path: String, cost: u64, what: &str, keys: Vec<String>, w: &mut Vec<String>| {
        if !keys.is_empty() {
            w.push(format!(
                "{path}: {cost} is more than the whole quota of {}: its {what} can never pass \
                 (429 without Retry-After)",
                keys.join(", ")
            ));
        }
    };
    for (i, rule) in &rules {
        let what = format!(
            "{} {} requests",
            rule.methods.as_ref().map_or("all".to_string(), |ms| ms
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join("/")),
            rule.path
        );
        let keys = over(rule.cost, &|k| reaches(k, rule));
        warn(
            format!("quota_costs.rules[{i}].cost"),
            rule.cost,
            &what,
            keys,
            warnings,
        );
    }
    let keys = over(default, &|_| true);
    warn(
        "quota_costs.default".into(),
        default,
        "requests without a cheaper rule",
        keys,
        warnings,
    );
    CostTable::new(default, rules.into_iter().map(|(_, r)| r).collect())
}

/// Whether `key`'s scope lets it send a request `rule` prices: a method of the rule (GET
/// standing for HEAD too) that the scope allows, and a path under both the rule's prefix and
/// one of the scope's (either may be the longer).
fn reaches(key: &Key, rule: &CostRule) -> bool {
    let methods = match (&rule.methods, key.scope.methods()) {
        (_, None) | (None, Some(_)) => true,
        (Some(rm), Some(km)) => rm
            .iter()
            .any(|m| km.contains(m) || (*m == Method::GET && km.contains(&Method::HEAD))),
    };
    let has = crate::access::path_has_prefix;
    methods
        && key
            .scope
            .paths()
            .is_none_or(|ps| ps.iter().any(|p| has(&rule.path, p) || has(p, &rule.path)))
}

pub(super) fn key_networks(raw: &RawKeyNetworks, errs: &mut Errors) -> NetworkPolicy {
    let d = NetworkPolicy::default();
    let ipv4_prefix = raw.ipv4_prefix.unwrap_or(d.ipv4_prefix);
    if !(1..=32).contains(&ipv4_prefix) {
        errs.push("key_networks.ipv4_prefix", "must be 1 to 32");
    }
    let ipv6_prefix = raw.ipv6_prefix.unwrap_or(d.ipv6_prefix);
    if !(1..=128).contains(&ipv6_prefix) {
        errs.push("key_networks.ipv6_prefix", "must be 1 to 128");
    }
    let remember_secs = match raw.remember.as_deref() {
        None => d.remember_secs,
        Some(s) => {
            super::keys::parse_period(s, "key_networks.remember", "key_networks.remember", errs)
                .map_or(d.remember_secs, |p| {
                    i64::try_from(p.as_secs()).unwrap_or(i64::MAX)
                })
        }
    };
    let max_per_key = raw.max_per_key.unwrap_or(d.max_per_key);
    if !(1..=4096).contains(&max_per_key) {
        errs.push("key_networks.max_per_key", "must be 1 to 4096");
    }
    NetworkPolicy {
        ipv4_prefix,
        ipv6_prefix,
        remember_secs,
        max_per_key,
    }
}

pub(super) fn introspection(raw: &RawIntrospection, errs: &mut Errors) -> Option<String> {
    if raw.enabled == Some(false) {
        return None;
    }
    let path = raw.path.as_deref().unwrap_or(DEFAULT_INTROSPECTION_PATH);
    let normalised = super::keys::parse_path_prefix(path, "introspection.path", errs)?;
    if normalised == "/" {
        errs.push(
            "introspection.path",
            "must not be \"/\" (it would hide the whole upstream)",
        );
        return None;
    }
    Some(normalised.trim_end_matches('/').to_string())
}
