//! Key-lifecycle sections: `[quota_costs]`, `[key_networks]`, `[introspection]`.

use super::Errors;
use crate::config::raw::{RawIntrospection, RawKeyNetworks, RawQuotaCosts};
use crate::networks::NetworkPolicy;
use crate::quota::{CostRule, CostTable};

/// The introspection endpoint's default path (an RFC 8615 well-known URI).
pub const DEFAULT_INTROSPECTION_PATH: &str = "/.well-known/keygate/key";

pub(super) fn quota_costs(raw: &RawQuotaCosts, errs: &mut Errors) -> CostTable {
    let rules = raw
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
            Some(CostRule {
                methods,
                path,
                cost: r.cost,
            })
        })
        .collect();
    CostTable::new(raw.default.unwrap_or(1), rules)
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
