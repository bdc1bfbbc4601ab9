//! The upstream side: a connection pool per worker, header rewriting (SPEC §4), timeouts,
//! retries on reused connections and protocol upgrades.
//!
//! **Keep-alive races.** An upstream may close an idle keep-alive connection at the moment
//! keygate picks it from the pool for the next request (uvicorn closes them after 5 s, gunicorn
//! after 2 s, Node after 5 s). Two defences, as Go's `net/http` transport and nginx have them:
//! the pool drops connections idle for `[upstream] pool_idle_timeout` (default 1 s, below every
//! common upstream keep-alive), and a request that fails on a *reused* connection before any
//! response byte arrived is sent once more on a new connection, when that is safe: it was never
//! written (the connection was found closed first), or its method is idempotent (RFC 9110
//! §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and its body, if any, is in memory in full
//! (read ahead by request buffering, `[server] request_buffer_bytes`; a body that was streamed
//! cannot be replayed). A POST that was written is never sent twice; a failure on a connection
//! opened for the request is not retried either (the upstream really is failing).
//!
//! **The pool** (issue 10). Each worker thread has its own list of idle HTTP/1.1 connections
//! (hyper's `client::conn::http1`), used last in, first out, so a request stays on its thread
//! from client to upstream and back. A request takes an idle connection or opens one; the
//! connection goes back to the list when its response has been read. So keygate never holds
//! more upstream connections than it has had requests in flight at once (bounded by
//! `[upstream] max_connections`, `upstream_cap.rs`); hyper-util's pool, used before, raced a new
//! connection against every wait for an idle one and kept the winner and the loser (77 upstream
//! connections for 50 clients, 807 for 500 requests in flight).
//!
//! **Memory per upstream connection** (issue 10). hyper's HTTP/1.1 client keeps, per
//! connection, an 8 KiB write buffer, a read buffer of 8 KiB (up to [`UPSTREAM_READ_BUF`]), its
//! protocol task (~3.7 KiB) and the queue its requests pass through (one 32-request block of
//! ~8 KiB, jemalloc's 10 KiB class); none of these sizes can be set. After 32 requests that
//! queue would keep a second block for good, so a pooled connection is renewed every
//! [`RENEW_AFTER`] requests: hyper hands the socket back while it is idle and a new client
//! connection is started on it (nothing is sent; the upstream sees the same TCP connection).
//! A request that offers an upgrade (`Upgrade`, only for `[upstream] upgrade_protocols`) goes
//! on a connection of its own, run with hyper's upgrade support so that a 101 hands the socket
//! to the tunnel; when the upstream declines, that connection is pooled like the others (and
//! closed instead of renewed).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, StatusCode, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::body::{Pacing, ReadPacer, RequestBody, RequestStats};

/// An upstream's response head, with the [`Pacing`] of the connection it came on (for
/// [`crate::body::ResponseBody::paced_by`]). Carried beside the response rather than in its
/// extensions: an extension costs three allocations per request (the map, its table and the
/// boxed value; issue 10).
pub type Answer = (http::Response<Incoming>, Pacing);

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub use crate::proto::{is_hop_by_hop, strip_hop_by_hop};

type Connector = HttpsConnector<HttpConnector>;

/// The protected service.
pub struct Upstream {
    /// One connection pool per worker thread (see [`Upstream::pool`]).
    pools: Box<[OnceLock<Arc<Pool>>]>,
    connector: Connector,
    pool_idle_timeout: Duration,
    /// The upstream URL's scheme and authority, which connections are opened to.
    connect_uri: Uri,
    /// `Host` for requests that carry none: the URL's host, and its port when not the scheme's
    /// default (as hyper-util's client set it, RFC 9112 §3.2).
    host: HeaderValue,
    scheme: Scheme,
    authority: Authority,
    /// Prefix from the configured URL's path, without trailing slash ("" for none).
    base_path: String,
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream did not answer within the request timeout")]
    Timeout,
    #[error("request body over the limit")]
    BodyTooLarge,
    /// The client stopped sending its body (`body_read_timeout`): the client's fault.
    #[error("the client sent no request-body byte within body_read_timeout")]
    ClientTimeout,
    #[error("the client's request body failed (malformed framing or aborted)")]
    ClientBody,
    #[error("cannot connect to upstream: {0}")]
    Connect(String),
    #[error("upstream request failed: {0}")]
    Other(String),
}

