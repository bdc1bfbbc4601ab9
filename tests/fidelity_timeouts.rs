//! Blame the right side, and survive upstream keep-alive (issue 8 §5, issue 9 §6):
//! - a client that stalls its request body gets 408 and is counted as a client timeout, never as
//!   an upstream error; an upstream that stops reading is still the upstream's fault (504);
//! - a request that fails on a reused upstream connection before any response byte is sent once
//!   more on a new connection when it is idempotent and its body, if any, is in memory in full
//!   (request buffering); a POST never is, nor a streamed body;
//! - `request_timeout` runs once, from the last request-body progress.
//!
//! The misbehaving upstreams are small raw-socket servers below, so each misbehaviour is exact.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt as _;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// A client that stalls its body.

fn stall_keygate(up: &Upstream) -> (Keygate, String) {
    let (token, hash) = new_key("slow");
    let kg = Keygate::builder()
        .upstream(up)
        .upstream_line("request_timeout = \"2s\"")
        .server("body_read_timeout = \"1s\"")
        .key("slow", &hash, "")
        .admin()
        .start();
    (kg, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_is_a_client_timeout_408_not_an_upstream_504() {
    let up = Upstream::start().await;
    let (kg, token) = stall_keygate(&up);

    // HTTP/1.1, Content-Length announced, 1000 of 10000 bytes sent, then nothing.
    let mut s = kg.tls_stream().await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: localhost\r\nx-api-key: {token}\r\nx-request-id: stall-h1\r\ncontent-length: 10000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[b'a'; 1000]).await.unwrap();
    s.flush().await.unwrap();
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "request timeout");
    assert_eq!(v["request_id"], "stall-h1");

    // Chunked, no length: the same.
    let mut s = kg.tls_stream().await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: localhost\r\nx-api-key: {token}\r\nx-request-id: stall-chunked\r\ntransfer-encoding: chunked\r\n\r\n3e8\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[b'a'; 1000]).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    let (status, _, _) = read_response(&mut s).await;
    assert_eq!(status, 408);

    // HTTP/2 (hyper client over rustls): a body stream that sends 1000 bytes and stalls.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, BoxErr>>(1);
    tx.send(Ok(hyper::body::Frame::data(Bytes::from(vec![b'b'; 1000]))))
        .await
        .unwrap();
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx)).boxed();
    let req = Request::post(kg.url("/upload"))
        .header("x-api-key", &token)
        .header("x-request-id", "stall-h2")
        .body(body)
        .unwrap();
    let r = kg.client_h2().send(req).await;
    assert_eq!(r.status, 408, "{}", r.text());
    assert_eq!(r.json()["error"], "request timeout");
    drop(tx);

    for id in ["stall-h1", "stall-chunked", "stall-h2"] {
        let line = kg.access_line(id);
        assert_eq!(line["status"], 408, "{line}");
        let ev = kg.wait_log("client_timeout event", |v| {
            v["event"] == "client_timeout" && v["request_id"] == id
        });
        assert_eq!(ev["phase"], "body");
    }
    assert!(
        kg.events("upstream_error").is_empty(),
        "a stalled client was blamed on the upstream:\n{}",
        kg.logs()
    );
    let m = metrics(&kg).await;
    assert_eq!(
        metric_present(&m, "keygate_client_timeouts_total{phase=\"body\"}"),
        3
    );
    assert_eq!(
        metric_present(&m, "keygate_upstream_errors_total{kind=\"timeout\"}"),
        0
    );
    assert_no_secrets(&kg.logs(), &[&token]);
}

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_slow_upload_outlives_both_timeouts() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("slow");
    let kg = Keygate::builder()
        .upstream(&up)
        .upstream_line("request_timeout = \"1s\"")
        .server("body_read_timeout = \"1s\"")
        .key("slow", &hash, "")
        .start();
    // 10 chunks, one every 400 ms: 4 s in all, each gap well under both timeouts.
    for h2 in [false, true] {
        let chunks = futures_util::stream::unfold(0u32, |i| async move {
            if i == 10 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
            Some((
                Ok::<_, BoxErr>(hyper::body::Frame::data(Bytes::from(vec![b'c'; 100]))),
                i + 1,
            ))
        });
        let req = Request::post(kg.url("/upload"))
            .header("x-api-key", &token)
            .body(http_body_util::StreamBody::new(chunks).boxed())
            .unwrap();
        let c = if h2 { kg.client_h2() } else { kg.client() };
        let r = c.send(req).await;
        assert_eq!((r.status, r.text()), (200, "1000".to_string()), "h2={h2}");
    }
}

