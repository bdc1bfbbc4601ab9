//! Streaming bodies: frames pass through as they arrive, except small request bodies.
//!
//! * [`RequestBody`] wraps the client's body on its way upstream: it counts bytes, cuts the
//!   stream off with an error as soon as it crosses `max_body_bytes` (SPEC §3), and as soon as
//!   the client has sent nothing for `[server] body_read_timeout` while keygate waits for it
//!   (nginx's `client_body_timeout`); either error aborts the upstream request, and
//!   [`RequestStats`] tells the pipeline which side was at fault.
//!   It may start with what [`read_prefix`] buffered before the upstream was contacted
//!   (`server.request_buffer_bytes`, README "Request buffering").
//! * [`ResponseBody`] is every response keygate sends: an upstream body or a small JSON error.
//!   It counts bytes out and writes the access record when it ends or is dropped, except for an
//!   upgraded connection (WebSocket): its record goes to the tunnel, which writes it when the
//!   tunnel closes, with the bytes carried each way and the whole duration
//!   ([`crate::tunnel::splice`]).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::log::AccessRecord;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Shared between the request body (being read by the upstream client) and the access record.
#[derive(Default, Debug)]
pub struct RequestStats {
    bytes: AtomicU64,
    over_limit: AtomicBool,
    client_failed: AtomicBool,
    client_timed_out: AtomicBool,
    waiting_on_client: AtomicBool,
    retried: AtomicBool,
    /// The upstream client has let go of the body: nothing of this request is left to send.
    body_released: AtomicBool,
}

