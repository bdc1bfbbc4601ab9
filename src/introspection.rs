//! The key holder's own view (SPEC §9): `GET /.well-known/keygate/key` (path configurable,
//! `[introspection] enabled = false` turns it off), answered by keygate to an authenticated
//! key and never forwarded. Client developers see why they are refused without asking an
//! operator: the key's id, role, scopes, expiry, rate limit and quota (limit, remaining, reset).
//!
//! Only the presenting key's own settings appear: never its hash, never its IP allowlist or
//! network history (the operator's business), never anything about other keys. It costs no
//! quota (the counters are read, not charged); the key's rate limit applies as to any request.

use bytes::Bytes;
use http::Response;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};

use crate::auth::Key;
use crate::body::ResponseBody;
use crate::limits::RateInfo;
use crate::usage::State;

/// The 200 JSON answer. `rate` is the rate-limit state after this request took its cell.
///
/// In cluster mode the quota figures are the cluster's (read from Redis), falling back to this
/// instance's counters when Redis cannot be asked.
pub async fn answer(
    key: &Key,
    rate: Option<RateInfo>,
    state: &State,
    cluster: Option<&crate::cluster::Cluster>,
) -> Response<ResponseBody> {
    let rate_limit = key.limiter.as_ref().map(|l| {
        let r = l.rate();
        let unit = match r.period.as_secs() {
            1 => "s".to_string(),
            60 => "min".to_string(),
            3600 => "h".to_string(),
            n => format!("{n}s"),
        };
        serde_json::json!({
            "rate": format!("{}/{unit}", r.count),
            "burst": l.burst(),
            "remaining": rate.map(|i| i.remaining),
            "reset": rate.map(|i| i.reset_secs),
        })
    });
    let quota = match key.quota {
        Some(q) => {
            let now = crate::clock::now();
            let shared = match cluster {
                // Redis unavailable: what this instance knows of the cluster's usage.
                Some(c) => match c.quota_peek(&key.id, q, now).await {
                    Ok(s) => Some(s),
                    Err(_) => c.quota_known(&key.id, q, now),
                },
                None => None,
            };
            let s = match shared {
                Some(s) => s,
                None => state.quotas.peek(&key.id, q, now).await,
            };
            let resets_at = jiff::Timestamp::from_second(now + s.reset_secs as i64)
                .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                .ok();
            Some(serde_json::json!({
                "limit": q.limit,
                "period": q.period.as_str(),
                "used": s.used,
                "remaining": s.remaining,
                "reset": s.reset_secs,
                "resets_at": resets_at,
            }))
        }
        None => None,
    };
    let scope = &key.scope;
    let body = serde_json::json!({
        "id": &*key.id,
        "role": key.role.as_deref(),
        "scopes": {
            "methods": scope.methods().map(|ms| ms.iter().map(|m| m.as_str()).collect::<Vec<_>>()),
            "paths": scope.paths(),
        },
        "expires": key.expires.map(|e| e.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
        "rate_limit": rate_limit,
        "quota": quota,
    });
    let mut resp = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        crate::reject::X_CONTENT_TYPE_OPTIONS.clone(),
        HeaderValue::from_static("nosniff"),
    );
    resp
}
