//! `[auth] cors_preflight` and `cors_preflight_limit` (`src/cors.rs`): whether CORS preflights
//! go to the upstream without a key, and how many per client.

use std::sync::Arc;

use super::Errors;
use crate::config::raw::RawAuth;
use crate::cors::PreflightBudget;

/// The default `cors_preflight_limit`: a browser sends one preflight per URL, method and
/// header set it has not cached (`Access-Control-Max-Age`, 5 s when the upstream sends none),
/// so a single-page app listing items may send several a second; an office behind one NAT
/// address is many browsers.
pub const DEFAULT_LIMIT: &str = "600/min";

/// `None` unless `cors_preflight = "forward"` (the default, `"refuse"`, treats a preflight as
/// any request without a key: 401).
pub(super) fn build(a: &RawAuth, errs: &mut Errors) -> Option<Arc<PreflightBudget>> {
    let forward = match a.cors_preflight.as_deref().unwrap_or("refuse") {
        "refuse" => false,
        "forward" => true,
        other => {
            errs.push(
                "auth.cors_preflight",
                format!("must be \"refuse\" or \"forward\", not {other:?}"),
            );
            false
        }
    };
    let limit = a.cors_preflight_limit.as_deref();
    let rate = match super::parse_rate(limit.unwrap_or(DEFAULT_LIMIT)) {
        Ok(r) => r,
        Err(m) => {
            errs.push("auth.cors_preflight_limit", m);
            return None;
        }
    };
    if limit.is_some() && !forward {
        errs.push(
            "auth.cors_preflight_limit",
            "applies only with cors_preflight = \"forward\"",
        );
    }
    forward.then(|| Arc::new(PreflightBudget::new(rate)))
}
