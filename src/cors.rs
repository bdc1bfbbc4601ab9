//! CORS preflights (`[auth] cors_preflight = "forward"`, default off; fresh user T5-25).
//!
//! A browser asks an API on another origin whether it may send a request with an API key by an
//! `OPTIONS` preflight (Fetch standard, "CORS-preflight request"): it carries `Origin` and
//! `Access-Control-Request-Method` (and `Access-Control-Request-Headers: x-api-key`) but never
//! credentials. Refused 401, the browser never sends the real request, which would have carried
//! the key. With the option on, a request that **is** a preflight goes to the upstream without
//! a key, so the upstream's CORS middleware (Starlette's `CORSMiddleware`, …) can answer it:
//!
//! * only `OPTIONS` with exactly one `Origin` and one `Access-Control-Request-Method`, no body,
//!   and no credential (credential header, `Authorization`, `Proxy-Authorization`): an
//!   `OPTIONS` without them is not a preflight and needs a key as before (lesson of Kong's
//!   first key-auth patch, which skipped every OPTIONS, and of `basic-auth-connect`'s "not all
//!   OPTIONS requests are CORS"; Spring detects preflights the same way);
//! * after the global allow/deny and the protocol checks, like every request; the failed-auth
//!   budget is neither consulted nor charged (nothing is authenticated);
//! * only an allow-list of request fields reaches the upstream (the CORS request fields and a
//!   few harmless ones, [`FORWARDED`]), plus keygate's forwarding fields (a trusted proxy's
//!   `X-Forwarded-For` chain extended as for any request): no cookie, no credential, no custom
//!   header, no body; no identity header (no key);
//! * per client (IPv4 address or IPv6 /64) at most `cors_preflight_limit` preflights (default
//!   `"600/min"`, GCRA): preflights are unauthenticated load on the upstream. Over it: 429.
//!
//! The preflight's detection rests on request fields anyone can send, so what this option
//! really opens is: "unauthenticated `OPTIONS` requests carrying those two fields reach the
//! upstream". That is harmless for an upstream whose CORS layer answers preflights itself and
//! whose handlers do nothing for `OPTIONS`, and not for one that runs application code for
//! `OPTIONS` (a catch-all route, a framework that dispatches OPTIONS to handlers): hence off by
//! default, and docs/access.md says what to check before turning it on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request};
use hyper::body::{Body as _, Incoming};
use tracing::Level;

use crate::body::{RequestBody, RequestStats, ResponseBody};
use crate::forward::{ForwardInfo, UpstreamError, rewrite_request_headers};
use crate::limits::Rate;
use crate::log::{ClientEvent, client_event, request_id_str};
use crate::metrics;
use crate::proto::strip_hop_by_hop;
use crate::reject::Reject;
use crate::webhook::{Arrival, Outcome};

static ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-request-private-network");
static SEC_FETCH_MODE: HeaderName = HeaderName::from_static("sec-fetch-mode");
static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
static SEC_FETCH_DEST: HeaderName = HeaderName::from_static("sec-fetch-dest");

/// The request fields a forwarded preflight keeps: what a browser sends on one and a CORS
/// layer may read. Everything else the client sent is dropped.
pub static FORWARDED: [&HeaderName; 11] = [
    &header::ORIGIN,
    &header::ACCESS_CONTROL_REQUEST_METHOD,
    &header::ACCESS_CONTROL_REQUEST_HEADERS,
    &ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK,
    &header::USER_AGENT,
    &header::ACCEPT,
    &header::ACCEPT_LANGUAGE,
    &header::REFERER,
    &SEC_FETCH_MODE,
    &SEC_FETCH_SITE,
    &SEC_FETCH_DEST,
];

/// Whether `req` is a CORS preflight as the Fetch standard sends one (see the module doc).
/// `credential` is `[auth] header`.
pub fn is_preflight(req: &Request<Incoming>, credential: &HeaderName) -> bool {
    let h = req.headers();
    let one = |name: &HeaderName| {
        let mut all = h.get_all(name).iter();
        all.next().is_some_and(|v| !v.is_empty()) && all.next().is_none()
    };
    req.method() == Method::OPTIONS
        && req.uri().path().starts_with('/')
        && one(&header::ORIGIN)
        && one(&header::ACCESS_CONTROL_REQUEST_METHOD)
        && !h.contains_key(credential)
        && !h.contains_key(header::AUTHORIZATION)
        && !h.contains_key(header::PROXY_AUTHORIZATION)
        && req.body().is_end_stream()
}

/// Clients tracked at most; past that, the least useful entries (budget full again) are
/// dropped, and if none is, newcomers share one allowance.
const MAX_CLIENTS: usize = 50_000;

/// Preflights per client: a GCRA per IPv4 address or IPv6 /64 (as the failed-auth throttle
/// counts clients), bounded in memory ([`MAX_CLIENTS`] entries, ~2 MiB).
pub struct PreflightBudget {
    rate: Rate,
    /// Emission interval and tolerance (burst − 1 intervals), ns.
    interval: u64,
    tolerance: u64,
    base: Instant,
    tat: Mutex<HashMap<u128, u64>>,
}

/// The key a client's budget is kept under (also for everyone once the table is full).
const OVERFLOW: u128 = u128::MAX;

