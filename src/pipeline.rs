//! One request, one straight path (SPEC §3):
//!
//! ```text
//! request id → client IP → global allow/deny (behind trusted proxies) → header size
//!   → credential → key status → key IP allowlist → key networks → [introspection]
//!   → scope → key concurrency → rate limit → body size → quota → forward → access log
//! ```
//!
//! keygate's own refusals after the quota charge (no upstream slot, a body failing while it
//! is buffered) give the quota back; only a request sent to the upstream costs quota
//! ([`QuotaCharge`]).
//!
//! The introspection endpoint (`[introspection] path`) is answered here, never forwarded: it
//! skips scope and quota (it costs nothing) but not the key's IP allowlist or rate limit.
//!
//! Each stage returns `Result<_, Reject>`; [`handle`] turns a `Reject` into the JSON error via
//! `reject.rs` and attaches the access record to whatever response goes out.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::Level;

use crate::auth::verify::{Busy, Joined, Outcome, Settled};
use crate::auth::{Key, Token, TokenError, Verifier};
use crate::body::{RequestBody, RequestStats, ResponseBody, linger};
use crate::config::Snapshot;
use crate::forward::{
    ForwardInfo, UpstreamError, X_FORWARDED_FOR, X_REQUEST_ID, rewrite_request_headers,
};
use crate::limits::RateInfo;
use crate::log::{AccessRecord, ClientEvent, client_event, request_id_str};
use crate::metrics;
use crate::proto::{self, strip_hop_by_hop};
use crate::quota::QuotaState;
use crate::reject::Reject;
use crate::upstream_cap::{Held, UpstreamCap};
use crate::usage::State;

static RATELIMIT_LIMIT: header::HeaderName = header::HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: header::HeaderName =
    header::HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: header::HeaderName = header::HeaderName::from_static("ratelimit-reset");
static RATELIMIT_POLICY: header::HeaderName = header::HeaderName::from_static("ratelimit-policy");
static RATELIMIT: header::HeaderName = header::HeaderName::from_static("ratelimit");

/// State shared by every connection for the life of the process.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub verifier: Verifier,
    /// Last use, quota counters and network history (the state file).
    pub state: State,
    /// Shared state on Redis (`[cluster]`); fixed at start.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// `[upstream] max_connections` (runtime state: survives reloads, resized by them).
    pub upstream_cap: UpstreamCap,
    /// Each key's requests in flight (`max_concurrent`), by key id: runtime state that outlives
    /// the snapshots (a reload builds keys with the counters from here).
    pub key_in_flight: crate::upstream_cap::KeyInFlightTable,
    /// Each webhook route's delivery ids, by route id: runtime state that outlives the
    /// snapshots (a reload builds routes with the stores from here).
    pub delivery_stores: crate::webhook::replay::DeliveryStores,
    /// Bytes of request bodies held at once
    /// ([`crate::buffer_budget::REQUEST_BUFFER_BUDGET`], webhook deliveries at most half).
    pub buffer_budget: crate::buffer_budget::BufferBudget,
    /// What upgraded connections listen to: reloads and the shutdown (`tunnel.rs`).
    pub tunnels: crate::tunnel::Tunnels,
}

impl Shared {
    pub fn new(
        snapshot: Snapshot,
        state: State,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Self {
        let snapshot = Arc::new(snapshot);
        Shared {
            cluster,
            verifier: Verifier::new(snapshot.auth.verify_concurrency),
            upstream_cap: UpstreamCap::new(snapshot.caps.upstream_max_connections),
            key_in_flight: Default::default(),
            delivery_stores: Default::default(),
            buffer_budget: crate::buffer_budget::BufferBudget::default(),
            tunnels: crate::tunnel::Tunnels::new(snapshot.clone()),
            snapshot: ArcSwap::new(snapshot),
            state,
        }
    }
}

/// Per-connection state: who is on the other end, and whether it is busy (for idle timeout).
pub struct Conn {
    pub peer: SocketAddr,
    /// The snapshot whose global `[access]` rules admitted the peer at accept (SPEC §3), held
    /// weakly (only its allocation, so its address is not reused while the connection lives):
    /// a request under a newer snapshot is checked again, so that a reload denying a network
    /// applies to connections already open (`gate`).
    admitted_under: std::sync::Weak<Snapshot>,
    /// The client's certificate chain (leaf first) when it presented one (`[tls] client_ca`),
    /// and the digest of the CA bundle it was last verified against: after a reload that
    /// changes `client_ca`, the chain is verified again before the connection's next request
    /// is served (`gate`).
    client_chain: Option<Box<[rustls_pki_types::CertificateDer<'static>]>>,
    verified_ca: std::sync::Mutex<Option<[u8; 32]>>,
    /// The peer's address (canonical) as a field value, for `X-Forwarded-For` and `X-Real-IP`:
    /// made once per connection rather than once per request.
    pub peer_value: HeaderValue,
    pub in_flight: AtomicU32,
    /// Milliseconds since `opened` at which the last request finished.
    pub last_active_ms: AtomicU64,
    /// Requests in flight that keygate admitted (past authentication and every check: see
    /// [`Admitted`]): what makes a connection busy for the connection table, which reclaims only
    /// connections with none (`conn_limits.rs`).
    pub admitted: AtomicU32,
    /// Milliseconds since `opened` at which the last admitted request finished.
    pub last_admitted_ms: AtomicU64,
    pub opened: Instant,
    /// HTTP/1.1: the request id of the response being sent (or sent last), for the
    /// `client_timeout` `send` event (`stall.rs`).
    pub responding: std::sync::Mutex<Option<HeaderValue>>,
    /// HTTP/1.1: keygate is closing the connection because the client took nothing for
    /// `send_timeout`; a response cut by it is logged `cut_by: send_timeout`.
    pub send_timed_out: std::sync::atomic::AtomicBool,
    /// keygate is closing the connection, and why (`shutdown`: `shutdown_grace` ran out;
    /// `reclaimed`: the connection table took it): a request or response it cuts is logged
    /// with this `cut_by` rather than as the client's doing ([`Conn::closing`]).
    closed_by: std::sync::OnceLock<crate::log::Cut>,
}

/// [`Conn`]s alive: their requests, responses and tunnels hold them, so once this is zero every
/// access line has been written (the shutdown waits for it, bounded, before the log is flushed).
static CONNS_ALIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many [`Conn`]s are alive (see [`CONNS_ALIVE`]).
pub fn conns_alive() -> usize {
    CONNS_ALIVE.load(Relaxed)
}

impl Drop for Conn {
    fn drop(&mut self) {
        CONNS_ALIVE.fetch_sub(1, Relaxed);
    }
}

impl Conn {
    /// A connection whose peer was not checked against any snapshot's rules: every request is.
    pub fn new(peer: SocketAddr) -> Self {
        Self::admitted(peer, std::sync::Weak::new())
    }

    /// A connection whose peer `snap`'s global rules admitted at accept, and whose client
    /// certificate chain, if any, `snap`'s `client_ca` verified in the handshake.
    pub fn admitted_under(
        peer: SocketAddr,
        snap: &Arc<Snapshot>,
        client_chain: Option<&[rustls_pki_types::CertificateDer<'_>]>,
    ) -> Self {
        let mut conn = Self::admitted(peer, Arc::downgrade(snap));
        conn.client_chain =
            client_chain.map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
        conn.verified_ca = std::sync::Mutex::new(snap.client_auth.as_ref().map(|a| a.ca_digest));
        conn
    }

    fn admitted(peer: SocketAddr, admitted_under: std::sync::Weak<Snapshot>) -> Self {
        CONNS_ALIVE.fetch_add(1, Relaxed);
        Conn {
            peer,
            admitted_under,
            client_chain: None,
            verified_ca: std::sync::Mutex::new(None),
            peer_value: crate::forward::ip_value(peer.ip().to_canonical()),
            in_flight: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(0),
            admitted: AtomicU32::new(0),
            last_admitted_ms: AtomicU64::new(0),
            opened: Instant::now(),
            responding: std::sync::Mutex::new(None),
            send_timed_out: std::sync::atomic::AtomicBool::new(false),
            closed_by: std::sync::OnceLock::new(),
        }
    }

    /// keygate closes this connection for `why`: what it cuts is logged with that `cut_by`.
    /// The first reason given stands.
    pub fn closing(&self, why: crate::log::Cut) {
        let _ = self.closed_by.set(why);
    }

    /// Whether the client certificate chain of this connection (if any) satisfies `snap`'s
    /// `[tls] client_ca`: verified once per connection and CA bundle (see `check_client_cert`).
    /// True when `snap` requires no client certificate.
    pub fn client_cert_admitted(&self, snap: &Snapshot) -> bool {
        let Some(auth) = &snap.client_auth else {
            return true;
        };
        let mut verified = self
            .verified_ca
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *verified == Some(auth.ca_digest) {
            return true;
        }
        if self.client_chain.as_deref().is_some_and(|c| auth.admits(c)) {
            *verified = Some(auth.ca_digest);
            return true;
        }
        false
    }

    /// Why keygate is closing this connection, if it is ([`Self::closing`]).
    pub fn closed_by(&self) -> Option<crate::log::Cut> {
        self.closed_by.get().copied()
    }
}

/// Marks a request in flight on its connection until the response body is done, and keeps
/// what the request holds (key slot, upstream permit) until then.
pub struct InFlight(Arc<Conn>, Held);

impl InFlight {
    fn new(conn: &Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Relaxed);
        InFlight(conn.clone(), Held::default())
    }

