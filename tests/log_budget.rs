//! Log lines a client can cause at will are bounded per client (issue 9 §5): a flood writes a
//! few lines, then a `log_suppressed` summary per kind with the number left out, and the
//! counters (`keygate_auth_failures_total`, `keygate_log_lines_suppressed_total`, requests)
//! stay complete. Covers the HTTP/2 library's own lines (unexpected PING ACKs), security events
//! (auth_failed), refused requests' access lines, and failed TLS handshakes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Lines per client and kind per window in these tests: `client_event_limit = "10/s"`.
const PER_WINDOW: usize = 10;

fn start(up: &Upstream) -> Keygate {
    let (_, hash) = new_key("k");
    Keygate::builder()
        .upstream(up)
        .server("max_header_bytes = 1024")
        .key("k", &hash, "")
        .log("client_event_limit = \"10/s\"")
        .admin()
        .start()
}

/// Lines suppressed for `kind` according to the `log_suppressed` summaries so far.
fn summarised(kg: &Keygate, kind: &str) -> u64 {
    kg.events("log_suppressed")
        .iter()
        .filter(|v| v["kind"] == kind)
        .map(|v| v["suppressed"].as_u64().unwrap())
        .sum()
}

/// Waits until `written + summarised == expected` for `kind`; returns (written, summarised).
fn settle(
    kg: &Keygate,
    kind: &str,
    expected: u64,
    written: impl Fn(&Keygate) -> u64,
) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (w, s) = (written(kg), summarised(kg, kind));
        if w + s >= expected {
            return (w, s);
        }
        assert!(
            Instant::now() < deadline,
            "{kind}: {w} written + {s} summarised of {expected}:\n{}",
            kg.logs()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A bound on lines written for one kind by one client that floods for `secs` seconds: the
/// per-window allowance for every window the flood touched.
fn bound(secs: f64) -> u64 {
    (PER_WINDOW as f64 * (secs.ceil() + 2.0)) as u64
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Issue 9: each unexpected PING ACK made the HTTP/2 library write a WARN line, without limit
/// (1,000 frames, 156 KB of log). Now they count against the client's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unexpected_h2_ping_acks_writes_a_bounded_number_of_lines() {
    let up = Upstream::start().await;
    let kg = start(&up);
    let mut s = kg.tls_stream_alpn(&[b"h2"]).await;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[])); // SETTINGS
    out.extend(frame(4, 1, 0, &[])); // ACK of keygate's SETTINGS
    for i in 0..1000u64 {
        out.extend(frame(6, 1, 0, &i.to_be_bytes())); // PING with ACK: never asked for
    }
    let started = Instant::now();
    s.write_all(&out).await.unwrap();
    s.flush().await.unwrap();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let is_ping_line = |l: &&str| l.contains("PING ack");
    let (written, suppressed) = settle(&kg, "protocol", 1000, |kg| {
        kg.logs().lines().filter(is_ping_line).count() as u64
    });
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        written + suppressed,
        1000,
        "every frame is a line or counted"
    );
    assert!(
        written <= bound(secs),
        "{written} lines for 1000 PING ACKs in {secs:.1} s"
    );
    let m = metrics(&kg).await;
    assert_eq!(
        metric(&m, "keygate_log_lines_suppressed_total{event=\"protocol\"}"),
        suppressed
    );
    let summary = kg.wait_log("protocol summary", |v| {
        v["event"] == "log_suppressed" && v["kind"] == "protocol"
    });
    assert_eq!(summary["top_client"], "127.0.0.1");
    // The library's line names the client, which the library itself does not know.
    let line = kg
        .json_logs()
        .into_iter()
        .find(|v| v["msg"].as_str().is_some_and(|m| m.contains("PING ack")))
        .unwrap();
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert_eq!(summary["clients"], 1);
    reader.abort();
}

