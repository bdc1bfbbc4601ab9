//! Signed webhook routes (SPEC §10): deliveries from senders that cannot hold an API key.
//!
//! A request whose path is a configured `[[webhooks]]` route takes this path instead of the API
//! key stages (the global IP rules and header size limit still apply first):
//!
//! ```text
//! sender allowlist → the client's failed-auth budget → method → body (read whole, up to
//!   max_body_bytes) → signature (constant time, any of the route's secrets) → timestamp
//!   tolerance (a failure of either is charged to the client's budget) → rate limit
//!   → duplicate key, from signed content only (an accepted one? answered 200 here)
//!   → forward unchanged
//! ```
//!
//! Nothing reaches the upstream before the signature is verified. The body is forwarded byte
//! for byte as received, with `X-Keygate-Webhook: <route id>` (client copies and `_` look-alikes
//! removed, and no API-key identity header); signature headers are kept so an upstream that
//! verifies again still can. Refusals are logged as `webhook_rejected` with a fixed `reason`;
//! never the secret, the signature or the payload.
//!
//! Matching: a route matches only a path already in normal form (no `.`/`..` segments, `//`,
//! or percent-encoded characters that normalise to something else). `/hooks/x/../../admin`
//! or `/hooks/%2e%2e/admin` is therefore never a webhook delivery: it goes through API-key
//! authentication like any other path, so a captured delivery cannot be re-aimed at another
//! upstream path that the upstream would resolve differently.

pub mod replay;
pub mod signature;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::Level;

use crate::access::IpList;
use crate::body::{RequestBody, RequestStats, ResponseBody};
use crate::config::Snapshot;
use crate::config::secret::Secret;
use crate::forward::{ForwardInfo, UpstreamError, rewrite_request_headers};
use crate::limits::KeyLimiter;
use crate::log::{ClientEvent, client_event, request_id_str};
use crate::metrics;
use crate::proto::strip_hop_by_hop;
use crate::reject::Reject;
pub use replay::{Asker, Claim, DeliveryStore};
pub use signature::{Failure, Scheme};

/// The header naming the route a verified delivery came through (SPEC §10).
pub static X_KEYGATE_WEBHOOK: HeaderName = HeaderName::from_static("x-keygate-webhook");

/// Why a delivery was refused: the `reason` of `webhook_rejected` and of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    MissingSignature,
    BadSignature,
    Stale,
    Replayed,
    InFlight,
    TooLarge,
    IpDenied,
    RateLimited,
    MethodNotAllowed,
    /// The route's delivery id header (`X-GitHub-Delivery`, an `id_from` header) came more
    /// than once: which one the application reads is anyone's guess, so the request is refused.
    AmbiguousId,
    /// Deliveries being read whole already hold the webhooks' half of the request-buffer
    /// budget, or the sender's address holds its share of it ([`crate::buffer_budget`]): 503.
    Busy,
    /// The client's address sent more unverified deliveries (no, a wrong or a stale signature)
    /// than `[auth] failed_auth_limit` allows: 429 before its body is read.
    Throttled,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::MissingSignature,
        Reason::BadSignature,
        Reason::Stale,
        Reason::Replayed,
        Reason::InFlight,
        Reason::TooLarge,
        Reason::IpDenied,
        Reason::RateLimited,
        Reason::MethodNotAllowed,
        Reason::AmbiguousId,
        Reason::Busy,
        Reason::Throttled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MissingSignature => "missing_signature",
            Reason::BadSignature => "bad_signature",
            Reason::Stale => "stale",
            Reason::Replayed => "replayed",
            Reason::InFlight => "in_flight",
            Reason::TooLarge => "too_large",
            Reason::IpDenied => "ip_denied",
            Reason::RateLimited => "rate_limited",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::AmbiguousId => "ambiguous_id",
            Reason::Busy => "busy",
            Reason::Throttled => "throttled",
        }
    }
}

