//! Progress deadlines on what keygate sends to a client (fresh user T3-9, T3-18).
//!
//! A client that stops taking its response keeps the key's `max_concurrent` slot and an
//! `[upstream] max_connections` permit for as long as the response lasts; without a deadline
//! that is for ever (the data waits in kernel buffers, at no cost to the client). As nginx's
//! `send_timeout` (60 s between two successful writes), `[server] send_timeout` bounds how long
//! a response may make no progress towards the client:
//!
//! * HTTP/1.1 (`server.rs`, `Watch::drive`): the connection's writes are blocked (hyper or TLS
//!   hold bytes the socket does not take) and no write has gone through for `send_timeout`:
//!   the connection is closed.
//! * HTTP/2 (here, [`StreamExec`]): each stream runs in its own task, wrapped in a
//!   [`SendDeadline`]. Once the response head is handed to hyper, and after each body frame,
//!   the stream owes the client nothing until hyper asks the body for its next frame, which it
//!   does only when the client's flow-control window (stream and connection, RFC 9113 §5.2)
//!   and the stream's send buffer have room. A stream that is not asked for `send_timeout` is
//!   dropped: h2 resets it (`RST_STREAM CANCEL`), the body and its slots are released. A body
//!   that waits on the upstream (a quiet server-sent-event stream, a long poll) is not owed and
//!   never times out here; the upstream's own deadlines apply.
//!
//! Both are logged as `client_timeout` with `phase = "send"` (with the response's
//! `request_id`; its access line says `completed: false`, `cut_by: "send_timeout"`) and counted in
//! `keygate_client_timeouts_total{phase="send"}`, never as an upstream error. Upgraded
//! connections (WebSocket) have their own clock, `[upstream] tunnel_idle_timeout`
//! (`tunnel::splice`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tracing::Level;

use crate::log::{ClientEvent, client_event};

tokio::task_local! {
    /// The HTTP/2 stream whose task is being polled (set by [`SendDeadline`]).
    static STREAM: Arc<StreamProgress>;
}

/// What a stream's response body tells its [`SendDeadline`]: `0` while nothing is owed to the
/// client (no response yet, or the body waits on the upstream), else a number that changes
/// each time a frame is handed to hyper.
#[derive(Default, Debug)]
struct StreamProgress {
    owed: AtomicU64,
    /// The stream's request id, for the `client_timeout` event.
    request_id: std::sync::OnceLock<http::HeaderValue>,
    /// Set just before the stream's task is dropped for `send_timeout`.
    timed_out: std::sync::atomic::AtomicBool,
}

/// The response head has been handed to hyper (called from the service future: inside the
/// stream's task on HTTP/2, on the connection's task on HTTP/1.1). Notes its request id
/// (`X-Request-Id`, always set on keygate's responses) for the `client_timeout` event.
pub fn response_ready(conn: &crate::pipeline::Conn, headers: &http::HeaderMap) {
    let id = headers.get(&crate::forward::X_REQUEST_ID);
    let h2 = STREAM.try_with(|s| {
        s.owed.fetch_add(1, Relaxed);
        if let Some(id) = id {
            let _ = s.request_id.set(id.clone());
        }
    });
    if h2.is_err() {
        *conn.responding.lock().unwrap_or_else(|p| p.into_inner()) = id.cloned();
    }
}