impl RequestStats {
    /// The client sent no body byte for `body_read_timeout` while keygate waited for one.
    pub fn client_timed_out(&self) -> bool {
        self.client_timed_out.load(Relaxed)
    }
    /// The body was last asked for a frame and the client had none: whatever stalls now is the
    /// client's doing, not the upstream's (an upstream that stops reading stops asking).
    pub fn waiting_on_client(&self) -> bool {
        self.waiting_on_client.load(Relaxed)
    }
    /// The request was sent a second time, on a new upstream connection (see `forward.rs`).
    pub fn retried(&self) -> bool {
        self.retried.load(Relaxed)
    }
    /// hyper's upstream client has dropped the request body (sent in full, or abandoned): the
    /// upstream connection has nothing more of this request to write ([`ReadPacer`]).
    fn body_released(&self) -> bool {
        self.body_released.load(SeqCst)
    }
    /// Request body bytes read from the client so far (a webhook body read before forwarding).
    pub(crate) fn set_bytes(&self, n: u64) {
        self.bytes.store(n, Relaxed);
    }
    pub(crate) fn set_retried(&self) {
        self.retried.store(true, Relaxed);
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }
    pub fn over_limit(&self) -> bool {
        self.over_limit.load(Relaxed)
    }
    /// The client's side of the body failed (malformed chunked framing, reset, aborted upload):
    /// the upstream request fails because of the client, not the upstream.
    pub fn client_failed(&self) -> bool {
        self.client_failed.load(Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the configured limit")]
pub struct BodyTooLarge;

#[derive(Debug, thiserror::Error)]
#[error("the client sent no request-body byte within body_read_timeout")]
pub struct BodyReadTimeout;

pub struct RequestBody {
    inner: Source,
    /// Read ahead by [`read_prefix`]: sent first, then its trailers, then the rest of `inner`.
    prefix: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    /// The whole body was read ahead: `inner` has nothing more.
    complete: bool,
    seen: u64,
    limit: u64,
    read_timeout: Duration,
    /// Armed while the client owes the next frame; created on the first stall only.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stall_armed: bool,
    stats: Arc<RequestStats>,
}

/// A body dropped before the client finished sending it (the upstream was never reached: 503
/// after `queue_timeout`, 502, 504; or the upstream answered without reading it all) lingers,
/// so the client, still uploading, reads the response instead of a TCP reset (HTTP/1.1) or a
/// stream reset (HTTP/2). The client authenticated, and its uploads are documents of many
/// megabytes, so the bound is nginx's `lingering_time` / `lingering_timeout` (30 s in all, 5 s
/// without a byte) rather than a refusal's 1 MiB: a second fresh user's Python client uploading
/// 3 MB never read its 502. Nothing is kept: the bytes are read and dropped. A body read to its
/// end, or whose client is gone, costs nothing here.
impl Drop for RequestBody {
    fn drop(&mut self) {
        self.stats.body_released.store(true, SeqCst);
        if let Source::Stream(rest) = std::mem::replace(&mut self.inner, Source::Buffered(None)) {
            linger_for(rest, i64::MAX, AUTHENTICATED_LINGER_TIME);
        }
    }
}

/// How long an authenticated client's unread upload is drained after its response (nginx's
/// `lingering_time`); [`LINGER_GAP`] is the longest wait for its next bytes.
const AUTHENTICATED_LINGER_TIME: Duration = Duration::from_secs(30);
const LINGER_GAP: Duration = Duration::from_secs(5);

/// A streamed client body, or one already read whole: a verified webhook delivery, or an empty
/// body (a request sent again, see `forward.rs`).
enum Source {
    Stream(Incoming),
    Buffered(Option<Bytes>),
}

impl RequestBody {
    /// `limit` in bytes (`max_body_bytes`); `read_timeout` is the longest the client may leave
    /// keygate waiting for the next body byte (`body_read_timeout`).
    pub fn new(
        inner: Incoming,
        limit: u64,
        read_timeout: Duration,
        stats: Arc<RequestStats>,
    ) -> Self {
        RequestBody {
            inner: Source::Stream(inner),
            prefix: None,
            trailers: None,
            complete: false,
            seen: 0,
            limit,
            read_timeout,
            stall: None,
            stall_armed: false,
            stats,
        }
    }

    /// A body with no bytes, sharing `stats` with the original request.
    pub fn empty(stats: Arc<RequestStats>) -> Self {
        RequestBody {
            inner: Source::Buffered(None),
            prefix: None,
            trailers: None,
            complete: false,
            seen: 0,
            limit: 0,
            read_timeout: Duration::MAX,
            stall: None,
            stall_armed: false,
            stats,
        }
    }

    /// A body read in full before forwarding (a verified webhook delivery); sent as one frame
    /// with its exact length. The client has nothing left to send, so no read timeout applies.
    pub fn buffered(bytes: Bytes, stats: Arc<RequestStats>) -> Self {
        let len = bytes.len() as u64;
        stats.bytes.store(len, Relaxed);
        RequestBody {
            inner: Source::Buffered((!bytes.is_empty()).then_some(bytes)),
            prefix: None,
            trailers: None,
            complete: false,
            seen: len,
            limit: u64::MAX,
            read_timeout: Duration::MAX,
            stall: None,
            stall_armed: false,
            stats,
        }
    }

    /// A second copy of this body, for a replay on a new upstream connection (`forward.rs`,
    /// RFC 9110 §9.2.2): `Some` when the whole body is in memory before it is sent (read ahead
    /// in full by [`read_prefix`], or [`buffered`](Self::buffered)), `None` while part of it
    /// would still come from the client (a streamed body cannot be sent twice). The bytes are
    /// reference-counted, not copied; trailers, if any, are.
    pub fn replay_copy(&self) -> Option<RequestBody> {
        let inner = match &self.inner {
            Source::Buffered(b) => Source::Buffered(b.clone()),
            Source::Stream(_) if self.complete => Source::Buffered(None),
            Source::Stream(_) => return None,
        };
        Some(RequestBody {
            inner,
            prefix: self.prefix.clone(),
            trailers: self.trailers.clone(),
            complete: self.complete,
            seen: 0,
            limit: self.limit,
            read_timeout: self.read_timeout,
            stall: None,
            stall_armed: false,
            stats: self.stats.clone(),
        })
    }

    /// Called when the client has no frame ready: starts (or checks) the stall clock.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.stats.waiting_on_client.store(true, Relaxed);
        let deadline = tokio::time::Instant::now()
            .checked_add(self.read_timeout)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400 * 365));
        let sleep = match &mut self.stall {
            Some(s) => {
                if !self.stall_armed {
                    s.as_mut().reset(deadline);
                }
                s
            }
            None => self
                .stall
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.stall_armed = true;
        if sleep.as_mut().poll(cx).is_ready() {
            self.stats.client_timed_out.store(true, Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyReadTimeout))));
        }
        Poll::Pending
    }

    /// The counters shared with the access record (and with [`ReadPacer`]).
    pub(crate) fn stats(&self) -> &Arc<RequestStats> {
        &self.stats
    }

    /// The body with what [`read_prefix`] already read from it in front.
    pub fn with_prefix(mut self, prefix: Prefix) -> Self {
        self.prefix = (!prefix.data.is_empty()).then_some(prefix.data);
        self.trailers = prefix.trailers;
        self.complete = prefix.complete;
        self
    }
}

