//! The listener: accept → connection cap → client-IP gate → TLS handshake → HTTP/1.1 or h2
//! (hyper-util auto) → [`pipeline::handle`]. Also the process-level tasks: signals (SIGHUP
//! reload, SIGTERM/SIGINT drain), systemd notifications, the admin listener, state-file saves
//! and certificate-expiry warnings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures_util::FutureExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::body::WriteGate;
use crate::config::{self, BuildContext, Snapshot};
use crate::conn_limits::{ConnSlot, ConnTable};
use crate::log::{ClientEvent, LogGuard, client_event};
use crate::metrics;
use crate::pipeline::{self, Conn, Shared};
use crate::usage::State;
use tracing::Level;

/// Where the running config came from, and so what SIGHUP re-reads.
pub enum Source {
    File(PathBuf),
    /// `keygate demo`: nothing to re-read.
    InMemory,
}

/// Serves until SIGTERM/SIGINT with `[server] workers` event loops (default: one per CPU).
///
/// The runtime shape is nginx's: each worker is one thread running its own single-threaded tokio
/// runtime, accepting from the shared listening socket and serving the connections it accepted
/// to the end, with no work stealing between workers. A request is then handled on one thread
/// from the first byte to the last, with no cross-thread wake-ups, atomics or task migration on
/// its path; this measured cheaper per request than one multi-threaded runtime
/// (`bench/perf.sh`, issue 10). The main thread is worker 0 and also runs the process-level
/// tasks (signals, reload, admin listener, housekeeping).
pub fn run(source: Source, snapshot: Snapshot, log: LogGuard) -> std::io::Result<()> {
    let workers = snapshot
        .server
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    raise_open_files_limit(
        (snapshot.server.max_connections + snapshot.caps.upstream_max_connections + 256) as u64,
    );
    worker_runtime()?.block_on(serve(source, snapshot, log, workers))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (as Go's runtime does at start, and
/// nginx with `worker_rlimit_nofile`): a shell, or a systemd unit without `LimitNOFILE=`
/// (the shipped one sets 65,536), starts at 1,024, below the default `max_connections`, and
/// `accept` would then fail with EMFILE before the connection table is full and can reclaim
/// anything (a fresh user's finding). Warns when the limit stays below `needed` (client and
/// upstream connections plus a margin for files, sockets and the admin listener). Returns
/// the soft limit in effect (`None`: unlimited).
pub fn raise_open_files_limit(needed: u64) -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    // An unlimited hard limit cannot be the soft one (the kernel caps it at fs.nr_open).
    let target = lim.maximum.unwrap_or(1 << 20);
    if lim.current.is_some_and(|c| c < target) {
        let raised = Rlimit {
            current: Some(target),
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "cannot raise RLIMIT_NOFILE");
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    if let Some(n) = now
        && n < needed
    {
        tracing::warn!(
            open_files_limit = n,
            needed,
            "the open files limit (RLIMIT_NOFILE) is below server.max_connections + upstream.max_connections: accept will fail with EMFILE before the connection table is full; raise LimitNOFILE= (systemd) or ulimit -n, or lower max_connections"
        );
    }
    now
}

/// Worker event loops made but not yet handed to their threads. Dropped on a start error
/// (inside the main runtime, where a runtime may not be dropped blocking), they are shut down
/// in the background.
struct WorkerRuntimes(Vec<tokio::runtime::Runtime>);

impl Drop for WorkerRuntimes {
    fn drop(&mut self) {
        for rt in self.0.drain(..) {
            rt.shutdown_background();
        }
    }
}

fn worker_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

async fn serve(
    source: Source,
    snapshot: Snapshot,
    log: LogGuard,
    workers: usize,
) -> std::io::Result<()> {
    // Signal handlers go in before anything is announced: once systemd has READY=1 it may send
    // SIGHUP (`systemctl reload`), and SIGHUP's default action would kill the process.
    let signals = Signals::install()?;
    // Shared with the reload task (log level); kept here so that the last lines ("stopped")
    // are still written and flushed after the reload task is gone.
    let log = Arc::new(log);
    // The other workers' event loops (and their listener descriptors), made before anything
    // is announced: one that cannot be made is a start error naming server.workers, not a
    // "listening" line followed by an exit (fresh user T5-8).
    let mut runtimes = WorkerRuntimes(Vec::with_capacity(workers.saturating_sub(1)));
    for n in 1..workers {
        runtimes.0.push(worker_runtime().map_err(|e| {
            let e = std::io::Error::other(format!(
                "server.workers = {workers}: cannot start event loop {n}: {e}"
            ));
            tracing::error!(error = %e, "cannot start");
            e
        })?);
    }
    let listener = TcpListener::bind(snapshot.server.listen)
        .await
        .map_err(|e| {
            tracing::error!(addr = %snapshot.server.listen, error = %e, "cannot bind the listener");
            e
        })?;
    let local = listener.local_addr()?;
    crate::clock::init();
    if let Some(st) = &snapshot.state
        && let Err(e) = crate::usage::check_state_dir(&st.path)
    {
        tracing::error!(path = %st.path.display(), error = %e, "state.path: cannot keep key usage, quotas and network history");
        return Err(std::io::Error::other(format!("state.path: {e}")));
    }
    let state = match &snapshot.state {
        Some(st) => State::load(&st.path, &snapshot.key_networks).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "starting with empty key-usage state");
            State::default()
        }),
        None => State::default(),
    };
    spawn_exposure_check(&snapshot.upstream_url);
    for w in &snapshot.warnings {
        tracing::warn!(warning = %w, "config warning");
    }
    metrics::global().set_cert_not_after(snapshot.cert_not_after);
    crate::log::budget().configure(snapshot.log.client_event_limit);
    let max_connections = snapshot.server.max_connections;
    let admin = snapshot.admin;
    metrics::global().set_config_hash(&snapshot.config_hash);
    let cluster = match &snapshot.cluster {
        Some(settings) => {
            let c =
                crate::cluster::Cluster::new(settings.clone()).map_err(std::io::Error::other)?;
            tracing::info!(instance = %settings.instance, "cluster mode: rate limits shared through Redis");
            c.start();
            crate::cluster::install(c.clone());
            Some(c)
        }
        None => None,
    };
    let shared = Arc::new(Shared::new(snapshot, state, cluster));
    if let Some(c) = &shared.cluster {
        let s = shared.clone();
        tokio::spawn(
            c.clone()
                .write_behind(move || s.snapshot.load().key_networks),
        );
    }

    if let Some(addr) = admin {
        let l = TcpListener::bind(addr).await.map_err(|e| {
            tracing::error!(addr = %addr, error = %e, "cannot bind the admin listener");
            e
        })?;
        tracing::info!(addr = %l.local_addr()?, "admin listening");
        tokio::spawn(crate::admin::serve(l, shared.clone()));
    }
    tracing::info!(addr = %local, version = env!("CARGO_PKG_VERSION"), "listening");
    notify_ready(&format!(
        "serving on {local} with {} keys",
        shared.snapshot.load().keys.len()
    ));

    tokio::spawn(housekeeping(shared.clone()));
    tokio::spawn(write_state_behind(shared.clone()));
    tokio::spawn(crate::log::summaries());
    let (drain_tx, drain_rx) = watch::channel(Drain::Serving);
    let reload_task = tokio::spawn(reload_on_sighup(
        signals.hup,
        source,
        shared.clone(),
        log.clone(),
    ));

    let table = ConnTable::new(max_connections);
    // Every worker accepts from the same socket (its own descriptor of it).
    let listener = listener.into_std()?;
    for (n, rt) in (1..workers).zip(std::mem::take(&mut runtimes.0)) {
        let std_listener = listener.try_clone()?;
        let (shared, table, drain) = (shared.clone(), table.clone(), drain_rx.clone());
        std::thread::Builder::new()
            .name(format!("keygate-w{n}"))
            .spawn(move || {
                rt.block_on(async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(l) => accept_loop(l, shared, table, drain).await,
                        Err(e) => tracing::error!(error = %e, "worker cannot use the listener"),
                    }
                    // Its connections finish (or are cut at shutdown_grace) on this runtime;
                    // the process ends when the main thread returns.
                    std::future::pending::<()>().await
                });
            })?;
    }
    let listener = TcpListener::from_std(listener)?;
    let shutdown = shutdown_signal(signals.term, signals.int);
    tokio::select! {
        () = shutdown => {}
        () = accept_loop(listener, shared.clone(), table, drain_rx.clone()) => {}
    }

    // Drain: stop accepting, let in-flight requests finish within shutdown_grace.
    reload_task.abort();
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: draining open connections"),
    ]);
    let grace = shared.snapshot.load().server.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        open_connections = metrics::global().open_connections(),
        "shutting down"
    );
    let _ = drain_tx.send(Drain::Draining);
    drop(drain_rx);
    if tokio::time::timeout(grace, drain_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            open_connections = metrics::global().open_connections(),
            "shutdown_grace elapsed; closing remaining connections"
        );
        // Every connection still open is closed now, on whichever worker serves it, and what it
        // cuts is logged `cut_by: shutdown` (before, the process just ended: no access line).
        let _ = drain_tx.send(Drain::Cut);
    }
    // Tunnels (WebSockets) do not hold the drain up (they never end by themselves): those still
    // open are closed now, cleanly (close code 1001) and logged `cut_by: shutdown`.
    shared.tunnels.stop();
    // The access lines of what was cut are written before the log is flushed (bounded: a
    // stream task that does not end is not waited for).
    let _ = tokio::time::timeout(CUT_LOGGED_WITHIN, async {
        drain_tx.closed().await;
        while pipeline::conns_alive() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    save_state(&shared, true);
    if let Some(c) = &shared.cluster {
        // The last uses noted since the last flush (bounded by the cluster timeout).
        let policy = shared.snapshot.load().key_networks;
        let _ = c.flush_uses(&policy, crate::clock::now()).await;
        let _ = c.quota_sync(crate::clock::now(), false).await;
    }
    tracing::info!("stopped");
    drop(log);
    Ok(())
}

/// Where the process is in its life, as each connection sees it (a `watch` channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    Serving,
    /// SIGTERM/SIGINT: stop accepting; each connection finishes its requests and closes
    /// (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY).
    Draining,
    /// `shutdown_grace` ran out: every connection still open is closed at once.
    Cut,
}