/// The request id of the response an HTTP/1.1 connection is sending (or sent last).
pub fn responding(conn: &crate::pipeline::Conn) -> Option<http::HeaderValue> {
    conn.responding
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Whether a response body being dropped now is dropped because `send_timeout` ran out: its
/// HTTP/2 stream's task is being dropped for it, or its HTTP/1.1 connection is being closed
/// for it. Otherwise a body dropped before its end was abandoned by the client.
pub(crate) fn cut_by_send_timeout(conn: Option<&crate::pipeline::Conn>) -> bool {
    STREAM
        .try_with(|s| s.timed_out.load(Relaxed))
        .unwrap_or(false)
        || conn.is_some_and(|c| c.send_timed_out.load(Relaxed))
}

/// A response body was polled: `handed_over` when it gave hyper a frame (hyper will ask again
/// once the client has room for more), else it ended or waits on the upstream.
pub(crate) fn body_polled(handed_over: bool) {
    let _ = STREAM.try_with(|s| {
        if handed_over {
            // Never 0: a wrap-around would read as "nothing owed".
            let next = s.owed.load(Relaxed).wrapping_add(1).max(1);
            s.owed.store(next, Relaxed);
        } else {
            s.owed.store(0, Relaxed);
        }
    });
}

/// hyper's HTTP/2 stream executor: each stream's task is wrapped in a [`SendDeadline`].
#[derive(Clone, Debug)]
pub struct StreamExec {
    pub send_timeout: Duration,
    pub peer: std::net::SocketAddr,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(SendDeadline {
            stream: Some(fut),
            progress: Arc::default(),
            seen: 0,
            owed_since: None,
            timer: None,
            send_timeout: self.send_timeout,
            peer: self.peer,
        });
    }
}

pin_project_lite::pin_project! {
    /// One HTTP/2 stream's task, dropped (the stream reset) once its response has been owed to
    /// the client for `send_timeout` without hyper asking for more.
    pub struct SendDeadline<F> {
        // `None` once dropped for `send_timeout` (dropped in place, with the stream's
        // progress in scope, so its body knows why it was cut).
        #[pin]
        stream: Option<F>,
        progress: Arc<StreamProgress>,
        // The last `owed` value seen, and since when it has been owed.
        seen: u64,
        owed_since: Option<tokio::time::Instant>,
        // Made the first time the stream is owed a frame when it yields: most streams end in
        // the poll that answers them and never need one (a timer costs a clock read and a
        // runtime handle per stream; issue 10).
        #[pin]
        timer: Option<tokio::time::Sleep>,
        send_timeout: Duration,
        peer: std::net::SocketAddr,
    }
}

impl<F: std::future::Future<Output = ()>> std::future::Future for SendDeadline<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let progress = this.progress.clone();
        let Some(stream) = this.stream.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        if STREAM.sync_scope(progress, || stream.poll(cx)).is_ready() {
            return Poll::Ready(());
        }
        let owed = this.progress.owed.load(Relaxed);
        if owed == 0 {
            *this.owed_since = None;
            return Poll::Pending;
        }
        let now = tokio::time::Instant::now();
        if owed != *this.seen || this.owed_since.is_none() {
            *this.seen = owed;
            *this.owed_since = Some(now);
            let deadline = now + *this.send_timeout;
            match this.timer.as_mut().as_pin_mut() {
                Some(timer) => timer.reset(deadline),
                None => this.timer.set(Some(tokio::time::sleep_until(deadline))),
            }
        }
        // (Always made by now: set whenever `owed_since` is.)
        let expired = this
            .timer
            .as_mut()
            .as_pin_mut()
            .is_some_and(|timer| timer.poll(cx).is_ready());
        if !expired {
            return Poll::Pending;
        }
        let peer = *this.peer;
        crate::metrics::global().client_timeout("send");
        client_event!(
            ClientEvent::ClientTimeout,
            peer.ip(),
            Level::INFO,
            event = "client_timeout",
            phase = "send",
            protocol = "HTTP/2",
            request_id = this.progress.request_id.get().map(crate::log::request_id_str),
            client_ip = %peer.ip().to_canonical(),
            peer = %peer,
            timeout_ms = this.send_timeout.as_millis() as u64,
            "the client took nothing of its response within send_timeout; stream reset"
        );
        // Dropping the stream's future resets the stream and frees its body and slots; its
        // access line says it was cut by send_timeout.
        this.progress.timed_out.store(true, Relaxed);
        let progress = this.progress.clone();
        STREAM.sync_scope(progress, || this.stream.set(None));
        Poll::Ready(())
    }
}