/// 1000 requests without a credential from one client: the auth_failed events and the refused
/// requests' access lines are bounded, their counters complete. Then 1000 requests refused for
/// oversized headers (only an access line each), and 200 failed TLS handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_refusals_and_handshake_failures_are_bounded_and_counted() {
    let up = Upstream::start().await;
    let kg = start(&up);
    let c = kg.client_h2();
    let url = kg.url("/");
    let started = Instant::now();
    for _ in 0..10 {
        let replies = futures_util::future::join_all((0..100).map(|_| c.get(&url, &[]))).await;
        assert!(replies.iter().all(|r| r.status == 401));
    }
    let (written, suppressed) = settle(&kg, "auth_failed", 1000, |kg| {
        kg.events("auth_failed").len() as u64
    });
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(written + suppressed, 1000);
    assert!(
        written <= bound(secs),
        "{written} auth_failed lines in {secs:.1} s"
    );
    let access = |kg: &Keygate, status: u64| {
        kg.json_logs()
            .iter()
            .filter(|v| v["msg"] == "request" && v["status"] == status)
            .count() as u64
    };
    let (access_401, _) = settle(&kg, "access_refused", 1000, |kg| access(kg, 401));
    assert!(
        access_401 <= bound(secs),
        "{access_401} access lines for 401s"
    );
    let m = metrics(&kg).await;
    assert_eq!(
        metric(&m, "keygate_auth_failures_total{reason=\"missing\"}"),
        1000,
        "the security counter is complete"
    );
    assert_eq!(
        metric(
            &m,
            "keygate_log_lines_suppressed_total{event=\"auth_failed\"}"
        ),
        suppressed
    );

    // Oversized headers: answered 431 by the pipeline, an access line each.
    let big = "x".repeat(2000);
    let pad = [("x-pad", big.as_str())];
    let before = summarised(&kg, "access_refused") + access(&kg, 401);
    let started = Instant::now();
    for _ in 0..10 {
        let replies = futures_util::future::join_all((0..100).map(|_| c.get(&url, &pad))).await;
        assert!(replies.iter().all(|r| r.status == 431));
    }
    let (access_431, _) = settle(&kg, "access_refused", before + 1000, |kg| {
        access(kg, 401) + access(kg, 431)
    });
    let secs = started.elapsed().as_secs_f64();
    assert!(
        access_431 - access(&kg, 401) <= bound(secs),
        "{} access lines for 1000 431s",
        access_431 - access(&kg, 401)
    );

    // Plain text to the TLS port: a failed handshake each (a debug line at this test's level).
    let started = Instant::now();
    for _ in 0..200 {
        let mut t = tokio::net::TcpStream::connect(kg.addr).await.unwrap();
        let _ = t.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut sink = Vec::new();
        let _ = t.read_to_end(&mut sink).await;
    }
    let handshake_lines = |kg: &Keygate| {
        kg.logs()
            .lines()
            .filter(|l| l.contains("TLS handshake failed"))
            .count() as u64
    };
    let (written, _) = settle(&kg, "tls_handshake", 200, handshake_lines);
    let secs = started.elapsed().as_secs_f64();
    assert!(
        written >= 1 && written <= bound(secs),
        "{written} handshake lines"
    );
}

/// The budget is per client: a flood from one address leaves another's lines alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clients_events_are_still_written_during_a_flood() {
    let up = Upstream::start().await;
    let kg = start(&up);
    let c = kg.client_h2();
    let url = kg.url("/");
    let replies = futures_util::future::join_all((0..300).map(|_| c.get(&url, &[]))).await;
    assert!(replies.iter().all(|r| r.status == 401));
    // A different client address (127.0.0.2) fails once: its line is written.
    let mut tls = kg.tls_from([127, 0, 0, 2]).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = read_to_close(&mut tls).await;
    assert!(resp.starts_with(b"HTTP/1.1 401"));
    kg.wait_log("the other client's auth_failed", |v| {
        v["event"] == "auth_failed" && v["client_ip"] == "127.0.0.2"
    });
}