/// How long, after the drain (or the cut at `shutdown_grace`), the exit waits for the access
/// lines of what it ended: connections' tasks and HTTP/2 stream tasks, and tunnels closing
/// (`tunnel.rs`: at most 0.5 s to finish a frame, 1 s to send the Close frames, 1 s for the
/// replies).
const CUT_LOGGED_WITHIN: Duration = Duration::from_secs(3);

/// One worker's accept loop: until the drain starts, takes connections from the shared listener
/// and serves each on a task of this worker's runtime.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    table: Arc<ConnTable>,
    mut drain_rx: watch::Receiver<Drain>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = drain_rx.wait_for(|d| *d != Drain::Serving) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning. A connection flood can
                    // cause it, so the line is budgeted (under the unspecified address).
                    client_event!(ClientEvent::AcceptFailed, std::net::Ipv4Addr::UNSPECIFIED.into(), Level::WARN, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let snap = shared.snapshot.load_full();
        if snap.server.proxy_protocol {
            // Only the load balancers may say who the client is; nobody else gets a byte read.
            if !snap.access.is_balancer(peer.ip()) {
                metrics::global().ip_denied();
                client_event!(ClientEvent::IpDenied, peer.ip(), Level::WARN, event = "ip_denied", client_ip = %peer.ip().to_canonical(), scope = "proxy_protocol", "connection from a peer not in access.trusted_proxies closed (server.proxy_protocol is on)");
                continue;
            }
        } else if !admitted_at_accept(&snap, peer, false) {
            continue;
        }
        // A slot in the connection table (conn_limits.rs): per-address cap, and when full a
        // connection still in its handshake or idle makes room.
        let per_ip = snap.caps.max_connections_per_ip;
        let Some(slot) = table.admit(
            peer.ip(),
            per_ip,
            snap.access.is_balancer(peer.ip().to_canonical()),
        ) else {
            continue;
        };
        let shared = shared.clone();
        let drain = drain_rx.clone();
        tokio::spawn(async move {
            let _open = OpenConnection::new();
            let mut stream = stream;
            let peer = if snap.server.proxy_protocol {
                let proxied = tokio::select! {
                    p = proxied_peer(&mut stream, peer, &snap) => p,
                    () = slot.reclaimed() => None,
                };
                proxied.filter(|p| {
                    let ip = p.ip();
                    slot.rebind(ip, per_ip, snap.access.is_trusted_proxy(ip))
                })
            } else {
                Some(peer)
            };
            if let Some(peer) = peer {
                // Lines the h2/TLS libraries write while serving it count against its budget.
                crate::log::serving(
                    peer.ip().to_canonical(),
                    serve_connection(stream, peer, snap, shared, drain, &slot),
                )
                .await;
            }
            drop(slot);
        });
    }
}