impl UpstreamError {
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Timeout => "timeout",
            UpstreamError::Connect(_) => "connect",
            UpstreamError::BodyTooLarge
            | UpstreamError::ClientTimeout
            | UpstreamError::ClientBody
            | UpstreamError::Other(_) => "other",
        }
    }
}

/// Formats an error with its whole `source()` chain, for the operator's log.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

impl Upstream {
    /// Errors are plain messages; a message starting with `ca:` belongs to `upstream.ca`.
    /// `pool_idle_timeout`: how long an idle upstream connection is kept for reuse.
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        request_timeout: Duration,
        pool_idle_timeout: Duration,
        extra_ca: Option<&[u8]>,
    ) -> Result<Self, String> {
        // Checked before parsing so that an unparsable URL with a password is not echoed.
        let authority_part = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default();
        if authority_part.contains('@') {
            return Err("URL must not contain credentials (user:password@)".to_string());
        }
        // Errors show the URL without its query or fragment, which may carry a secret
        // (`?api_key=…`; a fresh user, T6-6: the refusal repeated it in `check` and the log).
        let shown = url.split(['?', '#']).next().unwrap_or_default();
        let uri: Uri = url.parse().map_err(|_| format!("invalid URL {shown:?}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("URL {shown:?} needs http:// or https://"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("URL {shown:?} must be http:// or https://"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("URL {shown:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err("URL must not contain credentials".to_string());
        }
        if uri.query().is_some() {
            return Err(format!(
                "URL {shown:?} must not have a query (not repeated here)"
            ));
        }
        // A fragment is never sent, so whatever it holds would be dropped silently (fresh user
        // T8: `http://…/base#frag?token=x` passed `check`).
        if url.contains('#') {
            return Err(format!(
                "URL {shown:?} must not have a fragment (#…; not repeated here)"
            ));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));

        let mut roots = rustls::RootCertStore::empty();
        if scheme == Scheme::HTTPS {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
        if let Some(pem) = extra_ca {
            let certs = crate::tls::parse_certs(pem).map_err(|e| format!("ca: {e}"))?;
            for c in certs {
                roots.add(c).map_err(|e| format!("ca: {e}"))?;
            }
        }
        if scheme == Scheme::HTTPS && roots.is_empty() {
            return Err(
                "ca: no trusted root certificates for the https upstream (set upstream.ca)"
                    .to_string(),
            );
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let connect_uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| e.to_string())?;
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(p) if p != default_port => format!("{}:{p}", authority.host()),
            _ => authority.host().to_string(),
        };
        let host =
            HeaderValue::from_str(&host).map_err(|_| format!("URL {shown:?} has no host"))?;
        Ok(Upstream {
            pools: (0..POOLS).map(|_| OnceLock::new()).collect(),
            connector,
            pool_idle_timeout,
            connect_uri,
            host,
            scheme,
            authority,
            base_path,
            request_timeout,
        })
    }

    /// The request target sent upstream (origin-form, RFC 9112 §3.2.1): the URL's base path
    /// followed by the client's path and query.
    pub fn uri_for(&self, pq: Option<&PathAndQuery>) -> Uri {
        if self.base_path.is_empty() {
            return pq.map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        }
        let pq_str = pq.map_or("/", |p| p.as_str());
        format!("{}{}", self.base_path, pq_str)
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"))
    }

    /// Sends the request; waits for the response head. The deadline is `request_timeout` of
    /// upstream silence after the last request-body bytes went out, so a long upload is not
    /// mistaken for a slow upstream, and time spent waiting for a client that stalls its body is
    /// the client's (`body_read_timeout`, [`UpstreamError::ClientTimeout`]). A request that may
    /// be replayed is sent once more on a new connection when a reused one fails (module doc);
    /// `stats.retried()` then says so.
    pub async fn send(
        &self,
        req: http::Request<RequestBody>,
        stats: &Arc<RequestStats>,
    ) -> Result<Answer, UpstreamError> {
        let fut = self.send_or_retry(req, stats);
        tokio::pin!(fut);
        // Upstream silence is measured from the last request-body progress, sampled every
        // `tick`: a 504 comes between `request_timeout` and `request_timeout + tick` after it
        // (fresh user T8-3: restarting a whole `request_timeout` whenever bytes had moved
        // doubled it for every request with a body).
        let tick = (self.request_timeout / 4).min(Duration::from_secs(1));
        let mut seen = stats.bytes();
        let mut quiet_since = tokio::time::Instant::now();
        let wake = tokio::time::sleep(self.request_timeout.min(tick));
        tokio::pin!(wake);
        loop {
            tokio::select! {
                res = &mut fut => {
                    return res.map_err(|e| {
                        if stats.over_limit() {
                            UpstreamError::BodyTooLarge
                        } else if stats.client_timed_out() {
                            UpstreamError::ClientTimeout
                        } else if stats.client_failed() {
                            UpstreamError::ClientBody
                        } else {
                            match e {
                                SendError::Connect(e) => UpstreamError::Connect(Chain(&*e).to_string()),
                                SendError::Http(e) => UpstreamError::Other(Chain(&e).to_string()),
                            }
                        }
                    });
                }
                () = &mut wake => {
                    let (bytes, now) = (stats.bytes(), tokio::time::Instant::now());
                    if bytes != seen || stats.waiting_on_client() {
                        seen = bytes;
                        quiet_since = now;
                    } else if now >= quiet_since + self.request_timeout {
                        return Err(UpstreamError::Timeout);
                    }
                    wake.as_mut().reset((quiet_since + self.request_timeout).min(now + tick));
                }
            }
        }
    }

    async fn send_or_retry(
        &self,
        mut req: http::Request<RequestBody>,
        stats: &Arc<RequestStats>,
    ) -> Result<Answer, SendError> {
        use http_body::Body as _;
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.host.clone());
        }
        let pool = self.pool();
        // A request that offers an upgrade goes on a connection of its own that can hand its
        // socket to the tunnel (`Kind::Upgradable`); pooled connections cannot.
        let offers_upgrade = req.headers().contains_key(header::UPGRADE);
        let mut conn = (!offers_upgrade).then(|| pool.checkout()).flatten();
        if let Some(c) = conn.take_if(|c| c.sent >= RENEW_AFTER) {
            // Renewed in the request's own time: a few polls of this worker's tasks. Done in
            // the background instead, the connection was missing from the pool meanwhile and
            // busy workers opened new ones in its place (~130 connects/s at 20k requests/s).
            conn = Box::pin(c.renew()).await;
        }
        let Some(mut conn) = conn else {
            // A new connection: a failure here is the upstream's, never retried.
            let kind = if offers_upgrade {
                Kind::Upgradable
            } else {
                Kind::Renewable
            };
            return Box::pin(self.send_on_new(pool, req.map(Box::new), kind)).await;
        };
        // Kept only for requests that may be replayed: one copy of the head per GET sent on a
        // reused connection. The fields as a list (one allocation; the names and values are
        // reference counts): a `HeaderMap` clone costs two (its index and its entries), for a
        // copy that is almost never used (issue 10).
        // The body too when it is in memory in full (fresh user T8-2: a PUT with a small,
        // read-ahead body got 502 where nginx retries it); `None` for no body (the common GET:
        // no allocation), a streamed one is never replayed.
        let body = req.body();
        let replay_body = if !is_idempotent(req.method()) {
            None
        } else if body.is_end_stream() {
            Some(None)
        } else {
            body.replay_copy().map(|b| Some(Box::new(b)))
        };
        let replay = replay_body.map(|body| {
            (
                req.method().clone(),
                req.uri().clone(),
                req.headers()
                    .iter()
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect::<Vec<_>>(),
                body,
            )
        });
        let pacing = conn.pacer.begin(stats);
        let guard = AbortOnDrop::arm(&conn);
        conn.sent += 1;
        let sent = conn.tx.try_send_request(req.map(Box::new)).await;
        guard.disarm();
        match sent {
            Ok(resp) => {
                pool.checkin(conn, &resp);
                Ok((resp, pacing))
            }
            Err(mut e) => {
                if let Some(unsent) = e.take_message() {
                    // Found closed before a byte was written: sending it is not sending twice.
                    stats.set_retried();
                    return Box::pin(self.send_on_new(pool, unsent, Kind::Renewable)).await;
                }
                match replay {
                    Some((method, uri, headers, body)) if failed_before_response(e.error()) => {
                        stats.set_retried();
                        let body =
                            body.unwrap_or_else(|| Box::new(RequestBody::empty(stats.clone())));
                        let mut again = http::Request::new(body);
                        *again.method_mut() = method;
                        *again.uri_mut() = uri;
                        let h = again.headers_mut();
                        h.reserve(headers.len());
                        // In order: each name's values keep theirs.
                        for (n, v) in headers {
                            h.append(n, v);
                        }
                        Box::pin(self.send_on_new(pool, again, Kind::Renewable)).await
                    }
                    _ => Err(SendError::Http(e.into_error())),
                }
            }
        }
    }

    /// Sends on a connection opened for this request; it joins the pool after the response.
    /// The connect is boxed: its future (the TCP/TLS connector's and the HTTP/1.1 handshake's
    /// state, ~2 KiB) would otherwise be part of every request's future, which the server boxes
    /// per request, whether or not the request opens a connection.
    async fn send_on_new(
        &self,
        pool: &Arc<Pool>,
        req: http::Request<Box<RequestBody>>,
        kind: Kind,
    ) -> Result<Answer, SendError> {
        let mut conn = Box::pin(self.connect(kind)).await?;
        let pacing = conn.pacer.begin(req.body().stats());
        let guard = AbortOnDrop::arm(&conn);
        conn.sent += 1;
        let sent = conn.tx.send_request(req).await;
        guard.disarm();
        let resp = sent.map_err(SendError::Http)?;
        pool.checkin(conn, &resp);
        Ok((resp, pacing))
    }

    /// Opens a connection (TCP, and TLS for an `https` upstream, within `connect_timeout`) and
    /// starts its HTTP/1.1 protocol ([`Conn::start`]).
    async fn connect(&self, kind: Kind) -> Result<Conn, SendError> {
        use tower_service::Service as _;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector
            .call(self.connect_uri.clone())
            .await
            .map_err(SendError::Connect)?;
        Conn::start(io, kind)
            .await
            .map_err(|e| SendError::Connect(e.into()))
    }

    /// This worker thread's pool. Each worker runs its own single-threaded runtime
    /// (`server::run`), and a connection's I/O runs on the runtime that opened it, so a pool
    /// shared between workers would have one worker's requests written and read by another
    /// worker's thread (two cross-thread wake-ups per request). With a pool per worker, a
    /// request stays on its thread from client to upstream and back, as in nginx's workers.
    fn pool(&self) -> &Arc<Pool> {
        self.pools[POOL.with(|p| *p)].get_or_init(|| Arc::new(Pool::new(self.pool_idle_timeout)))
    }
}