    /// The connection the request came on.
    pub fn conn(&self) -> &Conn {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .last_active_ms
            .store(self.0.opened.elapsed().as_millis() as u64, Relaxed);
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Marks a connection busy with an admitted request, from the moment a key is through every
/// check until the response is done (it lives in [`Held`]). A request keygate itself holds
/// back (a throttled client's 429 held for [`THROTTLED_PAUSE`], a wait for verification, an
/// unauthenticated upload lingering) does not make its connection busy: a fresh user's eight
/// addresses sending wrong tokens on 512 connections kept each one "in flight" and the full
/// table could reclaim none of them (a legitimate client got 9 of 30 requests through). Such a
/// connection is reclaimable like an idle one (its request finishes, then it closes), ranked by
/// its last admitted request.
pub struct Admitted(Arc<Conn>);

impl Admitted {
    pub fn new(conn: &Arc<Conn>) -> Self {
        conn.admitted.fetch_add(1, Relaxed);
        Admitted(conn.clone())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0
            .last_admitted_ms
            .store(self.0.opened.elapsed().as_millis() as u64, Relaxed);
        self.0.admitted.fetch_sub(1, Relaxed);
    }
}

/// The exchange with the upstream up to its response head, owning what the request holds
/// meanwhile (its key slot, upstream permit, buffer reservation). If the client goes away
/// first (the request's future is dropped: a closed connection, an HTTP/2 reset), the exchange
/// is not cut: it goes on in a task of its own until the upstream's response head (then
/// dropped) or its timeout (`[upstream] request_timeout`), and only then are the slots given
/// back. An upstream goes on working on a request whose client left (uvicorn, Django and
/// gunicorn workers do not stop when a socket closes), so releasing the slots at the abort let
/// a key capped at 2 keep 33 requests busy at the upstream by aborting each after 0.3 s (a
/// fresh user's finding: the caps bounded connections, not the upstream's work). Like nginx's
/// `proxy_ignore_client_abort on`. The cost on the way: the exchange's future is boxed (one
/// allocation per forwarded request); a task is spawned only for an abandoned one.
pub(crate) struct Exchange {
    fut: Option<std::pin::Pin<Box<dyn Future<Output = Sent> + Send>>>,
    held: Held,
}

pub(crate) type Sent = Result<crate::forward::Answer, crate::forward::UpstreamError>;

impl Exchange {
    /// Sends `up` and waits for the response head, holding `held` meanwhile (given back to
    /// `held` when the head comes). Not an `async fn`: the request and the rest of the
    /// exchange's state go into the boxed future at once, so that the future this returns,
    /// which is part of every forwarded request's own future, holds only the box and `held`
    /// (an `async fn` keeps a slot for each argument: +450 bytes per request in flight).
    pub(crate) fn start<'h>(
        snap: &Arc<Snapshot>,
        up: Request<RequestBody>,
        stats: &Arc<RequestStats>,
        held: &'h mut Held,
    ) -> impl Future<Output = Sent> + Send + 'h {
        let (snap, stats) = (snap.clone(), stats.clone());
        let mut ex = Exchange {
            fut: Some(Box::pin(
                async move { snap.upstream.send(up, &stats).await },
            )),
            held: std::mem::take(held),
        };
        async move {
            let sent = std::future::poll_fn(|cx| {
                let fut = ex.fut.as_mut().expect("polled until ready only");
                let out = std::task::ready!(fut.as_mut().poll(cx));
                ex.fut = None;
                std::task::Poll::Ready(out)
            })
            .await;
            *held = std::mem::take(&mut ex.held);
            sent
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else {
            return;
        };
        let held = std::mem::take(&mut self.held);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                // The response head (or the upstream's failure) ends what the upstream does
                // for this request; its body, unread, closes the connection.
                let _ = fut.await;
                drop(held);
            });
        }
    }
}

/// Why authentication failed, as logged (`auth_failed.reason`). Never sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthFailure {
    Missing,
    Malformed,
    UnknownKey,
    BadSecret,
    Disabled,
    Expired,
}

impl AuthFailure {
    fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::BadSecret => "bad_secret",
            AuthFailure::Disabled => "disabled",
            AuthFailure::Expired => "expired",
        }
    }

    /// Failures that count towards the per-IP throttle: guessing, not a stale but real key.
    fn counts_as_guess(self) -> bool {
        matches!(
            self,
            AuthFailure::Malformed | AuthFailure::UnknownKey | AuthFailure::BadSecret
        )
    }
}

/// What the stages learn about the request, for the response headers and the access log.
/// Dropped before the request was answered (its client went away), it writes the request's
/// access line itself (status 499, see its `Drop`).
struct Ctx<'a> {
    start: Instant,
    /// As received, or `REDACTED` (it held a token); moved into the access record.
    method: http::Method,
    path: Option<http::uri::PathAndQuery>,
    /// A response exists: the access record went with it.
    answered: bool,
    snap: &'a Arc<Snapshot>,
    shared: &'a Shared,
    conn: &'a Arc<Conn>,
    request_id: &'a HeaderValue,
    client_ip: IpAddr,
    /// The method holds a token (`log::holds_token`): refused, never logged as it is.
    token_method: bool,
    key: Option<Arc<Key>>,
    rate: Option<RateInfo>,
    quota: Option<QuotaState>,
    /// The request is for the introspection endpoint: answered by keygate.
    introspect: bool,
    upstream_status: Option<u16>,
    stats: Option<Arc<RequestStats>>,
    /// The path as forwarded, when credential echoes were removed from its query (`echo.rs`).
    echo_free_path: Option<http::uri::PathAndQuery>,
    held: Held,
    /// The quota this request was charged, given back unless it reached the upstream.
    quota_charge: Option<QuotaCharge<'a>>,
}

/// A quota charge that is given back when dropped, unless [`spent`](Self::spent): a request
/// keygate refuses after charging it (503 `upstream_saturated`, 408/400 while its body is
/// buffered, an `OPTIONS` answered here) or that its client abandons before it is sent to the
/// upstream costs no quota. Once sent, it is spent whatever the upstream answers (a 5xx, or a
/// 502/504 keygate gives when the upstream fails or is too slow: the upstream may have done
/// the work, and keygate cannot tell). Fresh user T3-11: a 4/day key was used up by one served
/// request and three 503s.
struct QuotaCharge<'a> {
    shared: &'a Shared,
    key: Arc<Key>,
    quota: crate::quota::Quota,
    cost: u64,
    /// Unix second of the charge: a refund in a later window gives nothing back.
    at: i64,
    /// Charged to the cluster's lease (else to this instance's counters).
    cluster: bool,
}

impl QuotaCharge<'_> {
    fn spent(self) {
        std::mem::forget(self);
    }
}

impl Drop for QuotaCharge<'_> {
    fn drop(&mut self) {
        match (&self.shared.cluster, self.cluster) {
            (Some(c), true) => c.quota_refund(&self.key.id, self.quota, self.cost, self.at),
            _ => self
                .shared
                .state
                .quotas
                .refund(&self.key.id, self.quota, self.cost, self.at),
        }
    }
}

/// The hyper service body: never fails, every outcome is a response.
///
/// This future is allocated for every request and moved whole, so its size is per-request
/// cost: sub-futures of rare paths (webhook delivery, introspection, argon2 verification,
/// every Redis call in cluster mode) are boxed where they are awaited, and only a request
/// that takes such a path pays for its state.
pub async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    conn: Arc<Conn>,
) -> Result<Response<ResponseBody>, std::convert::Infallible> {
    let start = Instant::now();
    let mut in_flight = InFlight::new(&conn);
    let snap = shared.snapshot.load_full();
    let request_id = request_id(&req);
    let client_ip = snap.access.client_ip(
        conn.peer.ip(),
        req.headers()
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(|v| v.as_bytes()),
    );
    // A key pasted as the method (a client bug): refused (`check_protocol`) and logged as
    // `REDACTED`, looked for once.
    let token_method = crate::log::holds_token(req.method().as_str());
    let method = if token_method {
        http::Method::from_bytes(b"REDACTED").unwrap_or_default()
    } else {
        req.method().clone()
    };
    let path = req.uri().path_and_query().cloned();
    // keygate's own answers (refusals, introspection) to a HEAD request carry their header
    // fields but no content (RFC 9110 §9.3.2); over HTTP/2 a HEAD response with DATA is a
    // stream error (RFC 9113 §8.1.1) that clients report instead of the status.
    let head = method == http::Method::HEAD;

    let mut ctx = Ctx {
        start,
        method,
        path,
        answered: false,
        snap: &snap,
        shared: &shared,
        conn: &conn,
        request_id: &request_id,
        client_ip,
        token_method,
        key: None,
        rate: None,
        quota: None,
        introspect: false,
        upstream_status: None,
        stats: None,
        echo_free_path: None,
        held: Held::default(),
        quota_charge: None,
    };
    let own = |r: Response<ResponseBody>| {
        if head {
            r.map(|_| ResponseBody::full(bytes::Bytes::new()))
        } else {
            r
        }
    };
    // Signed webhook routes need no API key: their own stages, after the same gate.
    let webhook = snap.webhooks.find(req.uri().path()).cloned();
    let mut resp = match webhook {
        Some(route) => match gate(&req, &ctx) {
            Ok(()) => {
                let out = Box::pin(crate::webhook::deliver(req, &route, &ctx.arrival())).await;
                ctx.take_outcome(out)
                    .unwrap_or_else(|reject| own(reject.into_response(&request_id)))
            }
            Err(reject) => {
                linger(req.into_body());
                own(reject.into_response(&request_id))
            }
        },
        // `[auth] cors_preflight = "forward"`: a CORS preflight reaches the upstream without a
        // key (`cors.rs`), after the same gate; its access line has no key id.
        None if snap.auth.cors_preflight.is_some()
            && crate::cors::is_preflight(&req, &snap.auth.header) =>
        {
            match gate(&req, &ctx) {
                Ok(()) => {
                    let budget = snap.auth.cors_preflight.as_deref().expect("checked above");
                    let out = Box::pin(crate::cors::forward(req, budget, &ctx.arrival())).await;
                    ctx.take_outcome(out)
                        .unwrap_or_else(|reject| own(reject.into_response(&request_id)))
                }
                Err(reject) => own(reject.into_response(&request_id)),
            }
        }
        None => match admit(&req, &mut ctx).await {
            Ok(key) if ctx.introspect => {
                linger(req.into_body());
                own(Box::pin(crate::introspection::answer(
                    &key,
                    ctx.rate,
                    &ctx.shared.state,
                    ctx.shared.cluster.as_deref(),
                ))
                .await)
            }
            Ok(key) => match forward(req, key, &mut ctx).await {
                Ok(r) => r,
                Err(reject) => own(reject.into_response(&request_id)),
            },
            Err(reject) => {
                linger(req.into_body());
                own(reject.into_response(&request_id))
            }
        },
    };
    finish_headers(&mut resp, &ctx);
    let record = ctx.record(resp.status().as_u16());
    ctx.answered = true;
    in_flight.1 = std::mem::take(&mut ctx.held);
    Ok(resp.map(|b| b.with_record(record).with_in_flight(in_flight)))
}

