//! `[[webhooks]]` → [`Routes`] (SPEC §10). Every problem is reported with its TOML path
//! (`webhooks[1].secrets[0]`); secret values never appear in a message.
//!
//! Secrets are resolved here, so a reload re-reads every environment variable, file and
//! credential. What must survive a reload is carried over for a route with the same id: its
//! duplicate-delivery memory (same window and capacity), from the previous snapshot or, for a
//! route removed by an earlier reload and put back, from the runtime's
//! [`DeliveryStores`]; and its rate-limit bucket (same rate and burst), from the previous
//! snapshot only (a removed route's rate limit starts afresh, as a key's does).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use super::{Errors, cidr_list, parse_duration, parse_rate};
use crate::config::raw::RawWebhook;
use crate::config::secret::Secret;
use crate::config::{ConfigErrors, Snapshot};
use crate::limits::KeyLimiter;
use crate::webhook::replay::{DEFAULT_CAPACITY, DeliveryStore, DeliveryStores};
use crate::webhook::{IdSource, Route, Routes, Scheme};

/// Default `max_body_bytes`: 1 MiB.
pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
/// Default `tolerance`.
pub const DEFAULT_TOLERANCE: &str = "5m";
/// Default `dedupe_window`: a day, so a sender's retries of a delivery whose 2xx it never saw
/// (GitHub redeliveries, Stripe's and Standard Webhooks' retry schedules over hours) are still
/// recognised; independent of `tolerance` so schemes without a timestamp are covered too.
pub const DEFAULT_DEDUPE_WINDOW: &str = "24h";
/// Most ids `dedupe_window` ever needs: 1 000 000 per route (~ 200 MiB locally); more is a
/// config mistake.
pub const MAX_DEDUPE_IDS: usize = 1_000_000;

/// `introspection` is the introspection endpoint's path (`None` when turned off): a webhook
/// route may not share a single request path with it (see [`shadows_introspection`]).
pub(super) fn build(
    raw: &[RawWebhook],
    base: &Path,
    (previous, kept): (Option<&Snapshot>, Option<&DeliveryStores>),
    introspection: Option<&str>,
    shared: bool,
    errs: &mut Errors,
    warnings: &mut Vec<String>,
) -> Routes {
    if let (Some(kept), Some(prev)) = (kept, previous) {
        kept.adopt(prev.webhooks.0.iter().map(|r| &**r));
    }
    let mut routes: Vec<Arc<Route>> = Vec::with_capacity(raw.len());
    // (index, normalised path) of every route with a valid path, for the overlap check.
    let mut paths: Vec<(usize, String)> = Vec::new();
    for (i, w) in raw.iter().enumerate() {
        let p = |f: &str| format!("webhooks[{i}].{f}");
        if raw[..i].iter().any(|o| o.id == w.id) {
            errs.push(p("id"), format!("duplicate webhook id {:?}", w.id));
        }
        if let Some(path) = check_path(&w.path, &p("path"), errs) {
            for (j, other) in &paths {
                if overlaps(other, &path) {
                    errs.push(
                        p("path"),
                        format!(
                            "{:?} overlaps webhooks[{j}].path ({other:?}): a request could match both routes",
                            path
                        ),
                    );
                }
            }
            if let Some(ip) = introspection.filter(|ip| shadows_introspection(&path, ip)) {
                errs.push(
                    p("path"),
                    format!(
                        "{path:?} overlaps the introspection endpoint {ip:?} (introspection.path): \
                         webhook routes are matched first, so key holders could no longer reach it; \
                         choose another path, or move or turn off [introspection]"
                    ),
                );
            }
            if path == "/" {
                warnings.push(format!(
                    "{}: \"/\" makes every path a webhook route: no request needs an API key",
                    p("path")
                ));
            }
            paths.push((i, path));
        }
        let old = previous.and_then(|s| s.webhooks.get(&w.id));
        // The route's delivery ids: from the snapshot being replaced, else from the runtime's
        // stores (a route removed by an earlier reload and now put back).
        let store = (old.map(|r| r.deliveries.clone())).or_else(|| kept?.get(&w.id));
        if let Some(route) = build_route(i, w, base, old.map(|r| &**r), store, shared, errs) {
            routes.push(Arc::new(route));
        }
    }
    if let Some(kept) = kept {
        kept.prune(|id| raw.iter().any(|w| w.id == id));
    }
    Routes(routes)
}