/// Why an upstream request failed.
enum SendError {
    /// No connection could be opened (TCP, TLS).
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed or the upstream's response was not HTTP/1.1.
    Http(hyper::Error),
}

type Sender = SendRequest<Box<RequestBody>>;

/// An upstream connection's socket (TCP, or TLS over TCP for an `https` upstream).
type Io = hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>;

/// What an upstream connection's protocol task can do with its socket when it ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Pooled, renewed on the same socket every [`RENEW_AFTER`] requests.
    Renewable,
    /// Opened for a request that offers an upgrade: on a 101 its socket becomes the tunnel's.
    /// Pooled like the others when the upstream declines, but closed rather than renewed.
    Upgradable,
}

/// Requests one hyper connection carries before it is renewed on the same socket.
///
/// hyper queues requests to its HTTP/1.1 connection task through a tokio channel whose
/// blocks hold 32 requests (~8 KiB: 32 × the 248-byte `http::Request` and its reply
/// handle). When the 33rd request crosses into a second block, tokio keeps the first one for
/// reuse, so every upstream connection that had served 32 requests held two blocks, 16 KiB,
/// for one request in flight at a time (issue 10: 500 busy upstream connections held ~8 MiB
/// of them). Renewed (the socket handed back by hyper while idle and a new handshake made on
/// it, which costs no bytes on the wire), a connection holds one block and starts with fresh
/// buffers.
const RENEW_AFTER: u32 = 32;

