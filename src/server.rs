//! The listener: accept → connection cap → client-IP gate → TLS handshake → HTTP/1.1 or h2
//! (hyper-util auto) → [`pipeline::handle`]. Also the process-level tasks: signals (SIGHUP
//! reload, SIGTERM/SIGINT drain), systemd notifications, the admin listener, state-file saves
//! and certificate-expiry warnings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::auth::Verifier;
use crate::config::{self, BuildContext, Snapshot};
use crate::log::LogGuard;
use crate::metrics;
use crate::pipeline::{self, Conn, Shared};
use crate::usage::Usage;

/// Where the running config came from, and so what SIGHUP re-reads.
pub enum Source {
    File(PathBuf),
    /// `keygate demo`: nothing to re-read.
    InMemory,
}

/// Builds the runtime (`[server] workers` threads) and serves until SIGTERM/SIGINT.
pub fn run(source: Source, snapshot: Snapshot, log: LogGuard) -> std::io::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(w) = snapshot.server.workers {
        rt.worker_threads(w);
    }
    rt.enable_all()
        .thread_name("keygate-worker")
        .build()?
        .block_on(serve(source, snapshot, log))
}

async fn serve(source: Source, snapshot: Snapshot, log: LogGuard) -> std::io::Result<()> {
    let listener = TcpListener::bind(snapshot.server.listen)
        .await
        .map_err(|e| {
            tracing::error!(addr = %snapshot.server.listen, error = %e, "cannot bind the listener");
            e
        })?;
    let local = listener.local_addr()?;
    let usage = match &snapshot.state {
        Some(st) => Usage::load(&st.path).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "starting with empty key-usage state");
            Usage::default()
        }),
        None => Usage::default(),
    };
    for w in &snapshot.warnings {
        tracing::warn!(warning = %w, "config warning");
    }
    metrics::global().set_cert_not_after(snapshot.cert_not_after);
    metrics::global().reloaded_init();
    let max_connections = snapshot.server.max_connections;
    let admin = snapshot.admin;
    let shared = Arc::new(Shared {
        verifier: Verifier::new(snapshot.auth.verify_concurrency),
        snapshot: ArcSwap::from_pointee(snapshot),
        usage,
    });

    if let Some(addr) = admin {
        let l = TcpListener::bind(addr).await.map_err(|e| {
            tracing::error!(addr = %addr, error = %e, "cannot bind the admin listener");
            e
        })?;
        tracing::info!(addr = %l.local_addr()?, "admin listening");
        tokio::spawn(crate::admin::serve(l, shared.clone()));
    }
    tracing::info!(addr = %local, version = env!("CARGO_PKG_VERSION"), "listening");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    tokio::spawn(housekeeping(shared.clone()));
    let (drain_tx, drain_rx) = watch::channel(false);
    let reload_task = tokio::spawn(reload_on_sighup(source, shared.clone(), log));

    let permits = Arc::new(Semaphore::new(max_connections));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(peer = %peer, "max_connections reached; connection refused");
            continue;
        };
        let snap = shared.snapshot.load_full();
        if snap.access.decide_at_accept() && !snap.access.admits(peer.ip()) {
            metrics::global().ip_denied();
            tracing::warn!(event = "ip_denied", client_ip = %peer.ip().to_canonical(), scope = "global", "connection closed before TLS");
            continue;
        }
        let shared = shared.clone();
        let drain = drain_rx.clone();
        tokio::spawn(async move {
            metrics::global().connection_opened();
            serve_connection(stream, peer, snap, shared, drain).await;
            metrics::global().connection_closed();
            drop(permit);
        });
    }

    // Drain: stop accepting, let in-flight requests finish within shutdown_grace.
    drop(listener);
    reload_task.abort();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let grace = shared.snapshot.load().server.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        open_connections = metrics::global().open_connections(),
        "shutting down"
    );
    let _ = drain_tx.send(true);
    drop(drain_rx);
    if tokio::time::timeout(grace, drain_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            open_connections = metrics::global().open_connections(),
            "shutdown_grace elapsed; closing remaining connections"
        );
    }
    save_state(&shared, true);
    tracing::info!("stopped");
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    snap: Arc<Snapshot>,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let s = &snap.server;
    let tls = match tokio::time::timeout(
        s.tls_handshake_timeout,
        TlsAcceptor::from(snap.tls.clone()).accept(stream),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "TLS handshake timed out");
            return;
        }
    };

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout)
        // hyper answers 431 (without a body) past its buffer; below that, the pipeline checks
        // `max_header_bytes` exactly and answers with the JSON error.
        .max_buf_size((s.max_header_bytes * 2).max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(s.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(1024))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let idle = s.idle_timeout;
    let conn = Arc::new(Conn::new(peer));
    let svc = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| pipeline::handle(req, shared.clone(), conn.clone()))
    };
    let http = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
    tokio::pin!(http);
    let mut closing = false;
    let mut idle_deadline = tokio::time::Instant::now() + idle;
    loop {
        tokio::select! {
            res = http.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = drain.changed(), if !closing => {
                http.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep_until(idle_deadline), if !closing => {
                let last = conn.opened + Duration::from_millis(conn.last_active_ms.load(Relaxed));
                if conn.in_flight.load(Relaxed) == 0 && last.elapsed() >= idle {
                    http.as_mut().graceful_shutdown();
                    closing = true;
                } else {
                    idle_deadline = tokio::time::Instant::from_std(last.max(std::time::Instant::now() - idle / 2)) + idle;
                }
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "stop requested"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "stop requested"),
    }
}

async fn reload_on_sighup(source: Source, shared: Arc<Shared>, log: LogGuard) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let Source::File(path) = &source else {
            tracing::info!("SIGHUP: nothing to reload (in-memory demo config)");
            continue;
        };
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::monotonic_usec_now()
                .unwrap_or(sd_notify::NotifyState::Reloading),
        ]);
        let prev = shared.snapshot.load_full();
        let path = path.clone();
        let prev_for_build = prev.clone();
        let built = tokio::task::spawn_blocking(move || {
            let raw = config::load_file(&path)?;
            let base_dir = path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            config::build(
                raw,
                &BuildContext {
                    base_dir,
                    tls_override: None,
                    previous: Some(&prev_for_build),
                },
            )
        })
        .await;
        match built {
            Ok(Ok(mut new)) => {
                let mut restart_needed = Vec::new();
                if new.server.listen != prev.server.listen {
                    restart_needed.push("server.listen");
                    new.server.listen = prev.server.listen;
                }
                if new.admin != prev.admin {
                    restart_needed.push("admin.listen");
                    new.admin = prev.admin;
                }
                for (changed, name) in [
                    (new.server.workers != prev.server.workers, "server.workers"),
                    (
                        new.server.max_connections != prev.server.max_connections,
                        "server.max_connections",
                    ),
                    (
                        new.auth.verify_concurrency != prev.auth.verify_concurrency,
                        "auth.verify_concurrency",
                    ),
                    (new.log.json != prev.log.json, "log.format"),
                ] {
                    if changed {
                        restart_needed.push(name);
                    }
                }
                for w in &new.warnings {
                    tracing::warn!(warning = %w, "config warning");
                }
                log.set_level(new.log.level);
                metrics::global().set_cert_not_after(new.cert_not_after);
                let keys = new.keys.len();
                shared.snapshot.store(Arc::new(new));
                metrics::global().reloaded(true);
                if restart_needed.is_empty() {
                    tracing::info!(event = "config_reloaded", keys, "configuration reloaded");
                } else {
                    tracing::warn!(event = "config_reloaded", keys, restart_needed = %restart_needed.join(", "), "configuration reloaded; these settings keep their old values until a restart");
                }
            }
            Ok(Err(errors)) => {
                metrics::global().reloaded(false);
                tracing::error!(event = "config_reload_failed", error = %errors.to_string().replace('\n', "; "), "reload failed; still serving the previous configuration");
            }
            Err(e) => {
                metrics::global().reloaded(false);
                tracing::error!(event = "config_reload_failed", error = %e, "reload failed; still serving the previous configuration");
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
}

/// Periodic chores: state-file saves (every minute), per-IP state pruning, certificate expiry
/// warnings (at start and daily).
async fn housekeeping(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    let mut minutes = 0u64;
    loop {
        tick.tick().await;
        let snap = shared.snapshot.load_full();
        if minutes % (24 * 60) == 0 {
            if let Some(not_after) = snap.cert_not_after {
                let left = not_after - jiff::Timestamp::now().as_second();
                if left < 14 * 86_400 {
                    tracing::warn!(
                        event = "cert_expiring",
                        days_left = left / 86_400,
                        not_after,
                        "the TLS certificate expires soon; renew it and send SIGHUP"
                    );
                }
            }
        }
        if minutes > 0 {
            save_state(&shared, false);
            snap.auth.failed_auth.prune();
        }
        minutes += 1;
    }
}

fn save_state(shared: &Shared, force: bool) {
    if let Some(st) = &shared.snapshot.load().state {
        if let Err(e) = shared.usage.save(&st.path, force) {
            tracing::warn!(path = %st.path.display(), error = %e, "cannot write the state file");
        }
    }
}