/// Whether webhook route `route` (exact, or a prefix ending in `/`) matches any request path
/// the introspection endpoint owns: `introspection` itself (with or without a trailing `/`)
/// and everything under it (answered 404 there). So `/.well-known/keygate/key`,
/// `/.well-known/keygate/key/`, `/.well-known/keygate/key/x` and the prefixes `/.well-known/`
/// or `/` all collide; an exact `/.well-known/keygate` does not (it matches no path of the
/// endpoint's).
fn shadows_introspection(route: &str, introspection: &str) -> bool {
    crate::access::path_has_prefix(route, introspection)
        || (route.ends_with('/') && format!("{introspection}/").starts_with(route))
}

/// Two route paths overlap if one request path could match both.
fn overlaps(a: &str, b: &str) -> bool {
    a == b || (a.ends_with('/') && b.starts_with(a)) || (b.ends_with('/') && a.starts_with(b))
}

fn check_path(s: &str, path: &str, errs: &mut Errors) -> Option<String> {
    if !s.starts_with('/') {
        errs.push(path, format!("path {s:?} must start with '/'"));
        return None;
    }
    if crate::access::is_normal_path(s) && !s.contains('?') && !s.contains('#') {
        return Some(s.to_string());
    }
    errs.push(
        path,
        format!(
            "path {s:?} must be in normal form (no '.'/'..' segments, '//', '\\\\', percent escapes, ';' parameters, query or fragment)"
        ),
    );
    None
}

/// The HMAC keys of one route, resolved from its references.
fn keys(
    i: usize,
    w: &RawWebhook,
    scheme: Option<Scheme>,
    base: &Path,
    errs: &mut Errors,
) -> Vec<Secret> {
    let mut refs: Vec<(String, &crate::config::secret::SecretRef)> = w
        .secrets
        .iter()
        .enumerate()
        .map(|(j, r)| (format!("webhooks[{i}].secrets[{j}]"), r))
        .collect();
    if let Some(r) = &w.secret {
        if !refs.is_empty() {
            errs.push(
                format!("webhooks[{i}].secret"),
                "use either secret or secrets, not both",
            );
        }
        refs.push((format!("webhooks[{i}].secret"), r));
    }
    if refs.is_empty() {
        errs.push(
            format!("webhooks[{i}].secrets"),
            "at least one secret is needed (a reference: { env = \"NAME\" }, { file = \"PATH\" } or { credential = \"NAME\" })",
        );
    }
    let mut keys = Vec::with_capacity(refs.len());
    for (path, r) in refs {
        match r.resolve(base) {
            Ok(secret) => match scheme.map(|s| s.key_from_secret(&secret)) {
                Some(Ok(key)) => keys.push(key),
                Some(Err(m)) => errs.push(path, m),
                None => {}
            },
            Err(m) => errs.push(path, m),
        }
    }
    keys
}