/// An upstream connection: the handle requests are sent through, and its protocol task.
struct Conn {
    tx: Sender,
    /// The protocol task; yields the socket back when asked to (`hand_back`) and idle.
    task: tokio::task::JoinHandle<Option<Io>>,
    /// Tells the task to hand the socket back rather than close it (`None`: it cannot).
    hand_back: Option<tokio::sync::oneshot::Sender<()>>,
    /// Requests given to this hyper connection.
    sent: u32,
    /// Paces its reads by the client a response goes to (body.rs, `ReadPacer`).
    pacer: Arc<ReadPacer>,
}

impl Conn {
    /// Runs the HTTP/1.1 protocol on `io` on a task of this worker's runtime, which ends when
    /// the connection closes or its [`SendRequest`] is dropped while idle.
    async fn start(io: Io, kind: Kind) -> Result<Self, hyper::Error> {
        let (tx, protocol) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(UPSTREAM_READ_BUF)
            .handshake(io)
            .await?;
        let pacer = Arc::new(ReadPacer::default());
        if kind == Kind::Upgradable {
            let task = tokio::spawn(crate::body::paced(pacer.clone(), async move {
                if let Err(e) = protocol.with_upgrades().await {
                    tracing::debug!(error = %Chain(&e), "upstream connection ended with an error");
                }
                None
            }));
            return Ok(Conn {
                tx,
                task,
                hand_back: None,
                sent: 0,
                pacer,
            });
        }
        let (hand_back, renewal) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(crate::body::paced(pacer.clone(), drive(protocol, renewal)));
        Ok(Conn {
            tx,
            task,
            hand_back: Some(hand_back),
            sent: 0,
            pacer,
        })
    }