/// An upstream that reads the request head and then neither reads the body nor answers.
async fn deaf_upstream() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).await;
            held.push(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_stops_reading_the_body_is_still_the_upstreams_fault() {
    let addr = deaf_upstream().await;
    let (token, hash) = new_key("up");
    let kg = Keygate::builder()
        .upstream_url(&format!("http://{addr}"))
        .upstream_line("request_timeout = \"1s\"")
        .server("body_read_timeout = \"30s\"")
        .key("up", &hash, "")
        .start();
    // The client offers 64 MiB as fast as it can; the upstream reads none of it, so keygate
    // stops asking the client for more: the upstream, not the client, is stalling.
    let chunks =
        futures_util::stream::iter((0..1024).map(|_| {
            Ok::<_, BoxErr>(hyper::body::Frame::data(Bytes::from(vec![b'd'; 64 * 1024])))
        }));
    let req = Request::post(kg.url("/upload"))
        .header("x-api-key", &token)
        .header("content-length", (64u64 << 20).to_string())
        .header("x-request-id", "deaf")
        .body(http_body_util::StreamBody::new(chunks).boxed())
        .unwrap();
    let r = kg.client().send_raw(req).await.expect("a response");
    assert_eq!(r.status(), 504);
    let ev = kg.wait_log("upstream_error", |v| v["event"] == "upstream_error");
    assert_eq!(ev["kind"], "timeout");
    assert!(kg.events("client_timeout").is_empty());
}

/// `request_timeout` is the upstream's silence after the last request-body byte went out, once
/// (README, config.example.toml): a request with a small body gets its 504 as soon as a bodiless
/// one does (fresh user T8-3: after 2 × `request_timeout`, since the wait restarted whenever
/// body bytes had moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_runs_once_whether_or_not_the_request_has_a_body() {
    let addr = deaf_upstream().await;
    let (token, hash) = new_key("up");
    let kg = Keygate::builder()
        .upstream_url(&format!("http://{addr}"))
        .upstream_line("request_timeout = \"3s\"")
        .key("up", &hash, "")
        .start();
    for (method, body) in [("GET", ""), ("POST", "hello"), ("PUT", "hello")] {
        let req = Request::builder()
            .method(method)
            .uri(kg.url("/x"))
            .header("x-api-key", &token)
            .body(full(body))
            .unwrap();
        let t = std::time::Instant::now();
        let r = kg.client().send(req).await;
        let took = t.elapsed();
        assert_eq!(r.status, 504, "{method}");
        // 3 s, sampled at most 0.75 s late; the old code took 6 s with a body.
        assert!(
            took >= Duration::from_millis(2900) && took < Duration::from_millis(5000),
            "{method} with {} body bytes: 504 after {took:?}",
            body.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Upstreams that drop keep-alive connections.

#[derive(Clone, Copy, PartialEq)]
enum Flaky {
    /// Answers the first request on a connection; reads the second and closes without answering
    /// (never says `Connection: close`).
    ClosesOnSecondRequest,
    /// Answers the first request, then closes the connection as soon as the next request starts
    /// arriving, without reading it (the kernel answers the unread bytes with a reset).
    ResetsOnSecondRequest,
    /// Closes every connection as soon as a request has been read, without answering.
    NeverAnswers,
    /// Answers every request; closes a connection idle for 300 ms (a short keep-alive).
    ShortKeepAlive,
}

struct FlakyUpstream {
    addr: std::net::SocketAddr,
    /// "METHOD /path" of every request read, in order.
    seen: Arc<Mutex<Vec<String>>>,
    /// The whole head of every request read, in order.
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<Mutex<u32>>,
}

/// Reads one request (head and Content-Length body): its head. None at EOF.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = content_length(&head);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 8192];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            return Some(head);
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";

impl FlakyUpstream {
    async fn start(mode: Flaky) -> FlakyUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let connections: Arc<Mutex<u32>> = Arc::default();
        let (seen2, conns2, heads2) = (seen.clone(), connections.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                *conns2.lock().unwrap() += 1;
                let seen = seen2.clone();
                let heads = heads2.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    loop {
                        if mode == Flaky::ResetsOnSecondRequest && served == 1 {
                            let mut b = [0u8; 1];
                            let _ = s.peek(&mut b).await;
                            seen.lock().unwrap().push("(reset)".into());
                            return; // dropped with unread bytes: RST
                        }
                        let next = if mode == Flaky::ShortKeepAlive && served > 0 {
                            match tokio::time::timeout(
                                Duration::from_millis(300),
                                read_request(&mut s, &mut buf),
                            )
                            .await
                            {
                                Ok(r) => r,
                                Err(_) => return,
                            }
                        } else {
                            read_request(&mut s, &mut buf).await
                        };
                        let Some(head) = next else { return };
                        let line = head.lines().next().unwrap_or_default();
                        let req = line.rsplit_once(' ').map_or(line, |(a, _)| a).to_string();
                        heads.lock().unwrap().push(head);
                        let head_only = req.starts_with("HEAD");
                        seen.lock().unwrap().push(req);
                        let answer = match mode {
                            Flaky::NeverAnswers => false,
                            Flaky::ClosesOnSecondRequest => served == 0,
                            _ => true,
                        };
                        if !answer {
                            return;
                        }
                        let answer: &[u8] = if head_only { &OK[..OK.len() - 2] } else { OK };
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                        served += 1;
                    }
                });
            }
        });
        FlakyUpstream {
            addr,
            seen,
            heads,
            connections,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
    fn connections(&self) -> u32 {
        *self.connections.lock().unwrap()
    }
}

