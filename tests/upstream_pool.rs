//! keygate's upstream connection pool (`forward.rs`, issue 10): one list of idle HTTP/1.1
//! connections per worker, used last in, first out. A connection is reused once its response has
//! been read, never more connections are opened than requests were in flight, and a connection
//! left idle for `[upstream] pool_idle_timeout` is closed by keygate even when no request comes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A keep-alive HTTP/1.1 upstream that answers every request with `ok` after `delay`, counting
/// the connections it accepted and the ones that were closed by keygate (EOF while idle).
struct CountingUpstream {
    url: String,
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

async fn counting_upstream(delay: Duration) -> CountingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let opened = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (o, c) = (opened.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            o.fetch_add(1, SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                c.fetch_add(1, SeqCst);
                                return;
                            }
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    tokio::time::sleep(delay).await;
                    let resp = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    CountingUpstream {
        url,
        opened,
        closed,
    }
}

fn one_worker(up: &CountingUpstream, pool_idle: &str) -> (Keygate, String) {
    let (token, hash) = new_key("pool");
    let kg = Keygate::builder()
        .upstream_url(&up.url)
        .upstream_line(&format!("pool_idle_timeout = \"{pool_idle}\""))
        .server("workers = 1")
        .key("pool", &hash, "max_concurrent = 64")
        .start();
    (kg, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_and_never_more_than_requests_in_flight() {
    let up = counting_upstream(Duration::from_millis(30)).await;
    let (kg, token) = one_worker(&up, "30s");
    for h2 in [false, true] {
        let c = if h2 { kg.client_h2() } else { kg.client() };
        for _ in 0..5 {
            let r = c.get(&kg.url("/seq"), &[("x-api-key", &token)]).await;
            assert_eq!(r.status, 200, "h2={h2}");
        }
    }
    assert_eq!(
        up.opened.load(SeqCst),
        1,
        "sequential requests share one connection"
    );
    // Three waves of 12 concurrent requests over HTTP/2: 12 connections at most.
    let c = kg.client_h2();
    let (url, hdr) = (kg.url("/wave"), [("x-api-key", token.as_str())]);
    for wave in 0..3 {
        let reqs = (0..12).map(|_| c.get(&url, &hdr));
        let got = futures_util::future::join_all(reqs).await;
        assert!(got.iter().all(|r| r.status == 200), "wave {wave}");
    }
    let opened = up.opened.load(SeqCst);
    assert!(
        opened <= 12,
        "{opened} upstream connections for 12 requests in flight"
    );
    assert_eq!(up.closed.load(SeqCst), 0, "pool_idle_timeout is 30 s");
}

/// Every 32 requests keygate renews its hyper connection on the same socket (`forward.rs`,
/// `RENEW_AFTER`: hyper's request queue would otherwise keep a second 8 KiB block per
/// connection). Renewing must not be seen upstream: one TCP connection carries every request,
/// GETs and POSTs with bodies alike, on HTTP/1.1 and HTTP/2, and no extra connection is opened
/// while one is being renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_connection_keeps_its_socket() {
    let up = counting_upstream(Duration::ZERO).await;
    let (kg, token) = one_worker(&up, "30s");
    let hdr = [("x-api-key", token.as_str())];
    for h2 in [false, true] {
        let c = if h2 { kg.client_h2() } else { kg.client() };
        for i in 0..70 {
            let r = if i % 3 == 0 {
                let req = hyper::Request::post(kg.url(&format!("/p{i}")))
                    .header("x-api-key", &token)
                    .body(full(&b"{\"n\":1}"[..]))
                    .unwrap();
                c.send(req).await
            } else {
                c.get(&kg.url(&format!("/g{i}")), &hdr).await
            };
            assert_eq!(r.status, 200, "h2={h2} request {i}");
            assert_eq!(&r.body[..], b"ok", "h2={h2} request {i}");
        }
    }
    assert_eq!(
        up.opened.load(SeqCst),
        1,
        "140 sequential requests, one socket"
    );
    assert_eq!(up.closed.load(SeqCst), 0, "the socket was never closed");
    // Busy connections are renewed too, without leaving the pool short meanwhile: 8 clients
    // sending 40 requests each, one after the other, never need more than 8 sockets.
    let c = kg.client_h2();
    let url = kg.url("/busy");
    let loops = (0..8).map(|_| async {
        for _ in 0..40 {
            assert_eq!(c.get(&url, &hdr).await.status, 200);
        }
    });
    futures_util::future::join_all(loops).await;
    let opened = up.opened.load(SeqCst);
    assert!(
        opened <= 8,
        "{opened} upstream connections for 8 requests in flight"
    );
    assert_eq!(up.closed.load(SeqCst), 0, "no socket was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_pool_idle_timeout_without_traffic() {
    let up = counting_upstream(Duration::ZERO).await;
    let (kg, token) = one_worker(&up, "200ms");
    let c = kg.client();
    let (url, hdr) = (kg.url("/x"), [("x-api-key", token.as_str())]);
    let reqs = (0..3).map(|_| c.get(&url, &hdr));
    for r in futures_util::future::join_all(reqs).await {
        assert_eq!(r.status, 200);
    }
    let opened = up.opened.load(SeqCst);
    assert!(opened >= 1);
    // No request follows: keygate itself closes what it no longer keeps (at most two
    // pool_idle_timeout periods later; generous bound).
    let t0 = std::time::Instant::now();
    while up.closed.load(SeqCst) < opened && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        up.closed.load(SeqCst),
        opened,
        "idle upstream connections left open"
    );
    // The next request opens a new connection and is answered.
    let r = c.get(&kg.url("/after"), &[("x-api-key", &token)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.opened.load(SeqCst), opened + 1);
}