    /// The same socket under a new hyper connection (`RENEW_AFTER`); `None` when the socket
    /// cannot be reused (closed, bytes arrived unasked, or an upgradable connection, which is
    /// closed instead). Call only while idle (as pooled).
    async fn renew(self) -> Option<Self> {
        let Conn {
            tx,
            task,
            hand_back,
            ..
        } = self;
        hand_back?.send(()).ok()?;
        drop(tx);
        let io = task.await.ok().flatten()?;
        Conn::start(io, Kind::Renewable).await.ok()
    }
}

/// A pooled connection's protocol task: runs hyper's HTTP/1.1 client until its sender is
/// dropped while idle or the connection closes. Hands the socket back (for [`Conn::renew`])
/// when told to before the sender was dropped and nothing is left unread; else shuts it down
/// (a TLS upstream gets its close_notify) and closes it.
async fn drive(
    mut protocol: hyper::client::conn::http1::Connection<Io, Box<RequestBody>>,
    mut renewal: tokio::sync::oneshot::Receiver<()>,
) -> Option<Io> {
    if let Err(e) = std::future::poll_fn(|cx| protocol.poll_without_shutdown(cx)).await {
        tracing::debug!(error = %Chain(&e), "upstream connection ended with an error");
        return None;
    }
    let parts = protocol.into_parts();
    let mut io = parts.io;
    if renewal.try_recv().is_ok() && parts.read_buf.is_empty() {
        return Some(io);
    }
    let _ =
        std::future::poll_fn(|cx| hyper::rt::Write::poll_shutdown(std::pin::Pin::new(&mut io), cx))
            .await;
    None
}

