//! Upgraded connections (WebSocket tunnels) after the upstream's 101: both sockets are spliced
//! ([`splice`]) until a side closes, nothing moves for `[upstream] tunnel_idle_timeout`, or
//! keygate closes the tunnel because its access is gone.
//!
//! A tunnel carries no more requests, so the per-request re-checks that make a reload apply to
//! open connections (`pipeline::gate`: a network denied, a client CA replaced, a key removed)
//! never meet it. Instead each tunnel keeps what its upgrade request was admitted on
//! ([`Grant`]) and takes that decision again after every reload and at its key's expiry
//! instant ([`Grant::check`]): when the upgrade request would now be refused, the tunnel is
//! closed, `tunnel_closed` is logged with the reason, `keygate_tunnels_closed_total{reason}`
//! counts it and its access line says `cut_by: revoked`. nginx and Caddy close (Caddy: every)
//! upgraded connections at a reload; keygate closes only those that lost their access, so a
//! reload that changes something else leaves every WebSocket up (Caddy's users asked for
//! exactly that: caddyserver/caddy#5471, #7222).
//!
//! A WebSocket (RFC 6455) is closed cleanly: each direction first finishes the frame it is in
//! (bounded by [`FINISH_FRAME`]), then the client gets a Close frame with 1008 (policy
//! violation; 1001 "going away" at shutdown) and the upstream a masked Close frame with 1001,
//! as if its client left; then TLS close_notify and FIN, and what the peers still send (their
//! Close replies) is read and discarded for a moment, so that no reset destroys the Close frame
//! on its way. Another upgraded protocol, or a WebSocket stuck mid-frame, is closed at the TCP
//! level. At shutdown every tunnel still open when the drain ends is closed the same way
//! (`cut_by: shutdown`); a tunnel does not hold the drain up: it never ends by itself.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::watch;
use tracing::Level;

use crate::auth::Key;
use crate::config::Snapshot;
use crate::log::{ClientEvent, client_event, request_id_str};
use crate::metrics;
use crate::pipeline::Conn;

/// How long each direction may take to finish the WebSocket frame it is in when keygate closes
/// the tunnel; past it the tunnel is closed at the TCP level.
pub const FINISH_FRAME: Duration = Duration::from_millis(500);

/// How long the Close frames, TLS close_notify and FIN may take, and then again how long the
/// peers' replies are read (and discarded) before the sockets are dropped.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// The longest a tunnel waits before it looks at its key's expiry again (the wall clock may
/// move under the monotonic one).
const EXPIRY_RECHECK: Duration = Duration::from_secs(3600);

/// What every tunnel listens to: the running snapshot (sent after each reload) and the
/// shutdown. Lives in [`crate::pipeline::Shared`].
pub struct Tunnels {
    snapshot: watch::Sender<Arc<Snapshot>>,
    stopping: watch::Sender<bool>,
}

impl Tunnels {
    pub fn new(snapshot: Arc<Snapshot>) -> Self {
        Tunnels {
            snapshot: watch::Sender::new(snapshot),
            stopping: watch::Sender::new(false),
        }
    }

    /// After a reload's swap: every tunnel checks its [`Grant`] against `snapshot`.
    pub fn reloaded(&self, snapshot: Arc<Snapshot>) {
        self.snapshot.send_replace(snapshot);
    }

    /// At shutdown, once the drain is over: every tunnel still open is closed.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    fn watch(&self) -> Watch {
        Watch {
            snapshot: self.snapshot.subscribe(),
            stopping: self.stopping.subscribe(),
        }
    }
}

/// One tunnel's receivers of [`Tunnels`].
pub struct Watch {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    stopping: watch::Receiver<bool>,
}

/// Why keygate closed a tunnel (`tunnel_closed.reason`, the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client's address is refused by the global `[access]` rules now.
    IpDenied,
    /// Its client certificate no longer verifies against `[tls] client_ca` (or one is now
    /// required and it presented none).
    ClientCert,
    KeyRemoved,
    /// The key's `hash` changed: the token the tunnel was opened with is no longer the key's.
    KeyReplaced,
    KeyDisabled,
    KeyExpired,
    /// The client's address is outside the key's `allow` now.
    KeyIpDenied,
    /// The upgrade request's method or path is outside the key's scope now.
    ScopeDenied,
    /// The protocol is no longer in `[upstream] upgrade_protocols`.
    UpgradeRefused,
    /// keygate is stopping.
    Shutdown,
}