fn build_route(
    i: usize,
    w: &RawWebhook,
    base: &Path,
    old: Option<&Route>,
    old_store: Option<Arc<DeliveryStore>>,
    shared: bool,
    errs: &mut Errors,
) -> Option<Route> {
    let before = errs.0.len();
    let p = |f: &str| format!("webhooks[{i}].{f}");
    if !crate::auth::token::is_valid_id(&w.id) {
        errs.push(
            p("id"),
            format!(
                "invalid webhook id {:?} (use [a-z0-9-], 1 to 32 characters)",
                w.id
            ),
        );
    }
    let scheme = Scheme::parse(&w.scheme);
    if scheme.is_none() {
        errs.push(
            p("scheme"),
            format!(
                "unknown scheme {:?} (use \"hmac-sha256-hex\", \"github\", \"stripe\" or \"standard-webhooks\")",
                w.scheme
            ),
        );
    }
    let keys = keys(i, w, scheme, base, errs);
    let header_text = w.header.clone().unwrap_or_else(|| {
        scheme
            .map_or("x-webhook-signature", |s| s.default_header())
            .to_string()
    });
    let header = match HeaderName::from_bytes(header_text.as_bytes()) {
        Ok(h) if !crate::forward::is_hop_by_hop(&h) && h != http::header::HOST => Some(h),
        _ => {
            errs.push(p("header"), format!("invalid header name {header_text:?}"));
            None
        }
    };
    // Standard Webhooks: `<prefix>-signature` goes with `<prefix>-id` and `<prefix>-timestamp`.
    let (mut std_id, mut std_ts) = (
        HeaderName::from_static("webhook-id"),
        HeaderName::from_static("webhook-timestamp"),
    );
    if let (Some(Scheme::StandardWebhooks), Some(h)) = (scheme, &header) {
        match h.as_str().strip_suffix("-signature") {
            Some(prefix) if !prefix.is_empty() => {
                std_id = HeaderName::from_bytes(format!("{prefix}-id").as_bytes()).ok()?;
                std_ts = HeaderName::from_bytes(format!("{prefix}-timestamp").as_bytes()).ok()?;
            }
            _ => errs.push(
                p("header"),
                "a standard-webhooks header must be named <prefix>-signature (webhook-signature, svix-signature)",
            ),
        }
    }
    let methods: Vec<Method> = match &w.methods {
        None => vec![Method::POST],
        Some(ms) => {
            if ms.is_empty() {
                errs.push(p("methods"), "must name at least one method");
            }
            ms.iter()
                .enumerate()
                .filter_map(|(j, m)| {
                    match Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()) {
                        Ok(m) => Some(m),
                        Err(_) => {
                            errs.push(
                                format!("webhooks[{i}].methods[{j}]"),
                                format!("invalid method {m:?}"),
                            );
                            None
                        }
                    }
                })
                .collect()
        }
    };
    let max_body_bytes = w.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
    let budget = crate::buffer_budget::WEBHOOK_BUFFER_SHARE as u64;
    if max_body_bytes > budget {
        // A delivery is read whole out of the webhooks' share of the request-buffer budget: a
        // larger one would be refused 503 on every retry (a fresh user's 70 MB delivery).
        errs.push(
            p("max_body_bytes"),
            format!(
                "must be at most {budget} (32 MiB: a delivery is held whole in memory, out of the webhooks' share of the request-buffer budget)"
            ),
        );
    }
    if max_body_bytes == 0 {
        errs.push(p("max_body_bytes"), "must be at least 1");
    }
    let tolerance = match parse_duration(w.tolerance.as_deref().unwrap_or(DEFAULT_TOLERANCE)) {
        Ok(d) if d >= Duration::from_secs(1) => d.as_secs(),
        Ok(_) => {
            errs.push(p("tolerance"), "must be at least 1s");
            1
        }
        Err(m) => {
            errs.push(p("tolerance"), m);
            1
        }
    };
    let dedupe_window = match parse_duration(
        w.dedupe_window.as_deref().unwrap_or(DEFAULT_DEDUPE_WINDOW),
    ) {
        Ok(d) if d < Duration::from_secs(1) => {
            errs.push(p("dedupe_window"), "must be at least 1s");
            d
        }
        // A replay within the tolerance must still be recognised as one.
        Ok(d) if scheme.is_some_and(Scheme::is_timestamped) && d.as_secs() < tolerance => {
            errs.push(
                p("dedupe_window"),
                format!(
                    "must be at least the tolerance ({tolerance}s): a delivery replayed within the tolerance would be forwarded again"
                ),
            );
            d
        }
        Ok(d) => d,
        Err(m) => {
            errs.push(p("dedupe_window"), m);
            Duration::ZERO
        }
    };
    let dedupe_max_ids = w.dedupe_max_ids.unwrap_or(DEFAULT_CAPACITY);
    if !(1..=MAX_DEDUPE_IDS).contains(&dedupe_max_ids) {
        errs.push(
            p("dedupe_max_ids"),
            format!("must be between 1 and {MAX_DEDUPE_IDS}"),
        );
    }
    let id_from = w.id_from.as_ref().and_then(|f| match (&f.header, &f.json) {
        (Some(h), None) => match HeaderName::from_bytes(h.as_bytes()) {
            Ok(h) => Some(IdSource::Header(h)),
            Err(_) => {
                errs.push(p("id_from.header"), format!("invalid header name {h:?}"));
                None
            }
        },
        (None, Some(field)) if !field.is_empty() => Some(IdSource::JsonField(field.clone())),
        _ => {
            errs.push(
                p("id_from"),
                "exactly one of { header = \"NAME\" } or { json = \"FIELD\" } (a top-level field)",
            );
            None
        }
    });
    let allow = w.allow.as_ref().map(|l| cidr_list(l, &p("allow"), errs));
    let rate = w.rate_limit.as_deref().and_then(|s| match parse_rate(s) {
        Ok(r) => Some(r),
        Err(m) => {
            errs.push(p("rate_limit"), m);
            None
        }
    });
    if w.burst == Some(0) {
        errs.push(p("burst"), "must be at least 1");
    }
    if w.burst.is_some() && rate.is_none() {
        errs.push(p("burst"), "needs rate_limit");
    }
    if errs.0.len() != before {
        return None;
    }
    let limiter = rate.map(|r| {
        let burst = w.burst.unwrap_or(r.count);
        match old.and_then(|o| o.limiter.as_ref()) {
            Some(l) if l.rate() == r && l.burst() == burst => l.clone(),
            _ => Arc::new(KeyLimiter::new(r, burst)),
        }
    });
    let window = dedupe_window;
    let deliveries = match old_store {
        Some(o) if o.settings() == (window, dedupe_max_ids, shared) => o,
        // A changed window or capacity keeps the ids already known, under the new settings
        // (a fresh user, T5-22/T6-4: raising dedupe_window, as docs/webhooks.md recommends,
        // forgot every accepted delivery and replays were forwarded again).
        Some(o) => Arc::new(o.resettled(window, dedupe_max_ids, shared)),
        None if shared => Arc::new(DeliveryStore::shared(window, dedupe_max_ids)),
        None => Arc::new(DeliveryStore::local(window, dedupe_max_ids)),
    };
    Some(Route {
        id: w.id.as_str().into(),
        id_header: HeaderValue::from_str(&w.id).ok()?,
        path: w.path.clone(),
        scheme: scheme?,
        header: header?,
        std_id_header: std_id,
        std_timestamp_header: std_ts,
        keys,
        allow_header: HeaderValue::from_str(
            &methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        )
        .ok()?,
        methods,
        max_body_bytes,
        tolerance,
        id_from,
        allow,
        limiter,
        deliveries,
        forward_signature: w.forward_signature.unwrap_or(true),
    })
}