impl From<Failure> for Reason {
    fn from(f: Failure) -> Self {
        match f {
            Failure::MissingSignature => Reason::MissingSignature,
            Failure::BadSignature => Reason::BadSignature,
            Failure::Stale => Reason::Stale,
        }
    }
}

/// Where a delivery's id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSource {
    Header(HeaderName),
    /// A top-level field of a JSON object body (a string or a number).
    JsonField(String),
}

/// One `[[webhooks]]` entry, validated.
pub struct Route {
    pub id: Arc<str>,
    pub id_header: HeaderValue,
    /// Normalised; ends with `/` for a prefix route.
    pub path: String,
    pub scheme: Scheme,
    /// The signature header (`header`, or the scheme's default).
    pub header: HeaderName,
    /// Standard Webhooks: the id and timestamp headers (`webhook-id`, `webhook-timestamp`, or
    /// `<prefix>-id`/`<prefix>-timestamp` for a `<prefix>-signature` header).
    pub std_id_header: HeaderName,
    pub std_timestamp_header: HeaderName,
    /// HMAC keys, one per configured secret (rotation: any may match).
    pub keys: Vec<Secret>,
    pub methods: Vec<Method>,
    /// `Allow` for a 405: the methods, comma-separated (RFC 9110 §10.2.1).
    pub allow_header: HeaderValue,
    pub max_body_bytes: u64,
    /// Timestamp tolerance, in seconds. (How long accepted delivery ids are remembered is the
    /// store's `dedupe_window`, default 24 h: at least the tolerance.)
    pub tolerance: u64,
    pub id_from: Option<IdSource>,
    pub allow: Option<IpList>,
    pub limiter: Option<Arc<KeyLimiter>>,
    pub deliveries: Arc<DeliveryStore>,
    /// `forward_signature` (default true): the signature header goes on to the upstream, so an
    /// application that verifies again still can. False removes it once verified (the
    /// Standard Webhooks id and timestamp headers stay: they carry no secret-derived value).
    pub forward_signature: bool,
}

impl Route {
    pub fn is_prefix(&self) -> bool {
        self.path.ends_with('/')
    }

    fn matches(&self, path: &str) -> bool {
        if self.is_prefix() {
            path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }
}

impl Route {
    /// The headers a sender of this route adds to `body` (what `keygate webhook sign` prints), signed with the route's secret at
    /// `secret_index` (its position in `secrets`, 0-based) at unix time `now`:
    ///
    /// * `hmac-sha256-hex`: the route's header (default `X-Webhook-Signature`) with the hex MAC;
    /// * `github`: `X-Hub-Signature-256: sha256=<hex>` (or the configured header);
    /// * `stripe`: `Stripe-Signature: t=<now>,v1=<hex>`;
    /// * `standard-webhooks`: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<b64>`
    ///   (with the route's prefix, e.g. `svix-*`, when its header is `svix-signature`).
    ///
    /// `delivery_id` is the Standard Webhooks message id; for the other schemes, when the
    /// route takes its delivery id from a header (`id_from = { header = … }`, or GitHub's
    /// `X-GitHub-Delivery`), that header is added with it, so duplicate detection sees what a
    /// real sender's delivery carries. A JSON-field id is the body's business.
    ///
    /// Errors: `secret_index` is not below the number of secrets (the message says how many).
    pub fn sign(
        &self,
        secret_index: usize,
        body: &[u8],
        now: i64,
        delivery_id: &str,
    ) -> Result<Vec<(String, String)>, String> {
        let Some(key) = self.keys.get(secret_index) else {
            return Err(format!(
                "--secret-index {secret_index}: route {:?} has {} secret{} (0 to {})",
                &*self.id,
                self.keys.len(),
                if self.keys.len() == 1 { "" } else { "s" },
                self.keys.len().saturating_sub(1)
            ));
        };
        let mut headers = signature::sign(
            self.scheme,
            self.header.as_str(),
            key,
            body,
            now,
            delivery_id,
        );
        if self.scheme == Scheme::StandardWebhooks {
            for (name, _) in &mut headers {
                if name == "webhook-id" {
                    *name = self.std_id_header.as_str().to_string();
                } else if name == "webhook-timestamp" {
                    *name = self.std_timestamp_header.as_str().to_string();
                }
            }
        } else if let Some(IdSource::Header(h)) = self.delivery_id_source() {
            headers.push((h.as_str().to_string(), delivery_id.to_string()));
        }
        Ok(headers)
    }