/// The start of a request body, read before the upstream is contacted.
#[derive(Debug, Default)]
pub struct Prefix {
    pub data: Bytes,
    /// The body's trailers, when it ended within the prefix.
    pub trailers: Option<http::HeaderMap>,
    /// The whole body was read.
    pub complete: bool,
}

/// Why [`read_prefix`] stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PrefixError {
    /// No body byte within `body_read_timeout`.
    #[error("the client sent no request-body byte within body_read_timeout")]
    Stalled,
    /// Malformed framing or an aborted upload.
    #[error("the client's request body failed: {0}")]
    Client(#[from] hyper::Error),
}

/// Reads `body` until it ends or more than `limit` bytes have arrived (the prefix may exceed
/// `limit` by one frame: at most hyper's read buffer on HTTP/1.1, a DATA frame on HTTP/2).
/// Each wait for the next frame is bounded by `read_timeout` (`body_read_timeout`), the whole
/// by the caller (`request_buffer_timeout`).
pub async fn read_prefix(
    body: &mut Incoming,
    limit: usize,
    read_timeout: Duration,
) -> Result<Prefix, PrefixError> {
    use http_body_util::BodyExt as _;
    let hint = body.size_hint().exact().map_or(limit, |n| n as usize);
    let mut data = bytes::BytesMut::with_capacity(hint.min(limit));
    while data.len() <= limit {
        let frame = tokio::time::timeout(read_timeout, body.frame())
            .await
            .map_err(|_| PrefixError::Stalled)?;
        match frame {
            None => {
                return Ok(Prefix {
                    data: data.freeze(),
                    trailers: None,
                    complete: true,
                });
            }
            Some(frame) => match frame?.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => {
                    return Ok(Prefix {
                        data: data.freeze(),
                        trailers: f.into_trailers().ok(),
                        complete: true,
                    });
                }
            },
        }
    }
    Ok(Prefix {
        data: data.freeze(),
        trailers: None,
        complete: false,
    })
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match (this.prefix.take(), this.trailers.take()) {
            (Some(data), trailers) => {
                this.trailers = trailers;
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            (None, Some(t)) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
            (None, None) if this.complete => return Poll::Ready(None),
            (None, None) => {
                let inner = match &mut this.inner {
                    Source::Stream(s) => s,
                    Source::Buffered(b) => {
                        return Poll::Ready(b.take().map(|b| Ok(Frame::data(b))));
                    }
                };
                let polled = Pin::new(inner).poll_frame(cx);
                if polled.is_ready() {
                    this.stall_armed = false;
                    this.stats.waiting_on_client.store(false, Relaxed);
                }
                polled
            }
        };
        match polled {
            Poll::Pending => this.stalled(cx),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    this.stats.bytes.store(this.seen, Relaxed);
                    if this.seen > this.limit {
                        this.stats.over_limit.store(true, Relaxed);
                        // The rest is read and discarded while the 413 goes out, so the client
                        // reads the 413 instead of a broken pipe (HTTP/1.1) or a stream reset
                        // before any response (HTTP/2).
                        if let Source::Stream(rest) =
                            std::mem::replace(&mut this.inner, Source::Buffered(None))
                        {
                            linger(rest);
                        }
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.stats.client_failed.store(true, Relaxed);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.prefix.is_some() || self.trailers.is_some() {
            return false;
        }
        self.complete
            || match &self.inner {
                Source::Stream(s) => s.is_end_stream(),
                Source::Buffered(b) => b.is_none(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        // A buffered body has an exact size even if the client sent it chunked, so the upstream
        // gets a Content-Length.
        let ahead = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        if self.complete {
            return SizeHint::with_exact(ahead);
        }
        let inner = match &self.inner {
            Source::Stream(s) => s.size_hint(),
            Source::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        };
        let mut hint = SizeHint::new();
        if let Some(u) = inner.upper() {
            hint.set_upper(u + ahead);
        }
        hint.set_lower(inner.lower() + ahead);
        hint
    }
}

/// Lingering close, as nginx does it: a refused request's unread body is read and discarded in
/// the background, up to a bound (1 MiB, 5 s), so that the client, still sending, reads the
/// refusal: on HTTP/1.1 closing with unread data sends a TCP RST that destroys the response, and
/// on HTTP/2 the stream would be reset while the client still uploads (curl reports "(92) Stream
/// error" instead of the response). Past the bound, HTTP/1.1 closes and HTTP/2 resets the stream
/// with `NO_ERROR` after the complete response (RFC 9113 §8.1).
pub fn linger(body: Incoming) {
    linger_for(body, LINGER_BYTES, LINGER_TIME);
}

/// [`linger`] with its own bounds: at most `bytes` read, for at most `total`, and never more
/// than [`LINGER_GAP`] waiting for the client's next bytes.
fn linger_for(body: Incoming, bytes: i64, total: Duration) {
    if body.is_end_stream() {
        return;
    }
    // Outside a runtime (a body dropped while the runtime itself shuts down) there is nobody
    // left to read it for.
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        use http_body_util::BodyExt as _;
        let mut body = body;
        let mut left: i64 = bytes;
        let drain = async {
            while left > 0 {
                match tokio::time::timeout(LINGER_GAP, body.frame()).await {
                    Ok(Some(Ok(f))) => left -= f.data_ref().map_or(0, |d| d.len() as i64),
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(total, drain).await;
    });
}

const LINGER_BYTES: i64 = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(5);

enum Kind {
    Full(Option<Bytes>),
    Upstream(Incoming),
}

pub struct ResponseBody {
    kind: Kind,
    /// HTTP/1.1: the next upstream chunk waits until the client's TLS stream took the last one.
    gate: Option<Arc<WriteGate>>,
    /// The upstream connection whose reads wait on `gate` until this body is done.
    paced: Option<Arc<ReadPacer>>,
    /// The upstream connection this body comes from, until [`Self::gated`] attaches it.
    pacing: Option<Pacing>,
    /// HTTP/1.1: the last chunk handed to hyper, kept until the next one arrives (issue 9 §3).
    /// hyper's client reads an upstream body into one buffer and hands out each chunk as a view
    /// of it; it reads the next chunk into the same buffer once the last one is gone, which the
    /// write gate makes sure of. When that buffer grows from its first 8 KiB to
    /// [`crate::forward::UPSTREAM_READ_BUF`], the `bytes` crate grows it in place to
    /// 8 KiB + 16,320 bytes (jemalloc's 24 KiB class), and the connection keeps that for good:
    /// 8 KiB more for every upstream connection that carried a large body, and for every slow
    /// reader. With the last chunk still referenced, hyper takes a fresh buffer of exactly
    /// 16,320 bytes instead (16 KiB class), and the old one is freed when the next chunk
    /// arrives. The cost is a buffer taken and freed per chunk, from jemalloc's thread cache.
    previous: Option<Bytes>,
    /// Inline rather than boxed: one allocation less per request.
    record: Option<AccessRecord>,
    in_flight: Option<crate::pipeline::InFlight>,
    /// Set for a 101: the record is handed to the tunnel instead of written.
    tunnel: Option<tokio::sync::oneshot::Sender<Box<AccessRecord>>>,
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            gate: None,
            paced: None,
            pacing: None,
            previous: None,
            record: None,
            in_flight: None,
            tunnel: None,
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub fn upstream(body: Incoming) -> Self {
        ResponseBody {
            kind: Kind::Upstream(body),
            gate: None,
            paced: None,
            pacing: None,
            previous: None,
            record: None,
            in_flight: None,
            tunnel: None,
        }
    }

    /// Attaches the access record; it is written when this body finishes or is dropped.
    pub fn with_record(mut self, record: AccessRecord) -> Self {
        self.record = Some(record);
        self
    }

    /// The [`Pacing`] of the upstream connection this body comes from (see [`Self::gated`]).
    pub fn paced_by(mut self, pacing: Pacing) -> Self {
        self.pacing = Some(pacing);
        self
    }

    /// Paces an upstream body by what the client takes (HTTP/1.1; see [`WriteGate`]), and, with
    /// the [`Pacing`] of the upstream connection it comes from ([`Self::paced_by`]), that
    /// connection's reads too ([`ReadPacer`]). An upgrade's (101) connection is never paced: it
    /// becomes a tunnel.
    pub fn gated(mut self, gate: Arc<WriteGate>) -> Self {
        let upstream = self.pacing.take();
        if matches!(self.kind, Kind::Upstream(_)) {
            if let Some(p) = upstream
                && self.tunnel.is_none()
            {
                p.pacer.attach(&gate, &p.request);
                self.paced = Some(p.pacer);
            }
            self.gate = Some(gate);
        }
        self
    }

    /// Keeps the connection marked busy (for its idle timeout) until this body is done.
    pub fn with_in_flight(mut self, guard: crate::pipeline::InFlight) -> Self {
        self.in_flight = Some(guard);
        self
    }

    /// The body of a 101 whose connection becomes a tunnel: the access record is handed to
    /// [`TunnelLog`] (written when the tunnel closes) instead of written now.
    pub fn upgraded(mut self, tunnel: TunnelRecord) -> Self {
        self.tunnel = Some(tunnel.0);
        self
    }

    fn finish(&mut self) {
        self.pacing = None;
        self.previous = None;
        if let (Some(pacer), Some(gate)) = (self.paced.take(), &self.gate) {
            pacer.detach(gate);
        }
        if let Some(r) = self.record.take() {
            match self.tunnel.take() {
                Some(tunnel) => {
                    if let Err(r) = tunnel.send(Box::new(r)) {
                        r.emit(); // the tunnel task is gone: write what is known
                    }
                }
                None => r.emit(),
            }
        }
        self.in_flight = None;
    }
}

/// The 101 response's half of an upgraded connection's access record ([`tunnel_log`]).
pub struct TunnelRecord(tokio::sync::oneshot::Sender<Box<AccessRecord>>);

/// The tunnel's half: receives the access record and writes it when the tunnel closes.
pub struct TunnelLog(tokio::sync::oneshot::Receiver<Box<AccessRecord>>);

/// A pair for one upgraded connection: [`ResponseBody::upgraded`] takes the first, the task that
/// splices the connection the second.
pub fn tunnel_log() -> (TunnelRecord, TunnelLog) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    (TunnelRecord(tx), TunnelLog(rx))
}

impl TunnelLog {
    /// Writes the access line of a closed tunnel: `bytes_in`/`bytes_out` grow by what it
    /// carried from the client / to the client, and the duration runs to now. `cut`: keygate
    /// closed it (`tunnel.rs`).
    pub async fn closed(self, carried: crate::tunnel::Carried, cut: Option<crate::log::Cut>) {
        if let Ok(record) = self.0.await {
            if let Some(stats) = &record.bytes_in {
                stats.bytes.fetch_add(carried.from_client, Relaxed);
            }
            let mut record = record;
            record.bytes_out += carried.to_client;
            record.cut = cut;
            record.emit();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(body) => {
                if let Some(gate) = &this.gate
                    && !gate.open()
                {
                    return Poll::Pending;
                }
                Pin::new(body).poll_frame(cx)
            }
        };
        // HTTP/2: whether the stream now owes the client a frame (`stall.rs`, send_timeout).
        crate::stall::body_polled(matches!(&polled, Poll::Ready(Some(Ok(f))) if f.is_data()));
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if let Some(r) = this.record.as_mut() {
                        r.bytes_out += d.len() as u64;
                    }
                    if let Some(gate) = &this.gate {
                        gate.handed_over();
                        this.previous = Some(d.clone());
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let request_id = this.record.as_ref().map(|r| &r.request_id);
                let request_id = request_id.map(crate::log::request_id_str);
                tracing::warn!(request_id, error = %e, "upstream response body failed mid-stream");
                if let Some(r) = this.record.as_mut() {
                    r.cut = Some(crate::log::Cut::Upstream);
                }
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(body) => body.size_hint(),
        }
    }
}

/// Back-pressure between an HTTP/1.1 response body and the client's socket (issue 9 §3).
///
/// hyper's HTTP/1.1 server pulls body chunks into its write queue while the queue holds less than
/// `max_buf_size` (32 KiB with the default `max_header_bytes`) in fewer than 16 pieces, whether
/// the client reads or not, and each upstream chunk keeps its whole read buffer
/// ([`crate::forward::UPSTREAM_READ_BUF`]) alive until it is written. With the gate, a
/// [`ResponseBody`] hands hyper its next chunk only once the last one has left keygate: hyper
/// flushes the connection's I/O only when its own queue is empty, and the TLS stream's flush
/// completes only when its records are all in the socket, so a completed flush opens the gate
/// ([`WriteGate::drained`]). The upstream connection the body comes from reads nothing while
/// the gate is closed ([`ReadPacer`]), so a client that does not read makes keygate hold the one
/// chunk being written: what of it TLS could not take yet, in hyper's queue, sharing the
/// upstream connection's read buffer, and its TLS records, which the client's TLS stream hands
/// to the kernel when the socket refuses them for its unsent-data bound (`server::ConnIo`; at
/// most `server::TLS_SEND_BUFFER` stays when the socket's send buffer itself is full): README,
/// "Memory". The rest of the response waits in the upstream connection's socket (TCP flow
/// control), as nginx leaves it when its buffers are full. A client that keeps up is not
/// slowed: the gate opens within the poll that wrote the chunk.
///
/// The response body itself keeps no waker: the gate opens only in the connection's own flush,
/// and while a body is being written hyper's HTTP/1.1 dispatcher polls the body again right
/// after a flush that completed, in the same poll of the connection (`Dispatcher::poll_loop`:
/// it loops while it can write body and the flush was ready); a flush that cannot complete
/// leaves the socket's wake-up registered, and the poll it brings flushes again. A wake-up per
/// chunk cost ~10 % more CPU on 1 MiB bodies (one more poll of the connection per 16 KiB, each
/// with a read attempt). Bodies streamed whole over HTTP/1.1 in `tests/memory.rs` and
/// `tests/upstream_buffers.rs` would hang if that changed. Only an upstream connection that
/// found the gate closed is woken when it opens.
///
/// HTTP/2 needs no gate: each stream's queue is bounded by `server::H2_STREAM_SEND_BUFFER` and
/// the client's flow-control window.
#[derive(Default, Debug)]
pub struct WriteGate {
    /// A chunk was handed to hyper and has not all reached the socket yet.
    queued: AtomicBool,
    /// An upstream connection waits for the gate to open ([`ReadPacer`]); woken through `reader`.
    reader_waiting: AtomicBool,
    reader: futures_util::task::AtomicWaker,
}

impl WriteGate {
    /// Everything handed over has reached the socket (called when the connection's
    /// `poll_flush` completes).
    pub fn drained(&self) {
        self.queued.store(false, SeqCst);
        self.wake_reader();
    }

    /// Whether the last chunk handed over has left keygate (see above for the wake-up).
    fn open(&self) -> bool {
        !self.queued.load(SeqCst)
    }

    fn handed_over(&self) {
        self.queued.store(true, SeqCst);
    }

    /// Wakes the upstream connection waiting for this gate, if one is.
    fn wake_reader(&self) {
        if self.reader_waiting.load(SeqCst) && self.reader_waiting.swap(false, SeqCst) {
            self.reader.wake();
        }
    }

    /// Whether an upstream connection must wait before it reads; if so, it is woken when the
    /// gate opens.
    fn must_wait(&self, cx: &Context<'_>) -> bool {
        if self.open() {
            return false;
        }
        self.reader.register(cx.waker());
        self.reader_waiting.store(true, SeqCst);
        // Opened in between: go on (a wake-up may still come; it is harmless).
        !self.open()
    }
}

/// Paces an upstream connection's reads by the client its response goes to (issue 9 §3).
///
/// hyper's HTTP/1.1 client reads the next chunk of a response body into its body channel (it
/// holds one) as soon as the last one was taken, so a client that reads slowly used to make
/// keygate hold two chunks: the one being written and the one read ahead. The upstream
/// connection's protocol task ([`paced`]) is not polled while the [`WriteGate`] of the client
/// connection its response goes to is closed, so it reads nothing more, and its read buffer is
/// the chunk being written (hyper reuses it once that chunk is gone). It is woken when the gate
/// opens. Only once the request is sent in full: while hyper still writes a request body (an
/// upload with the response already streaming), the connection is never held, so a client that
/// sends its whole body before it reads cannot deadlock.
///
/// Attached when an HTTP/1.1 response body starts ([`ResponseBody::gated`]), detached when it
/// ends or is dropped (the client gone), and only to the connection's current request: a
/// connection that already went back to the pool and carries another client's request is never
/// held for the first client (each request sent starts afresh, [`ReadPacer::begin`]). HTTP/2
/// clients' responses and upgraded connections are never held.
#[derive(Default, Debug)]
pub struct ReadPacer {
    /// The request the connection serves now, and the gate its response waits on.
    current: Mutex<Option<Current>>,
}

/// A connection's current request and the gate its response waits on, once attached.
type Current = (Arc<RequestStats>, Option<Arc<WriteGate>>);

/// What the upstream client returns with a response (`forward::Answer`): the connection's
/// [`ReadPacer`] and the request the response answers.
#[derive(Clone, Debug)]
pub struct Pacing {
    pacer: Arc<ReadPacer>,
    request: Arc<RequestStats>,
}

impl ReadPacer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request is about to be sent on this connection: whatever paced the last one no longer
    /// applies. Returns what its response carries ([`ResponseBody::gated`] attaches it).
    pub fn begin(self: &Arc<Self>, request: &Arc<RequestStats>) -> Pacing {
        let last = self.lock().replace((request.clone(), None));
        if let Some((_, Some(gate))) = last {
            gate.wake_reader();
        }
        Pacing {
            pacer: self.clone(),
            request: request.clone(),
        }
    }

    fn attach(&self, gate: &Arc<WriteGate>, request: &Arc<RequestStats>) {
        let mut current = self.lock();
        if let Some((r, g)) = &mut *current
            && Arc::ptr_eq(r, request)
        {
            *g = Some(gate.clone());
        }
    }

    /// Detaches `gate` (if still attached) and wakes the connection if it waited for it.
    fn detach(&self, gate: &Arc<WriteGate>) {
        let mut current = self.lock();
        if let Some((_, g)) = &mut *current
            && g.as_ref().is_some_and(|g| Arc::ptr_eq(g, gate))
        {
            *g = None;
            drop(current);
            gate.wake_reader();
        }
    }

    fn must_wait(&self, cx: &Context<'_>) -> bool {
        match &*self.lock() {
            Some((request, Some(gate))) => request.body_released() && gate.must_wait(cx),
            _ => false,
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream connection's protocol future (hyper's HTTP/1.1 client connection), polled
    /// only while its [`ReadPacer`] lets it read. A struct rather than an `async fn`, which would
    /// keep room for the connection's state twice (argument and pinned local) in every
    /// connection's task.
    pub struct Paced<F> {
        #[pin]
        conn: F,
        pacer: Arc<ReadPacer>,
    }
}

/// `conn`, paced by `pacer`.
pub fn paced<F: std::future::Future>(pacer: Arc<ReadPacer>, conn: F) -> Paced<F> {
    Paced { conn, pacer }
}

impl<F: std::future::Future> std::future::Future for Paced<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if this.pacer.must_wait(cx) {
            return Poll::Pending;
        }
        this.conn.poll(cx)
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Client went away mid-stream (or keygate cut it: send_timeout), or the body was never
        // polled because it has no content (HEAD, 304…: it is at its end, nothing is cut).
        if self.record.is_some() && self.tunnel.is_none() && !self.is_end_stream() {
            let conn = self.in_flight.as_ref().map(crate::pipeline::InFlight::conn);
            let cut = if crate::stall::cut_by_send_timeout(conn) {
                crate::log::Cut::SendTimeout
            } else {
                // keygate closing the connection itself (shutdown, reclaimed), else the client.
                conn.and_then(crate::pipeline::Conn::closed_by)
                    .unwrap_or(crate::log::Cut::Client)
            };
            if let Some(r) = self.record.as_mut() {
                r.cut = Some(cut);
            }
        }
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::atomic::AtomicUsize;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);
    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    /// A connection future that counts how often it was polled.
    fn conn(polls: &Arc<AtomicUsize>) -> impl Future<Output = ()> + use<> {
        let polls = polls.clone();
        std::future::poll_fn(move |_| {
            polls.fetch_add(1, SeqCst);
            Poll::<()>::Pending
        })
    }

    /// A request whose body hyper has let go of (sent in full).
    fn sent_request() -> Arc<RequestStats> {
        let stats = Arc::new(RequestStats::default());
        drop(RequestBody::empty(stats.clone()));
        stats
    }

    #[test]
    fn an_upstream_connection_reads_only_while_its_client_has_taken_the_last_chunk() {
        let pacer = Arc::new(ReadPacer::default());
        let polls = Arc::new(AtomicUsize::new(0));
        let mut fut = Box::pin(paced(pacer.clone(), conn(&polls)));
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);

        // The request still being uploaded: never held, gate or not.
        let uploading = Arc::new(RequestStats::default());
        let pacing = pacer.begin(&uploading);
        let gate = Arc::new(WriteGate::default());
        pacing.pacer.attach(&gate, &pacing.request);
        gate.handed_over();
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(SeqCst),
            1,
            "held while the request body is still sent"
        );

        // The next request, sent in full: held while the client has a chunk in flight.
        let request = sent_request();
        let pacing = pacer.begin(&request);
        pacing.pacer.attach(&gate, &pacing.request);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(SeqCst), 1, "read on with a chunk in flight");
        // The chunk reached the socket: the connection is woken and reads.
        gate.drained();
        assert_eq!(wakes.0.load(SeqCst), 1, "not woken when the gate opened");
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(SeqCst), 2);
        // A fast client's gate opens before the connection is polled: no wake-up is spent.
        gate.handed_over();
        gate.drained();
        assert_eq!(wakes.0.load(SeqCst), 1);

        // Held again; the response body ends (or the client goes): detached and woken.
        gate.handed_over();
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(SeqCst), 2, "read on with a chunk in flight");
        pacer.detach(&gate);
        assert_eq!(wakes.0.load(SeqCst), 2, "not woken when detached");
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(SeqCst), 3);
    }

    #[test]
    fn a_pooled_connection_is_never_held_for_an_earlier_client() {
        let pacer = Arc::new(ReadPacer::default());
        let polls = Arc::new(AtomicUsize::new(0));
        let mut fut = Box::pin(paced(pacer.clone(), conn(&polls)));
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);

        // Client A's response was read in full; the connection went back to the pool and
        // carries client B's request before A's response body was attached (or ended).
        let first = pacer.begin(&sent_request());
        let second = pacer.begin(&sent_request());
        let a = Arc::new(WriteGate::default());
        a.handed_over();
        first.pacer.attach(&a, &first.request);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(SeqCst),
            1,
            "held for a client whose request is done"
        );

        // Attached, then the connection is taken for the next request: released and woken.
        let b = Arc::new(WriteGate::default());
        b.handed_over();
        second.pacer.attach(&b, &second.request);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(SeqCst), 1);
        let _third = pacer.begin(&sent_request());
        assert_eq!(wakes.0.load(SeqCst), 1, "not woken when released");
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(SeqCst), 2);
        // An earlier client's body ending does not detach someone else's gate.
        let c = Arc::new(WriteGate::default());
        let fourth = pacer.begin(&sent_request());
        c.handed_over();
        fourth.pacer.attach(&c, &fourth.request);
        pacer.detach(&b);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(SeqCst),
            2,
            "another client's detach released the connection"
        );
    }
}
