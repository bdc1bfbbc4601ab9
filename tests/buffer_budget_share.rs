//! The request-buffer budget has a share per client (src/buffer_budget.rs). Fresh user T8
//! found it was a global budget spent per connection, reserved up front, with no share per
//! client: ~2,000 stalled webhook deliveries from 10 addresses (1 byte sent each, a 16 KiB
//! reservation each) held the whole webhook half, so every genuine delivery got 503 (T8-4);
//! four keys' 1,024 slow uploads (1 byte sent each, their declared 64 KiB reserved each) held
//! the whole 64 MiB, so every delivery got 503 and every other key's small body streamed again
//! (T8-5). Now a body reserves what it has received (1 KiB before its first byte), one address
//! (and, for API bodies, one key) holds at most 1/16 of its use's half, and API bodies hold at
//! most their half. Real TLS, hand-written HTTP/1.1 and hyper's HTTP/2 client, from several
//! loopback addresses.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::admin::*;
use common::webhooks::*;
use common::*;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;
const SECRET_ENV: &str = "WH_SHARE";
const WEBHOOK_BYTES: &str = "keygate_request_buffer_bytes{use=\"webhook\"}";
const API_BYTES: &str = "keygate_request_buffer_bytes{use=\"api\"}";
const API_EXHAUSTED: &str = "keygate_request_buffer_exhausted_total{use=\"api\"}";
const WEBHOOK_EXHAUSTED: &str = "keygate_request_buffer_exhausted_total{use=\"webhook\"}";
const API_CLIENT_FULL: &str = "keygate_request_buffer_client_share_spent_total{use=\"api\"}";
const WEBHOOK_CLIENT_FULL: &str =
    "keygate_request_buffer_client_share_spent_total{use=\"webhook\"}";
const BUSY: &str = "keygate_webhook_rejected_total{route=\"gh\",reason=\"busy\"}";

/// A GitHub route (`max_body_bytes` 1 MiB) and two API keys; bodies up to 1 MiB are buffered.
fn start(up_url: &str, secret: &str, keys: &[(&str, &str, &str)]) -> Keygate {
    let mut b = Keygate::builder()
        .upstream_url(up_url)
        .server("request_buffer_timeout = \"15s\"\nrequest_buffer_bytes = 1048576")
        .raw(
            "[[webhooks]]\nid = \"gh\"\npath = \"/hooks/github\"\nscheme = \"github\"\n\
             secret = { env = \"WH_SHARE\" }\nmax_body_bytes = 1048576\n",
        )
        .admin();
    for (id, hash, extra) in keys {
        b = b.key(id, hash, extra);
    }
    b.start_with(&[(SECRET_ENV, secret)], None)
}