    /// Where this route's senders put a delivery id: `id_from`, else the scheme's own
    /// (`webhook-id`, `X-GitHub-Delivery`, Stripe's event `id`). What duplicates are detected
    /// by is `dedupe_key`: only signed content, so an id header outside the signature
    /// (`X-GitHub-Delivery`, an `id_from` header) is never used for it; it must be single
    /// (`ambiguous_id` otherwise), and `sign` adds it as a real sender would.
    pub fn delivery_id_source(&self) -> Option<IdSource> {
        static GITHUB_DELIVERY: HeaderName = HeaderName::from_static("x-github-delivery");
        Some(match (&self.id_from, self.scheme) {
            (Some(s), _) => s.clone(),
            (None, Scheme::StandardWebhooks) => IdSource::Header(self.std_id_header.clone()),
            (None, Scheme::Github) => IdSource::Header(GITHUB_DELIVERY.clone()),
            (None, Scheme::Stripe) => IdSource::JsonField("id".into()),
            (None, Scheme::HmacSha256Hex) => return None,
        })
    }
}

/// Every configured route. Few, so a linear scan; routes never overlap (`check` refuses it).
#[derive(Default)]
pub struct Routes(pub Vec<Arc<Route>>);

impl Routes {
    /// The route for a request path, if the path is in normal form under every reading
    /// ([`crate::access::is_normal_path`]: no escape, dot-segment or `;` parameter, so no
    /// origin server can read it as another path) and matches one. Any other spelling goes
    /// through key authentication like every non-webhook path.
    pub fn find(&self, raw_path: &str) -> Option<&Arc<Route>> {
        if self.0.is_empty() || !crate::access::is_normal_path(raw_path) {
            return None;
        }
        self.0.iter().find(|r| r.matches(raw_path))
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Route>> {
        self.0.iter().find(|r| &*r.id == id)
    }
}

/// What the pipeline knows of the request when it hands it over.
pub struct Arrival<'a> {
    pub snap: &'a std::sync::Arc<Snapshot>,
    /// The TCP peer (a trusted proxy, or the sender).
    pub peer: IpAddr,
    pub client_ip: IpAddr,
    pub request_id: &'a HeaderValue,
    /// The budget of request-body bytes held in memory (shared with request buffering).
    pub buffer_budget: &'a crate::buffer_budget::BufferBudget,
    /// `[upstream] max_connections`: deliveries take a slot like every forwarded request.
    pub upstream_cap: &'a crate::upstream_cap::UpstreamCap,
}

/// The response, and what the access record needs.
pub struct Outcome {
    pub response: Result<Response<ResponseBody>, Reject>,
    pub upstream_status: Option<u16>,
    pub stats: Option<Arc<RequestStats>>,
    /// The upstream slot and body bytes the delivery holds until its response is sent.
    pub held: crate::upstream_cap::Held,
}

fn rejected(route: &Route, a: &Arrival<'_>, reason: Reason) {
    metrics::global().webhook_rejected(&route.id, reason.as_str());
    // The counter above is complete; the line is under the client's log budget (a sender
    // can cause one per request).
    client_event!(
        ClientEvent::WebhookRejected,
        a.client_ip,
        Level::WARN,
        event = "webhook_rejected",
        reason = reason.as_str(),
        route = &*route.id,
        request_id = request_id_str(a.request_id),
        client_ip = %a.client_ip,
    );
}

/// Takes a request for `route` from arrival to the upstream's answer (or a refusal).
pub async fn deliver(req: Request<Incoming>, route: &Arc<Route>, a: &Arrival<'_>) -> Outcome {
    let mut stats = None;
    let mut upstream_status = None;
    let mut held = crate::upstream_cap::Held::default();
    let response = deliver_inner(req, route, a, &mut stats, &mut upstream_status, &mut held).await;
    Outcome {
        response,
        upstream_status,
        stats,
        held,
    }
}

async fn deliver_inner(
    req: Request<Incoming>,
    route: &Arc<Route>,
    a: &Arrival<'_>,
    stats_out: &mut Option<Arc<RequestStats>>,
    upstream_status: &mut Option<u16>,
    held_out: &mut crate::upstream_cap::Held,
) -> Result<Response<ResponseBody>, Reject> {
    let refuse = |reason: Reason, reject: Reject| {
        rejected(route, a, reason);
        reject
    };
    let early = |req: Request<Incoming>, reason: Reason, reject: Reject| {
        crate::body::linger(req.into_body());
        refuse(reason, reject)
    };
    if let Some(allow) = &route.allow
        && !allow.contains(a.client_ip)
    {
        return Err(early(req, Reason::IpDenied, Reject::Forbidden));
    }
    // Unverified deliveries are bounded per client address, by the failed-auth budget API keys
    // use (a wrong signature is a failed authentication): a client over it is refused before
    // its body is read. A full table refuses nobody here (unlike for argon2, there is no hash
    // to save: an HMAC is cheap), so many addresses cannot lock out a sender they do not know.
    let throttle = &a.snap.auth.failed_auth;
    if let Some(retry_after) = throttle.over_budget(a.client_ip) {
        return Err(early(
            req,
            Reason::Throttled,
            Reject::Throttled { retry_after },
        ));
    }
    if !route.methods.contains(req.method()) {
        let reject = early(
            req,
            Reason::MethodNotAllowed,
            Reject::MethodNotAllowed { allow: "POST" },
        );
        // The route's own list replaces the placeholder.
        let mut resp = reject.into_response(a.request_id);
        resp.headers_mut()
            .insert(header::ALLOW, route.allow_header.clone());
        return Ok(resp);
    }
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > route.max_body_bytes
    {
        return Err(early(req, Reason::TooLarge, Reject::PayloadTooLarge));
    }

    let client_authority = crate::proto::client_authority(&req);
    let (mut parts, body) = req.into_parts();
    // Counted while reading, so the access line of a refused delivery or of a duplicate
    // answered here shows the bytes keygate read (`bytes_in`), as a forwarded one does.
    let stats = Arc::new(RequestStats::default());
    *stats_out = Some(stats.clone());
    // The whole read is bounded in time (`request_buffer_timeout`) as well as per stall, and
    // in memory: every byte held comes out of the webhooks' share of the request-buffer budget
    // (a fresh user's 400 unsigned 1 MB bodies trickled by one client held 444 MiB), charged
    // as it arrives (a second one's 70 stalled deliveries declaring 1 MiB each reserved all
    // 64 MiB with 70 KB sent). The bytes stay reserved until the delivery is done.
    // One address holds at most its share of that (T8-4: ~2,000 stalled deliveries from 10
    // addresses held all of it), and a delivery reserves 1 KiB before its first byte.
    let held = &mut held_out.buffer;
    let who = crate::buffer_budget::Claimant::webhook(a.client_ip, route.max_body_bytes);
    let read = read_body(
        body,
        route.max_body_bytes,
        a.snap.server.body_read_timeout,
        &stats,
        (a.buffer_budget, &who),
        held,
    );
    let whole = a.snap.caps.request_buffer_timeout;
    let Ok(read) = tokio::time::timeout(whole, read).await else {
        metrics::global().client_timeout("request_buffer");
        client_event!(ClientEvent::ClientTimeout, a.client_ip, Level::INFO, event = "client_timeout", phase = "request_buffer", request_id = request_id_str(a.request_id), client_ip = %a.client_ip, route = &*route.id, timeout_ms = whole.as_millis() as u64, "the sender did not send the whole body within request_buffer_timeout");
        return Err(Reject::RequestTimeout);
    };
    let body = match read {
        Ok(b) => b,
        Err(BodyError::Busy(rest)) => {
            crate::body::linger(rest);
            return Err(refuse(Reason::Busy, Reject::Unavailable { retry_after: 1 }));
        }
        Err(BodyError::TooLarge(rest)) => {
            crate::body::linger(rest);
            return Err(refuse(Reason::TooLarge, Reject::PayloadTooLarge));
        }
        Err(BodyError::Client) => {
            client_event!(
                ClientEvent::ClientBody,
                a.client_ip,
                Level::INFO,
                request_id = request_id_str(a.request_id),
                route = &*route.id,
                "webhook body failed (malformed framing or aborted)"
            );
            return Err(Reject::BadRequest);
        }
        Err(BodyError::Stalled) => {
            metrics::global().client_timeout("body");
            client_event!(ClientEvent::ClientTimeout, a.client_ip, Level::INFO, event = "client_timeout", phase = "body", request_id = request_id_str(a.request_id), client_ip = %a.client_ip, route = &*route.id, "the sender sent no body byte within body_read_timeout");
            return Err(Reject::RequestTimeout);
        }
    };

    // An unverified delivery is charged as it is answered, within the budget: the budget is
    // looked at again first, so that deliveries whose bodies were still arriving when it ran
    // out get 429 rather than each a 401 charged after the fact (a fresh user, T6-3: 150
    // parallel forged deliveries, 150 x 401 and the address blocked for 393 s; T5-7's kind).
    let unverified = |reason: Reason| match throttle.over_budget(a.client_ip) {
        Some(retry_after) => refuse(Reason::Throttled, Reject::Throttled { retry_after }),
        None => {
            throttle.record_failure(a.client_ip);
            refuse(reason, Reject::Unauthorized)
        }
    };

    // Signature, then timestamp.
    let h = &parts.headers;
    // The sender's own delivery id header, when the route has one outside the signed content
    // (`X-GitHub-Delivery`, an `id_from` header): keygate does not dedupe on it (see
    // `dedupe_key`), but the application may, so two values are refused rather than leaving it
    // to guess which one counts.
    // (A repeated `webhook-id` is signed content: `bad_signature` below.)
    if let Some(IdSource::Header(name)) = route.delivery_id_source() {
        let signed_id = route.scheme == Scheme::StandardWebhooks && name == route.std_id_header;
        if !signed_id && single(h, Some(&name)).is_none() {
            return Err(refuse(Reason::AmbiguousId, Reject::BadRequest));
        }
    }
    let std = route.scheme == Scheme::StandardWebhooks;
    let (Some(sig), Some(id), Some(ts)) = (
        single(h, Some(&route.header)),
        single(h, std.then_some(&route.std_id_header)),
        single(h, std.then_some(&route.std_timestamp_header)),
    ) else {
        return Err(unverified(Reason::BadSignature));
    };
    let signed = signature::Signed {
        signature: sig,
        id,
        timestamp: ts,
        body: &body,
    };
    let now = jiff::Timestamp::now().as_second();
    if let Err(f) = signature::verify(route.scheme, &route.keys, &signed, now, route.tolerance) {
        return Err(unverified(f.into()));
    }
    // The route's rate limit protects the upstream, so only verified deliveries are charged:
    // charged before the signature check, one bucket for everybody let anyone who knows the
    // URL keep the genuine sender at 429 with 5 forged requests a second (fresh user T3-4).
    if let Some(limiter) = &route.limiter
        && let Some(retry_after) = limiter.check().retry_after
    {
        return Err(refuse(
            Reason::RateLimited,
            Reject::RateLimited { retry_after },
        ));
    }

    // Duplicates.
    let delivery_id = dedupe_key(route, h, &body);
    let mut claim_guard = None;
    if let Some(id) = delivery_id {
        let asker = Asker {
            client_ip: a.client_ip,
            request_id: request_id_str(a.request_id),
        };
        match route.deliveries.claim(&route.id, &id, &asker).await {
            Claim::Fresh => {
                claim_guard = Some(ClaimGuard {
                    store: route.deliveries.clone(),
                    route: route.id.clone(),
                    id: Some(id),
                })
            }
            Claim::Accepted => {
                rejected(route, a, Reason::Replayed);
                return Ok(duplicate_response(a.request_id));
            }
            Claim::InFlight => return Err(refuse(Reason::InFlight, Reject::Conflict)),
            Claim::Unavailable => return Err(Reject::Unavailable { retry_after: 1 }),
        }
    }

    // Forward: the verified body, unchanged.
    let snap = a.snap;
    let peer = a.peer.to_canonical();
    let peer_is_trusted_proxy = snap.access.is_trusted_proxy(peer);
    // No API key is involved: no key identity reaches the upstream, whatever the sender wrote
    // (the configured identity header may be outside keygate's X-Keygate-* namespace).
    // With `forward_signature = false` the signature header goes too, with its look-alikes
    // (`X_Hub_Signature_256` reads as the same name to a CGI/WSGI/ASGI server).
    let identity_and_signature: [&HeaderName; 2] = [&snap.auth.identity_header, &route.header];
    let managed = if route.forward_signature {
        &identity_and_signature[..1]
    } else {
        &identity_and_signature[..]
    };
    crate::proto::remove_managed_fields(&mut parts.headers, managed, peer_is_trusted_proxy);
    crate::proto::join_cookie_crumbs(&mut parts.headers);
    crate::proto::append_via(parts.version, &mut parts.headers);
    rewrite_request_headers(
        &mut parts.headers,
        &ForwardInfo {
            peer,
            peer_value: crate::forward::ip_value(peer),
            peer_is_trusted_proxy,
            request_id: a.request_id,
            identity_header: &X_KEYGATE_WEBHOOK,
            key_id: &route.id_header,
            credential_header: &snap.auth.header,
            upgrade: None,
            client_ip: a.client_ip,
            client_authority: client_authority.as_ref(),
            host_from_client: snap.forwarding.host == crate::proto::HostMode::Client,
        },
    );

    let mut up = Request::from_parts(parts, RequestBody::buffered(body, stats.clone()));
    *up.uri_mut() = snap.upstream.uri_for(up.uri().path_and_query());
    *up.version_mut() = http::Version::HTTP_11;

    let mut guard = claim_guard;
    // The route's deliveries count against `[upstream] max_connections` like every forwarded
    // request (they bypassed it: a burst of signed deliveries could exceed the cap).
    let caps = &snap.caps;
    let permit = a.upstream_cap.acquire_for(caps).await;
    match permit {
        Ok(p) => held_out.upstream = Some(p),
        Err(why) => {
            if let Some(g) = guard.as_mut() {
                g.settle(false).await;
            }
            return Err(why.refuse(caps, a.client_ip, a.request_id, None, Some(&route.id)));
        }
    }
    // Held until the upstream answers, even if the sender goes away (`pipeline::Exchange`).
    let result = crate::pipeline::Exchange::start(a.snap, up, &stats, held_out).await;
    let (mut resp, pacing) = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some(g) = guard.as_mut() {
                g.settle(false).await;
            }
            metrics::global().upstream_error(e.kind());
            client_event!(ClientEvent::UpstreamError, a.client_ip, Level::ERROR, event = "upstream_error", kind = e.kind(), request_id = request_id_str(a.request_id), route = &*route.id, error = %e);
            return Err(match e {
                UpstreamError::Timeout => Reject::GatewayTimeout,
                _ => Reject::BadGateway,
            });
        }
    };
    *upstream_status = Some(resp.status().as_u16());
    if let Some(g) = guard.as_mut() {
        g.settle(resp.status().is_success()).await;
    }
    metrics::global().webhook_forwarded(&route.id);
    strip_hop_by_hop(resp.headers_mut(), None);
    Ok(resp.map(|b| ResponseBody::upstream(b).paced_by(pacing)))
}