impl Ctx<'_> {
    /// What the keyless paths (webhook deliveries, forwarded CORS preflights) need of this
    /// request and the runtime.
    fn arrival(&self) -> crate::webhook::Arrival<'_> {
        crate::webhook::Arrival {
            snap: self.snap,
            peer: self.conn.peer.ip(),
            client_ip: self.client_ip,
            request_id: self.request_id,
            buffer_budget: &self.shared.buffer_budget,
            upstream_cap: &self.shared.upstream_cap,
        }
    }

    /// A keyless path's outcome: what the access record needs is kept here; the response or
    /// the refusal is returned.
    fn take_outcome(
        &mut self,
        out: crate::webhook::Outcome,
    ) -> Result<Response<ResponseBody>, Reject> {
        self.upstream_status = out.upstream_status;
        self.stats = out.stats;
        self.held = out.held;
        out.response
    }

    /// The access record of this request with `status` (taken once: method and path move in).
    fn record(&mut self, status: u16) -> AccessRecord {
        AccessRecord {
            start: self.start,
            request_id: self.request_id.clone(),
            client_ip: self.client_ip,
            method: std::mem::take(&mut self.method),
            path: self
                .echo_free_path
                .take()
                .or(self.path.take().map(own_path)),
            status,
            key_id: self.key.as_ref().map(|k| k.id.clone()),
            upstream_status: self.upstream_status,
            bytes_in: self.stats.take(),
            bytes_out: 0,
            cut: None,
            snapshot: self.snap.clone(),
        }
    }
}

/// Status of the access line of a request whose client went away before keygate answered it:
/// nginx's 499 ("client closed request"), which operators' dashboards already know.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Status of the access line of a request keygate itself abandoned before answering it, closing
/// its connection (at `shutdown_grace`, or reclaimed by the connection table): nginx's 444
/// ("connection closed without response"). Its `cut_by` says why.
pub const CLOSED_WITHOUT_RESPONSE: u16 = 444;

impl Drop for Ctx<'_> {
    /// The request's future was dropped before it had a response: its client closed the
    /// connection or reset the stream while keygate waited (for the upstream's response head,
    /// a verification, the body being buffered, the upstream queue). Before, such a request
    /// left no access line at all; now it is logged with status 499, `completed: false`,
    /// `cut_by: "client"` (an exchange already under way goes on without it: `Exchange`).
    /// When keygate closed the connection itself (shutdown, reclaimed), the line says so:
    /// status 444 and that `cut_by`.
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let (status, cut) = match self.conn.closed_by() {
            Some(cut) => (CLOSED_WITHOUT_RESPONSE, cut),
            None => (CLIENT_CLOSED_REQUEST, crate::log::Cut::Client),
        };
        let mut record = self.record(status);
        record.cut = Some(cut);
        record.emit();
    }
}

/// `X-Request-Id` from the client if well-formed (1–128 of `A-Za-z0-9._-`), else a new one.
fn request_id<B>(req: &Request<B>) -> HeaderValue {
    if let Some(v) = req.headers().get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        // A keygate token is made of the same characters: one sent as the request id (by
        // mistake, or to get it logged) would be logged, echoed and forwarded verbatim, so a
        // token-shaped id is replaced like a malformed one.
        if (1..=128).contains(&b.len())
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
            && !crate::log::holds_token(std::str::from_utf8(b).unwrap_or_default())
        {
            // A copy, not a reference into hyper's read buffer (see `own_path`).
            return unique_per_response(HeaderValue::from_bytes(b).unwrap_or_else(|_| v.clone()));
        }
    }
    new_request_id()
}

/// The request's path and query in a buffer of its own. As parsed, it is a slice of hyper's
/// 8 KiB connection read buffer, and the access record keeps it until the response body ends:
/// that kept the whole buffer alive, so that hyper, reading on while the response streams,
/// took a new 8 KiB buffer for every request (and a connection streaming a long response held
/// both; issue 9 §3). A copy of the few bytes costs less.
fn own_path(p: http::uri::PathAndQuery) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_maybe_shared(bytes::Bytes::copy_from_slice(p.as_str().as_bytes()))
        .unwrap_or(p)
}

/// 128 random bits as 32 hex digits.
///
/// The value is copied three times per request (access record, upstream request, response);
/// held by a shared buffer from the start, each copy is a reference count, not an allocation.
pub fn new_request_id() -> HeaderValue {
    let n: u128 = rand::random();
    let mut buf = [0u8; 32];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in buf.iter_mut().enumerate() {
        *slot = HEX[((n >> (124 - 4 * i)) & 0xf) as usize];
    }
    unique_per_response(
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
            .expect("hex is a valid header value"),
    )
}