/// Waits until `f` holds for the metrics (15 s at most).
async fn until(kg: &Keygate, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = metrics(kg).await;
        if f(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never happened; metrics:\n{}",
            m.lines()
                .filter(|l| l.starts_with("keygate_request_buffer")
                    || l.starts_with("keygate_webhook_rejected"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A genuine signed GitHub delivery from 127.0.0.1; its status.
async fn genuine_delivery(kg: &Keygate, secret: &str, id: &str) -> u16 {
    let body = format!(r#"{{"action":"opened","delivery":"{id}"}}"#);
    let body = body.as_bytes();
    let got = kg
        .client()
        .send(post(
            &kg.url("/hooks/github"),
            &sign_github(secret, body, id),
            body,
        ))
        .await;
    got.status
}

/// An API POST to `/upload` with `token` from 127.0.0.`src` over its own TLS connection
/// (HTTP/1.1): declares `declared` bytes, sends `sent` of them, then waits. The task ends with
/// the status keygate answered (0 if none within 30 s).
async fn slow_upload(
    kg: &Keygate,
    src: u8,
    token: &str,
    declared: usize,
    sent: usize,
) -> tokio::task::JoinHandle<u16> {
    let tls = kg.tls_from([127, 0, 0, src]).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n\
         Content-Length: {declared}\r\n\r\n"
    );
    tokio::spawn(async move {
        let mut tls = tls;
        let exchange = async {
            tls.write_all(head.as_bytes()).await.ok()?;
            tls.write_all(&vec![b'a'; sent]).await.ok()?;
            tls.flush().await.ok()?;
            let mut buf = [0u8; 12];
            tls.read_exact(&mut buf).await.ok()?;
            String::from_utf8_lossy(&buf[9..12]).parse().ok()
        };
        // Dropping the task (abort) closes the connection.
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    })
}

/// An HTTP/2 connection from 127.0.0.`src` whose requests carry any body.
async fn h2_from(
    kg: &Keygate,
    src: u8,
) -> hyper::client::conn::http2::SendRequest<http_body_util::combinators::BoxBody<Bytes, BoxErr>> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::from((
        Ipv4Addr::new(127, 0, 0, src),
        0,
    )))
    .unwrap();
    let tcp = sock.connect(kg.addr).await.unwrap();
    let mut cfg = kg.tls_config();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

/// A body of `first` bytes that never ends.
fn stalled_body(first: usize) -> http_body_util::combinators::BoxBody<Bytes, BoxErr> {
    let first = futures_util::stream::once(async move {
        Ok::<_, BoxErr>(hyper::body::Frame::data(Bytes::from(vec![b'{'; first])))
    });
    http_body_util::StreamBody::new(futures_util::StreamExt::chain(
        first,
        futures_util::stream::pending(),
    ))
    .boxed()
}

/// A request on `h2` as a task ending with its status (0 if none within 30 s).
fn h2_send(
    h2: &hyper::client::conn::http2::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, BoxErr>,
    >,
    req: hyper::Request<http_body_util::combinators::BoxBody<Bytes, BoxErr>>,
) -> tokio::task::JoinHandle<u16> {
    let mut h2 = h2.clone();
    tokio::spawn(async move {
        let sent = async {
            h2.ready().await.ok()?;
            let resp = h2.send_request(req).await.ok()?;
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            Some(status)
        };
        tokio::time::timeout(Duration::from_secs(30), sent)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    })
}

/// T8-4's kind (old code: the genuine delivery got 503, the half full to the byte). One address
/// opens 182 deliveries stalled after their first byte (as T8-4's
/// 2,200, declaring 60,000 bytes) and 10 HTTP/2 streams stalled after 1,000 bytes, then 34 that
/// send 1 MiB less a byte each (34 MiB, more than the webhooks' 32 MiB half). Before, the
/// stalled ones held 16 KiB each and the big ones filled the half: a genuine delivery from
/// another address got 503. Now the stalled ones hold 1 KiB each, the address holds at most its
/// share (2 MiB; one whole 1 MiB delivery fits), the rest of its deliveries are refused 503 at
/// once, and the genuine delivery is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_deliveries_from_one_address_do_not_refuse_another_senders_delivery() {
    let up = RecordingUpstream::start().await;
    let secret = unique_secret("gh");
    let kg = start(&up.url(), &secret, &[]);

    let mut tasks = Vec::new();
    for _ in 0..182 {
        let tls = kg.tls_from([127, 0, 0, 10]).await.unwrap();
        tasks.push(tokio::spawn(unsigned_delivery(
            tls,
            Some(60_000),
            1,
            Duration::from_secs(30),
        )));
    }
    let h2 = h2_from(&kg, 10).await;
    let mut h2_tasks = Vec::new();
    for i in 0..10 {
        let mut req = hyper::Request::post("https://localhost/hooks/github")
            .header("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))
            .header("x-github-delivery", format!("h2-{i}"));
        if i % 2 == 0 {
            req = req.header("content-length", "60000");
        }
        h2_tasks.push(h2_send(&h2, req.body(stalled_body(1000)).unwrap()));
    }
    // Charged what they sent: 1 KiB each (16 KiB each before: 3 MiB, so that 29 whole
    // deliveries below filled the half to the byte).
    let stalled = 192 * 1024;
    until(&kg, "192 stalled deliveries hold 1 KiB each", |m| {
        metric(m, WEBHOOK_BYTES) == stalled
    })
    .await;

    let mut big = Vec::new();
    for _ in 0..34 {
        let tls = kg.tls_from([127, 0, 0, 10]).await.unwrap();
        big.push(tokio::spawn(unsigned_delivery(
            tls,
            Some(MIB as usize),
            MIB as usize - 1,
            Duration::from_secs(30),
        )));
    }
    // Settled: every big delivery is refused busy or holds its whole 1 MiB (its buffer reaches
    // the declared length once half of it has arrived).
    let m = until(&kg, "34 big deliveries settled", |m| {
        metric(m, BUSY) + (metric(m, WEBHOOK_BYTES).saturating_sub(stalled)) / MIB >= 34
    })
    .await;
    assert!(
        metric(&m, WEBHOOK_BYTES) <= 2 * MIB,
        "one address holds at most 1/16 of the webhooks' half: {}",
        metric(&m, WEBHOOK_BYTES)
    );
    assert!(metric(&m, WEBHOOK_CLIENT_FULL) >= 32, "{m}");
    assert_eq!(
        metric(&m, WEBHOOK_EXHAUSTED),
        0,
        "the half itself was never spent"
    );

    // Another sender is served meanwhile (old code: 503).
    assert_eq!(genuine_delivery(&kg, &secret, "d-genuine-1").await, 200);
    // So is another address opening deliveries of its own.
    let other = kg.tls_from([127, 0, 0, 11]).await.unwrap();
    let other = tokio::spawn(unsigned_delivery(
        other,
        Some(MIB as usize),
        MIB as usize - 1,
        Duration::from_secs(30),
    ));
    let held = metric(&m, WEBHOOK_BYTES);
    until(&kg, "another address's delivery is held", |m| {
        metric(m, WEBHOOK_BYTES) >= held + MIB
    })
    .await;
    assert_eq!(genuine_delivery(&kg, &secret, "d-genuine-2").await, 200);

    let mut statuses = Vec::new();
    for t in tasks.into_iter().chain(h2_tasks).chain(big) {
        statuses.push(t.await.unwrap());
    }
    assert!(
        statuses.iter().all(|s| matches!(s, 408 | 503)),
        "{statuses:?}"
    );
    assert!(statuses.iter().filter(|&&s| s == 503).count() >= 32);
    assert_eq!(
        other.await.unwrap(),
        408,
        "held until request_buffer_timeout"
    );
    until(&kg, "everything given back", |m| {
        metric(m, WEBHOOK_BYTES) == 0
    })
    .await;
    assert_eq!(
        up.count(),
        2,
        "the two genuine deliveries, nothing unsigned"
    );
}

/// T8-5's kind (old code: 64 MiB reserved, "small"'s chunked body streamed, `exhausted` +2, the
/// delivery 503). Key "bulk" opens 70 uploads declaring 1 MiB and stalled after 1 byte (HTTP/1.1)
/// and 10 HTTP/2 streams stalled after 1,000 bytes, then uploads that send 700 KiB of 1 MiB
/// from four other addresses. Before, each upload reserved its declared 1 MiB: 64 of them held
/// all 64 MiB, so key "small"'s 7-byte body streamed (`exhausted` +1) and a genuine delivery
/// got 503. Now the stalled ones hold 1 KiB each, the key holds at most its share (2 MiB; past
/// it its bodies stream), "small"'s bodies are buffered (the upstream gets them with a
/// Content-Length, not chunked) and deliveries are forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_keys_slow_uploads_do_not_stop_another_keys_body_being_buffered() {
    let up = Upstream::start().await;
    let secret = unique_secret("gh");
    let (bulk, bulk_hash) = new_key("bulk");
    let (small, small_hash) = new_key("small");
    let kg = start(
        &up.url(),
        &secret,
        &[
            ("bulk", &bulk_hash, "max_concurrent = 200"),
            ("small", &small_hash, ""),
        ],
    );

    let mut tasks = Vec::new();
    for _ in 0..70 {
        tasks.push(slow_upload(&kg, 20, &bulk, MIB as usize, 1).await);
    }
    let h2 = h2_from(&kg, 21).await;
    for i in 0..10 {
        let mut req = hyper::Request::post("https://localhost/upload").header("x-api-key", &bulk);
        if i % 2 == 0 {
            req = req.header("content-length", MIB.to_string());
        }
        tasks.push(h2_send(&h2, req.body(stalled_body(1000)).unwrap()));
    }
    let stalled = 80 * 1024;
    until(&kg, "80 stalled uploads hold 1 KiB each", |m| {
        metric(m, API_BYTES) == stalled
    })
    .await;
    assert_eq!(metric(&metrics(&kg).await, API_EXHAUSTED), 0);

    // The same key sends real bytes from other addresses: it is held to its share. (Those
    // past it stream to the upstream and wait there: not awaited.)
    let mut streamed = Vec::new();
    for src in 22..26 {
        streamed.push(slow_upload(&kg, src, &bulk, MIB as usize, 700 * 1024).await);
    }
    let m = until(&kg, "the key reaches its share", |m| {
        metric(m, API_CLIENT_FULL) >= 1
    })
    .await;
    assert!(
        metric(&m, API_BYTES) <= 2 * MIB,
        "{}",
        metric(&m, API_BYTES)
    );

    // Another key's small bodies are still buffered: chunked on HTTP/1.1, no length on HTTP/2;
    // the upstream gets a Content-Length (old code: streamed, chunked, `exhausted` +1).
    let before = metrics(&kg).await;
    let mut tls = kg.tls_from([127, 0, 0, 2]).await.unwrap();
    tls.write_all(
        format!(
            "POST /echo-h1 HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {small}\r\n\
             Transfer-Encoding: chunked\r\n\r\n7\r\npayload\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, _, _) = read_response(&mut tls).await;
    assert_eq!(status, 200);
    let small_h2 = h2_from(&kg, 3).await;
    // A stream of unknown length: hyper sends no content-length.
    let body = http_body_util::StreamBody::new(futures_util::stream::once(async {
        Ok::<_, BoxErr>(hyper::body::Frame::data(Bytes::from_static(b"payload")))
    }))
    .boxed();
    let req = hyper::Request::post("https://localhost/echo-h2")
        .header("x-api-key", &small)
        .body(body)
        .unwrap();
    assert_eq!(h2_send(&small_h2, req).await.unwrap(), 200);
    let after = metrics(&kg).await;
    assert_eq!(
        metric(&after, API_EXHAUSTED),
        metric(&before, API_EXHAUSTED),
        "the API half was not spent"
    );
    for path in ["/echo-h1", "/echo-h2"] {
        let seen = up
            .requests()
            .into_iter()
            .find(|s| s.uri.ends_with(path))
            .unwrap_or_else(|| panic!("{path} not forwarded"));
        assert_eq!(seen.header("content-length"), Some("7"), "{path}: {seen:?}");
        assert_eq!(seen.header("transfer-encoding"), None, "{path}: {seen:?}");
    }

    // The webhooks' half is theirs (old code: 503).
    assert_eq!(
        genuine_delivery(&kg, &secret, "d-during-uploads").await,
        200
    );
    assert_eq!(metric(&metrics(&kg).await, WEBHOOK_EXHAUSTED), 0);

    for t in tasks {
        assert_eq!(t.await.unwrap(), 408, "held until request_buffer_timeout");
    }
    for t in streamed {
        t.abort();
    }
    until(&kg, "everything given back", |m| metric(m, API_BYTES) == 0).await;
}