impl Closed {
    pub const ALL: [Closed; 10] = [
        Closed::IpDenied,
        Closed::ClientCert,
        Closed::KeyRemoved,
        Closed::KeyReplaced,
        Closed::KeyDisabled,
        Closed::KeyExpired,
        Closed::KeyIpDenied,
        Closed::ScopeDenied,
        Closed::UpgradeRefused,
        Closed::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Closed::IpDenied => "ip_denied",
            Closed::ClientCert => "client_cert",
            Closed::KeyRemoved => "key_removed",
            Closed::KeyReplaced => "key_replaced",
            Closed::KeyDisabled => "key_disabled",
            Closed::KeyExpired => "key_expired",
            Closed::KeyIpDenied => "key_ip_denied",
            Closed::ScopeDenied => "scope_denied",
            Closed::UpgradeRefused => "upgrade_refused",
            Closed::Shutdown => "shutdown",
        }
    }

    /// The WebSocket close code the client gets (RFC 6455 §7.4.1): 1001 "going away" at
    /// shutdown, else 1008 "policy violation" (its access was taken away).
    fn client_code(self) -> u16 {
        match self {
            Closed::Shutdown => 1001,
            _ => 1008,
        }
    }

    fn cut(self) -> crate::log::Cut {
        match self {
            Closed::Shutdown => crate::log::Cut::Shutdown,
            _ => crate::log::Cut::Revoked,
        }
    }
}

/// What a tunnel's upgrade request was admitted on, to take the decision again.
pub struct Grant {
    pub conn: Arc<Conn>,
    /// The key as it was when the request was admitted.
    pub key: Arc<Key>,
    /// The client's `X-Forwarded-For` values as received (copies), to find its address again
    /// under changed `trusted_proxies`.
    pub forwarded_for: Box<[HeaderValue]>,
    pub method: http::Method,
    /// The upgrade request's path and query as received (a copy).
    pub path: http::uri::PathAndQuery,
    /// The protocol switched to, lower-case, without a version (`websocket`).
    pub protocol: Box<str>,
}

impl Grant {
    /// Whether the upgrade request would still be admitted under `snap` at `now`, in the
    /// pipeline's order (SPEC §3): global allow/deny, client certificate, key status, the key's
    /// allowlist, its scope; then the upgrade policy (SPEC §4).
    pub fn check(&self, snap: &Snapshot, now: jiff::Timestamp) -> Result<(), Closed> {
        let client_ip = self.client_ip(snap);
        if !snap.access.admits(client_ip) {
            return Err(Closed::IpDenied);
        }
        if !self.conn.client_cert_admitted(snap) {
            return Err(Closed::ClientCert);
        }
        let key = snap.keys.get(&*self.key.id).ok_or(Closed::KeyRemoved)?;
        if key.hash.fingerprint() != self.key.hash.fingerprint() {
            return Err(Closed::KeyReplaced);
        }
        if key.disabled {
            return Err(Closed::KeyDisabled);
        }
        if key.is_expired(now) {
            return Err(Closed::KeyExpired);
        }
        if key.allow.as_ref().is_some_and(|a| !a.contains(client_ip)) {
            return Err(Closed::KeyIpDenied);
        }
        if !key.scope.permits(&self.method, self.path.path())
            || !key.scope.permits_overrides(self.path.query())
        {
            return Err(Closed::ScopeDenied);
        }
        if !snap
            .forwarding
            .upgrade_protocols
            .iter()
            .any(|p| **p == *self.protocol)
        {
            return Err(Closed::UpgradeRefused);
        }
        Ok(())
    }

    fn client_ip(&self, snap: &Snapshot) -> IpAddr {
        snap.access.client_ip(
            self.conn.peer.ip(),
            self.forwarded_for.iter().map(|v| v.as_bytes()),
        )
    }

    fn is_websocket(&self) -> bool {
        &*self.protocol == "websocket"
    }
}