/// The client-IP gate at accept (SPEC §3). With no trusted proxies the TCP peer is the client,
/// so a refused one is closed before any TLS work. Behind the PROXY protocol the header's source
/// is the peer (`proxied`), decided here as well unless it is itself a trusted proxy (then the
/// request's `X-Forwarded-For` names the client, and the pipeline decides).
fn admitted_at_accept(snap: &Snapshot, peer: SocketAddr, proxied: bool) -> bool {
    let ip = peer.ip().to_canonical();
    let decide_now =
        snap.access.decide_at_accept() || (proxied && !snap.access.is_trusted_proxy(ip));
    if decide_now && !snap.access.admits(ip) {
        metrics::global().ip_denied();
        client_event!(ClientEvent::IpDenied, ip, Level::WARN, event = "ip_denied", client_ip = %ip, scope = "global", "connection closed before TLS");
        return false;
    }
    true
}

/// Reads the PROXY protocol header a trusted balancer sends first (within
/// `tls_handshake_timeout`) and applies the IP gate to the address it carries. `None`: close.
async fn proxied_peer(
    stream: &mut TcpStream,
    balancer: SocketAddr,
    snap: &Snapshot,
) -> Option<SocketAddr> {
    let timeout = snap.server.tls_handshake_timeout;
    let peer = match crate::proxy_protocol::read_header(stream, timeout).await {
        Ok(Some(source)) => SocketAddr::new(source.ip().to_canonical(), source.port()),
        // LOCAL / UNKNOWN: the balancer's own connection (health checks).
        Ok(None) => balancer,
        // A balancer's TCP health check connects and closes without a header: not worth a warning.
        Err(e @ crate::proxy_protocol::ProxyError::NotReceived(_)) => {
            client_event!(ClientEvent::ProxyProtocol, balancer.ip(), Level::DEBUG, peer = %balancer, error = %e, "connection closed");
            return None;
        }
        Err(e) => {
            client_event!(ClientEvent::ProxyProtocol, balancer.ip(), Level::WARN, peer = %balancer, error = %e, "connection closed: check the load balancer's PROXY protocol setting");
            return None;
        }
    };
    admitted_at_accept(snap, peer, true).then_some(peer)
}

/// Counts an open client connection for the whole life of its task, panics included.
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        metrics::global().connection_opened();
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::global().connection_closed();
    }
}

/// What one connection may have encrypted and waiting for the client's socket (rustls'
/// default is 64 KiB), in bytes: one TLS record. With hyper's write buffer (at most
/// `max_buf_size`) and the upstream read buffers a response's chunks pin
/// ([`crate::forward::UPSTREAM_READ_BUF`]), this bounds what a client that reads slowly can
/// make keygate hold (README, "Memory"). On HTTP/1.1 a record the socket refused for its
/// unsent-data bound ([`CLIENT_NOTSENT_LOWAT`]) is handed to the kernel ([`ConnIo`]), so
/// keygate keeps one only when the socket's send buffer itself is full (a path whose window
/// has not grown yet); on HTTP/2 the last record stays while its client does not read.
pub const TLS_SEND_BUFFER: usize = 16 * 1024;

/// What one HTTP/2 stream may have queued for a client that does not open its flow-control
/// window (hyper's default is ~400 KiB per stream).
pub const H2_STREAM_SEND_BUFFER: usize = 16 * 1024;

/// How much request-body data an HTTP/2 client may send on one stream before keygate has passed
/// it on (RFC 9113 §6.9.2: the initial flow-control window). hyper's default is 1 MiB.
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// The same for a whole HTTP/2 connection: what one connection's uploads can make keygate hold
/// while the upstream (or the queue for it) is slow, whatever the number of streams. hyper's
/// default is 1 MiB; with 512 KiB an upload still fills a 40 Mbit/s path at 100 ms RTT, and
/// 1,000 connections uploading into a stalled upstream hold at most 512 MiB less what the
/// upstream read (an HTTP/1.1 upload waits in the kernel's socket buffers instead).
pub const H2_CONNECTION_WINDOW: u32 = 512 * 1024;