/// Ends a connection's task if the request being sent on it is abandoned before its response
/// head (the `request_timeout` 504, or the client gone). Without it, a connection whose upstream
/// had stopped reading the body stayed open, blocked writing, outside `[upstream]
/// max_connections` (its permit was released with the request) until the upstream read again
/// (a second fresh user: 6 such connections with a cap of 2), and the client's unread body with
/// it. Aborted, the task drops the socket and the body (which lingers for the client's sake).
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl AbortOnDrop {
    fn arm(conn: &Conn) -> Self {
        AbortOnDrop(Some(conn.task.abort_handle()))
    }

    /// The response head came (or the send failed by itself): nothing to abort.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Connection pools per [`Upstream`]: one per worker thread (threads past this share).
const POOLS: usize = 64;

/// Idle connections one pool keeps at most (the oldest is closed beyond it).
const POOL_MAX_IDLE: usize = 1024;

/// The largest read buffer of an upstream connection (hyper's default grows to ~400 KiB).
/// Reads start at 8 KiB (hyper's smallest) and grow to this when a read fills the buffer, so a
/// small response keeps 8 KiB per upstream connection and a large body is read 16 KiB at a
/// time. Each body chunk passed on to the client keeps its whole read buffer alive until it is
/// written, so this is what a slow reader can pin per chunk (issue 9 §3: 1,000 slow readers of
/// 1 MiB bodies). 64 bytes less than 16 KiB, so that a chunk, with HTTP/1.1 chunked framing and
/// the TLS record's 22 bytes, is one record that fits a 16 KiB allocation (16 KiB + 22 would
/// take jemalloc's 20 KiB size class). hyper also starts a new buffer for every response
/// (it reads ahead for the connection's close while the last response's bytes are still held),
/// so a busy connection holds two: with reads of exactly 16 KiB, 500 requests in flight over
/// HTTP/2 held ~20 MiB of read buffers, half of it unused (issue 10). It is also the largest
/// upstream response head accepted (16,320 bytes; nginx's `proxy_buffer_size` default is
/// 4–8 KiB); a larger one is a 502 (tests/upstream_buffers.rs).
pub const UPSTREAM_READ_BUF: usize = 16 * 1024 - 64;

static NEXT_POOL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    /// This thread's pool index, given out in the order threads first forward a request.
    static POOL: usize = NEXT_POOL.fetch_add(1, Relaxed) % POOLS;
}

/// One worker's idle upstream connections, oldest first, each with the time it became idle.
struct Pool {
    idle: Mutex<VecDeque<(Conn, Instant)>>,
    idle_timeout: Duration,
    /// Whether the task that closes expired connections runs.
    reaper: AtomicBool,
}

impl Pool {
    fn new(idle_timeout: Duration) -> Self {
        Pool {
            idle: Mutex::new(VecDeque::new()),
            idle_timeout,
            reaper: AtomicBool::new(false),
        }
    }

    /// The most recently used idle connection that is still open and idle for less than
    /// `pool_idle_timeout`; `None` when there is none (then a new one is opened).
    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((conn, since)) = idle.pop_back() {
            if now.saturating_duration_since(since) >= self.idle_timeout {
                // The rest are older still.
                idle.clear();
                return None;
            }
            if conn.tx.is_ready() {
                return Some(conn);
            }
        }
        None
    }

    /// Puts a connection back once its response has been read: at once when it is (a small
    /// response arrives whole), else from a task that waits for it. An upgraded connection
    /// (101) belongs to the tunnel and never comes back.
    fn checkin(self: &Arc<Self>, mut conn: Conn, resp: &http::Response<Incoming>) {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        if conn.tx.is_ready() {
            self.push(conn);
        } else if !conn.tx.is_closed() {
            let pool = self.clone();
            tokio::spawn(async move {
                if conn.tx.ready().await.is_ok() {
                    pool.push(conn);
                }
            });
        }
    }

    fn push(self: &Arc<Self>, conn: Conn) {
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() >= POOL_MAX_IDLE {
                idle.pop_front();
            }
            idle.push_back((conn, Instant::now()));
        }
        if !self.reaper.swap(true, Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        }
    }

    /// Closes the connections idle for `pool_idle_timeout` or more (dropping a connection's
    /// sender ends its task, which closes the socket).
    fn prune(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while idle.front().is_some_and(|(conn, since)| {
            conn.tx.is_closed() || now.saturating_duration_since(*since) >= self.idle_timeout
        }) {
            idle.pop_front();
        }
    }
}

/// Every `pool_idle_timeout`, closes a pool's expired connections, so that idle upstream
/// connections do not outlive it when traffic stops; ends with the pool (a reload).
async fn reap(pool: Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.prune();
    }
}

/// Safe to send twice (RFC 9110 §9.2.2).
fn is_idempotent(m: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(m)
}

/// The connection was closed or reset under a written request before any response head
/// arrived (the request failed rather than getting an answer).
fn failed_before_response(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() {
        return true;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            );
        }
        cur = err.source();
    }
    false
}