/// Forged deliveries to a signed webhook route (no API key needed to send them): 500 bad
/// signatures and 200 missing ones from one client write a bounded number of
/// `webhook_rejected` lines and a `log_suppressed` summary; the per-route counter has every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_webhook_deliveries_are_bounded_in_the_log_and_all_counted() {
    let up = Upstream::start().await;
    let (_, hash) = new_key("k");
    let secret = format!("budget-secret-{:016x}", rand::random::<u64>());
    let kg = Keygate::builder()
        .upstream(&up)
        .key("k", &hash, "")
        .log("client_event_limit = \"10/s\"")
        // Unverified deliveries count against the address's failed-auth budget (then 429
        // throttled, tests/webhook_forgery.rs); here every one must reach the signature check.
        .auth("failed_auth_limit = \"100000/min\"")
        .admin()
        .raw("[[webhooks]]\nid = \"gh\"\npath = \"/hooks/gh\"\nscheme = \"github\"\nsecret = { env = \"BUDGET_WH\" }\n")
        .start_with(&[("BUDGET_WH", secret.as_str())], None);
    let c = kg.client_h2();
    let url = kg.url("/hooks/gh");
    let post = |sig: Option<&str>| {
        let mut b = hyper::Request::post(&url);
        if let Some(sig) = sig {
            b = b.header("x-hub-signature-256", sig);
        }
        c.send(b.body(full("{\"forged\":true}")).unwrap())
    };
    let forged = format!("sha256={}", "ab".repeat(32));
    let started = Instant::now();
    for _ in 0..5 {
        let replies = futures_util::future::join_all((0..100).map(|_| post(Some(&forged)))).await;
        assert!(replies.iter().all(|r| r.status == 401));
    }
    for _ in 0..2 {
        let replies = futures_util::future::join_all((0..100).map(|_| post(None))).await;
        assert!(replies.iter().all(|r| r.status == 401));
    }
    let (written, suppressed) = settle(&kg, "webhook_rejected", 700, |kg| {
        kg.events("webhook_rejected").len() as u64
    });
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(written + suppressed, 700);
    assert!(
        written <= bound(secs),
        "{written} webhook_rejected lines for 700 forged deliveries in {secs:.1} s"
    );
    let summary = kg.wait_log("webhook summary", |v| {
        v["event"] == "log_suppressed" && v["kind"] == "webhook_rejected"
    });
    assert_eq!(summary["top_client"], "127.0.0.1");
    let m = metrics(&kg).await;
    assert_eq!(
        metric(
            &m,
            "keygate_webhook_rejected_total{route=\"gh\",reason=\"bad_signature\"}"
        ),
        500
    );
    assert_eq!(
        metric(
            &m,
            "keygate_webhook_rejected_total{route=\"gh\",reason=\"missing_signature\"}"
        ),
        200
    );
    assert_eq!(
        metric(
            &m,
            "keygate_log_lines_suppressed_total{event=\"webhook_rejected\"}"
        ),
        suppressed
    );
    assert_eq!(up.count(), 0);
    assert_no_secrets(&kg.logs(), &[&secret, &forged["sha256=".len()..]]);
}

/// A captured signed delivery replayed at will (fresh user T8-9): each replay is answered 200
/// `duplicate` by keygate without reaching the upstream, and each wrote an access line without
/// limit (2,000 lines in a second). Such lines are budgeted like refusals; the request metric
/// stays complete, and the forwarded original is always logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_webhook_deliveries_are_bounded_in_the_log() {
    use common::webhooks::{post, sign_github};
    let up = Upstream::start().await;
    let (_, hash) = new_key("k");
    let secret = format!("replay-secret-{:016x}", rand::random::<u64>());
    let kg = Keygate::builder()
        .upstream(&up)
        .key("k", &hash, "")
        .log("client_event_limit = \"10/s\"")
        .admin()
        .raw("[[webhooks]]\nid = \"gh\"\npath = \"/hooks/gh\"\nscheme = \"github\"\nsecret = { env = \"REPLAY_WH\" }\n")
        .start_with(&[("REPLAY_WH", secret.as_str())], None);
    let c = kg.client_h2();
    let url = kg.url("/hooks/gh");
    let body = br#"{"zen":"replay"}"#;
    let headers = sign_github(&secret, body, "delivery-t8-9");
    assert_eq!(c.send(post(&url, &headers, body)).await.status, 200);
    assert_eq!(up.count(), 1);
    let started = Instant::now();
    for _ in 0..3 {
        let replies =
            futures_util::future::join_all((0..100).map(|_| c.send(post(&url, &headers, body))))
                .await;
        assert!(replies.iter().all(|r| r.status == 200));
    }
    let lines = |kg: &Keygate| {
        kg.logs()
            .lines()
            .filter(|l| l.contains("\"path\":\"/hooks/gh\"") && l.contains("\"status\":200"))
            .count() as u64
    };
    let (written, suppressed) = settle(&kg, "access_refused", 301, lines);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        written + suppressed,
        301,
        "every answer written or summarised"
    );
    assert!(
        written <= bound(secs) + 1,
        "{written} access lines for 300 replays in {secs:.1} s (old code: 301)"
    );
    assert_eq!(up.count(), 1, "no replay reached the upstream");
    assert_no_secrets(&kg.logs(), &[&secret]);
}

