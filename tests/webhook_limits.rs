//! What a webhook sender (no API key needed) can make keygate hold while it reads a delivery
//! whole to check its signature. A fresh user's 400 connections, each trickling 1,000,000 bytes
//! of a declared 1 MiB body with a fake signature, took keygate from 9 MiB to 444 MiB, each body
//! held for `body_read_timeout` (60 s). Now every byte held comes out of the webhooks' share
//! of the request-buffer budget (32 MiB of 64; past it 503 `busy`; tests/webhook_budget.rs
//! shows the rest of the budget stays for API request buffering), and the
//! whole read is bounded by `request_buffer_timeout` (408). Deliveries also take an upstream
//! slot (`[upstream] max_connections`), which they used to bypass. Real TLS, raw HTTP/1.1
//! senders.

mod common;

use std::time::{Duration, Instant};

use common::webhooks::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET_ENV: &str = "WH_GH";

fn start(up: &RecordingUpstream, secret: &str) -> Keygate {
    start_with_upstream_lines(up, secret, &[])
}

fn start_with_upstream_lines(up: &RecordingUpstream, secret: &str, lines: &[&str]) -> Keygate {
    let mut b = Keygate::builder().upstream_url(&up.url());
    for l in lines {
        b = b.upstream_line(l);
    }
    b.server("request_buffer_timeout = \"4s\"")
        .raw(
            "[[webhooks]]\nid = \"gh\"\npath = \"/hooks/github\"\nscheme = \"github\"\n\
             secret = { env = \"WH_GH\" }\nmax_body_bytes = 4194304\n",
        )
        .admin()
        .start_with(&[(SECRET_ENV, secret)], None)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One sender: declares `declared` bytes, sends `sent` of them with a fake signature, then
/// waits; returns the status keygate answered (0 if none within 20 s).
async fn stalled_delivery(kg: &Keygate, declared: usize, sent: usize) -> u16 {
    let tls = kg.tls_from([127, 0, 0, 1]).await.unwrap();
    unsigned_delivery(tls, Some(declared), sent, Duration::from_secs(20)).await
}

/// 80 senders offer 2 MiB each (160 MiB) and stall one byte short: keygate holds at most the
/// webhooks' 32 MiB share of them (RSS well under what the bodies would take), refuses the rest at once
/// with 503 `busy`, answers the holders 408 at `request_buffer_timeout`, forwards nothing, and
/// then serves a real delivery (the budget came back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_unsigned_bodies_hold_at_most_the_buffer_budget_then_408() {
    let up = RecordingUpstream::start().await;
    let secret = unique_secret("gh");
    let kg = start(&up, &secret);
    let before = rss_kib(kg.pid());
    let pid = kg.pid();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let size = 2 * 1024 * 1024;
    let statuses =
        futures_util::future::join_all((0..80).map(|_| stalled_delivery(&kg, size, size - 1)))
            .await;
    sampler.abort();
    let secs = started.elapsed().as_secs_f64();
    let busy = statuses.iter().filter(|s| **s == 503).count();
    let timed_out = statuses.iter().filter(|s| **s == 408).count();
    assert_eq!(busy + timed_out, 80, "{statuses:?}");
    assert!(
        busy >= 40,
        "{busy} refused busy of 80 × 2 MiB: {statuses:?}"
    );
    assert!(timed_out >= 1, "{statuses:?}");
    assert!(
        secs < 15.0,
        "holders answered at request_buffer_timeout: {secs:.1} s"
    );
    let peak_mib = peak.load(std::sync::atomic::Ordering::Relaxed) / 1024;
    eprintln!(
        "RSS {} MiB, peak {peak_mib} MiB; {busy} busy, {timed_out} timed out",
        before / 1024
    );
    assert!(
        peak_mib < before / 1024 + 100,
        "RSS {} MiB -> peak {peak_mib} MiB for 160 MiB offered",
        before / 1024
    );
    assert_eq!(up.count(), 0, "nothing unsigned was forwarded");
    let m = metrics(&kg).await;
    assert!(
        metric(
            &m,
            "keygate_webhook_rejected_total{route=\"gh\",reason=\"busy\"}"
        ) >= 40
    );
    kg.wait_log("request_buffer timeout", |v| {
        v["event"] == "client_timeout" && v["phase"] == "request_buffer"
    });

    // The budget came back: a real delivery is forwarded.
    let body = br#"{"action":"opened"}"#;
    let c = kg.client();
    let mut req = hyper::Request::post(kg.url("/hooks/github"));
    for (n, v) in sign_github(&secret, body, "d-1") {
        req = req.header(n, v);
    }
    let got = c.send(req.body(full(&body[..])).unwrap()).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(up.count(), 1);
}