fn flaky_keygate(up: &FlakyUpstream, extra: &[&str]) -> (Keygate, String) {
    let (token, hash) = new_key("k");
    // One event loop: upstream pools are per worker, and the retry counts below assume that
    // a request finds the connection the one before it left in the pool. With two, the test
    // client may open a second connection that lands on the other worker and its empty pool.
    let mut b = Keygate::builder()
        .upstream_url(&format!("http://{}", up.addr))
        .key("k", &hash, "")
        .server("workers = 1")
        .admin();
    for l in extra {
        b = b.upstream_line(l);
    }
    (b.start(), token)
}

async fn call(kg: &Keygate, c: &TestClient, token: &str, method: &str, path: &str) -> u16 {
    let req = Request::builder()
        .method(method)
        .uri(kg.url(path))
        .header("x-api-key", token)
        .body(empty())
        .unwrap();
    c.send(req).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_once_when_a_reused_connection_drops_them() {
    for mode in [Flaky::ClosesOnSecondRequest, Flaky::ResetsOnSecondRequest] {
        let up = FlakyUpstream::start(mode).await;
        let (kg, token) = flaky_keygate(&up, &[]);
        for h2 in [false, true] {
            let c = if h2 { kg.client_h2() } else { kg.client() };
            for method in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"] {
                // The very first request opens a connection; every later one finds the
                // connection the one before it left in the pool (a retry's new connection is
                // pooled too), and the upstream drops it under the request.
                assert_eq!(call(&kg, &c, &token, "GET", "/warm").await, 200);
                let status = call(&kg, &c, &token, method, "/again").await;
                assert_eq!(
                    status, 200,
                    "{method} (h2={h2}) on a dropped reused connection"
                );
            }
        }
        let m = metrics(&kg).await;
        // 2 protocols × 5 methods × 2 requests, all but the first retried once.
        assert_eq!(metric_present(&m, "keygate_upstream_retries_total"), 19);
        assert_eq!(
            metric_present(&m, "keygate_upstream_errors_total{kind=\"other\"}"),
            0
        );
    }
}

/// The retry sends the head the dropped attempt sent, field for field: repeated fields and
/// their order included (keygate keeps a copy of an idempotent request's head for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_carries_the_same_head() {
    let up = FlakyUpstream::start(Flaky::ClosesOnSecondRequest).await;
    let (kg, token) = flaky_keygate(&up, &[]);
    let c = kg.client();
    assert_eq!(call(&kg, &c, &token, "GET", "/warm").await, 200);
    let req = Request::builder()
        .method("GET")
        .uri(kg.url("/again?q=1"))
        .header("x-api-key", &token)
        .header("x-trace", "first")
        .header("accept", "text/plain")
        .header("x-trace", "second")
        .header("x-request-id", "retry-test-1")
        .body(empty())
        .unwrap();
    assert_eq!(c.send(req).await.status, 200);
    let heads = up.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 3, "warm-up, dropped attempt, retry: {heads:?}");
    let (dropped, retry) = (&heads[1], &heads[2]);
    assert_eq!(
        dropped, retry,
        "the retry's head differs from the attempt's"
    );
    let traces: Vec<&str> = retry
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-trace:"))
        .collect();
    assert_eq!(traces, ["x-trace: first", "x-trace: second"]);
    assert!(retry.starts_with("GET /again?q=1 HTTP/1.1\r\n"), "{retry}");
    assert!(retry.contains("x-request-id: retry-test-1"), "{retry}");
    assert!(
        !retry.contains(&token),
        "the credential reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_never_sent_twice() {
    let up = FlakyUpstream::start(Flaky::ClosesOnSecondRequest).await;
    let (kg, token) = flaky_keygate(&up, &[]);
    let c = kg.client();
    // Non-idempotent: the upstream may have acted on it, so the client gets the 502.
    for method in ["POST", "PATCH"] {
        assert_eq!(call(&kg, &c, &token, "GET", "/warm").await, 200);
        let status = call(&kg, &c, &token, method, "/order").await;
        assert_eq!(status, 502, "{method}");
        let n = up.seen().iter().filter(|r| r.starts_with(method)).count();
        assert_eq!(n, 1, "{method} sent more than once: {:?}", up.seen());
    }
    // A PUT whose body was streamed (larger than request_buffer_bytes, 64 KiB) cannot be
    // replayed either: part of it came from the client while it was sent.
    assert_eq!(call(&kg, &c, &token, "GET", "/warm").await, 200);
    let req = Request::put(kg.url("/doc"))
        .header("x-api-key", &token)
        .body(full(vec![b'x'; 100_000]))
        .unwrap();
    assert_eq!(c.send(req).await.status, 502);
    assert_eq!(up.seen().iter().filter(|r| r.starts_with("PUT")).count(), 1);
    assert_eq!(
        metric_present(&metrics(&kg).await, "keygate_upstream_retries_total"),
        0
    );
}