/// Marks a field value that differs in every response (the request id, the rate-limit state)
/// as never to be indexed by HPACK (RFC 7541 §6.2.3, the `h2` crate's "sensitive" values).
/// Indexed, each one was inserted into the connection's HPACK table only to be evicted unused,
/// pushing out fields that do repeat (`content-type`, `server`), and the encoder compared each
/// new value with every older one of the same name still in the table (~50 request ids in 4 KiB):
/// 6.5 % of keygate's user-space CPU on HTTP/2 (issue 10). The cost: the field's name is sent
/// as a literal (~10 bytes). HTTP/1.1 ignores the mark; `to_str` and logging are unaffected.
fn unique_per_response(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// How long a 429 to a client over `failed_auth_limit` is held back (see `admit`).
const THROTTLED_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Every check before forwarding, in SPEC order. Returns the authenticated key.
async fn admit(req: &Request<Incoming>, ctx: &mut Ctx<'_>) -> Result<Arc<Key>, Reject> {
    let snap = ctx.snap;
    gate(req, ctx)?;

    let key = match authenticate(req, ctx).await {
        Ok(key) => key,
        Err(throttled @ Reject::Throttled { .. }) => {
            // Tarpit: a throttled client's 429 is cheap, so without a pause it can be asked for
            // tens of thousands of times a second, and on few workers that volume alone slows
            // everyone else. Held for a moment, each connection gets one attempt per pause.
            tokio::time::sleep(THROTTLED_PAUSE).await;
            return Err(throttled);
        }
        Err(reject) => return Err(reject),
    };
    ctx.key = Some(key.clone());
    let used_at = jiff::Timestamp::now().as_second();
    if ctx
        .shared
        .state
        .usage
        .touch(&key.id, ctx.client_ip, used_at)
        && let Some(cluster) = &ctx.shared.cluster
    {
        let seen_at = crate::clock::now();
        cluster.note_use(&key.id, ctx.client_ip, used_at, seen_at, &snap.key_networks);
    }

    if let Some(allow) = &key.allow
        && !allow.contains(ctx.client_ip)
    {
        metrics::global().ip_denied();
        client_event!(ClientEvent::IpDenied, ctx.client_ip, Level::WARN, event = "ip_denied", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id = &*key.id, scope = "key");
        return Err(Reject::Forbidden);
    }
    track_network(&key, ctx).await;
    if let Some(path) = &snap.introspection_path {
        ctx.introspect = introspection_target(req, path)?;
    }
    if ctx.introspect {
        // Keygate's own answer: no scope (it is not an upstream path), no quota (it is free),
        // but the key's rate limit, like any request to keygate.
        rate_limit(&key, ctx).await?;
        return Ok(key);
    }
    if !key.scope.permits(req.method(), req.uri().path())
        || !key.scope.permits_overrides(req.uri().query())
    {
        metrics::global().scope_denied(&key.id);
        client_event!(ClientEvent::ScopeDenied, ctx.client_ip, Level::WARN, event = "scope_denied", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id = &*key.id, method = req.method().as_str(), path = %crate::log::RedactedPath { pq: req.uri().path(), params: &[] });
        return Err(Reject::Forbidden);
    }
    // The key's concurrency cap: a slow or stuck client of this key holds a slot until its
    // response is done, so one key (a leaked one, say) cannot hold every upstream connection.
    // Before the rate limit and the quota, so that this refusal costs the key neither a token
    // nor quota (fresh user T3-11: a client obeying its Retry-After: 1 emptied its bucket).
    let Some(slot) = key.in_flight.try_acquire(key.max_concurrent) else {
        metrics::global().concurrency_limited(&key.id);
        client_event!(ClientEvent::ConcurrencyLimited, ctx.client_ip, Level::WARN, event = "concurrency_limited", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id = &*key.id, max_concurrent = key.max_concurrent, "key has max_concurrent requests in flight");
        return Err(Reject::RateLimited { retry_after: 1 });
    };
    ctx.held.key = Some(slot);
    rate_limit(&key, ctx).await?;

    // Announced bodies over the limit never reach the upstream.
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > snap.server.max_body_bytes
    {
        client_event!(
            ClientEvent::BodyTooLarge,
            ctx.client_ip,
            Level::WARN,
            request_id = request_id_str(ctx.request_id),
            key_id = &*key.id,
            content_length = len,
            "request body over max_body_bytes"
        );
        return Err(Reject::PayloadTooLarge);
    }
    // Last, so that a request keygate refuses for any other reason costs no quota.
    charge_quota(req, &key, ctx).await?;
    Ok(key)
}

async fn rate_limit(key: &Key, ctx: &mut Ctx<'_>) -> Result<(), Reject> {
    if let Some(limiter) = &key.limiter {
        let info = rate_check(ctx, key, limiter).await?;
        ctx.rate = Some(info);
        if let Some(retry_after) = info.retry_after {
            metrics::global().rate_limited(&key.id);
            client_event!(ClientEvent::RateLimited, ctx.client_ip, Level::WARN, event = "rate_limited", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id = &*key.id, retry_after);
            return Err(Reject::RateLimited { retry_after });
        }
    }
    Ok(())
}

/// What an intermediary must refuse before looking further (RFC 9110/9112/9113, `proto.rs`):
/// 400 for a request whose authority is missing, doubled or contradictory; 501 for `CONNECT`
/// (keygate is a gateway, not a tunnel) and `TRACE` (it would reflect the request, cookies and
/// all, and keygate's identity header, back to a browser).
fn check_protocol<B>(req: &Request<B>, ctx: &Ctx<'_>) -> Result<(), Reject> {
    let malformed = |reason: &str, error: Option<&proto::Malformed>| {
        client_event!(ClientEvent::MalformedRequest, ctx.client_ip, Level::INFO, request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, reason, error = error.map(tracing::field::display), "malformed request refused");
        Err(Reject::BadRequest)
    };
    if let Err(m) = proto::check_authority(req) {
        return malformed(m.as_str(), Some(&m));
    }
    // A key pasted as the method (a client bug) would be forwarded and logged as it is: the
    // method is the one client-chosen field of the access line that is not redacted.
    if ctx.token_method {
        return malformed("credential_in_method", None);
    }
    // With an upstream base path (`url = "http://127.0.0.1:8000/api"`) the upstream receives
    // `/api` + the client's path: a path that leaves `/api` once dot-segments are resolved,
    // under any reading an origin server may apply (`/../admin`, `/%2e%2e/admin`,
    // `/..;/admin`), would reach what the base path was meant to keep out (nginx answers 400).
    let (_, _, base) = ctx.snap.upstream.origin();
    let path = req.uri().path();
    if !base.is_empty() && path.starts_with('/') && !crate::access::is_plain_path(path) {
        let full = format!("{base}{path}");
        if !crate::access::every_reading(&full, |p| crate::access::path_has_prefix(p, base)) {
            return malformed("path_escapes_base", None);
        }
    }
    if req.method() == http::Method::CONNECT || req.method() == http::Method::TRACE {
        client_event!(ClientEvent::MalformedRequest, ctx.client_ip, Level::INFO, request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, method = req.method().as_str(), "method not implemented by keygate");
        return Err(Reject::NotImplemented);
    }
    Ok(())
}

/// Quota (SPEC §9): the request's cost from `[quota_costs]` against the key's window. Refused:
/// 429 with `Retry-After` until the window resets (none for a cost above the whole quota);
/// `quota_exceeded` once per key and window, at the first refusal that finds no unit left,
/// `quota_insufficient` (client log budget) for a refusal while units remain.
async fn charge_quota<B>(req: &Request<B>, key: &Key, ctx: &mut Ctx<'_>) -> Result<(), Reject> {
    let Some(quota) = key.quota else {
        return Ok(());
    };
    let cost = ctx
        .snap
        .quota_costs
        .cost(req.method(), req.uri().path(), req.uri().query());
    let now = crate::clock::now();
    let local = || ctx.shared.state.quotas.charge(&key.id, quota, cost, now);
    let mut in_cluster = false;
    let state = match &ctx.shared.cluster {
        None => local().await,
        Some(cluster) => match Box::pin(cluster.quota_charge(&key.id, quota, cost, now)).await {
            Ok(s) => {
                in_cluster = true;
                s
            }
            Err(e) => {
                cluster.fall_back(
                    "quota",
                    &e,
                    ctx.client_ip,
                    request_id_str(ctx.request_id),
                    Some(&key.id),
                )?;
                // Counted on from the cluster's usage this instance last saw, and added to the
                // shared counter when Redis answers again (`cluster/quota.rs`).
                in_cluster = true;
                cluster.quota_charge_degraded(&key.id, quota, cost, now)
            }
        },
    };
    ctx.quota = Some(state);
    let Some(first) = state.refused else {
        if cost > 0 {
            ctx.quota_charge = Some(QuotaCharge {
                shared: ctx.shared,
                key: ctx.key.clone().expect("authenticated"),
                quota,
                cost,
                at: now,
                cluster: in_cluster,
            });
        }
        return Ok(());
    };
    metrics::global().quota_exceeded(&key.id);
    // A request that costs more than the whole quota can never pass: no Retry-After promising
    // that it will after the reset (fresh user T5-18). Still 429, the quota's status (SPEC §3).
    let never = cost > quota.limit;
    if first {
        tracing::warn!(event = "quota_exceeded", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id = &*key.id, limit = quota.limit, period = quota.period.as_str(), used = state.used, cost, reset_secs = state.reset_secs, "quota used up for this window; requests that cost something get 429 until it resets");
    } else if state.remaining > 0 || never {
        // Units are left, but not enough for this request: the key is not used up (its
        // cheaper requests pass), so this is no `quota_exceeded`; anyone holding the key can
        // cause it at will, so it is logged under the client's log budget.
        client_event!(ClientEvent::QuotaInsufficient, ctx.client_ip, Level::WARN, event = "quota_insufficient", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id = &*key.id, limit = quota.limit, period = quota.period.as_str(), used = state.used, cost, never, "request costs more than the key's quota has left (never: more than the whole quota); refused");
    } else {
        tracing::debug!(
            request_id = request_id_str(ctx.request_id),
            key_id = &*key.id,
            cost,
            "over quota"
        );
    }
    Err(Reject::QuotaExceeded {
        retry_after: (!never).then_some(state.reset_secs),
    })
}

/// Key networks (SPEC §9): `key_first_use` or `key_new_network` when this network is new. In
/// cluster mode a network new to this instance is checked against the cluster's history in
/// Redis, so each is logged once cluster-wide (`cluster/history.rs` states the bounds); when
/// Redis cannot be asked this instance's own history decides (never a refusal).
async fn track_network(key: &Key, ctx: &Ctx<'_>) {
    let now = crate::clock::now();
    let policy = &ctx.snap.key_networks;
    let mut sighting = ctx
        .shared
        .state
        .networks
        .observe(&key.id, ctx.client_ip, now, policy)
        .await;
    if sighting != crate::networks::Sighting::Known
        && let Some(cluster) = &ctx.shared.cluster
        && let Ok(shared) =
            Box::pin(cluster.network_sighting(&key.id, ctx.client_ip, now, policy, sighting)).await
    {
        sighting = shared;
    }
    match sighting {
        crate::networks::Sighting::Known => {}
        crate::networks::Sighting::FirstUse => {
            tracing::info!(event = "key_first_use", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id = &*key.id, "first use of this key");
        }
        crate::networks::Sighting::NewNetwork { previous } => {
            metrics::global().key_new_network(&key.id);
            client_event!(ClientEvent::KeyNewNetwork, ctx.client_ip, Level::WARN, event = "key_new_network", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id = &*key.id, previous_networks = previous, "key used from a network outside its recent history");
        }
    }
}

/// Whether the request is for the introspection endpoint at `path` (normalised, as scopes
/// are, so no other spelling slips through to the upstream). Paths under it are keygate's
/// too: 404, never forwarded. Other methods than GET/HEAD: 405.
fn introspection_target<B>(req: &Request<B>, path: &str) -> Result<bool, Reject> {
    let raw = req.uri().path();
    // Only a path with an escape, a backslash or a dot/empty segment can normalise to
    // something else; the common path is compared as it is, with no allocation.
    let needs_normalising = raw.contains(['%', '\\']) || raw.contains("/.") || raw.contains("//");
    let normalised;
    let norm = if needs_normalising {
        let Some(n) = crate::access::normalize_path(raw) else {
            return Ok(false);
        };
        normalised = n;
        normalised.as_ref()
    } else {
        raw
    };
    if norm.trim_end_matches('/') == path {
        if req.method() == http::Method::GET || req.method() == http::Method::HEAD {
            return Ok(true);
        }
        return Err(Reject::MethodNotAllowed { allow: "GET, HEAD" });
    }
    if crate::access::path_has_prefix(norm, path) {
        return Err(Reject::NotFound);
    }
    Ok(false)
}

/// One cell of the key's bucket: the cluster-wide one while Redis is usable, else this
/// instance's own (`on_error = "local"`) or a 503 (`on_error = "deny"`).
async fn rate_check(
    ctx: &Ctx<'_>,
    key: &Key,
    limiter: &Arc<crate::limits::KeyLimiter>,
) -> Result<RateInfo, Reject> {
    let Some(cluster) = &ctx.shared.cluster else {
        return Ok(limiter.check());
    };
    match Box::pin(cluster.rate_check(&key.id, limiter)).await {
        Ok(info) => Ok(info),
        Err(e) => {
            cluster.fall_back(
                "rate limit",
                &e,
                ctx.client_ip,
                request_id_str(ctx.request_id),
                Some(&key.id),
            )?;
            Ok(limiter.check())
        }
    }
}

/// On a connection opened under an earlier snapshot: a client certificate verified in its
/// handshake must still verify against the running `[tls] client_ca` (a fresh user, T5-11: a
/// reload that replaced a compromised client CA left connections authenticated by it served
/// indefinitely; nginx closes them at the reload). Verified once per connection and CA bundle;
/// a connection without a certificate is refused once `client_ca` is required.
fn check_client_cert(ctx: &Ctx<'_>) -> Result<(), Reject> {
    let conn = ctx.conn;
    if conn.client_cert_admitted(ctx.snap) {
        return Ok(());
    }
    client_event!(ClientEvent::TlsHandshake, ctx.client_ip, Level::WARN, event = "client_cert_refused", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, presented = conn.client_chain.is_some(), "the connection's client certificate does not verify against the reloaded tls.client_ca");
    Err(Reject::Forbidden)
}

/// The checks every request passes first, webhook deliveries included: the global IP rules
/// (when they could not be decided at accept), the header size limit and the protocol rules.
fn gate<B>(req: &Request<B>, ctx: &Ctx<'_>) -> Result<(), Reject> {
    let snap = ctx.snap;
    // Behind trusted proxies the allow/deny decision could not be made at accept; and a
    // decision made at accept holds only for the snapshot that made it: after a reload, the
    // open connections' next requests meet the new rules (a fresh user, T5-12: a network
    // denied by a reload kept being served on its open HTTP/1.1 and HTTP/2 connections until
    // they went idle; nginx evaluates `deny` per request too).
    let admitted_under_this = std::ptr::eq(ctx.conn.admitted_under.as_ptr(), Arc::as_ptr(snap));
    let decided_at_accept = snap.access.decide_at_accept() && admitted_under_this;
    if !decided_at_accept && !snap.access.admits(ctx.client_ip) {
        metrics::global().ip_denied();
        client_event!(ClientEvent::IpDenied, ctx.client_ip, Level::WARN, event = "ip_denied", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, scope = "global");
        return Err(Reject::Forbidden);
    }
    if !admitted_under_this {
        check_client_cert(ctx)?;
    }
    check_header_size(req, snap.server.max_header_bytes)?;
    check_protocol(req, ctx)
}

/// Request line + headers, as on the wire (name + ": " + value + CRLF).
fn check_header_size<B>(req: &Request<B>, max: usize) -> Result<(), Reject> {
    let mut size = req.uri().path_and_query().map_or(1, |p| p.as_str().len()) + 16;
    for (name, value) in req.headers() {
        size += name.as_str().len() + value.len() + 4;
    }
    if size > max {
        Err(Reject::HeadersTooLarge)
    } else {
        Ok(())
    }
}

/// The credential from `[auth] header` or `Authorization: Bearer`. More than one is malformed.
fn credential<'r, B>(
    req: &'r Request<B>,
    header: &header::HeaderName,
) -> Result<&'r str, AuthFailure> {
    let mut found: Option<&[u8]> = None;
    for v in req.headers().get_all(header) {
        if found.replace(v.as_bytes()).is_some() {
            return Err(AuthFailure::Malformed);
        }
    }
    for v in req.headers().get_all(header::AUTHORIZATION) {
        let b = v.as_bytes();
        if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ") {
            let token = b[7..].trim_ascii();
            match found {
                Some(prev) if prev == token => {}
                Some(_) => return Err(AuthFailure::Malformed),
                None => found = Some(token),
            }
        }
    }
    let raw = found.ok_or(AuthFailure::Missing)?;
    std::str::from_utf8(raw.trim_ascii()).map_err(|_| AuthFailure::Malformed)
}

