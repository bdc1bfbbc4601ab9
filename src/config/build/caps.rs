//! `server.max_connections_per_ip`, `server.request_buffer_*`, `upstream.max_connections`,
//! `upstream.queue_timeout`, `auth.default_max_concurrent`, and the progress deadlines
//! `server.send_timeout` and `upstream.tunnel_idle_timeout`: the caps that keep one client, one
//! address or one key from taking what others need (issue 9; README "Connection and upstream
//! caps").

use super::{Errors, duration_or};
use crate::config::Caps;
use crate::config::raw::RawConfig;
use crate::conn_limits::DEFAULT_PER_IP_DIVISOR;
use crate::upstream_cap::{
    DEFAULT_MAX_CONNECTIONS, DEFAULT_QUEUE_TIMEOUT, default_key_max_concurrent,
};

/// Default `server.request_buffer_bytes`: bodies up to 64 KiB are read before the upstream is
/// contacted.
pub const DEFAULT_REQUEST_BUFFER_BYTES: usize = 64 * 1024;
/// Largest `server.request_buffer_bytes` accepted (buffers live in memory).
pub const MAX_REQUEST_BUFFER_BYTES: usize = 1024 * 1024;

pub(super) fn build(raw: &RawConfig, max_connections: usize, errs: &mut Errors) -> Caps {
    let s = &raw.server;
    let max_connections_per_ip = match s.max_connections_per_ip {
        Some(0) => {
            errs.push("server.max_connections_per_ip", "must be at least 1");
            1
        }
        Some(n) => n,
        // 1/16 of the table, but never fewer than 64 (or the whole table when smaller).
        None => (max_connections / DEFAULT_PER_IP_DIVISOR).max(max_connections.min(64)),
    };
    let request_buffer_bytes = s
        .request_buffer_bytes
        .unwrap_or(DEFAULT_REQUEST_BUFFER_BYTES);
    if request_buffer_bytes > MAX_REQUEST_BUFFER_BYTES {
        errs.push(
            "server.request_buffer_bytes",
            format!("must be at most {MAX_REQUEST_BUFFER_BYTES} (0 streams every body)"),
        );
    }
    let request_buffer_timeout = duration_or(
        &s.request_buffer_timeout,
        "30s",
        "server.request_buffer_timeout",
        errs,
    );
    let u = &raw.upstream;
    let upstream_max_connections = match u.max_connections {
        Some(0) => {
            errs.push("upstream.max_connections", "must be at least 1");
            1
        }
        Some(n) => n,
        None => DEFAULT_MAX_CONNECTIONS,
    };
    let upstream_queue_timeout = duration_or(
        &u.queue_timeout,
        DEFAULT_QUEUE_TIMEOUT,
        "upstream.queue_timeout",
        errs,
    );
    let default_max_concurrent = match raw.auth.default_max_concurrent {
        Some(0) => {
            errs.push("auth.default_max_concurrent", "must be at least 1");
            1
        }
        Some(n) => n,
        // A quarter of the upstream's connections (at most 256), so that one key cannot take
        // them all however low the operator sets upstream.max_connections (a fresh user set it
        // to a worker pool of 8 and one key still held all 8 and the queue).
        None => default_key_max_concurrent(upstream_max_connections),
    };
    // nginx's send_timeout and proxy_read_timeout (60 s each): without them a client that stops
    // reading, or a tunnel where nobody speaks, holds its key slot and upstream connection for
    // ever (fresh user T3-9, T3-18).
    let send_timeout = duration_or(&s.send_timeout, "60s", "server.send_timeout", errs);
    let tunnel_idle_timeout = duration_or(
        &u.tunnel_idle_timeout,
        "60s",
        "upstream.tunnel_idle_timeout",
        errs,
    );
    Caps {
        send_timeout,
        tunnel_idle_timeout,
        max_connections_per_ip,
        request_buffer_bytes,
        request_buffer_timeout,
        upstream_max_connections,
        upstream_queue_timeout,
        default_max_concurrent,
    }
}