/// The TLS handshake within `tls_handshake_timeout`; `None` (logged, budgeted) when it fails.
async fn tls_handshake(
    stream: TcpStream,
    peer: SocketAddr,
    snap: &Snapshot,
) -> Option<Box<TlsStream<TcpStream>>> {
    let accept = TlsAcceptor::from(snap.tls.clone()).accept(stream);
    match tokio::time::timeout(snap.server.tls_handshake_timeout, accept).await {
        Ok(Ok(mut tls)) => {
            tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
            Some(Box::new(tls))
        }
        Ok(Err(e)) => {
            client_event!(ClientEvent::TlsHandshake, peer.ip(), Level::DEBUG, peer = %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            client_event!(ClientEvent::TlsHandshake, peer.ip(), Level::DEBUG, peer = %peer, "TLS handshake timed out");
            None
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    snap: Arc<Snapshot>,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<Drain>,
    slot: &ConnSlot,
) {
    let _ = stream.set_nodelay(true);
    keep_alive(&stream);
    bound_unsent(&stream);
    let s = &snap.server;
    // Memory per connection (issue 9 §3): the handshake's state (a TLS stream and a timer) is
    // boxed and freed once it is done, and the TLS stream it yields is boxed too, so that the
    // task keeps no room for either for the rest of the connection's life (an async fn keeps
    // a slot for every local that lives across an await, moved-out or not).
    let handshake = Box::pin(tls_handshake(stream, peer, &snap));
    // A connection still in its handshake is the first to go when the table is full.
    let tls = tokio::select! {
        r = handshake => r,
        () = slot.reclaimed() => return,
    };
    let Some(tls) = tls else {
        return;
    };

    // Explicit limits against hostile clients (tests/hostile.rs, docs/hardening.md).
    let header_read_timeout = s.header_read_timeout;
    let conn = Arc::new(Conn::admitted_under(
        peer,
        &snap,
        tls.get_ref().1.peer_certificates(),
    ));
    slot.established(conn.clone());
    // Set when the first request's head is complete and reaches the pipeline.
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io_state = Arc::new(IoState::new(conn.opened));
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    // HTTP/1.1: response bodies are paced by what the client's TLS stream takes (body.rs).
    let gate = (!h2).then(|| Arc::new(WriteGate::default()));
    let svc = {
        let conn = conn.clone();
        let started = started.clone();
        let io_state = io_state.clone();
        let gate = gate.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            started.store(true, Relaxed);
            use http_body::Body as _;
            io_state.parkable.store(
                req.body().is_end_stream()
                    && !req.headers().contains_key(http::header::UPGRADE)
                    && req.method() != http::Method::CONNECT,
                Relaxed,
            );
            // Boxed: hyper keeps room for this future in every connection, idle or not
            // (`Box<Option<future>>`), and the pipeline's future is ~3 KiB; boxed, an idle
            // connection holds a pointer and the request pays one allocation (issue 9 §3).
            // `map`, not `async move { handled.await }`: an async block keeps its captured
            // future and the future it awaits in two slots, so the box was twice the pipeline's
            // future (14 KiB per request in flight, jemalloc's 14,336-byte class; issue 10).
            let gate = gate.clone();
            let conn_r = conn.clone();
            Box::pin(
                pipeline::handle(req, shared.clone(), conn.clone()).map(move |resp| {
                    // HTTP/2: from here the stream owes the client its response (stall.rs).
                    if let Ok(r) = &resp {
                        crate::stall::response_ready(&conn_r, r.headers());
                    }
                    match gate {
                        Some(gate) => resp.map(|r| r.map(|b| b.gated(gate))),
                        None => resp,
                    }
                }),
            )
        })
    };
    let send_timeout = snap.caps.send_timeout;
    let watch = Watch {
        peer,
        conn,
        started,
        idle: s.idle_timeout,
        header_read_timeout,
        send_timeout,
    };
    // The protocol is the one negotiated by ALPN (RFC 9113 §3.2, RFC 7301), never guessed from
    // the first bytes: `h2` speaks HTTP/2 only, `http/1.1` or no ALPN HTTP/1.1 only.
    if h2 {
        // Boxed so that the (larger) HTTP/2 state is not part of every HTTP/1.1 connection's
        // task (issue 9 §3).
        Box::pin(async move {
            let Some(io) = h2_preface(tls, peer, header_read_timeout).await else {
                return;
            };
            // The same two tiers as HTTP/1.1 below: h2 counts 32 bytes more per field than the
            // wire does (pseudo-headers included), so twice `max_header_bytes` lets the pipeline
            // answer the JSON 431 exactly; h2 answers a bare 431 above that, and ends the
            // connection (GOAWAY) for a block too large to decode or a CONTINUATION flood.
            let h2_header_list =
                u32::try_from((s.max_header_bytes * 2).max(8192)).unwrap_or(u32::MAX);
            // Each stream's task is dropped (the stream reset) when the client takes nothing of
            // its response for send_timeout (stall.rs).
            let mut b = hyper::server::conn::http2::Builder::new(crate::stall::StreamExec {
                send_timeout,
                peer,
            });
            b.timer(TokioTimer::new())
                // Streams over the limit are refused (RST_STREAM REFUSED_STREAM); refusals count
                // towards the local-reset cap below.
                .max_concurrent_streams(s.h2_max_concurrent_streams)
                .max_header_list_size(h2_header_list)
                // Rapid reset (CVE-2023-44487): streams the client resets before keygate has
                // accepted them; more than 20 pending at once is GOAWAY ENHANCE_YOUR_CALM.
                .max_pending_accept_reset_streams(Some(20))
                // "MadeYouReset" (CVE-2025-8671): streams keygate had to reset for the client's
                // protocol errors; past 1024 on one connection, GOAWAY ENHANCE_YOUR_CALM.
                .max_local_error_reset_streams(Some(1024))
                .max_send_buf_size(H2_STREAM_SEND_BUFFER)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20));
            let http = b.serve_connection(TokioIo::new(io), svc);
            tokio::pin!(http);
            watch
                .drive(
                    http.as_mut(),
                    |c| c.graceful_shutdown(),
                    &mut drain,
                    slot,
                    None,
                )
                .await;
        })
        .await;
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            // hyper starts this clock when it waits for a request head: at the first byte of
            // the first request, and right after each response on a kept-alive connection (so
            // it is also HTTP/1.1's keep-alive idle limit). The wait before the first byte is
            // covered by `first_request` in `Watch::drive`.
            .header_read_timeout(header_read_timeout)
            // hyper answers 431 (without a body) past its buffer or past 100 header lines;
            // below that, the pipeline checks `max_header_bytes` exactly and answers with the
            // JSON error.
            .max_buf_size((s.max_header_bytes * 2).max(8192))
            .max_headers(100)
            .keep_alive(true);
        let mut io = ConnIo {
            inner: tls,
            replay: bytes::Bytes::new(),
            state: io_state.clone(),
            gate: gate.unwrap_or_default(),
        };
        loop {
            let mut http = b
                .serve_connection(TokioIo::new(io), svc.clone())
                .with_upgrades();
            let driven = watch
                .drive(
                    std::pin::Pin::new(&mut http),
                    |c| c.graceful_shutdown(),
                    &mut drain,
                    slot,
                    Some(&io_state),
                )
                .await;
            if driven == Driven::Ended {
                return;
            }
            // Parked (issue 9 §3): hyper's buffers, its cached header map and its state are
            // freed; the TLS stream waits for the client's next bytes, and a new hyper
            // connection takes them. Nothing was half-read (the last request had no body and
            // hyper had read nothing more, or it is replayed) or half-written.
            let Some(parts) = http.into_parts() else {
                return;
            };
            io = parts.io.into_inner();
            watch.started.store(false, Relaxed);
            if !parts.read_buf.is_empty() {
                io.replay = parts.read_buf;
                continue;
            }
            let last =
                watch.conn.opened + Duration::from_millis(watch.conn.last_active_ms.load(Relaxed));
            let until = tokio::time::Instant::from_std(last + watch.idle.min(header_read_timeout));
            let woken = tokio::select! {
                r = io.inner.get_ref().0.readable() => r.is_ok(),
                () = tokio::time::sleep_until(until) => false,
                _ = drain.changed() => false,
                () = slot.reclaimed() => false,
            };
            if !woken {
                use tokio::io::AsyncWriteExt;
                let _ = tokio::time::timeout(Duration::from_secs(1), io.inner.shutdown()).await;
                return;
            }
        }
    }
}

