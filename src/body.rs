//! Streaming bodies. Nothing is buffered: frames pass through as they arrive.
//!
//! * [`RequestBody`] wraps the client's body on its way upstream: it counts bytes, cuts the
//!   stream off with an error as soon as it crosses `max_body_bytes` (SPEC §3), and as soon as
//!   the client has sent nothing for `[server] body_read_timeout` while keygate waits for it
//!   (nginx's `client_body_timeout`); either error aborts the upstream request, and
//!   [`RequestStats`] tells the pipeline which side was at fault.
//! * [`ResponseBody`] is every response keygate sends: an upstream body or a small JSON error.
//!   It counts bytes out and writes the access record when it ends or is dropped.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
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
    /// `None`: an empty body (a request sent again, see `forward.rs`).
    inner: Option<Incoming>,
    seen: u64,
    limit: u64,
    read_timeout: Duration,
    /// Armed while the client owes the next frame; created on the first stall only.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stall_armed: bool,
    stats: Arc<RequestStats>,
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
            inner: Some(inner),
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
            inner: None,
            seen: 0,
            limit: 0,
            read_timeout: Duration::MAX,
            stall: None,
            stall_armed: false,
            stats,
        }
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
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if polled.is_ready() {
            this.stall_armed = false;
            this.stats.waiting_on_client.store(false, Relaxed);
        }
        match polled {
            Poll::Pending => this.stalled(cx),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    this.stats.bytes.store(this.seen, Relaxed);
                    if this.seen > this.limit {
                        this.stats.over_limit.store(true, Relaxed);
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
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(Incoming),
}

pub struct ResponseBody {
    kind: Kind,
    record: Option<Box<AccessRecord>>,
    in_flight: Option<crate::pipeline::InFlight>,
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            record: None,
            in_flight: None,
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub fn upstream(body: Incoming) -> Self {
        ResponseBody {
            kind: Kind::Upstream(body),
            record: None,
            in_flight: None,
        }
    }

    /// Attaches the access record; it is written when this body finishes or is dropped.
    pub fn with_record(mut self, record: AccessRecord) -> Self {
        self.record = Some(Box::new(record));
        self
    }

    /// Keeps the connection marked busy (for its idle timeout) until this body is done.
    pub fn with_in_flight(mut self, guard: crate::pipeline::InFlight) -> Self {
        self.in_flight = Some(guard);
        self
    }

    fn finish(&mut self) {
        if let Some(r) = self.record.take() {
            r.emit();
        }
        self.in_flight = None;
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
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(r)) = (frame.data_ref(), this.record.as_mut()) {
                    r.bytes_out += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %e, "upstream response body failed mid-stream");
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

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Client went away mid-stream, or the body was never polled (HEAD, 304…).
        self.finish();
    }
}