/// One route by id, built alone (for `keygate webhook sign`): its scheme, signature header and
/// first key. Only that route's fields are read; TLS files and the rest are not needed.
pub fn webhook_route(
    raw: &crate::config::raw::RawConfig,
    id: &str,
    base: &Path,
) -> Result<Arc<Route>, ConfigErrors> {
    let Some(i) = raw.webhooks.iter().position(|w| w.id == id) else {
        return Err(ConfigErrors::one(
            "webhooks",
            format!("no webhook route with id {id:?}"),
        ));
    };
    let mut errs = Errors(Vec::new());
    let route = build_route(i, &raw.webhooks[i], base, None, None, false, &mut errs);
    match route {
        Some(r) if errs.0.is_empty() => Ok(Arc::new(r)),
        _ => Err(ConfigErrors(errs.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn introspection_collisions() {
        let ip = "/.well-known/keygate/key";
        for route in [
            "/.well-known/keygate/key",
            "/.well-known/keygate/key/",
            "/.well-known/keygate/key/x",
            "/.well-known/keygate/key/x/",
            "/.well-known/keygate/",
            "/.well-known/",
            "/",
        ] {
            assert!(shadows_introspection(route, ip), "{route}");
        }
        for route in [
            "/.well-known/keygate",
            "/.well-known/keygate/keys",
            "/.well-known/keygate/keys/",
            "/.well-known/keygate/ke",
            "/.well-known/other/",
            "/hooks/",
        ] {
            assert!(!shadows_introspection(route, ip), "{route}");
        }
    }

    #[test]
    fn overlap_rules() {
        assert!(overlaps("/a", "/a"));
        assert!(overlaps("/a/", "/a/b"));
        assert!(overlaps("/a/b", "/a/"));
        assert!(overlaps("/a/", "/a/b/"));
        assert!(!overlaps("/a", "/a/"));
        assert!(!overlaps("/a", "/ab"));
        assert!(!overlaps("/a/", "/ab/"));
    }
}
