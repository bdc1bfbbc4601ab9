//! Who may spend the request-buffer budget (src/buffer_budget.rs). Webhook deliveries are read
//! whole before their signature can be checked, by anyone who reaches a route; API request
//! bodies are buffered (up to `request_buffer_bytes`) so slow clients do not pin upstream
//! connections. A second fresh user's 70 unauthenticated connections, each declaring a 1 MiB
//! delivery and stalling after 1 KB, reserved the whole 64 MiB (declared lengths were reserved
//! up front): every real delivery got 503 and API bodies streamed again, invisibly. Now a
//! delivery is charged by the bytes it has sent (from 1 KiB before its first byte), webhooks
//! together hold at most half of the budget, and the budget in use is a metric (the share per
//! client is tests/buffer_budget_share.rs'). Real TLS, raw
//! HTTP/1.1 senders.

mod common;

use std::time::Duration;

use common::webhooks::*;
use common::*;
use tokio::io::AsyncWriteExt;

const SECRET_ENV: &str = "WH_BUDGET";
const WEBHOOK_BYTES: &str = "keygate_request_buffer_bytes{use=\"webhook\"}";
const API_BYTES: &str = "keygate_request_buffer_bytes{use=\"api\"}";
const API_EXHAUSTED: &str = "keygate_request_buffer_exhausted_total{use=\"api\"}";
const BUSY: &str = "keygate_webhook_rejected_total{route=\"gh\",reason=\"busy\"}";

fn start(up: &RecordingUpstream, secret: &str, api_hash: &str) -> Keygate {
    Keygate::builder()
        .upstream_url(&up.url())
        .server("request_buffer_timeout = \"8s\"")
        .key("api", api_hash, "")
        .raw(
            "[[webhooks]]\nid = \"gh\"\npath = \"/hooks/github\"\nscheme = \"github\"\n\
             secret = { env = \"WH_BUDGET\" }\nmax_body_bytes = 1048576\n",
        )
        .admin()
        .start_with(&[(SECRET_ENV, secret)], None)
}

/// One unsigned delivery from 127.0.0.`src` over its own TLS connection (HTTP/1.1): declares
/// `declared` bytes (`None`: chunked), sends `sent` of them, then waits. The task ends with the
/// status keygate answered (0 if none within 30 s).
async fn open_delivery(
    kg: &Keygate,
    src: u8,
    declared: Option<usize>,
    sent: usize,
) -> tokio::task::JoinHandle<u16> {
    let tls = kg.tls_from([127, 0, 0, src]).await.unwrap();
    tokio::spawn(unsigned_delivery(
        tls,
        declared,
        sent,
        Duration::from_secs(30),
    ))
}

/// One unsigned delivery as an HTTP/2 stream (on `c`'s shared connection): 1000 bytes of a
/// body that never ends, declaring 1 MiB or nothing. The task ends with the status.
fn h2_delivery(
    c: &std::sync::Arc<TestClient>,
    url: String,
    declare: bool,
) -> tokio::task::JoinHandle<u16> {
    use http_body_util::BodyExt as _;
    let c = c.clone();
    tokio::spawn(async move {
        let first = futures_util::stream::once(async {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                bytes::Bytes::from(vec![b'{'; 1000]),
            ))
        });
        let body = http_body_util::StreamBody::new(futures_util::StreamExt::chain(
            first,
            futures_util::stream::pending(),
        ))
        .boxed();
        let mut req = hyper::Request::post(url)
            .header("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))
            .header("x-github-delivery", "d");
        if declare {
            req = req.header("content-length", "1048576");
        }
        let sent = c.send_raw(req.body(body).unwrap());
        match tokio::time::timeout(Duration::from_secs(30), sent).await {
            Ok(Ok(resp)) => resp.status().as_u16(),
            _ => 0,
        }
    })
}