/// A header's only value (`Some(None)` if absent or not asked for); `None` if it is repeated:
/// a repeated signature header is ambiguous and refused.
fn single<'h>(h: &'h HeaderMap, name: Option<&HeaderName>) -> Option<Option<&'h [u8]>> {
    let Some(name) = name else {
        return Some(None);
    };
    let mut it = h.get_all(name).iter();
    let first = it.next();
    if it.next().is_some() {
        return None;
    }
    Some(first.map(HeaderValue::as_bytes))
}

/// The key duplicates are found by, taken only from what the signature covers, so a replay of
/// a captured delivery cannot dress up as another delivery (and nobody can claim a pending
/// delivery's key without holding the delivery itself):
///
/// 1. `id_from = { json = … }` (Stripe: its event `id`): a field of the signed body;
/// 2. `standard-webhooks`: the `webhook-id`, signed with the timestamp and body (also when
///    `id_from` names a header: that one is not signed);
/// 3. otherwise (`github`, an `id_from` header on `github`, `stripe`, `hmac-sha256-hex`):
///    the SHA-256 of the body. A byte-identical body within `dedupe_window` is the same
///    delivery; that is what a replay is, and GitHub's redeliveries resend the same body.
///    The sender's unsigned id header (`X-GitHub-Delivery`) is not used: anyone can change it.
///
/// `None` (no duplicate detection): `hmac-sha256-hex` without `id_from`, and a body without
/// the JSON field a route takes its id from. The three kinds of key
/// are tagged so they never collide.
fn dedupe_key(route: &Route, h: &HeaderMap, body: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Digest as _, Sha256};
    let tagged = |tag: u8, v: &[u8]| {
        let mut k = Vec::with_capacity(v.len() + 1);
        k.push(tag);
        k.extend_from_slice(v);
        k
    };
    let json = match (&route.id_from, route.scheme) {
        (Some(IdSource::JsonField(f)), _) => Some(f.as_str()),
        (None, Scheme::Stripe) => Some("id"),
        (None, Scheme::HmacSha256Hex) => return None,
        _ => None,
    };
    if let Some(f) = json {
        // A body without the field has no id (no duplicate detection, as documented): the
        // sender chose that, and nobody else can take the field out of a signed body.
        return json_field(body, f)
            .filter(|v| !v.is_empty())
            .map(|v| tagged(b'j', &v[..]));
    }
    if route.scheme == Scheme::StandardWebhooks
        && let Some(v) = h.get(&route.std_id_header).filter(|v| !v.is_empty())
    {
        return Some(tagged(b'w', v.as_bytes()));
    }
    Some(tagged(b'b', &Sha256::digest(body)[..]))
}