/// credential → key → secret (cache or argon2) → status.
async fn authenticate<B>(req: &Request<B>, ctx: &mut Ctx<'_>) -> Result<Arc<Key>, Reject> {
    let snap = ctx.snap;
    let throttle = &snap.auth.failed_auth;
    let report = |reason: AuthFailure, key_id: Option<&str>, exhausted: bool| {
        metrics::global().auth_failed(reason.as_str());
        client_event!(ClientEvent::AuthFailed, ctx.client_ip, Level::WARN, event = "auth_failed", reason = reason.as_str(), request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id);
        if exhausted {
            client_event!(ClientEvent::AuthThrottled, ctx.client_ip, Level::WARN, event = "auth_throttled", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, limit = throttle.rate().count, "client IP reached failed_auth_limit: its unverified tokens are refused for now");
        }
        Reject::Unauthorized
    };
    let fail = |reason: AuthFailure, key_id: Option<&str>| {
        let exhausted = reason.counts_as_guess() && throttle.record_failure(ctx.client_ip);
        report(reason, key_id, exhausted)
    };
    // A throttled client gets 429 for every token not in the verified cache, whatever is wrong
    // with it (a 401 for unknown ids only would tell it which ids exist), and it is not counted.
    let refuse = |key_id: Option<&str>, retry_after: u64| {
        metrics::global().auth_throttled();
        client_event!(ClientEvent::AuthThrottled, ctx.client_ip, Level::WARN, event = "auth_throttled", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id, retry_after);
        Reject::Throttled { retry_after }
    };
    let throttled = |key_id: Option<&str>| {
        throttle
            .throttled(ctx.client_ip)
            .map(|retry_after| refuse(key_id, retry_after))
    };
    let guess = |reason: AuthFailure, key_id: Option<&str>| {
        if reason.counts_as_guess() {
            throttled(key_id).unwrap_or_else(|| fail(reason, key_id))
        } else {
            fail(reason, key_id)
        }
    };

    let text = credential(req, &snap.auth.header).map_err(|r| guess(r, None))?;
    let token = Token::parse(text).map_err(|e| match e {
        TokenError::Form | TokenError::Checksum => guess(AuthFailure::Malformed, None),
    })?;
    let Some(key) = snap.keys.get(token.id()) else {
        return Err(guess(AuthFailure::UnknownKey, Some(token.id())));
    };
    let digest = ctx.shared.verifier.digest(token.expose());
    while !Verifier::is_cached(key, &digest) {
        // Another request is verifying this very token (a client's parallel first requests
        // after a restart): wait for its outcome, uncharged, instead of each request being
        // charged to the failed-auth budget and queued for its own hash.
        let leading = match Box::pin(ctx.shared.verifier.join(key, &digest)).await {
            Joined::Lead(leading) => leading,
            // Cached now (or verified against an older hash of a reloaded key: look again).
            Joined::Waited(Some(Settled::Valid)) => continue,
            // Each waiter is a request with a wrong token, charged like one answered from the
            // negative cache: the budget first, so that a burst sharing one wrong verdict is
            // refused 429 once the budget is spent rather than overdrawing it (a fresh user:
            // 100 parallel requests with one wrong token, 100 x 401 and the address blocked
            // for 4 minutes instead of one more attempt every 3 s).
            Joined::Waited(Some(Settled::Invalid)) => {
                return Err(guess(AuthFailure::BadSecret, Some(&key.id)));
            }
            Joined::Waited(Some(Settled::Busy)) => {
                return Err(Reject::Unavailable { retry_after: 1 });
            }
            // No verdict: its request was abandoned before its hash was arranged (e.g. while
            // throttled), or the verification was given up when nobody waited: try again.
            Joined::Waited(None) => continue,
        };
        // Not verified before: this costs argon2 work, which a throttled IP does not get;
        // unless (cluster mode) another instance verified this very token: see `vouched`.
        let cluster = ctx.shared.cluster.as_ref();
        let proof = cluster.map(|_| crate::cluster::throttle::vouch_proof(key, token.expose()));
        let vouched = async || match (cluster, &proof) {
            (Some(c), Some(p)) => Box::pin(c.vouched(&key.id, p)).await,
            _ => false,
        };
        let mut exempt = false;
        if let Some(retry_after) = throttle.throttled(ctx.client_ip) {
            exempt = vouched().await;
            if !exempt {
                return Err(refuse(Some(&key.id), retry_after));
            }
        }
        if ctx.shared.verifier.is_known_bad(key, &digest) {
            leading.settle(Settled::Invalid);
            return Err(fail(AuthFailure::BadSecret, Some(&key.id)));
        }
        // The guess is charged to the client's budget before hashing (and refunded if right),
        // so a client with many requests in flight gets no more hashes than its budget.
        let mut reservation = None;
        if !exempt {
            match throttle.reserve(ctx.client_ip) {
                Ok(r) => reservation = Some(r),
                Err(retry_after) => {
                    exempt = vouched().await;
                    if !exempt {
                        return Err(refuse(Some(&key.id), retry_after));
                    }
                }
            }
        }
        // Cluster mode: the same budget, shared by every instance (cluster/throttle.rs).
        let shared_guess = match (cluster, reservation.is_some()) {
            (Some(cluster), true) => {
                match Box::pin(cluster.guess_reserve(ctx.client_ip, throttle.rate())).await {
                    Ok(None) => Some(cluster),
                    Ok(Some(retry_after)) => {
                        if let Some(r) = reservation.take() {
                            r.refund();
                        }
                        if !vouched().await {
                            return Err(refuse(Some(&key.id), retry_after));
                        }
                        None
                    }
                    Err(e) => {
                        let rid = request_id_str(ctx.request_id);
                        if let Err(refused) =
                            cluster.fall_back("failed-auth budget", &e, ctx.client_ip, rid, None)
                        {
                            if let Some(r) = reservation.take() {
                                r.refund();
                            }
                            return Err(refused);
                        }
                        None
                    }
                }
            }
            _ => None,
        };
        // A token another instance vouched for waits like a client that never failed.
        let (priority, exhausted) = reservation.as_ref().map_or(
            (
                crate::limits::Priority::from(crate::limits::Standing::Clean),
                false,
            ),
            |r| (r.priority, r.exhausted),
        );
        let charged = reservation.is_some();
        // From here the verification belongs to every request waiting for it: if this one is
        // abandoned, it goes on for them, and its verdict settles this request's charge
        // (here and in the cluster's budget) all the same: refunded for a right token or one
        // never hashed, kept for a wrong one (an abandoned guess still counts). A right token
        // is vouched for to the other instances (cluster mode).
        let (ip, rate) = (ctx.client_ip, throttle.rate());
        let runtime = cluster.map(|_| tokio::runtime::Handle::current());
        let shared_guess = shared_guess.cloned();
        let vouch = cluster
            .cloned()
            .zip(proof)
            .map(|(c, p)| (c, p, key.verified.clone(), key.id.clone()));
        let on_verdict: crate::auth::verify::OnVerdict = Box::new(move |verdict| {
            let wrong = verdict == Some(Settled::Invalid);
            match (verdict, reservation) {
                (Some(Settled::Valid), Some(r)) => r.refund(),
                (Some(Settled::Invalid), Some(r)) => r.confirm_failure(),
                (Some(Settled::Busy) | None, Some(r)) => r.refused_unhashed(),
                (_, None) => {}
            }
            let Some(runtime) = runtime else { return };
            if let Some(cluster) = shared_guess
                && !wrong
            {
                runtime.spawn(async move { cluster.guess_refund(ip, rate).await });
            }
            if let Some((cluster, proof, verified, key_id)) = vouch
                && verdict == Some(Settled::Valid)
            {
                let _enter = runtime.enter();
                cluster.vouch(&verified, &key_id, proof);
            }
        });
        let outcome = Box::pin(ctx.shared.verifier.verify(
            leading,
            key,
            token.expose(),
            digest,
            priority,
            on_verdict,
        ))
        .await;
        match outcome {
            Ok(Outcome::Valid) => break,
            // Charged before hashing; an exempt token that proved wrong (a stale or forged
            // proof) is charged now.
            Ok(Outcome::Invalid) if charged => {
                return Err(report(AuthFailure::BadSecret, Some(&key.id), exhausted));
            }
            Ok(Outcome::Invalid) => return Err(fail(AuthFailure::BadSecret, Some(&key.id))),
            Err(Busy) => {
                client_event!(ClientEvent::AuthBusy, ctx.client_ip, Level::WARN, event = "auth_busy", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id = &*key.id, standing = ?priority.standing, attempts = priority.attempts, "argon2 verification queue: waited too long or full; refused unhashed");
                return Err(Reject::Unavailable { retry_after: 1 });
            }
        }
    }
    if key.disabled {
        return Err(fail(AuthFailure::Disabled, Some(&key.id)));
    }
    // The clock is read only for a key that can expire.
    if key.expires.is_some() && key.is_expired(jiff::Timestamp::now()) {
        return Err(fail(AuthFailure::Expired, Some(&key.id)));
    }
    // Cluster mode: the token's proof for the other instances is written again when this
    // instance has not written it lately (T6-5; two atomic loads when it has).
    if let Some(cluster) = ctx.shared.cluster.as_ref() {
        cluster.vouch_again(key, token.expose());
    }
    Ok(key.clone())
}