/// Waits until `series` reads `want` on `/metrics` (10 s at most).
async fn gauge_reaches(kg: &Keygate, series: &str, want: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric(&metrics(kg).await, series);
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} is {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An API upload of `len` bytes with a key, sent in two halves: returns the response status
/// and what `keygate_request_buffer_bytes{use="api"}` read between the halves (the upload's
/// reservation, charged as its bytes arrive, if it is being buffered; 0 if it streams).
async fn api_upload(kg: &Keygate, token: &str, len: usize) -> (u16, u64) {
    let mut tls = kg.tls_from([127, 0, 0, 2]).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n\
         Content-Length: {len}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&vec![b'a'; len / 2]).await.unwrap();
    tls.flush().await.unwrap();
    // Buffered: its reservation shows once keygate has read the head.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut reserved = 0;
    while reserved == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        reserved = metric(&metrics(kg).await, API_BYTES);
    }
    tls.write_all(&vec![b'b'; len - len / 2]).await.unwrap();
    tls.flush().await.unwrap();
    let (status, _, _) = read_response(&mut tls).await;
    (status, reserved)
}

/// 70 stalled deliveries (1 MiB declared, 1 KB sent) hold 70 × 1 KiB, not 70 MiB, and so do
/// chunked ones and HTTP/2 streams: a real delivery is forwarded meanwhile, and an API upload
/// is still buffered. Senders that do send
/// their bytes hold at most the webhooks' half of the budget: API buffering keeps the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_senders_cannot_spend_the_api_clients_buffer_budget() {
    let up = RecordingUpstream::start().await;
    let secret = unique_secret("gh");
    let (token, hash) = new_key("api");
    let kg = start(&up, &secret, &hash);

    // 1. Stalled after 1 KB: charged what they sent (1 KiB each). HTTP/1.1 with
    // Content-Length and chunked, and HTTP/2 streams with and without content-length.
    let mut stalled = Vec::new();
    for i in 0..70 {
        stalled.push(open_delivery(&kg, 10 + (i % 20) as u8, Some(1024 * 1024), 1000).await);
    }
    for i in 0..10 {
        stalled.push(open_delivery(&kg, 40 + i, None, 1000).await);
    }
    let h2 = std::sync::Arc::new(kg.client_h2());
    for i in 0..10 {
        stalled.push(h2_delivery(&h2, kg.url("/hooks/github"), i % 2 == 0));
    }
    gauge_reaches(&kg, WEBHOOK_BYTES, 90 * 1024).await;
    let body = br#"{"action":"opened"}"#;
    let mut req = hyper::Request::post(kg.url("/hooks/github"));
    for (n, v) in sign_github(&secret, body, "d-real") {
        req = req.header(n, v);
    }
    let got = kg.client().send(req.body(full(&body[..])).unwrap()).await;
    assert_eq!(
        got.status, 200,
        "a real delivery during the hold: {:?}",
        got.body
    );
    let (status, reserved) = api_upload(&kg, &token, 30_000).await;
    assert_eq!(status, 200);
    assert!(
        (1..=30_000).contains(&reserved),
        "the API upload was buffered, charged as it arrived: {reserved}"
    );
    for s in stalled {
        assert_eq!(s.await.unwrap(), 408, "held until request_buffer_timeout");
    }
    gauge_reaches(&kg, WEBHOOK_BYTES, 0).await;

    // 2. Senders that send 1 MiB less one byte each, 40 of them (40 MiB): at most the webhooks'
    // 32 MiB is held, the rest are refused busy at once; API buffering is untouched.
    let mut full_senders = Vec::new();
    for i in 0..40 {
        full_senders.push(
            open_delivery(&kg, 10 + (i % 20) as u8, Some(1024 * 1024), 1024 * 1024 - 1).await,
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(&metrics(&kg).await, BUSY) < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "no sender was refused busy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = metrics(&kg).await;
    assert!(metric(&m, WEBHOOK_BYTES) <= 32 * 1024 * 1024, "{m}");
    let (status, reserved) = api_upload(&kg, &token, 30_000).await;
    assert_eq!(status, 200);
    assert!(
        (1..=30_000).contains(&reserved),
        "the API upload was buffered, charged as it arrived: {reserved}"
    );
    let mut statuses = Vec::new();
    for s in full_senders {
        statuses.push(s.await.unwrap());
    }
    assert!(
        statuses.iter().all(|s| matches!(s, 408 | 503)),
        "{statuses:?}"
    );
    assert_eq!(metric(&metrics(&kg).await, API_EXHAUSTED), 0);
    gauge_reaches(&kg, WEBHOOK_BYTES, 0).await;
    gauge_reaches(&kg, API_BYTES, 0).await;
    assert_eq!(
        up.count(),
        3,
        "one delivery and two uploads, nothing unsigned"
    );
}
