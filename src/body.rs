//! Streaming bodies. Nothing is buffered: frames pass through as they arrive.
//!
//! * [`RequestBody`] wraps the client's body on its way upstream: it counts bytes and cuts the
//!   stream off with an error as soon as it crosses `max_body_bytes`, which aborts the upstream
//!   request (SPEC §3).
//! * [`ResponseBody`] is every response keygate sends: an upstream body or a small JSON error.
//!   It counts bytes out and writes the access record when it ends or is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

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
}

impl RequestStats {
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

pub struct RequestBody {
    inner: Incoming,
    seen: u64,
    limit: u64,
    stats: Arc<RequestStats>,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, stats: Arc<RequestStats>) -> Self {
        RequestBody {
            inner,
            seen: 0,
            limit,
            stats,
        }
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
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
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