async fn forward(
    mut req: Request<Incoming>,
    key: Arc<Key>,
    ctx: &mut Ctx<'_>,
) -> Result<Response<ResponseBody>, Reject> {
    let snap = ctx.snap;
    // (The key's concurrency slot was taken in `admit`.)
    ctx.held.admitted = Some(Admitted::new(ctx.conn));
    // Only allowed protocols pass, and only after every check above (SPEC §4, docs/access.md).
    let offer = proto::upgrade_offer(
        req.version(),
        req.headers(),
        &snap.forwarding.upgrade_protocols,
    );
    if let Some((protocol, reason)) = &offer.refused {
        metrics::global().upgrade_refused(protocol);
        client_event!(ClientEvent::UpgradeRefused, ctx.client_ip, Level::WARN, event = "upgrade_refused", request_id = request_id_str(ctx.request_id), client_ip = %ctx.client_ip, key_id = &*key.id, protocol = protocol.as_str(), reason = reason.as_str(), forwarded_upgrade = offer.forward.is_some());
    }
    let client_upgrade = offer
        .forward
        .is_some()
        .then(|| hyper::upgrade::on(&mut req));
    // What the upgrade request is admitted on, as received, for the tunnel to check again
    // after each reload (`tunnel.rs`); copies, taken only for an upgrade.
    let grant_inputs = client_upgrade.is_some().then(|| {
        let forwarded_for: Box<[HeaderValue]> = req
            .headers()
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
            .collect();
        let path = req.uri().path_and_query().cloned().map(own_path);
        (forwarded_for, req.method().clone(), path)
    });

    // The presented credential, wherever else the client also put it, never reaches the upstream.
    let echoes = credential(&req, &snap.auth.header).ok().and_then(|token| {
        crate::echo::Echoes::find(
            token,
            req.uri().path_and_query(),
            req.headers(),
            &snap.auth.header,
        )
    });
    if let Some(echoes) = echoes {
        client_event!(ClientEvent::CredentialEcho, ctx.client_ip, Level::INFO, event = "credential_echo", request_id = request_id_str(ctx.request_id), key_id = &*key.id, places = ?echoes.places, "the presented credential was also in the request; removed before forwarding");
        echoes.apply_to_headers(req.headers_mut());
        if let Some(pq) = echoes.path_and_query {
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(pq.clone());
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
                ctx.echo_free_path = Some(pq);
            }
        }
    }

    let client_authority = proto::client_authority(&req);
    // Room for the fields added below (`Via`, the identity header, `X-Forwarded-*`,
    // `X-Real-IP`, `X-Request-Id`, `Host`) in one step: the map as parsed has room for the
    // client's fields only (HTTP/2's grows one field at a time), and growing it twice on the
    // way cost four allocations per request (issue 10).
    req.headers_mut().reserve(8);
    proto::join_cookie_crumbs(req.headers_mut());
    let version = req.version();
    proto::append_via(version, req.headers_mut());
    let method = req.method().clone();
    if !proto::decrement_max_forwards(&method, req.headers_mut()) {
        // RFC 9110 §7.6.2: OPTIONS with Max-Forwards: 0 is answered here, not forwarded.
        return Ok(options_reply());
    }
    let peer = ctx.conn.peer.ip().to_canonical();
    rewrite_request_headers(
        req.headers_mut(),
        &ForwardInfo {
            peer,
            peer_value: ctx.conn.peer_value.clone(),
            peer_is_trusted_proxy: snap.access.is_trusted_proxy(peer),
            request_id: ctx.request_id,
            identity_header: &snap.auth.identity_header,
            key_id: &key.id_header,
            credential_header: &snap.auth.header,
            upgrade: offer.forward.clone(),
            client_ip: ctx.client_ip,
            client_authority: client_authority.as_ref(),
            host_from_client: snap.forwarding.host == proto::HostMode::Client,
        },
    );
    let stats = Arc::new(RequestStats::default());
    ctx.stats = Some(stats.clone());
    let (parts, mut body) = req.into_parts();
    // Boxed, and only for a request with a body to read: its state (~440 bytes) would otherwise
    // be part of every request's future.
    let prefix = if buffers_body(&body, offer.forward.is_some(), ctx) {
        Box::pin(buffer_small_body(&parts, &mut body, ctx)).await?
    } else {
        Default::default()
    };
    let mut up = Request::from_parts(
        parts,
        RequestBody::new(
            body,
            snap.server.max_body_bytes,
            snap.server.body_read_timeout,
            stats.clone(),
        )
        .with_prefix(prefix),
    );
    *up.uri_mut() = snap.upstream.uri_for(up.uri().path_and_query());
    *up.version_mut() = http::Version::HTTP_11;

    ctx.held.upstream = Some(upstream_permit(ctx, &key).await?);
    // From here the request reaches the upstream: its quota is spent, whatever the answer.
    if let Some(charge) = ctx.quota_charge.take() {
        charge.spent();
    }
    let sent = Exchange::start(ctx.snap, up, &stats, &mut ctx.held).await;
    if stats.retried() {
        metrics::global().upstream_retried();
        tracing::debug!(
            event = "upstream_retry",
            request_id = request_id_str(ctx.request_id),
            "reused upstream connection failed before answering; request sent again on a new one"
        );
    }
    let (mut resp, pacing) = match sent {
        Ok(r) => r,
        Err(UpstreamError::BodyTooLarge) => {
            client_event!(
                ClientEvent::BodyTooLarge,
                ctx.client_ip,
                Level::WARN,
                request_id = request_id_str(ctx.request_id),
                key_id = &*key.id,
                bytes = stats.bytes(),
                "streamed request body crossed max_body_bytes; upstream request aborted"
            );
            return Err(Reject::PayloadTooLarge);
        }
        // The client stalled its body (nginx's client_body_timeout): its fault, so 408 and a
        // client-timeout count, never an upstream error or a 504.
        Err(UpstreamError::ClientTimeout) => {
            metrics::global().client_timeout("body");
            client_event!(
                ClientEvent::ClientTimeout,
                ctx.client_ip,
                Level::INFO,
                event = "client_timeout",
                phase = "body",
                request_id = request_id_str(ctx.request_id),
                key_id = &*key.id,
                bytes = stats.bytes(),
                timeout_ms = snap.server.body_read_timeout.as_millis() as u64,
                "the client sent no request-body byte within body_read_timeout; upstream request aborted"
            );
            return Err(Reject::RequestTimeout);
        }
        // Not the upstream's fault: no upstream_error event or metric for a client's bad
        // chunked framing or aborted upload.
        Err(UpstreamError::ClientBody) => {
            client_event!(
                ClientEvent::ClientBody,
                ctx.client_ip,
                Level::INFO,
                request_id = request_id_str(ctx.request_id),
                key_id = &*key.id,
                bytes = stats.bytes(),
                "the client's request body failed (malformed framing or aborted); upstream request aborted"
            );
            return Err(Reject::BadRequest);
        }
        Err(e) => {
            metrics::global().upstream_error(e.kind());
            // The detail is for the operator only.
            client_event!(ClientEvent::UpstreamError, ctx.client_ip, Level::ERROR, event = "upstream_error", kind = e.kind(), request_id = request_id_str(ctx.request_id), key_id = &*key.id, error = %e);
            return Err(match e {
                UpstreamError::Timeout => Reject::GatewayTimeout,
                _ => Reject::BadGateway,
            });
        }
    };
    ctx.upstream_status = Some(resp.status().as_u16());

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Spliced only when the upstream switched to a protocol keygate forwarded; anything
        // else would be a tunnel nobody allowed (an h2c answer to a plain request).
        let checked = proto::check_switch(resp.headers(), offer.forward.as_ref());
        let (Some(client_upgrade), Ok(())) = (client_upgrade, checked) else {
            let error = checked.err().unwrap_or(proto::SwitchError::NotRequested);
            let protocol = resp
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .map(|v| proto::loggable_protocol(v.split('/').next().unwrap_or_default().trim()));
            metrics::global().upstream_error("protocol");
            tracing::error!(event = "upstream_error", kind = "protocol", request_id = request_id_str(ctx.request_id), key_id = &*key.id, protocol, error = %error);
            return Err(Reject::BadGateway);
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        // The access line is written when the tunnel closes (bytes each way, whole duration).
        let (record, log) = crate::body::tunnel_log();
        let (forwarded_for, method, path) = grant_inputs.unwrap_or_default();
        let protocol = resp
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split('/').next())
            .map(|p| p.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let start = crate::tunnel::Start {
            client: client_upgrade,
            upstream: upstream_upgrade,
            grant: crate::tunnel::Grant {
                conn: ctx.conn.clone(),
                key: key.clone(),
                forwarded_for,
                method,
                path: path.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
                protocol: protocol.into(),
            },
            watch: ctx.shared.tunnels.subscribe(),
            // The tunnel keeps the key's slot and the upstream connection while it lasts.
            held: std::mem::take(&mut ctx.held),
            log,
            request_id: ctx.request_id.clone(),
            client_ip: ctx.client_ip,
            idle: snap.caps.tunnel_idle_timeout,
        };
        tokio::spawn(crate::tunnel::run(start));
        let upgrade = resp.headers().get(header::UPGRADE).cloned();
        strip_hop_by_hop(resp.headers_mut(), upgrade);
        return Ok(resp.map(|b| ResponseBody::upstream(b).upgraded(record)));
    }
    strip_hop_by_hop(resp.headers_mut(), None);
    if snap.forwarding.host == proto::HostMode::Upstream
        && let Some(public) = &client_authority
    {
        proto::rewrite_upstream_urls(resp.headers_mut(), snap.upstream.origin(), public);
    }
    Ok(resp.map(|b| ResponseBody::upstream(b).paced_by(pacing)))
}