/// A top-level field of a JSON object, as bytes (strings unquoted, numbers as written).
/// Only that field is materialised; the rest of the document is skipped.
pub fn json_field(body: &[u8], field: &str) -> Option<Vec<u8>> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Find<'f>(&'f str);
    impl<'de> DeserializeSeed<'de> for Find<'_> {
        type Value = Option<Vec<u8>>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = Option<Vec<u8>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                if k == self.0 && found.is_none() {
                    let v: serde_json::Value = m.next_value()?;
                    found = match v {
                        serde_json::Value::String(s) => Some(s.into_bytes()),
                        serde_json::Value::Number(n) => Some(n.to_string().into_bytes()),
                        _ => None,
                    };
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    Find(field).deserialize(&mut de).ok().flatten()
}

/// Releases a claimed delivery id if the request ends without an answer from the upstream
/// (cancelled when the sender disconnects), so the sender's retry is forwarded.
struct ClaimGuard {
    store: Arc<DeliveryStore>,
    route: Arc<str>,
    id: Option<Vec<u8>>,
}

impl ClaimGuard {
    async fn settle(&mut self, accepted: bool) {
        if let Some(id) = self.id.take() {
            self.store.settle(&self.route, &id, accepted).await;
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let store = self.store.clone();
            let route = self.route.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { store.settle(&route, &id, false).await });
            }
        }
    }
}

