//! `[roles.NAME]`: named sets of key settings (SPEC §9). A key that says `role = "NAME"` takes
//! each of the role's fields unless it sets that field itself; fields are merged one by one
//! (a key with its own `rate_limit` keeps the role's `burst` unless it sets `burst` too).
//!
//! Built in, and not redefinable (their meaning must not depend on a file): `read-only` (GET,
//! HEAD and OPTIONS on every path) and `full` (no restriction of its own).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use http::Method;

use super::Errors;
use crate::access::IpList;
use crate::config::raw::RawRole;
use crate::limits::Rate;
use crate::quota::Quota;

pub const BUILTIN_ROLES: [&str; 2] = ["read-only", "full"];

/// A role with every field parsed.
#[derive(Debug, Clone, Default)]
pub struct Role {
    pub methods: Option<Vec<Method>>,
    pub paths: Option<Vec<String>>,
    pub rate: Option<Rate>,
    pub burst: Option<u32>,
    /// Requests in flight at once for each key of the role (`max_concurrent`).
    pub max_concurrent: Option<u32>,
    pub quota: Option<Quota>,
    pub allow: Option<IpList>,
    pub rotation_period: Option<Duration>,
}

/// Parses every `[roles.NAME]` and adds the built-ins. Errors are named `roles.NAME.field`.
pub(super) fn build_roles(
    raw: &BTreeMap<String, RawRole>,
    errs: &mut Errors,
) -> HashMap<String, Role> {
    let mut roles = HashMap::with_capacity(raw.len() + BUILTIN_ROLES.len());
    roles.insert(
        "read-only".to_string(),
        Role {
            methods: Some(vec![Method::GET, Method::HEAD, Method::OPTIONS]),
            ..Default::default()
        },
    );
    roles.insert("full".to_string(), Role::default());
    for (name, r) in raw {
        let p = |f: &str| format!("roles.{name}.{f}");
        if BUILTIN_ROLES.contains(&name.as_str()) {
            errs.push(
                format!("roles.{name}"),
                "is a built-in role and cannot be redefined; choose another name",
            );
            continue;
        }
        if !crate::auth::token::is_valid_id(name) {
            errs.push(
                format!("roles.{name}"),
                "invalid role name (use [a-z0-9-], 1 to 32 characters)",
            );
            continue;
        }
        let rate = r.rate_limit.as_deref().and_then(|s| {
            super::parse_rate(s)
                .map_err(|m| errs.push(p("rate_limit"), m))
                .ok()
        });
        if r.burst == Some(0) {
            errs.push(p("burst"), "must be at least 1");
        }
        if r.max_concurrent == Some(0) {
            errs.push(p("max_concurrent"), "must be at least 1");
        }
        let role = Role {
            max_concurrent: r.max_concurrent,
            methods: r
                .methods
                .as_ref()
                .map(|m| super::keys::parse_methods(m, &p("methods"), errs)),
            paths: r
                .paths
                .as_ref()
                .map(|ps| super::keys::parse_paths(ps, &p("paths"), errs)),
            rate,
            burst: r.burst,
            quota: r.quota.as_deref().and_then(|s| {
                crate::quota::parse_quota(s)
                    .map_err(|m| errs.push(p("quota"), m))
                    .ok()
            }),
            allow: r
                .allow
                .as_ref()
                .map(|l| super::cidr_list(l, &p("allow"), errs)),
            rotation_period: r.rotation_period.as_deref().and_then(|s| {
                super::keys::parse_period(s, "state.rotation_period", &p("rotation_period"), errs)
            }),
        };
        roles.insert(name.clone(), role);
    }
    roles
}