/// An idempotent request whose body was read in full before the upstream was contacted
/// (request buffering) is replayed like a bodiless one (RFC 9110 §9.2.2; SPEC §3's retry
/// rule; fresh user T8-2: PUTs with a 10-byte body got 502 where nginx retries them), over
/// HTTP/1.1 and HTTP/2, Content-Length or not; the retry carries the same body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_with_a_buffered_body_is_retried_with_that_body() {
    let up = FlakyUpstream::start(Flaky::ClosesOnSecondRequest).await;
    let (kg, token) = flaky_keygate(&up, &[]);
    for h2 in [false, true] {
        let c = if h2 { kg.client_h2() } else { kg.client() };
        for method in ["PUT", "DELETE", "OPTIONS"] {
            assert_eq!(call(&kg, &c, &token, "GET", "/warm").await, 200);
            let before = up.heads.lock().unwrap().len();
            let req = Request::builder()
                .method(method)
                .uri(kg.url("/doc"))
                .header("x-api-key", &token)
                .body(full("some body"))
                .unwrap();
            let r = c.send(req).await;
            assert_eq!(r.status, 200, "{method} (h2={h2}): {}", r.text());
            let heads = up.heads.lock().unwrap()[before..].to_vec();
            assert_eq!(heads.len(), 2, "dropped attempt and retry: {heads:?}");
            assert_eq!(heads[0], heads[1], "the retry's head differs");
            assert!(
                heads[1].to_ascii_lowercase().contains("content-length: 9"),
                "{}",
                heads[1]
            );
        }
    }
    // Every request but the very first found a connection its predecessor left: 2 × 6 − 1.
    assert_eq!(
        metric_present(&metrics(&kg).await, "keygate_upstream_retries_total"),
        11
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_on_a_new_connection_is_not_retried() {
    let up = FlakyUpstream::start(Flaky::NeverAnswers).await;
    let (kg, token) = flaky_keygate(&up, &[]);
    assert_eq!(call(&kg, &kg.client(), &token, "GET", "/x").await, 502);
    assert_eq!(
        up.seen(),
        vec!["GET /x".to_string()],
        "retried on a new connection"
    );
    assert_eq!(
        metric_present(
            &metrics(&kg).await,
            "keygate_upstream_errors_total{kind=\"other\"}"
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_takes_a_new_connection_not_another_dead_pooled_one() {
    let up = FlakyUpstream::start(Flaky::ClosesOnSecondRequest).await;
    let (kg, token) = flaky_keygate(&up, &[]);
    let c = kg.client();
    // Four pooled connections, each used once: every one of them will drop its next request.
    let reqs = (0..4).map(|_| call(&kg, &c, &token, "GET", "/warm"));
    let got = futures_util::future::join_all(reqs).await;
    assert!(got.iter().all(|s| *s == 200), "{got:?}");
    for _ in 0..4 {
        assert_eq!(call(&kg, &c, &token, "GET", "/x").await, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_a_short_keep_alive_never_fails_a_request() {
    let up = FlakyUpstream::start(Flaky::ShortKeepAlive).await;
    // The pool forgets idle connections before the upstream closes them (200 ms < 300 ms), so
    // even a POST, which is never retried, finds no dead connection.
    let (kg, token) = flaky_keygate(&up, &["pool_idle_timeout = \"200ms\""]);
    let c = kg.client();
    for _ in 0..4 {
        assert_eq!(call(&kg, &c, &token, "POST", "/p").await, 200);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(call(&kg, &c, &token, "GET", "/g").await, 200);
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    assert!(up.connections() >= 2);
}