/// keygate's own answer to `OPTIONS` with `Max-Forwards: 0` (RFC 9110 §9.3.7): it is the
/// final recipient, and says which methods it forwards.
fn options_reply() -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(bytes::Bytes::new()));
    resp.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    resp
}

/// Request buffering (README "Request buffering"): a body that fits in
/// `server.request_buffer_bytes` is read completely before the upstream is contacted, within
/// `server.request_buffer_timeout` (else 408), so a slow client costs the upstream nothing until
/// its request is complete. A larger body streams; so does any body while the API half of the
/// request-buffer budget, or its client's share of it (its address's, its key's), is spent
/// ([`crate::buffer_budget`]): a body refused midway streams from where it was. Memory is
/// reserved as bytes arrive ([`crate::buffer_budget::ChargedBuf`]), not by declared length.
/// Returns what was read ahead.
///
/// Called only when [`buffers_body`] says there is a body to read.
async fn buffer_small_body(
    parts: &http::request::Parts,
    body: &mut Incoming,
    ctx: &mut Ctx<'_>,
) -> Result<crate::body::Prefix, Reject> {
    let caps = &ctx.snap.caps;
    let limit = caps.request_buffer_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let ceiling = match declared {
        Some(n) if n > limit as u64 => return Ok(Default::default()),
        Some(n) => n as usize,
        None => limit,
    };
    let Some(key) = ctx.key.as_ref() else {
        return Ok(Default::default());
    };
    let who = crate::buffer_budget::Claimant::api(ctx.client_ip, &key.id);
    let budget = &ctx.shared.buffer_budget;
    let spent = |why: crate::buffer_budget::Full| {
        tracing::debug!(
            request_id = request_id_str(ctx.request_id),
            why = ?why,
            "request-buffer budget (or this client's share) spent; streaming the body"
        );
    };
    let held = &mut ctx.held.buffer;
    let buf = match crate::buffer_budget::ChargedBuf::start(budget, &who, held, ceiling) {
        Ok(buf) => buf,
        Err(why) => {
            spent(why);
            return Ok(Default::default());
        }
    };
    let read_timeout = ctx.snap.server.body_read_timeout;
    let read = read_charged(body, buf, limit, read_timeout, (budget, &who), held);
    let result = tokio::time::timeout(caps.request_buffer_timeout, read).await;
    let timed_out = |phase: &'static str, timeout: std::time::Duration| {
        metrics::global().client_timeout(phase);
        client_event!(
            ClientEvent::ClientTimeout,
            ctx.client_ip,
            Level::INFO,
            event = "client_timeout",
            phase,
            request_id = request_id_str(ctx.request_id),
            client_ip = %ctx.client_ip,
            timeout_ms = timeout.as_millis() as u64,
            "request body too slow while being buffered ({phase}); the upstream was not contacted"
        );
        Reject::RequestTimeout
    };
    match result {
        Ok(Ok((prefix, None))) => Ok(prefix),
        Ok(Ok((prefix, Some(why)))) => {
            spent(why);
            Ok(prefix)
        }
        Ok(Err(crate::body::PrefixError::Stalled)) => Err(timed_out("body", read_timeout)),
        Ok(Err(e)) => {
            client_event!(ClientEvent::ClientBody, ctx.client_ip, Level::INFO, request_id = request_id_str(ctx.request_id), error = %e, "the client's request body failed (malformed framing or aborted) before the upstream was contacted");
            Err(Reject::BadRequest)
        }
        Err(_) => Err(timed_out("request_buffer", caps.request_buffer_timeout)),
    }
}

/// Reads `body` into `buf` until it ends or more than `limit` bytes have arrived (the prefix
/// may exceed `limit` by one frame), each step of `buf` reserved for `who` in `held` first.
/// Each wait for the next frame is bounded by `read_timeout`. When a step is refused, returns
/// what was read (with the frame in hand, unreserved: it goes upstream at once) as an
/// incomplete prefix, and why.
async fn read_charged(
    body: &mut Incoming,
    mut buf: crate::buffer_budget::ChargedBuf,
    limit: usize,
    read_timeout: std::time::Duration,
    budget: (
        &crate::buffer_budget::BufferBudget,
        &crate::buffer_budget::Claimant,
    ),
    held: &mut Option<crate::buffer_budget::BufferReservation>,
) -> Result<(crate::body::Prefix, Option<crate::buffer_budget::Full>), crate::body::PrefixError> {
    use crate::body::{Prefix, PrefixError};
    use http_body_util::BodyExt as _;
    let (budget, who) = budget;
    let done = |buf: crate::buffer_budget::ChargedBuf, trailers, complete| Prefix {
        data: buf.into_inner().freeze(),
        trailers,
        complete,
    };
    while buf.len() <= limit {
        let frame = tokio::time::timeout(read_timeout, body.frame())
            .await
            .map_err(|_| PrefixError::Stalled)?;
        let Some(frame) = frame else {
            return Ok((done(buf, None, true), None));
        };
        match frame?.into_data() {
            Ok(d) => {
                if let Err(why) = buf.push(budget, who, held, &d) {
                    let mut data = buf.into_inner();
                    data.extend_from_slice(&d);
                    let prefix = Prefix {
                        data: data.freeze(),
                        trailers: None,
                        complete: false,
                    };
                    return Ok((prefix, Some(why)));
                }
            }
            Err(f) => return Ok((done(buf, f.into_trailers().ok(), true), None)),
        }
    }
    Ok((done(buf, None, false), None))
}

/// Whether [`buffer_small_body`] has anything to do: a request with a body, no upgrade, and
/// request buffering on.
fn buffers_body(body: &Incoming, upgrade: bool, ctx: &Ctx<'_>) -> bool {
    use http_body::Body as _;
    !upgrade && ctx.snap.caps.request_buffer_bytes != 0 && !body.is_end_stream()
}