/// 200 for a delivery the upstream already accepted: the sender stops retrying.
fn duplicate_response(request_id: &HeaderValue) -> Response<ResponseBody> {
    let body = format!(
        "{{\"status\":\"duplicate\",\"request_id\":\"{}\"}}",
        request_id_str(request_id)
    );
    let mut resp = Response::new(ResponseBody::full(Bytes::from(body)));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

enum BodyError {
    /// Over the limit; the rest of the body, to drain.
    TooLarge(Incoming),
    /// The webhooks' half of the request-buffer budget, or the sender's share of it, is spent;
    /// the rest of the body, to drain.
    Busy(Incoming),
    /// Malformed framing, or aborted.
    Client,
    /// No body byte for `body_read_timeout`.
    Stalled,
}

/// Reads the whole body, refusing as soon as it crosses `limit` bytes, or when the sender
/// leaves keygate waiting longer than `stall` for the next bytes (`body_read_timeout`, as for
/// every other body).
///
/// Memory is reserved in `budget` for `who` (the webhooks' half, and the sender's address's
/// share of it, see [`crate::buffer_budget`]) before it is allocated, and grows with what has
/// *arrived*, not with what the sender declared ([`ChargedBuf`]: 1 KiB before the first byte,
/// then doubling, up to the declared length or `limit`). So a sender that declares 1 MiB and
/// stalls after 1 byte holds 1 KiB, not 1 MiB. The reservation accumulates in `held`, which
/// the caller keeps until the delivery is done; when the half or the sender's share has no
/// room, `Busy`.
///
/// [`ChargedBuf`]: crate::buffer_budget::ChargedBuf
async fn read_body(
    mut body: Incoming,
    limit: u64,
    stall: Duration,
    stats: &RequestStats,
    budget: (
        &crate::buffer_budget::BufferBudget,
        &crate::buffer_budget::Claimant,
    ),
    held: &mut Option<crate::buffer_budget::BufferReservation>,
) -> Result<Bytes, BodyError> {
    use crate::buffer_budget::ChargedBuf;
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    let (budget, who) = budget;
    let ceiling = body
        .size_hint()
        .exact()
        .filter(|&n| n <= limit)
        .unwrap_or(limit) as usize;
    let Ok(mut buf) = ChargedBuf::start(budget, who, held, ceiling) else {
        return Err(BodyError::Busy(body));
    };
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => return Err(BodyError::Stalled),
            Ok(None) => return Ok(buf.into_inner().freeze()),
            Ok(Some(Err(_))) => return Err(BodyError::Client),
            Ok(Some(Ok(f))) => f,
        };
        if let Some(d) = frame.data_ref() {
            let seen = buf.len() as u64 + d.len() as u64;
            stats.set_bytes(seen);
            if seen > limit {
                return Err(BodyError::TooLarge(body));
            }
            if buf.push(budget, who, held, d).is_err() {
                return Err(BodyError::Busy(body));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_ids() {
        assert_eq!(
            json_field(br#"{"id":"evt_1","x":{"id":"no"}}"#, "id"),
            Some(b"evt_1".to_vec())
        );
        assert_eq!(
            json_field(br#"{"x":[1,{"id":2}],"id":42}"#, "id"),
            Some(b"42".to_vec())
        );
        assert_eq!(
            json_field(br#"{"id":"a\u0062"}"#, "id"),
            Some(b"ab".to_vec())
        );
        assert_eq!(json_field(br#"{"id":null}"#, "id"), None);
        assert_eq!(json_field(br#"[{"id":"x"}]"#, "id"), None);
        assert_eq!(json_field(b"not json", "id"), None);
        assert_eq!(json_field(br#"{"other":1}"#, "id"), None);
    }
}
