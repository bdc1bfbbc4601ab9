//! The upstream side: a pooled hyper-util client, header rewriting (SPEC §4), timeouts,
//! retries on reused connections and protocol upgrades.
//!
//! **Keep-alive races.** An upstream may close an idle keep-alive connection at the moment
//! keygate picks it from the pool for the next request (uvicorn closes them after 5 s, gunicorn
//! after 2 s, Node after 5 s). Two defences, as Go's `net/http` transport and nginx have them:
//! the pool drops connections idle for `[upstream] pool_idle_timeout` (default 1 s, below every
//! common upstream keep-alive), and a request that fails on a *reused* connection before any
//! response byte arrived is sent once more on a new connection, when that is safe: its method is
//! idempotent (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and it has no body (one
//! that was streamed cannot be replayed). A POST is never sent twice; a failure on a connection
//! opened for the request is not retried either (the upstream really is failing).

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioExecutor;

use crate::body::{RequestBody, RequestStats};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub use crate::proto::{is_hop_by_hop, strip_hop_by_hop};

type Connector = Tracking<HttpsConnector<HttpConnector>>;

/// The protected service.
pub struct Upstream {
    /// One connection pool per worker thread (see [`Upstream::client`]).
    clients: Box<[std::sync::OnceLock<UpstreamClient>]>,
    connector: Connector,
    pool_idle_timeout: Duration,
    /// No pool: every request gets a new connection (for the one retry).
    fresh: UpstreamClient,
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
        let uri: Uri = url.parse().map_err(|_| format!("invalid URL {url:?}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("URL {url:?} needs http:// or https://"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("URL {url:?} must be http:// or https://"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("URL {url:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err("URL must not contain credentials".to_string());
        }
        if uri.query().is_some() {
            return Err(format!("URL {url:?} must not have a query"));
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
        let connector = Tracking(connector);
        let fresh = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .http1_max_buf_size(UPSTREAM_READ_BUF)
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector.clone());
        Ok(Upstream {
            clients: (0..POOLS).map(|_| std::sync::OnceLock::new()).collect(),
            connector,
            pool_idle_timeout,
            fresh,
            scheme,
            authority,
            base_path,
            request_timeout,
        })
    }

    pub fn uri_for(&self, pq: Option<&PathAndQuery>) -> Uri {
        let pq_str = pq.map_or("/", |p| p.as_str());
        let mut b = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone());
        b = if self.base_path.is_empty() {
            b.path_and_query(
                pq.cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
        } else {
            b.path_and_query(format!("{}{}", self.base_path, pq_str))
        };
        b.build().unwrap_or_else(|_| Uri::from_static("/"))
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
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let fut = self.send_or_retry(req, stats);
        tokio::pin!(fut);
        let mut seen = stats.bytes();
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
                        } else if e.is_connect() {
                            UpstreamError::Connect(Chain(&e).to_string())
                        } else {
                            UpstreamError::Other(Chain(&e).to_string())
                        }
                    });
                }
                () = tokio::time::sleep(self.request_timeout) => {
                    let now = stats.bytes();
                    if now == seen && !stats.waiting_on_client() {
                        return Err(UpstreamError::Timeout);
                    }
                    seen = now;
                }
            }
        }
    }

    async fn send_or_retry(
        &self,
        req: http::Request<RequestBody>,
        stats: &Arc<RequestStats>,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        use http_body::Body as _;
        // Kept only for requests that may be replayed: one header-map copy per GET.
        let replay = (is_idempotent(req.method()) && req.body().is_end_stream()).then(|| {
            (
                req.method().clone(),
                req.uri().clone(),
                req.headers().clone(),
            )
        });
        match self.client().request(req.map(Box::new)).await {
            Ok(resp) => {
                ConnUses::count(resp.extensions());
                Ok(resp)
            }
            Err(e) => match replay {
                Some((method, uri, headers)) if failed_on_reused_connection(&e) => {
                    stats.set_retried();
                    let mut again = http::Request::new(Box::new(RequestBody::empty(stats.clone())));
                    *again.method_mut() = method;
                    *again.uri_mut() = uri;
                    *again.headers_mut() = headers;
                    self.fresh.request(again).await
                }
                _ => Err(e),
            },
        }
    }
}