/// TCP keep-alive on a client's socket (SO_KEEPALIVE; Linux TCP_KEEPIDLE, TCP_KEEPINTVL,
/// TCP_KEEPCNT): after [`KEEPALIVE_IDLE`] without a segment from the client the kernel probes
/// it every [`KEEPALIVE_INTERVAL`], and after [`KEEPALIVE_PROBES`] unanswered probes the
/// connection fails, so a client that vanished (lost its network, a NAT dropped the mapping)
/// is detected within about two minutes even while keygate has nothing to send it (a silent
/// tunnel, a long upstream wait), as nginx's `so_keepalive` does. Failure to set it is
/// harmless (the other timeouts still apply).
fn keep_alive(stream: &TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&params);
}

/// How many bytes a client's socket may hold that the kernel has not sent yet (Linux
/// `TCP_NOTSENT_LOWAT`; Cloudflare and Apple set it on their servers for the same reason), in
/// bytes: 128 KiB, on HTTP/1.1 and HTTP/2 connections alike.
/// Without it the kernel takes up to `net.ipv4.tcp_wmem`'s maximum (4 MiB) for a client that
/// does not read: ~3.9 MB per slow reader on loopback, 3.9 GB for 1,000 of them (issue 9 §3).
/// With it, a client that does not read makes the kernel hold at most this much unsent, plus
/// what is in flight (the client's receive window) and one TLS record handed over when the
/// socket refused it ([`ConnIo`]). Data in flight is not bounded by it, so a fast client's
/// throughput is not: the kernel reports the socket writable again once less than half of it
/// is unsent, and keygate refills it. Failure to set it is harmless (the kernel's default).
pub const CLIENT_NOTSENT_LOWAT: u32 = 128 * 1024;

fn bound_unsent(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(CLIENT_NOTSENT_LOWAT);
}

pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_PROBES: u32 = 6;

/// How long an HTTP/1.1 connection stays idle before it is parked: hyper's read and write
/// buffers (8 KiB each) and its state are freed, and rebuilt when the client sends again, as
/// nginx frees an idle keep-alive connection's buffers (issue 9 §3). A busy connection is
/// never parked. HTTP/2 connections are not parked (hyper cannot hand one back).
const PARK_AFTER: Duration = Duration::from_secs(1);

/// How [`Watch::drive`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Driven {
    /// The connection is done (closed, failed, upgraded or shut down).
    Ended,
    /// HTTP/1.1, idle: take it apart and park it.
    Park,
}

/// What the connection's driver learns from its I/O and service (HTTP/1.1).
struct IoState {
    /// The last write or flush did not complete (hyper or rustls still hold bytes for the
    /// client): not parkable.
    write_blocked: AtomicBool,
    /// When a write or flush last went through, in milliseconds from `opened`: with
    /// `write_blocked`, how long the client has taken nothing (`send_timeout`, stall.rs).
    wrote_ms: AtomicU64,
    opened: std::time::Instant,
    /// The last request had no body and asked for no upgrade: once it is answered, hyper has
    /// nothing of it left to read.
    parkable: AtomicBool,
}

/// The client's TLS stream as hyper sees it: bytes hyper had read before the connection was
/// parked are replayed first, and a write left pending is noted in [`IoState`].
struct ConnIo {
    inner: Box<TlsStream<TcpStream>>,
    replay: bytes::Bytes,
    state: Arc<IoState>,
    /// Told when a flush is complete (hyper and TLS hold nothing), to pace response bodies.
    gate: Arc<WriteGate>,
}

impl IoState {
    fn new(opened: std::time::Instant) -> Self {
        IoState {
            write_blocked: AtomicBool::new(false),
            wrote_ms: AtomicU64::new(0),
            opened,
            parkable: AtomicBool::new(false),
        }
    }

    /// When a write last went through.
    fn last_write(&self) -> std::time::Instant {
        self.opened + Duration::from_millis(self.wrote_ms.load(Relaxed))
    }
}

impl ConnIo {
    fn note<T>(&self, polled: std::task::Poll<T>) -> std::task::Poll<T> {
        let blocked = polled.is_pending();
        self.state.write_blocked.store(blocked, Relaxed);
        if !blocked {
            let ms = self.state.opened.elapsed().as_millis() as u64;
            self.state.wrote_ms.store(ms, Relaxed);
        }
        polled
    }
    /// New plaintext is encrypted only once the TLS records already made are all in the socket,
    /// and the socket has room (its writability, as the kernel last reported it: a refused
    /// write clears it, and with [`CLIENT_NOTSENT_LOWAT`] the kernel sets it again once less
    /// than half of that is unsent). Otherwise a client that reads a few bytes at a time makes
    /// TLS top its buffer up with a record per opening of its window (a slow reader ended up
    /// holding ~200 records of ~70 bytes, each an allocation, instead of one), and a client
    /// that does not read makes keygate encrypt a 16 KiB record that then waits in keygate.
    /// Ready: write on (nothing is noted as written: the write that follows is).
    fn poll_room(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.inner.get_ref().1.wants_write() {
            match tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.inner), cx) {
                std::task::Poll::Pending => {
                    if !self.hand_over_refused() {
                        return self.note(std::task::Poll::Pending);
                    }
                }
                std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                std::task::Poll::Ready(Ok(())) => {}
            }
        }
        match self.inner.get_ref().0.poll_write_ready(cx) {
            std::task::Poll::Pending => self.note(std::task::Poll::Pending),
            ready => ready,
        }
    }

    /// TLS records the client's socket refused (the client stopped reading while a record was
    /// on its way) are handed to the kernel, with the socket's unsent-data bound lifted for
    /// that one write: keygate then holds no encrypted data for a slow reader, only the
    /// plaintext of the chunk being written (README "Memory"), and [`Self::poll_room`] makes
    /// no new record until the kernel reports room. The kernel holds at most one record (16 KiB,
    /// `TLS_SEND_BUFFER`) more than [`CLIENT_NOTSENT_LOWAT`] for it. A socket refused for its
    /// send buffer instead (`tcp_wmem`, on a path with a small window) refuses this write too,
    /// and the records stay in keygate, as before (at most `TLS_SEND_BUFFER`). Returns whether
    /// none is left. Called only when a write did not go through, never on the fast path.
    fn hand_over_refused(&mut self) -> bool {
        let (tcp, tls) = self.inner.get_mut();
        let sock = socket2::SockRef::from(&*tcp);
        let _ = sock.set_tcp_notsent_lowat(i32::MAX as u32);
        let mut out = SendNow(tcp);
        while tls.wants_write() {
            match tls.write_tls(&mut out) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let _ = sock.set_tcp_notsent_lowat(CLIENT_NOTSENT_LOWAT);
        !tls.wants_write()
    }
}