/// Issue 9 §5 leftovers: requests refused by the protocol checks (here `TRACE`, 501) wrote an
/// info line each without limit; they are budgeted as `malformed_request` like the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_refusals_are_bounded_per_client() {
    let up = Upstream::start().await;
    let kg = start(&up);
    let c = kg.client_h2();
    let url = kg.url("/");
    let started = Instant::now();
    for _ in 0..5 {
        let replies = futures_util::future::join_all((0..100).map(|_| {
            let req = http::Request::builder()
                .method(http::Method::TRACE)
                .uri(&url)
                .body(empty())
                .unwrap();
            c.send(req)
        }))
        .await;
        assert!(replies.iter().all(|r| r.status == 501));
    }
    let lines = |kg: &Keygate| {
        kg.logs()
            .lines()
            .filter(|l| l.contains("method not implemented by keygate"))
            .count() as u64
    };
    let (written, suppressed) = settle(&kg, "malformed_request", 500, lines);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(written + suppressed, 500);
    assert!(
        written >= 1 && written <= bound(secs),
        "{written} lines for 500 TRACE requests in {secs:.1} s"
    );
}

/// Many addresses, each within its own budget, cannot turn "N lines per client" into an
/// unbounded volume (a fresh user's 3 600 guesses from 3 600 addresses wrote 10 530 lines in
/// 30 s): all clients together write at most 100 × N lines of a kind per window, the rest are
/// counted as suppressed, and the security counter stays complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_addresses_together_write_at_most_the_all_clients_ceiling() {
    const ADDRESSES: u64 = 260;
    let up = Upstream::start().await;
    let (_, hash) = new_key("k");
    // 1 line per client per minute: the ceiling is 100 lines of each kind per window.
    let kg = Keygate::builder()
        .upstream(&up)
        .key("k", &hash, "")
        .log("client_event_limit = \"1/min\"")
        .admin()
        .start();
    let started = Instant::now();
    for i in 0..ADDRESSES {
        let src = [127, 0, 1 + (i / 200) as u8, 1 + (i % 200) as u8];
        let mut tls = kg.tls_from(src).await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let resp = read_to_close(&mut tls).await;
        assert!(resp.starts_with(b"HTTP/1.1 401"), "{src:?}");
    }
    let secs = started.elapsed().as_secs_f64();
    let m = metrics(&kg).await;
    assert_eq!(
        metric(&m, "keygate_auth_failures_total{reason=\"missing\"}"),
        ADDRESSES,
        "the security counter is complete"
    );
    let suppressed = metric(
        &m,
        "keygate_log_lines_suppressed_total{event=\"auth_failed\"}",
    );
    // Each address wrote at most its one line; the first window (at most two if the run
    // crossed a window's end) held at most 100 of them.
    let windows = if secs < 55.0 { 2 } else { 3 };
    let written = kg.events("auth_failed").len() as u64;
    assert_eq!(written + suppressed, ADDRESSES, "{written} + {suppressed}");
    assert!(
        written <= 100 * windows && written < ADDRESSES,
        "{written} auth_failed lines from {ADDRESSES} addresses in {secs:.1} s"
    );
    let distinct: std::collections::HashSet<String> = kg
        .events("auth_failed")
        .iter()
        .map(|v| v["client_ip"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        distinct.len() as u64,
        written,
        "one line per address at most"
    );
}

/// A fresh user: the budget bounds lines, but each refused request's line carried its whole
/// target (a 16 KB path without a key: a 16 KB line, ~16 MB a minute per kind). A refused,
/// unauthenticated request's path is logged up to 1 KiB with the count of what was left out;
/// an authenticated request's path whole. HTTP/1.1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_log_at_most_a_kibibyte_of_their_path() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder().upstream(&up).key("k", &hash, "").start();
    let long = format!("/{}", "a".repeat(12_000));
    for c in [kg.client(), kg.client_h2()] {
        for (key, want) in [(None, 401), (Some(token.as_str()), 200)] {
            let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
            let got = c.get(&kg.url(&long), &headers).await;
            assert_eq!(got.status, want);
            let rid = got.header("x-request-id").unwrap().to_string();
            let path = kg.access_line(&rid)["path"].as_str().unwrap().to_string();
            if want == 401 {
                assert_eq!(
                    path,
                    format!("{}…(+{} bytes)", &long[..1024], long.len() - 1024)
                );
            } else {
                assert_eq!(path, long);
            }
        }
    }
}