/// The request body is boxed on its way to hyper: a request waits for its connection in hyper's
/// dispatch channel, whose blocks hold 32 requests each, so a 224-byte body inline made every
/// upstream connection's channel block ~15 KiB; boxed, it is ~8 KiB (issue 10, peak RSS with
/// 500 requests in flight).
type UpstreamClient = Client<Connector, Box<RequestBody>>;

/// Connection pools per [`Upstream`]: one per worker thread (threads past this share).
const POOLS: usize = 64;

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

impl Upstream {
    /// This worker thread's pooled client. Each worker runs its own single-threaded runtime
    /// (`server::run`), and a pooled connection's I/O runs on the runtime that opened it, so a
    /// pool shared between workers would have one worker's requests written and read by another
    /// worker's thread (two cross-thread wake-ups per request). With a pool per worker, a
    /// request stays on its thread from client to upstream and back, as in nginx's workers.
    fn client(&self) -> &UpstreamClient {
        self.clients[POOL.with(|p| *p)].get_or_init(|| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(self.pool_idle_timeout)
                .pool_max_idle_per_host(1024)
                .http1_max_buf_size(UPSTREAM_READ_BUF)
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .build(self.connector.clone())
        })
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

/// The request failed on a connection that had already carried a response, with the connection
/// closed or reset under it (no response head arrived: the future resolved with an error).
fn failed_on_reused_connection(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let Some(info) = e.connect_info() else {
        return false;
    };
    let mut ext = http::Extensions::new();
    info.get_extras(&mut ext);
    let reused = ext.get::<ConnUses>().is_some_and(|u| u.0.load(Relaxed) > 0);
    if !reused {
        return false;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            return true;
        }
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

/// Responses carried by one upstream connection so far; attached to the connection by
/// [`Tracking`] and read back from a response's or an error's connection info.
#[derive(Clone, Default)]
struct ConnUses(Arc<AtomicU32>);

impl ConnUses {
    fn count(ext: &http::Extensions) {
        if let Some(u) = ext.get::<ConnUses>() {
            u.0.fetch_add(1, Relaxed);
        }
    }
}

/// A connector that tags each new connection with its own [`ConnUses`], so that a failed
/// request can tell a reused connection from one opened for it (hyper-util keeps that private).
#[derive(Clone)]
pub struct Tracking<C>(C);

impl<C> tower_service::Service<Uri> for Tracking<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
{
    type Response = Tracked<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            Ok(Tracked {
                io: connecting.await?,
                uses: ConnUses::default(),
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// An upstream connection with its [`ConnUses`].
    pub struct Tracked<T> {
        #[pin]
        io: T,
        uses: ConnUses,
    }
}

impl<T: Connection> Connection for Tracked<T> {
    /// The inner connection's flags with [`ConnUses`] as the only extra: hyper-util copies
    /// every extra into every response's extensions (an allocation each), and the HTTP
    /// connector's own (`HttpInfo`, the socket addresses) is never read.
    fn connected(&self) -> Connected {
        let inner = self.io.connected();
        let c = Connected::new()
            .proxy(inner.is_proxied())
            .extra(self.uses.clone());
        if inner.is_negotiated_h2() {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl<T: hyper::rt::Read> hyper::rt::Read for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write> hyper::rt::Write for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
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

    /// Whether a TCP connection to the upstream can be opened now (for `/readyz`).
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
            .trim_end_matches(']');
        matches!(
            tokio::time::timeout(within, tokio::net::TcpStream::connect((host, port))).await,
            Ok(Ok(_))
        )
    }
}