/// A delivery trickled a byte at a time, never stalling as long as `body_read_timeout`, is
/// answered 408 at `request_buffer_timeout` instead of being read for as long as it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_delivery_is_cut_at_request_buffer_timeout() {
    let up = RecordingUpstream::start().await;
    let secret = unique_secret("gh");
    let kg = start(&up, &secret);
    let mut tls = kg.tls_from([127, 0, 0, 1]).await.unwrap();
    let head = format!(
        "POST /hooks/github HTTP/1.1\r\nHost: localhost\r\nX-Hub-Signature-256: sha256={}\r\n\
         Content-Length: 1000\r\n\r\n",
        "0".repeat(64)
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answered = Vec::new();
    let mut byte = [0u8; 1];
    for _ in 0..900 {
        if tls.write_all(b"x").await.is_err() {
            break;
        }
        let _ = tls.flush().await;
        if let Ok(Ok(1)) =
            tokio::time::timeout(Duration::from_millis(100), tls.read(&mut byte)).await
        {
            answered.push(byte[0]);
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    answered.extend_from_slice(&rest);
    let resp = String::from_utf8_lossy(&answered);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!((3.0..20.0).contains(&secs), "answered after {secs:.1} s");
    assert_eq!(up.count(), 0);
}

/// Signed deliveries count against `[upstream] max_connections` like every forwarded request:
/// with one slot held by a slow delivery, the next waits `queue_timeout` and gets 503 (its
/// delivery id released, so the sender's retry is forwarded later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_take_an_upstream_slot() {
    let up = RecordingUpstream::start().await;
    let secret = unique_secret("gh");
    let kg = start_with_upstream_lines(
        &up,
        &secret,
        &["max_connections = 1", "queue_timeout = \"300ms\""],
    );
    let deliver = |body: &'static [u8], id: &'static str, sleep_ms: u64| {
        let c = kg.client();
        let mut req = hyper::Request::post(kg.url("/hooks/github"))
            .header("x-upstream-sleep-ms", sleep_ms.to_string());
        for (n, v) in sign_github(&secret, body, id) {
            req = req.header(n, v);
        }
        let req = req.body(full(body)).unwrap();
        async move { c.send(req).await.status }
    };
    let slow = tokio::spawn(deliver(br#"{"n":1}"#, "d-1", 2500));
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.count() == 0 {
        assert!(Instant::now() < deadline, "the slow delivery never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(deliver(br#"{"n":2}"#, "d-2", 0).await, 503);
    assert_eq!(
        up.count(),
        1,
        "the second delivery did not reach the upstream"
    );
    let m = metrics(&kg).await;
    assert_eq!(
        metric(
            &m,
            "keygate_upstream_saturated_total{reason=\"queue_timeout\"}"
        ),
        1
    );
    assert_eq!(slow.await.unwrap(), 200);
    // The sender retries the refused delivery: forwarded (not answered as a duplicate).
    assert_eq!(deliver(br#"{"n":2}"#, "d-2", 0).await, 200);
    assert_eq!(up.count(), 2);
}