/// A write straight to the socket (`send` with `MSG_DONTWAIT`), whatever tokio last heard
/// of its writability: [`ConnIo::hand_over_refused`] writes right after a refusal, with the
/// socket's bound lifted, when tokio would wait for the kernel's next wake-up.
struct SendNow<'a>(&'a TcpStream);

impl std::io::Write for SendNow<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use rustix::net::SendFlags;
        Ok(rustix::net::send(
            self.0,
            buf,
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        )?)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl tokio::io::AsyncRead for ConnIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = buf.remaining().min(this.replay.len());
            buf.put_slice(&this.replay.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ConnIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_room(cx))?;
        let polled = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note(polled)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_room(cx))?;
        let polled = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note(polled)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let mut polled = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
        if polled.is_pending() && this.hand_over_refused() {
            // The records are the kernel's now, but the client has made no room: the flush
            // completes (and the write gate opens, so the upstream reads on) only once the
            // kernel reports room, and until then keygate holds no byte of the response but
            // the upstream connection's read buffer.
            polled = this.inner.get_ref().0.poll_write_ready(cx);
        }
        // hyper flushes its I/O only once its own write queue is empty, and the TLS stream's
        // flush is done once its records are all in the socket: keygate holds nothing of the
        // response any more.
        if let std::task::Poll::Ready(Ok(())) = polled {
            this.gate.drained();
        }
        this.note(polled)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads the HTTP/2 client connection preface (RFC 9113 §3.4) within `header_read_timeout`.
/// An invalid one (HTTP/1.1 on a connection that negotiated `h2`, or garbage) is answered
/// with SETTINGS and GOAWAY(PROTOCOL_ERROR) and the connection closed; a valid one is handed
/// on to hyper, replayed in front of the stream.
async fn h2_preface(
    mut tls: Box<TlsStream<TcpStream>>,
    peer: SocketAddr,
    within: Duration,
) -> Option<Prefaced<Box<TlsStream<TcpStream>>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut got = [0u8; H2_PREFACE.len()];
    let read = tokio::time::timeout(within, tls.read_exact(&mut got)).await;
    match read {
        Ok(Ok(_)) if got == *H2_PREFACE => Some(Prefaced { inner: tls, pos: 0 }),
        Ok(Ok(_)) => {
            client_event!(ClientEvent::ConnectionError, peer.ip(), Level::DEBUG, peer = %peer, "invalid HTTP/2 connection preface; GOAWAY(PROTOCOL_ERROR)");
            let _ = tls.write_all(&H2_PROTOCOL_ERROR).await;
            let _ = tls.shutdown().await;
            None
        }
        _ => {
            client_event!(ClientEvent::ConnectionError, peer.ip(), Level::DEBUG, peer = %peer, "no HTTP/2 connection preface within header_read_timeout");
            None
        }
    }
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame (the server preface), then GOAWAY with last stream 0 and
/// PROTOCOL_ERROR (RFC 9113 §6.5, §6.8, §7).
const H2_PROTOCOL_ERROR: [u8; 26] = [
    0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, length 0, stream 0
    0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY, length 8, stream 0
    0, 0, 0, 0, // last stream id 0
    0, 0, 0, 0x1, // PROTOCOL_ERROR
];