/// Resolves when keygate must close the tunnel: a reload (or the key's expiry instant) took its
/// access away, or keygate is stopping.
async fn must_close(grant: &Grant, mut watch: Watch) -> Closed {
    loop {
        let snap = watch.snapshot.borrow_and_update().clone();
        if let Err(why) = grant.check(&snap, jiff::Timestamp::now()) {
            return why;
        }
        // The key's expiry instant under the running config (a reload may set or move it).
        let expires = snap.keys.get(&*grant.key.id).and_then(|k| k.expires);
        drop(snap);
        let until_expiry = expires.map(|e| {
            let left = e.as_millisecond() - jiff::Timestamp::now().as_millisecond();
            Duration::from_millis(left.max(0) as u64).min(EXPIRY_RECHECK)
        });
        tokio::select! {
            changed = watch.snapshot.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            // (The guard `wait_for` yields is dropped inside: it must not live across an await.)
            () = async { let _ = watch.stopping.wait_for(|s| *s).await; } => return Closed::Shutdown,
            () = async {
                match until_expiry {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Everything a tunnel task needs ([`run`]).
pub struct Start {
    pub client: hyper::upgrade::OnUpgrade,
    pub upstream: hyper::upgrade::OnUpgrade,
    pub grant: Grant,
    pub watch: Watch,
    /// What the request holds (key slot, upstream permit), kept while the tunnel lasts.
    pub held: crate::upstream_cap::Held,
    pub log: crate::body::TunnelLog,
    pub request_id: HeaderValue,
    pub client_ip: IpAddr,
    /// `[upstream] tunnel_idle_timeout`.
    pub idle: Duration,
}

impl Tunnels {
    /// The receivers for a tunnel about to start: made before the 101 goes out, so that no
    /// reload between the upgrade's admission and the splice is missed.
    pub fn subscribe(&self) -> Watch {
        self.watch()
    }
}

/// The tunnel's task: waits for both sides' upgrades, splices them, and writes its access line
/// when it ends.
pub async fn run(start: Start) {
    let Start {
        client,
        upstream,
        grant,
        watch,
        held,
        log,
        request_id,
        client_ip,
        idle,
    } = start;
    let _held = held;
    let key_id = grant.key.id.clone();
    let mut carried = Carried::default();
    let mut cut = None;
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let close = must_close(&grant, watch);
            let (c, end) = splice(client, upstream, idle, grant.is_websocket(), close).await;
            carried = c;
            match end {
                TunnelEnd::Closed => {}
                TunnelEnd::Failed(e) => {
                    tracing::debug!(request_id = request_id_str(&request_id), error = %e, "upgraded connection ended with an error");
                }
                // Counted with the client timeouts: the client holds the slots, and a client
                // that vanished is the usual cause.
                TunnelEnd::Idle => {
                    cut = Some(crate::log::Cut::TunnelIdle);
                    metrics::global().client_timeout("tunnel_idle");
                    client_event!(ClientEvent::ClientTimeout, client_ip, Level::INFO, event = "client_timeout", phase = "tunnel_idle", request_id = request_id_str(&request_id), client_ip = %client_ip, key_id = &*key_id, timeout_ms = idle.as_millis() as u64, "no byte either way through the upgraded connection within upstream.tunnel_idle_timeout; closed");
                }
                TunnelEnd::ClosedBy { why, clean } => {
                    metrics::global().tunnel_closed(why.as_str());
                    cut = Some(why.cut());
                    let reason = why.as_str();
                    let protocol = &*grant.protocol;
                    let rid = request_id_str(&request_id);
                    if why == Closed::Shutdown {
                        tracing::info!(event = "tunnel_closed", reason, request_id = rid, client_ip = %client_ip, key_id = &*key_id, protocol, clean_close = clean, "upgraded connection closed: keygate is stopping");
                    } else {
                        tracing::warn!(event = "tunnel_closed", reason, request_id = rid, client_ip = %client_ip, key_id = &*key_id, protocol, clean_close = clean, "upgraded connection closed: the running config no longer admits its upgrade request");
                    }
                }
            }
        }
        Err(e) => {
            client_event!(ClientEvent::UpgradeFailed, client_ip, Level::WARN, request_id = request_id_str(&request_id), error = %e, "protocol upgrade failed")
        }
    }
    log.closed(carried, cut).await;
}

/// Bytes an upgraded connection carried each way.
#[derive(Debug, Default, Clone, Copy)]
pub struct Carried {
    pub from_client: u64,
    pub to_client: u64,
}

/// How an upgraded connection ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// Both sides closed their half.
    Closed,
    /// One side failed (a reset is how many WebSocket sessions end).
    Failed(std::io::Error),
    /// No byte went either way for `[upstream] tunnel_idle_timeout`: both sides were closed.
    Idle,
    /// keygate closed it ([`Closed`]); `clean`: with WebSocket Close frames.
    ClosedBy { why: Closed, clean: bool },
}

/// State both sides of a tunnel share while it is spliced.
struct Shared {
    /// Milliseconds from `start` to the last byte that moved either way.
    moved: AtomicU64,
    start: tokio::time::Instant,
    /// keygate is closing the tunnel: each side's writer takes the rest of the WebSocket frame
    /// it is in, then nothing more.
    closing: AtomicBool,
    /// The frames written to each side: [`CLIENT`] and [`UPSTREAM`].
    frames: [FrameCell; 2],
}

const CLIENT: usize = 0;
const UPSTREAM: usize = 1;

/// Copies both ways between the client and the upstream until both sides are done, one fails,
/// nothing has moved either way for `idle` (`[upstream] tunnel_idle_timeout`, as nginx's
/// `proxy_read_timeout` closes a silent WebSocket), or `close` resolves (keygate closes it; see
/// the module docs). A byte read from either side, or written to either side, is activity, so a
/// server-push stream with a silent client lives on, and a client that stops reading stalls the
/// copy and times out too. Returns what was carried, counted as read from each side, however it
/// ended.
pub async fn splice(
    client: hyper::upgrade::Upgraded,
    upstream: hyper::upgrade::Upgraded,
    idle: Duration,
    websocket: bool,
    close: impl std::future::Future<Output = Closed>,
) -> (Carried, TunnelEnd) {
    let shared = Shared {
        moved: AtomicU64::new(0),
        start: tokio::time::Instant::now(),
        closing: AtomicBool::new(false),
        frames: Default::default(),
    };
    let start = shared.start;
    // Bytes written to the client are the server's frames (unmasked), to the upstream the
    // client's (masked).
    let mut client = Counted::new(hyper_util::rt::TokioIo::new(client), &shared, CLIENT);
    let mut upstream = Counted::new(hyper_util::rt::TokioIo::new(upstream), &shared, UPSTREAM);
    let end = {
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        tokio::pin!(close);
        let mut deadline = start + idle;
        loop {
            tokio::select! {
                r = &mut copy => break r.map_or_else(TunnelEnd::Failed, |_| TunnelEnd::Closed),
                () = tokio::time::sleep_until(deadline) => {
                    let last = start + Duration::from_millis(shared.moved.load(Relaxed));
                    if last + idle <= tokio::time::Instant::now() {
                        break TunnelEnd::Idle;
                    }
                    deadline = last + idle;
                }
                why = &mut close => {
                    shared.closing.store(true, Relaxed);
                    let mut clean = false;
                    if websocket {
                        // Each side finishes the frame it is in (bytes already read from the
                        // other side), so that the Close frames start on a frame boundary.
                        let finish = tokio::time::Instant::now() + FINISH_FRAME;
                        loop {
                            if shared.frames.iter().all(|f| f.lock().at_boundary()) {
                                clean = true;
                                break;
                            }
                            tokio::select! {
                                r = &mut copy => {
                                    // A side closed meanwhile: nothing more to close cleanly.
                                    let _ = r;
                                    break;
                                }
                                () = tokio::time::sleep(Duration::from_millis(10)) => {}
                            }
                            if tokio::time::Instant::now() >= finish {
                                break;
                            }
                        }
                    }
                    break TunnelEnd::ClosedBy { why, clean };
                }
            }
        }
    };
    match &end {
        TunnelEnd::Idle => {
            // TLS close_notify and FIN to the client, FIN to the upstream; bounded, as a peer
            // that reads nothing may never take them.
            let _ = tokio::time::timeout(CLOSE_WITHIN, async {
                let _ = tokio::join!(client.shut(None), upstream.shut(None));
            })
            .await;
        }
        TunnelEnd::ClosedBy { why, clean } => {
            let (to_client, to_upstream) = if *clean {
                (
                    Some(close_frame(why.client_code(), None)),
                    Some(close_frame(1001, Some(rand::random()))),
                )
            } else {
                (None, None)
            };
            let _ = tokio::time::timeout(CLOSE_WITHIN, async {
                let _ = tokio::join!(client.shut(to_client), upstream.shut(to_upstream));
            })
            .await;
            // The peers' Close replies (and anything else in flight) are read and dropped, so
            // that closing with unread data does not reset the connection under the Close frame.
            let _ = tokio::time::timeout(CLOSE_WITHIN, async {
                let _ = tokio::join!(client.drain(), upstream.drain());
            })
            .await;
        }
        TunnelEnd::Closed | TunnelEnd::Failed(_) => {}
    }
    let carried = Carried {
        from_client: client.read,
        to_client: upstream.read,
    };
    (carried, end)
}

/// A WebSocket Close frame (RFC 6455 §5.5.1) with a status code and no reason: unmasked from
/// the server side, masked with `mask` from the client side (§5.3).
fn close_frame(code: u16, mask: Option<[u8; 4]>) -> Vec<u8> {
    let payload = code.to_be_bytes();
    let mut frame = vec![0x88];
    match mask {
        None => {
            frame.push(payload.len() as u8);
            frame.extend_from_slice(&payload);
        }
        Some(m) => {
            frame.push(0x80 | payload.len() as u8);
            frame.extend_from_slice(&m);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
    }
    frame
}

/// Where a stream of WebSocket frames (RFC 6455 §5.2) is: between two frames, in a frame's
/// header, or in its payload. Only lengths are read; the bytes pass unchanged.
#[derive(Debug, Default, Clone, Copy)]
struct Frames {
    /// Header bytes of the frame being written, so far (2 to 14 in all).
    head: [u8; 14],
    head_len: usize,
    /// Payload bytes still to come of the current frame, once its header is complete.
    payload_left: u64,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.payload_left == 0
    }

    /// The header's length once its first two bytes are known: 2, plus 2 or 8 for an extended
    /// payload length, plus 4 for a masking key.
    fn header_len(b1: u8) -> usize {
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
    }

    fn payload_len(head: &[u8]) -> u64 {
        match head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
            127 => u64::from_be_bytes(head[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        }
    }

    /// Moves over `data` (bytes written); with `stop`, stops at the first frame boundary and
    /// returns how many bytes it took (0 when already at one).
    fn advance(&mut self, data: &[u8], stop: bool) -> usize {
        let mut i = 0;
        while i < data.len() {
            if stop && self.at_boundary() && i > 0 {
                return i;
            }
            if stop && self.at_boundary() {
                return 0;
            }
            if self.head_len == 0 && self.payload_left > 0 {
                let take = (self.payload_left.min((data.len() - i) as u64)) as usize;
                i += take;
                self.payload_left -= take as u64;
                continue;
            }
            self.head[self.head_len] = data[i];
            self.head_len += 1;
            i += 1;
            if self.head_len >= 2 && self.head_len == Self::header_len(self.head[1]) {
                self.payload_left = Self::payload_len(&self.head[..self.head_len]);
                self.head_len = 0;
            }
        }
        i
    }
}

/// A frame tracker shared between the writer (inside the copy) and the closing code.
#[derive(Default)]
struct FrameCell(std::sync::Mutex<Frames>);

impl FrameCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Frames> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One side of a tunnel: counts the bytes read from it, notes when bytes last moved through it
/// either way, and tracks the WebSocket frames written to it (see [`Shared::closing`]).
struct Counted<'a, T> {
    io: T,
    read: u64,
    shared: &'a Shared,
    /// [`CLIENT`] or [`UPSTREAM`].
    side: usize,
}

impl<'a, T> Counted<'a, T> {
    fn new(io: T, shared: &'a Shared, side: usize) -> Self {
        Counted {
            io,
            read: 0,
            shared,
            side,
        }
    }

    fn frames(&self) -> std::sync::MutexGuard<'_, Frames> {
        self.shared.frames[self.side].lock()
    }

    fn note(&self, n: usize) {
        if n > 0 {
            self.shared
                .moved
                .store(self.shared.start.elapsed().as_millis() as u64, Relaxed);
        }
    }
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Counted<'_, T> {
    /// Writes `last` (a Close frame) if given, then shuts the write side down (TLS
    /// close_notify, FIN).
    async fn shut(&mut self, last: Option<Vec<u8>>) {
        use tokio::io::AsyncWriteExt as _;
        if let Some(frame) = last {
            let _ = self.io.write_all(&frame).await;
            let _ = self.io.flush().await;
        }
        let _ = self.io.shutdown().await;
    }

    /// Reads and drops what the peer still sends, until it closes.
    async fn drain(&mut self) {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.io.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read += n as u64;
        self.note(n);
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // Closing: only the rest of the current frame goes out, then nothing (the copy is
        // dropped once both sides are at a boundary).
        let closing = self.shared.closing.load(Relaxed);
        let allowed = if closing {
            let n = { *self.frames() }.advance(buf, true);
            if n == 0 {
                return Poll::Pending;
            }
            n
        } else {
            buf.len()
        };
        let polled = Pin::new(&mut self.io).poll_write(cx, &buf[..allowed]);
        if let Poll::Ready(Ok(n)) = polled {
            self.frames().advance(&buf[..n], false);
            self.note(n);
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of every length form (7-bit, 16-bit, 64-bit), masked and not, written in pieces
    /// of every size: the tracker is at a boundary exactly between frames, and when told to
    /// stop, takes exactly the rest of the frame it is in.
    #[test]
    fn frame_boundaries_are_found_in_any_split() {
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for (len, masked) in [
            (0usize, false),
            (5, true),
            (125, false),
            (126, true),
            (300, false),
            (70_000, true),
        ] {
            let mut f = vec![0x82];
            let m = if masked { 0x80 } else { 0 };
            match len {
                0..=125 => f.push(m | len as u8),
                126..=65535 => {
                    f.push(m | 126);
                    f.extend_from_slice(&(len as u16).to_be_bytes());
                }
                _ => {
                    f.push(m | 127);
                    f.extend_from_slice(&(len as u64).to_be_bytes());
                }
            }
            if masked {
                f.extend_from_slice(&[1, 2, 3, 4]);
            }
            f.extend(std::iter::repeat_n(0xab, len));
            stream.extend_from_slice(&f);
            ends.push(stream.len());
        }
        for piece in [1, 2, 3, 7, 13, 1000, stream.len()] {
            let mut t = Frames::default();
            let mut pos = 0;
            for chunk in stream.chunks(piece) {
                t.advance(chunk, false);
                pos += chunk.len();
                assert_eq!(
                    t.at_boundary(),
                    ends.contains(&pos),
                    "piece {piece} at {pos}"
                );
            }
        }
        // Stopping: from any position, the rest of the frame and no more.
        for start in [0, 1, 2, 5, ends[1], ends[3] + 3, ends[4] + 10] {
            let mut t = Frames::default();
            t.advance(&stream[..start], false);
            let n = t.advance(&stream[start..], true);
            let next = ends.iter().copied().find(|&e| e > start).unwrap();
            let expected = if ends.contains(&start) || start == 0 {
                0
            } else {
                next - start
            };
            assert_eq!(n, expected, "from {start}");
        }
    }

    #[test]
    fn close_frames_are_well_formed() {
        assert_eq!(close_frame(1008, None), [0x88, 2, 0x03, 0xf0]);
        let m = [9, 8, 7, 6];
        let f = close_frame(1001, Some(m));
        assert_eq!(f[..2], [0x88, 0x82]);
        assert_eq!(f[2..6], m);
        assert_eq!([f[6] ^ m[0], f[7] ^ m[1]], 1001u16.to_be_bytes());
    }
}