/// What the upstream must be told about the client (SPEC §4).
pub struct ForwardInfo<'a> {
    pub peer: IpAddr,
    /// `peer` as a field value ([`ip_value`]); a connection makes it once for all its requests.
    pub peer_value: HeaderValue,
    pub peer_is_trusted_proxy: bool,
    /// The client address keygate decided on (SPEC §5), sent as `X-Real-IP`.
    pub client_ip: IpAddr,
    pub request_id: &'a HeaderValue,
    pub identity_header: &'a HeaderName,
    pub key_id: &'a HeaderValue,
    pub credential_header: &'a HeaderName,
    /// The `Upgrade` value to forward (`proto::upgrade_offer`), if the request may upgrade.
    pub upgrade: Option<HeaderValue>,
    /// The authority the client named (`proto::client_authority`), for `X-Forwarded-Host` and,
    /// with `host = "client"`, `Host`.
    pub client_authority: Option<&'a HeaderValue>,
    /// Send the client's authority as `Host` (`[upstream] host = "client"`); else the upstream
    /// URL's (set by the HTTP client from the request URI).
    pub host_from_client: bool,
}

static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Rewrites a client request's headers for the upstream.
pub fn rewrite_request_headers(h: &mut HeaderMap, info: &ForwardInfo<'_>) {
    strip_hop_by_hop(h, info.upgrade.clone());
    // Credentials never leave keygate; the fields keygate sets are its alone, in any spelling.
    crate::proto::remove_managed_fields(
        h,
        &[info.credential_header, info.identity_header],
        info.peer_is_trusted_proxy,
    );
    h.insert(info.identity_header.clone(), info.key_id.clone());
    h.remove(header::HOST);
    if info.host_from_client
        && let Some(host) = info.client_authority
    {
        h.insert(header::HOST, host.clone());
    }

    // X-Forwarded-For: a trusted proxy's chain is extended with the proxy; an untrusted
    // client's header is discarded (it would let anyone claim any address upstream).
    let mut xff = String::new();
    if info.peer_is_trusted_proxy {
        for v in h.get_all(&X_FORWARDED_FOR).iter() {
            if let Ok(s) = v.to_str() {
                if !xff.is_empty() {
                    xff.push_str(", ");
                }
                xff.push_str(s.trim());
            }
        }
    }
    if xff.is_empty() {
        h.insert(X_FORWARDED_FOR.clone(), info.peer_value.clone());
    } else {
        xff.push_str(", ");
        xff.push_str(info.peer_value.to_str().unwrap_or_default());
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert(X_FORWARDED_FOR.clone(), v);
        }
    }
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    if !h.contains_key(&X_FORWARDED_HOST)
        && let Some(host) = info.client_authority
    {
        h.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    let real_ip = if info.client_ip == info.peer {
        info.peer_value.clone()
    } else {
        ip_value(info.client_ip)
    };
    h.insert(X_REAL_IP.clone(), real_ip);
    h.insert(X_REQUEST_ID.clone(), info.request_id.clone());
}

/// An IP address as a field value (`192.0.2.1`, `2001:db8::1`), formatted without a `String`.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    use std::io::Write as _;
    // The longest text form is 45 bytes (`ffff:…:255.255.255.255`).
    let mut buf = [0u8; 48];
    let mut w = &mut buf[..];
    let _ = write!(w, "{ip}");
    let n = 48 - w.len();
    HeaderValue::from_bytes(&buf[..n]).expect("an IP address is a valid field value")
}

impl Upstream {
    /// The upstream URL's scheme, authority and base path (no trailing `/`), for rewriting
    /// `Location` (`proto::rewrite_location`).
    pub fn origin(&self) -> (&Scheme, &Authority, &str) {
        (&self.scheme, &self.authority, &self.base_path)
    }

    /// Whether a TCP connection to the upstream can be opened now (for `/readyz`), name
    /// resolution included, within `within`. Timed on the side runtime
    /// ([`crate::side_runtime`]), not on the worker serving the admin request: a worker busy
    /// with a flood makes `/readyz` answer late, never say "upstream unreachable" (fresh user
    /// T5-17's kind: a health verdict from a latency the upstream does not alone determine).
    pub async fn reachable(&self, within: Duration) -> bool {
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            });
        let host = self
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        crate::side_runtime::run(async move {
            matches!(
                tokio::time::timeout(within, tokio::net::TcpStream::connect((host, port))).await,
                Ok(Ok(_))
            )
        })
        .await
        .unwrap_or(false)
    }
}