/// A stream whose first bytes, the HTTP/2 preface keygate already read and checked, are
/// replayed to hyper before the rest.
struct Prefaced<T> {
    inner: T,
    pos: usize,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefaced<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < H2_PREFACE.len() {
            let n = buf.remaining().min(H2_PREFACE.len() - this.pos);
            buf.put_slice(&H2_PREFACE[this.pos..this.pos + n]);
            this.pos += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefaced<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What a served connection is watched for: shutdown (drain), idle time, and a first request
/// that never comes.
struct Watch {
    peer: SocketAddr,
    conn: Arc<Conn>,
    started: Arc<std::sync::atomic::AtomicBool>,
    idle: Duration,
    header_read_timeout: Duration,
    /// HTTP/1.1: how long the connection's writes may stay blocked (stall.rs).
    send_timeout: Duration,
}

impl Watch {
    /// Runs an HTTP/1.1 or HTTP/2 connection to its end; `shut` starts its graceful shutdown.
    /// With `park` (HTTP/1.1), returns [`Driven::Park`] once the connection has been idle for
    /// [`PARK_AFTER`] with nothing half-read or half-written.
    async fn drive<C>(
        &self,
        mut http: std::pin::Pin<&mut C>,
        shut: impl Fn(std::pin::Pin<&mut C>),
        drain: &mut watch::Receiver<Drain>,
        slot: &ConnSlot,
        park: Option<&IoState>,
    ) -> Driven
    where
        C: std::future::Future<Output = Result<(), hyper::Error>>,
    {
        let Watch {
            peer,
            conn,
            started,
            idle,
            header_read_timeout,
            send_timeout,
        } = self;
        let (peer, idle, header_read_timeout) = (*peer, *idle, *header_read_timeout);
        let send_timeout = *send_timeout;
        let mut send_check = tokio::time::Instant::now() + send_timeout;
        let mut park_at = tokio::time::Instant::now() + PARK_AFTER;
        let mut closing = false;
        let mut idle_deadline = tokio::time::Instant::now() + idle;
        // Slowloris before the first byte: hyper's header clock only starts once the first
        // bytes of a request arrive, so a client that finishes the TLS handshake and then
        // sends nothing would be held until idle_timeout. As with nginx's
        // client_header_timeout, the first request's head must arrive within
        // header_read_timeout of the handshake: past that the connection is shut down
        // (HTTP/2: GOAWAY), and one header_read_timeout later closed if still no request.
        let mut first_request = Some(tokio::time::Instant::now() + header_read_timeout);
        let mut shut_for_no_request = false;
        loop {
            tokio::select! {
                res = http.as_mut() => {
                    if let Err(e) = res {
                        client_event!(ClientEvent::ConnectionError, peer.ip(), Level::DEBUG, peer = %peer, error = %e, "connection ended with an error");
                    }
                    return Driven::Ended;
                }
                () = tokio::time::sleep_until(park_at), if park.is_some() && !closing => {
                    let last = conn.opened + Duration::from_millis(conn.last_active_ms.load(Relaxed));
                    let io = park.expect("guarded");
                    if started.load(Relaxed)
                        && conn.in_flight.load(Relaxed) == 0
                        && last.elapsed() >= PARK_AFTER
                        && io.parkable.load(Relaxed)
                        && !io.write_blocked.load(Relaxed)
                    {
                        return Driven::Park;
                    }
                    park_at = tokio::time::Instant::from_std(last.max(std::time::Instant::now() - PARK_AFTER / 2)) + PARK_AFTER;
                }
                // send_timeout (HTTP/1.1): the client has taken nothing for that long while
                // keygate has bytes for it; closing frees the response, its key slot and its
                // upstream connection, as nginx's send_timeout does.
                () = tokio::time::sleep_until(send_check), if park.is_some() => {
                    let io = park.expect("guarded");
                    let last = io.last_write();
                    if io.write_blocked.load(Relaxed) && last.elapsed() >= send_timeout {
                        metrics::global().client_timeout("send");
                        let request_id = crate::stall::responding(conn);
                        client_event!(ClientEvent::ClientTimeout, peer.ip(), Level::INFO, event = "client_timeout", phase = "send", protocol = "HTTP/1.1", request_id = request_id.as_ref().map(crate::log::request_id_str), client_ip = %peer.ip().to_canonical(), peer = %peer, timeout_ms = send_timeout.as_millis() as u64, "the client took nothing of its response within send_timeout; connection closed");
                        // The response it cuts is logged `cut_by: send_timeout`.
                        conn.send_timed_out.store(true, Relaxed);
                        return Driven::Ended;
                    }
                    let now = std::time::Instant::now();
                    send_check = tokio::time::Instant::from_std(if io.write_blocked.load(Relaxed) { last } else { now }) + send_timeout;
                }
                changed = drain.changed() => {
                    let now = if changed.is_ok() { *drain.borrow_and_update() } else { Drain::Cut };
                    if now == Drain::Cut {
                        // shutdown_grace is over: what is still in flight is cut (logged so).
                        conn.closing(crate::log::Cut::Shutdown);
                        return Driven::Ended;
                    }
                    if !closing {
                        shut(http.as_mut());
                        closing = true;
                    }
                }
                // The table took this slot for a newcomer (only when idle: see conn_limits.rs).
                () = slot.reclaimed(), if !closing => {
                    // Closed at once unless a request keygate admitted is in flight (the table
                    // picks only connections without one, but one may have started since):
                    // requests it holds back itself (a throttled client's 429, a wait for
                    // verification) are cut with the connection. Left open until they ended,
                    // such connections no longer counted in the table but were still open: a
                    // fresh user's guessers kept 1,536 open against a table of 512.
                    if conn.admitted.load(Relaxed) == 0 {
                        // What it held back is logged `cut_by: reclaimed`, not as the client's.
                        conn.closing(crate::log::Cut::Reclaimed);
                        return Driven::Ended;
                    }
                    shut(http.as_mut());
                    closing = true;
                }
                () = tokio::time::sleep_until(idle_deadline), if !closing => {
                    let last = conn.opened + Duration::from_millis(conn.last_active_ms.load(Relaxed));
                    if conn.in_flight.load(Relaxed) == 0 && last.elapsed() >= idle {
                        shut(http.as_mut());
                        closing = true;
                    } else {
                        idle_deadline = tokio::time::Instant::from_std(last.max(std::time::Instant::now() - idle / 2)) + idle;
                    }
                }
                () = tokio::time::sleep_until(first_request.unwrap_or_else(tokio::time::Instant::now)), if first_request.is_some() => {
                    if started.load(Relaxed) {
                        first_request = None;
                    } else if !shut_for_no_request {
                        client_event!(ClientEvent::ConnectionError, peer.ip(), Level::DEBUG, peer = %peer, "no request within header_read_timeout of the TLS handshake; closing");
                        shut(http.as_mut());
                        closing = true;
                        shut_for_no_request = true;
                        first_request = Some(tokio::time::Instant::now() + header_read_timeout);
                    } else {
                        return Driven::Ended;
                    }
                }
            }
        }
    }
}

/// The process signals keygate acts on, registered once at start-up.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

async fn shutdown_signal(mut term: Signal, mut int: Signal) {
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "stop requested"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "stop requested"),
    }
}

/// `READY=1` with a `STATUS=` line for `systemctl status`. Outside systemd (no
/// `NOTIFY_SOCKET`) this does nothing.
fn notify_ready(status: &str) {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// SIGHUP: build a complete new snapshot off to the side (files read on a blocking thread),
/// then swap it in with one atomic store. Nothing is mutated in place, so a failure at any
/// point leaves the running configuration untouched. Connections already open keep the TLS
/// session they have; every request after the swap sees the new keys.
///
/// systemd (`Type=notify`) is told `RELOADING=1` with `MONOTONIC_USEC` (required by
/// `Type=notify-reload`) before, and `READY=1` after, whatever the outcome.
async fn reload_on_sighup(
    mut hup: Signal,
    source: Source,
    shared: Arc<Shared>,
    log: Arc<LogGuard>,
) {
    while hup.recv().await.is_some() {
        let Source::File(path) = &source else {
            tracing::info!("SIGHUP: nothing to reload (in-memory demo config)");
            continue;
        };
        let mut reloading = vec![sd_notify::NotifyState::Reloading];
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            reloading.push(now);
        }
        let _ = sd_notify::notify(&reloading);
        let prev = shared.snapshot.load_full();
        let path = path.clone();
        let prev_for_build = prev.clone();
        let shared_for_build = shared.clone();
        let built = tokio::task::spawn_blocking(move || {
            let raw = config::load_file(&path)?;
            let base_dir = path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            config::build(
                raw,
                &BuildContext {
                    base_dir,
                    tls_override: None,
                    previous: Some(&prev_for_build),
                    in_flight: Some(&shared_for_build.key_in_flight),
                    delivery_stores: Some(&shared_for_build.delivery_stores),
                },
            )
        })
        .await;
        let error = match built {
            Ok(Ok(mut new)) => {
                let restart_needed = keep_restart_only_settings(&mut new, &prev);
                for w in &new.warnings {
                    tracing::warn!(warning = %w, "config warning");
                }
                log.set_level(new.log.level);
                crate::log::budget().configure(new.log.client_event_limit);
                metrics::global().set_cert_not_after(new.cert_not_after);
                let keys = new.keys.len();
                let not_after = new.cert_not_after;
                spawn_exposure_check(&new.upstream_url);
                metrics::global().set_config_hash(&new.config_hash);
                let new = Arc::new(new);
                shared.snapshot.store(new.clone());
                // Upgraded connections carry no more requests: each checks its upgrade's
                // admission against the new config itself (`tunnel.rs`).
                shared.tunnels.reloaded(new);
                shared.verifier.forget_bad();
                metrics::global().reloaded(true);
                if restart_needed.is_empty() {
                    tracing::info!(event = "config_reloaded", keys, "configuration reloaded");
                    notify_ready(&format!("reloaded: {keys} keys"));
                } else {
                    let restart_needed = restart_needed.join(", ");
                    tracing::warn!(event = "config_reloaded", keys, restart_needed = %restart_needed, "configuration reloaded; these settings keep their old values until a restart");
                    notify_ready(&format!(
                        "reloaded: {keys} keys; restart needed to apply {restart_needed}"
                    ));
                }
                warn_if_cert_expiring(not_after);
                continue;
            }
            // Every problem with its TOML path, on one line. Messages never quote secrets.
            Ok(Err(errors)) => errors.to_string().replace('\n', "; "),
            Err(e) => e.to_string(),
        };
        metrics::global().reloaded(false);
        tracing::error!(event = "config_reload_failed", error = %error, "reload failed; still serving the previous configuration");
        notify_ready(&format!(
            "last reload failed, still serving the previous configuration: {error}"
        ));
    }
}