impl PreflightBudget {
    pub fn new(rate: Rate) -> Self {
        let interval = u64::try_from((rate.period / rate.count.max(1)).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        PreflightBudget {
            rate,
            interval,
            tolerance: interval.saturating_mul(u64::from(rate.count.max(1) - 1)),
            base: Instant::now(),
            tat: Mutex::new(HashMap::new()),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one preflight from `ip`'s budget, or `Err(seconds ≥ 1)` until it has room.
    pub fn admit(&self, ip: IpAddr) -> Result<(), u64> {
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut t = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = crate::limits::client_key(ip);
        if !t.contains_key(&key) && t.len() >= MAX_CLIENTS {
            t.retain(|_, tat| *tat > now);
            if t.len() >= MAX_CLIENTS {
                key = OVERFLOW;
            }
        }
        let tat = t.get(&key).copied().unwrap_or(now).max(now);
        let free_at = tat.saturating_sub(self.tolerance);
        if free_at > now {
            return Err((free_at - now).div_ceil(1_000_000_000).max(1));
        }
        t.insert(key, tat + self.interval);
        Ok(())
    }
}

/// Forwards a preflight (already through `pipeline::gate`) to the upstream, unauthenticated,
/// with only the [`FORWARDED`] fields; its client must be within `budget`.
pub async fn forward(req: Request<Incoming>, budget: &PreflightBudget, a: &Arrival<'_>) -> Outcome {
    let mut held = crate::upstream_cap::Held::default();
    let mut upstream_status = None;
    let stats = std::sync::Arc::new(RequestStats::default());
    let response = forward_inner(req, budget, a, &stats, &mut upstream_status, &mut held).await;
    Outcome {
        response,
        upstream_status,
        stats: Some(stats),
        held,
    }
}

async fn forward_inner(
    req: Request<Incoming>,
    budget: &PreflightBudget,
    a: &Arrival<'_>,
    stats: &std::sync::Arc<RequestStats>,
    upstream_status: &mut Option<u16>,
    held: &mut crate::upstream_cap::Held,
) -> Result<http::Response<ResponseBody>, Reject> {
    let snap = a.snap;
    if let Err(retry_after) = budget.admit(a.client_ip) {
        client_event!(ClientEvent::CorsPreflight, a.client_ip, Level::WARN, event = "cors_preflight_limited", request_id = request_id_str(a.request_id), client_ip = %a.client_ip, retry_after, "client over [auth] cors_preflight_limit");
        return Err(Reject::RateLimited { retry_after });
    }
    let client_authority = crate::proto::client_authority(&req);
    let (parts, _empty) = req.into_parts();
    let mut headers = HeaderMap::with_capacity(FORWARDED.len() + 8);
    for name in FORWARDED {
        for v in parts.headers.get_all(name) {
            headers.append(name.clone(), v.clone());
        }
    }
    let peer = a.peer.to_canonical();
    let peer_is_trusted_proxy = snap.access.is_trusted_proxy(peer);
    // A trusted proxy's chain goes on (`rewrite_request_headers` extends it).
    if peer_is_trusted_proxy {
        for v in parts.headers.get_all(&crate::forward::X_FORWARDED_FOR) {
            headers.append(crate::forward::X_FORWARDED_FOR.clone(), v.clone());
        }
    }
    crate::proto::append_via(parts.version, &mut headers);
    let none = HeaderValue::from_static("");
    rewrite_request_headers(
        &mut headers,
        &ForwardInfo {
            peer,
            peer_value: crate::forward::ip_value(peer),
            peer_is_trusted_proxy,
            request_id: a.request_id,
            identity_header: &snap.auth.identity_header,
            key_id: &none,
            credential_header: &snap.auth.header,
            upgrade: None,
            client_ip: a.client_ip,
            client_authority: client_authority.as_ref(),
            host_from_client: snap.forwarding.host == crate::proto::HostMode::Client,
        },
    );
    // No key: no identity.
    headers.remove(&snap.auth.identity_header);
    let mut up = Request::new(RequestBody::buffered(Bytes::new(), stats.clone()));
    *up.method_mut() = Method::OPTIONS;
    *up.uri_mut() = snap.upstream.uri_for(parts.uri.path_and_query());
    *up.version_mut() = http::Version::HTTP_11;
    *up.headers_mut() = headers;

    match a.upstream_cap.acquire_for(&snap.caps).await {
        Ok(p) => held.upstream = Some(p),
        Err(why) => return Err(why.refuse(&snap.caps, a.client_ip, a.request_id, None, None)),
    }
    let (mut resp, pacing) = match crate::pipeline::Exchange::start(snap, up, stats, held).await {
        Ok(r) => r,
        Err(e) => {
            metrics::global().upstream_error(e.kind());
            client_event!(ClientEvent::UpstreamError, a.client_ip, Level::ERROR, event = "upstream_error", kind = e.kind(), request_id = request_id_str(a.request_id), error = %e);
            return Err(match e {
                UpstreamError::Timeout => Reject::GatewayTimeout,
                _ => Reject::BadGateway,
            });
        }
    };
    *upstream_status = Some(resp.status().as_u16());
    strip_hop_by_hop(resp.headers_mut(), None);
    Ok(resp.map(|b| ResponseBody::upstream(b).paced_by(pacing)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_per_client_and_refills() {
        let b = PreflightBudget::new(Rate {
            count: 3,
            period: std::time::Duration::from_secs(60),
        });
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let same64: IpAddr = "2001:db8::1".parse().unwrap();
        let same64b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            assert!(b.admit(one).is_ok());
            assert!(b.admit(same64).is_ok());
        }
        let wait = b.admit(one).unwrap_err();
        assert!((1..=20).contains(&wait), "{wait}");
        assert!(b.admit(same64b).is_err(), "one IPv6 /64 is one client");
        assert!(b.admit(other).is_ok());
    }
}