/// An upstream connection permit (`[upstream] max_connections`), waiting at most
/// `upstream.queue_timeout`; 503 when none comes.
async fn upstream_permit(
    ctx: &Ctx<'_>,
    key: &Key,
) -> Result<crate::upstream_cap::UpstreamPermit, Reject> {
    let caps = &ctx.snap.caps;
    ctx.shared
        .upstream_cap
        .acquire_for(caps)
        .await
        .map_err(|why| why.refuse(caps, ctx.client_ip, ctx.request_id, Some(&key.id), None))
}

/// Headers every response gets: request id, HSTS, and the key's rate-limit state.
fn finish_headers(resp: &mut Response<ResponseBody>, ctx: &Ctx<'_>) {
    let h = resp.headers_mut();
    h.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
    if let Some(hsts) = &ctx.snap.server.hsts
        && !h.contains_key(header::STRICT_TRANSPORT_SECURITY)
    {
        h.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
    if let Some(r) = ctx.rate {
        h.insert(RATELIMIT_LIMIT.clone(), number_value(r.limit.into()));
        h.insert(
            RATELIMIT_REMAINING.clone(),
            unique_per_response(number_value(r.remaining.into())),
        );
        h.insert(
            RATELIMIT_RESET.clone(),
            unique_per_response(number_value(r.reset_secs)),
        );
    }
    let burst = ctx
        .rate
        .zip(ctx.key.as_ref().and_then(|k| k.limiter.as_ref()));
    if (burst.is_some() || ctx.quota.is_some())
        && let Some((policy, current)) =
            ratelimit_fields(burst.map(|(r, l)| (r, l.rate())), ctx.quota)
    {
        h.insert(RATELIMIT_POLICY.clone(), policy);
        h.insert(RATELIMIT.clone(), unique_per_response(current));
    }
}

/// A count or a number of seconds as a field value. Below 256 it is a clone of a value made once
/// (a reference count, no allocation); a larger one is formatted (one allocation). The three
/// `RateLimit-*` numbers of a rate-limited key's every response cost three allocations before
/// (issue 10).
fn number_value(n: u64) -> HeaderValue {
    static SMALL: std::sync::LazyLock<Vec<HeaderValue>> =
        std::sync::LazyLock::new(|| (0..256u64).map(HeaderValue::from).collect());
    usize::try_from(n)
        .ok()
        .and_then(|i| SMALL.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(n))
}

/// A field value formatted on the stack (at most 192 bytes; more is an error), so that the only
/// allocation is the value's own.
struct FieldBuf {
    buf: [u8; 192],
    len: usize,
}

impl FieldBuf {
    fn new() -> Self {
        FieldBuf {
            buf: [0; 192],
            len: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn value(&self) -> Option<HeaderValue> {
        HeaderValue::from_bytes(&self.buf[..self.len]).ok()
    }
}

impl std::fmt::Write for FieldBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `RateLimit-Policy` and `RateLimit` in the multi-policy form of the IETF httpapi draft
/// "RateLimit header fields for HTTP", draft-ietf-httpapi-ratelimit-headers-10 (September
/// 2025; -11 of May 2026 keeps this syntax): Structured-Field lists with one member per policy,
/// a quoted policy name and parameters, `q` (quota units) and `w` (window, seconds) in the
/// policy, `r` (remaining units) and `t` (seconds until reset) in the current state.
///
/// * `"burst"`: the per-key rate limit, a token bucket of `q` = burst cells that refills
///   completely in `w` seconds (burst × period / count, rounded up, ≥ 1).
/// * `"quota"`: the calendar quota, `q` = the limit, `w` = the window's length (86400 for a day,
///   the month's length for a month); units are request costs from `[quota_costs]`.
///
/// Returns (`RateLimit-Policy`, `RateLimit`), formatted without a `String` (two allocations, the
/// values'; four before).
pub fn ratelimit_fields(
    burst: Option<(RateInfo, crate::limits::Rate)>,
    quota: Option<QuotaState>,
) -> Option<(HeaderValue, HeaderValue)> {
    use std::fmt::Write as _;
    let mut policy = FieldBuf::new();
    let mut current = FieldBuf::new();
    if let Some((info, rate)) = burst {
        let refill = rate.period.as_secs_f64() * f64::from(info.limit) / f64::from(rate.count);
        let w = (refill.ceil() as u64).max(1);
        write!(policy, "\"burst\";q={};w={w}", info.limit).ok()?;
        write!(
            current,
            "\"burst\";r={};t={}",
            info.remaining, info.reset_secs
        )
        .ok()?;
    }
    if let Some(q) = quota {
        let sep = if policy.is_empty() { "" } else { ", " };
        write!(
            policy,
            "{sep}\"quota\";q={};w={}",
            q.quota.limit, q.window_secs
        )
        .ok()?;
        write!(
            current,
            "{sep}\"quota\";r={};t={}",
            q.remaining, q.reset_secs
        )
        .ok()?;
    }
    Some((policy.value()?, current.value()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it (the closure is never
    /// run; it only names the type).
    #[allow(unreachable_code, clippy::diverging_sub_expression)]
    fn size_of_future<F: Future>(_: impl FnOnce() -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every request's future is boxed (server.rs) and held until its response head: its size is
    /// what each request in flight costs beyond its buffers (issue 10: 500 HTTP/2 streams in
    /// flight). Rare paths are boxed where they are awaited (verification, webhooks,
    /// introspection, Redis calls, request buffering, a wait for an upstream permit) and the
    /// exchange with the upstream moves the request into its own box at once, so the common
    /// path's future stays in jemalloc's 3 KiB class (3,072 bytes, with the 16 bytes server.rs
    /// adds). It was 3,296 bytes (3.5 KiB class) before the exchange, request buffering and
    /// the upstream-permit wait were boxed, ~7 KiB in an earlier state.
    #[test]
    #[allow(unreachable_code, clippy::diverging_sub_expression)]
    fn the_per_request_future_stays_small() {
        let sizes = [
            (
                "handle",
                size_of_future(|| handle(unreachable!(), unreachable!(), unreachable!())),
            ),
            (
                "admit",
                size_of_future(|| admit(unreachable!(), unreachable!())),
            ),
            (
                "forward",
                size_of_future(|| forward(unreachable!(), unreachable!(), unreachable!())),
            ),
            (
                "upstream_permit",
                size_of_future(|| upstream_permit(unreachable!(), unreachable!())),
            ),
            (
                "Exchange::start",
                size_of_future(|| {
                    Exchange::start(
                        unreachable!(),
                        unreachable!(),
                        unreachable!(),
                        unreachable!(),
                    )
                }),
            ),
        ];
        for (name, size) in sizes {
            eprintln!("{name}: {size} bytes");
        }
        let handle = sizes[0].1;
        assert!(
            handle + 16 <= 3072 - 16,
            "pipeline::handle's future is {handle} bytes: box what a rare path awaits"
        );
        // What the common path awaits in turn; each is part of `handle`'s size.
        for (name, size) in &sizes[3..] {
            assert!(*size <= 256, "{name}'s future is {size} bytes");
        }
    }

    /// Request ids differ in every response: never indexed by HPACK (see `unique_per_response`),
    /// whether keygate made them or the client sent them.
    #[test]
    fn request_ids_are_not_indexed_by_hpack() {
        assert!(new_request_id().is_sensitive());
        let req = Request::builder()
            .header(&X_REQUEST_ID, "client-chosen.id_1")
            .body(())
            .unwrap();
        let id = request_id(&req);
        assert_eq!(id, "client-chosen.id_1");
        assert!(id.is_sensitive());
        assert_eq!(request_id_str(&id), "client-chosen.id_1");
    }

    /// The RateLimit fields, formatted on the stack, read as before (the draft's syntax).
    #[test]
    fn ratelimit_fields_are_formatted_as_the_draft_says() {
        let info = RateInfo {
            limit: 10,
            remaining: 7,
            reset_secs: 2,
            retry_after: None,
        };
        let rate = crate::limits::Rate {
            count: 5,
            period: std::time::Duration::from_secs(1),
        };
        let quota = QuotaState {
            quota: crate::quota::Quota {
                limit: 1000,
                period: crate::quota::Period::Day,
            },
            used: 1,
            remaining: 999,
            reset_secs: 3600,
            window_secs: 86400,
            refused: None,
        };
        let (p, c) = ratelimit_fields(Some((info, rate)), Some(quota)).unwrap();
        assert_eq!(p, "\"burst\";q=10;w=2, \"quota\";q=1000;w=86400");
        assert_eq!(c, "\"burst\";r=7;t=2, \"quota\";r=999;t=3600");
        let (p, c) = ratelimit_fields(None, Some(quota)).unwrap();
        assert_eq!(p, "\"quota\";q=1000;w=86400");
        assert_eq!(c, "\"quota\";r=999;t=3600");
        let max = QuotaState {
            quota: crate::quota::Quota {
                limit: u64::MAX,
                period: crate::quota::Period::Month,
            },
            used: 0,
            remaining: u64::MAX,
            reset_secs: u64::MAX,
            window_secs: u64::MAX,
            refused: None,
        };
        let info = RateInfo {
            limit: u32::MAX,
            remaining: u32::MAX,
            reset_secs: u64::MAX,
            retry_after: None,
        };
        let (p, _) = ratelimit_fields(Some((info, rate)), Some(max)).expect("fits 192 bytes");
        assert!(p.to_str().unwrap().ends_with(&format!("w={}", u64::MAX)));
    }

    #[test]
    fn numbers_as_field_values() {
        for n in [0, 1, 9, 10, 255, 256, 1000, u64::MAX] {
            assert_eq!(number_value(n), n.to_string().as_str());
        }
        // A clone of the table's value: marking it never-indexed leaves the table's alone.
        let mut v = number_value(7);
        v.set_sensitive(true);
        assert!(!number_value(7).is_sensitive());
    }
}