/// Settings a running process cannot change: the listeners are bound, the runtime, the
/// connection cap and the argon2 pool are sized, and the log format is fixed at start-up.
/// The new snapshot keeps the running values, so it describes what is really in effect (and a
/// later reload compares against that, and keeps reporting the change until a restart); the
/// names of the changed settings are returned. Everything else in the reload is applied.
fn keep_restart_only_settings(new: &mut Snapshot, running: &Snapshot) -> Vec<&'static str> {
    fn keep<T: PartialEq + Copy>(
        new: &mut T,
        running: T,
        name: &'static str,
        changed: &mut Vec<&'static str>,
    ) {
        if *new != running {
            changed.push(name);
            *new = running;
        }
    }
    let mut changed = Vec::new();
    let c = &mut changed;
    keep(
        &mut new.server.listen,
        running.server.listen,
        "server.listen",
        c,
    );
    keep(&mut new.admin, running.admin, "admin.listen", c);
    keep(
        &mut new.server.workers,
        running.server.workers,
        "server.workers",
        c,
    );
    keep(
        &mut new.server.max_connections,
        running.server.max_connections,
        "server.max_connections",
        c,
    );
    keep(
        &mut new.auth.verify_concurrency,
        running.auth.verify_concurrency,
        "auth.verify_concurrency",
        c,
    );
    keep(&mut new.log.json, running.log.json, "log.format", c);
    // The Redis connection is made once; a changed [cluster] applies at the next start.
    if new.cluster != running.cluster {
        changed.push("cluster");
        new.cluster = running.cluster.clone();
    }
    changed
}

/// Logs `cert_expiring` when the served certificate has less than 14 days left.
fn warn_if_cert_expiring(not_after: Option<i64>) {
    let Some(not_after) = not_after else { return };
    let left = not_after - jiff::Timestamp::now().as_second();
    if left < 0 {
        // Only a certificate that expired while keygate ran: start and reload refuse one.
        tracing::error!(
            event = "cert_expiring",
            days_left = left.div_euclid(86_400),
            not_after,
            "the TLS certificate has expired: clients that check it fail; renew it and send SIGHUP"
        );
    } else if left < 14 * 86_400 {
        tracing::warn!(
            event = "cert_expiring",
            days_left = left / 86_400,
            not_after,
            "the TLS certificate expires soon; renew it and send SIGHUP"
        );
    }
}

/// Periodic chores: per-IP state pruning, certificate-expiry and key-rotation warnings (at
/// start and daily).
async fn housekeeping(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    let mut minutes = 0u64;
    loop {
        tick.tick().await;
        let snap = shared.snapshot.load_full();
        if minutes.is_multiple_of(24 * 60) {
            warn_if_cert_expiring(snap.cert_not_after);
            warn_keys_due_for_rotation(&snap);
        }
        if minutes > 0 {
            snap.auth.failed_auth.prune();
        }
        minutes += 1;
    }
}

/// Daily: `key_rotation_due` for each key older than its rotation period (the key's or its
/// role's `rotation_period`, else `[state] rotation_period`, default 90 days).
fn warn_keys_due_for_rotation(snap: &Snapshot) {
    let now = jiff::Timestamp::now().as_second();
    let fallback = snap
        .state
        .as_ref()
        .map_or(Duration::from_secs(90 * 86_400), |s| s.rotation_period);
    let mut due: Vec<_> = snap
        .keys
        .values()
        .filter(|k| !k.disabled)
        .filter_map(|k| {
            let period = k.rotation_period.unwrap_or(fallback).as_secs() as i64;
            let age = now - k.created?.as_second();
            (age > period).then_some((k, age / 86_400, period / 86_400))
        })
        .collect();
    due.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    for (k, age_days, period_days) in due {
        tracing::warn!(
            event = "key_rotation_due",
            key_id = &*k.id,
            role = k.role.as_deref(),
            age_days,
            rotation_period_days = period_days,
            "key is older than its rotation period: issue a new key (keygate keygen) and retire this one"
        );
    }
}

/// The exposure check (`exposure.rs`) on a blocking thread: it makes TCP connections.
fn spawn_exposure_check(url: &str) {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || crate::exposure::check_and_log(&url));
}

/// Writes the state file behind the requests: every `SAVE_EVERY` if something changed (so a
/// crash loses at most that much), and at shutdown.
async fn write_state_behind(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(crate::usage::SAVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let shared = shared.clone();
        let _ = tokio::task::spawn_blocking(move || save_state(&shared, false)).await;
    }
}

fn save_state(shared: &Shared, force: bool) {
    let snap = shared.snapshot.load();
    if let Some(st) = &snap.state
        && let Err(e) = shared.state.save(&st.path, force, &snap.key_networks)
    {
        tracing::warn!(path = %st.path.display(), error = %e, "cannot write the state file");
    }
}

#[cfg(test)]
mod tests {
    /// A soft open-files limit below the hard one (a shell's 1,024) is raised to the hard one.
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let lim = getrlimit(Resource::Nofile);
        let Some(hard) = lim.maximum.filter(|&h| h > 512) else {
            return; // nothing to raise to here
        };
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(512),
                maximum: lim.maximum,
            },
        )
        .unwrap();
        assert_eq!(super::raise_open_files_limit(100), Some(hard));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
    }
}
