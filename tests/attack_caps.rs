//! Issue 9 §2 and §4: the caps that keep one address, one key or one slow client from taking
//! what others need. Connection table (per-address cap, reclaiming handshakes and idle
//! connections when full), per-key `max_concurrent`, `[upstream] max_connections` with its
//! bounded wait, and request buffering (a slow upload costs the upstream nothing until it is
//! complete). Real keygate process, real TLS, second loopback address 127.0.0.2.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Writes one HTTP/1.1 request and reads one response (by its Content-Length): (status, body).
/// `None`: the connection failed or closed first.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    head: &str,
    body: &[u8],
) -> Option<(u16, String)> {
    s.write_all(head.as_bytes()).await.ok()?;
    s.write_all(body).await.ok()?;
    read_response(s).await
}

async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let status = head.get(9..12)?.parse().ok()?;
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                    return Some((status, body));
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .ok()?
}

fn get(path: &str, token: &str, close: bool) -> String {
    let conn = if close { "close" } else { "keep-alive" };
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {conn}\r\nX-API-Key: {token}\r\n\r\n"
    )
}

/// One legitimate request on a new connection from `src`: its status, or `None` when keygate
/// refused the connection.
async fn probe(kg: &Keygate, src: [u8; 4], token: &str) -> Option<u16> {
    let mut s = kg.tls_from(src).await.ok()?;
    exchange(&mut s, &get("/", token, true), b"")
        .await
        .map(|(st, _)| st)
}

/// Polls the metrics until `series` satisfies `pred`.
async fn wait_metric(kg: &Keygate, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = metric_f64(&metrics(kg).await, series);
        if pred(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Attackers that connect over and over: each of `n` tasks completes a TLS handshake (ALPN as
/// [`Keygate::tls_config`]), hands the connection to `each`, pauses 100 ms, and starts again,
/// until [`stop`](Self::stop).
struct Attackers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Attackers {
    fn start<F, Fut>(kg: &Keygate, n: usize, each: F) -> Self
    where
        F: Fn(tokio_rustls::client::TlsStream<TcpStream>) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..n)
            .map(|_| {
                let (cfg, addr) = (kg.tls_config(), kg.addr);
                let (stop, each) = (stop.clone(), each.clone());
                tokio::spawn(async move {
                    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
                    while !stop.load(SeqCst) {
                        if let Ok(tcp) = TcpStream::connect(addr).await
                            && let Ok(s) = connector
                                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                                .await
                        {
                            each(s).await;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
            })
            .collect();
        Attackers { stop, tasks }
    }

    fn stop(self) {
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            t.abort();
        }
    }
}

/// An upstream that counts what reaches it: TCP connections accepted, requests in progress
/// (and the most at once), and for each request its framing headers and body length.
/// `/slow?ms=N` answers after N ms; everything else at once, after reading the body.
/// What the upstream saw of one request: Content-Length, Transfer-Encoding, body length.
type SeenRequest = (Option<String>, Option<String>, usize);

#[derive(Default)]
struct Counting {
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    seen: std::sync::Mutex<Vec<SeenRequest>>,
}

async fn counting_upstream() -> (String, Arc<Counting>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let c = Arc::new(Counting::default());
    let c2 = c.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c2.connections.fetch_add(1, SeqCst);
            let c = c2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let c = c.clone();
                        async move {
                            let now = c.in_flight.fetch_add(1, SeqCst) + 1;
                            c.max_in_flight.fetch_max(now, SeqCst);
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .map(|v| v.to_str().unwrap_or_default().to_string())
                            };
                            let (cl, te) = (h("content-length"), h("transfer-encoding"));
                            let ms = req
                                .uri()
                                .query()
                                .and_then(|q| q.strip_prefix("ms="))
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            let len = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().len())
                                .unwrap_or(0);
                            c.seen.lock().unwrap().push((cl, te, len));
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            c.in_flight.fetch_sub(1, SeqCst);
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(full(
                                Bytes::from(len.to_string()),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_many_bare_connections_cannot_lock_out_another() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_connections = 60")
        .server("max_connections_per_ip = 20")
        .key("k", &hash, "")
        .admin()
        .start();
    // 127.0.0.1 opens 100 TCP connections and never starts TLS.
    let mut bare = Vec::new();
    for _ in 0..100 {
        bare.push(TcpStream::connect(kg.addr).await.unwrap());
    }
    wait_metric(
        &kg,
        "keygate_connections_limited_total{reason=\"per_ip\"}",
        |v| v >= 80.0,
    )
    .await;
    assert_eq!(
        metric_f64(&metrics(&kg).await, "keygate_open_connections"),
        20.0,
        "one address holds at most max_connections_per_ip"
    );
    for i in 0..10 {
        assert_eq!(
            probe(&kg, [127, 0, 0, 2], &token).await,
            Some(200),
            "probe {i}"
        );
    }
    // The refusals are one event line (then one per 10 s), with the count, not 80 lines.
    let events = kg.events("connection_limited");
    assert!(!events.is_empty() && events.len() < 5, "{events:?}");
    assert_eq!(events[0]["reason"], "per_ip");
    assert_eq!(events[0]["client_ip"], "127.0.0.1");
    drop(bare);
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_table_makes_room_by_closing_connections_that_never_start_tls() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_connections = 30")
        .server("max_connections_per_ip = 1000")
        .key("k", &hash, "")
        .admin()
        .start();
    // More bare connections than slots (as 4,200 against 4,096).
    let mut bare = Vec::new();
    for _ in 0..40 {
        bare.push(TcpStream::connect(kg.addr).await.unwrap());
    }
    wait_metric(&kg, "keygate_open_connections", |v| v == 30.0).await;
    // 10 were closed for the last 10 bare ones (oldest first); each probe finds room too.
    for i in 0..20 {
        assert_eq!(
            probe(&kg, [127, 0, 0, 2], &token).await,
            Some(200),
            "probe {i}"
        );
    }
    let m = metrics(&kg).await;
    assert!(
        metric_f64(
            &m,
            "keygate_connections_limited_total{reason=\"handshake\"}"
        ) >= 11.0,
        "{m}"
    );
    assert_eq!(
        metric_f64(&m, "keygate_connections_limited_total{reason=\"full\"}"),
        0.0
    );
    // Reclaimed connections are really closed: keygate's end reads as EOF.
    let mut closed = 0;
    for s in &mut bare {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert!(closed >= 11, "only {closed} bare connections were closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_make_room_busy_ones_never() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_connections = 3")
        .server("max_connections_per_ip = 100")
        .key("k", &hash, "")
        .admin()
        .start();
    // One idle keep-alive connection (a request done), two busy with a slow request each.
    let mut idle = kg.tls_from([127, 0, 0, 1]).await.unwrap();
    assert_eq!(
        exchange(&mut idle, &get("/", &token, false), b"")
            .await
            .unwrap()
            .0,
        200
    );
    let slow = |n: usize| {
        let kg_addr = (kg.tls_config(), kg.addr);
        let token = token.clone();
        tokio::spawn(async move {
            let tcp = TcpStream::connect(kg_addr.1).await.unwrap();
            let mut cfg = kg_addr.0;
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            let _ = n;
            exchange(&mut s, &get("/slow?ms=4000", &token, true), b"").await
        })
    };
    let busy: Vec<_> = (0..2).map(slow).collect();
    wait_until("2 slow requests at the upstream", || up.count() == 3).await;

    // Full: the idle connection makes room for a newcomer.
    assert_eq!(probe(&kg, [127, 0, 0, 2], &token).await, Some(200));
    let mut b = [0u8; 1];
    let eof = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut b)).await;
    assert!(
        matches!(eof, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection still open: {eof:?}"
    );

    // Three busy connections: a newcomer is refused, none of them is cut.
    let third = slow(3);
    wait_until("3 slow requests at the upstream", || up.count() == 5).await;
    assert_eq!(probe(&kg, [127, 0, 0, 2], &token).await, None);
    wait_metric(
        &kg,
        "keygate_connections_limited_total{reason=\"full\"}",
        |v| v >= 1.0,
    )
    .await;
    for b in busy.into_iter().chain([third]) {
        assert_eq!(b.await.unwrap().map(|r| r.0), Some(200));
    }
    let m = metrics(&kg).await;
    // The idle keep-alive connection, and possibly the first probe's (idle once answered).
    assert!(
        metric_f64(&m, "keygate_connections_limited_total{reason=\"idle\"}") >= 1.0,
        "{m}"
    );
    // Room again once they are done.
    assert_eq!(probe(&kg, [127, 0, 0, 2], &token).await, Some(200));
}

/// A fresh user's attack: connections that complete TLS, send nothing, and reconnect as soon
/// as they are closed. While a full table reclaimed handshakes before idle connections, every
/// reconnect closed the oldest handshake in progress, which was a legitimate newcomer's (4 of
/// 24 probes got through). Idle connections now go before any handshake younger than a
/// second, so the attackers only take each other's slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_that_reconnect_never_cut_a_newcomers_handshake() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_connections = 16")
        .server("max_connections_per_ip = 1000")
        .key("k", &hash, "")
        .admin()
        .start();
    let handshakes = Arc::new(AtomicUsize::new(0));
    // 24 attackers for 16 slots: 8 are always reconnecting (after 100 ms), each reconnect
    // closing someone to make room.
    let h = handshakes.clone();
    let attackers = Attackers::start(&kg, 24, move |mut s| {
        let h = h.clone();
        async move {
            h.fetch_add(1, SeqCst);
            let mut b = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await;
        }
    });
    wait_until("the attackers churn", || handshakes.load(SeqCst) >= 40).await;
    let mut ok = 0;
    for _ in 0..20 {
        if probe(&kg, [127, 0, 0, 2], &token).await == Some(200) {
            ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let churned = handshakes.load(SeqCst);
    attackers.stop();
    assert_eq!(
        ok, 20,
        "probes that got through ({churned} attacker handshakes)"
    );
    let m = metrics(&kg).await;
    assert!(
        metric_f64(&m, "keygate_connections_limited_total{reason=\"idle\"}") >= 20.0,
        "{m}"
    );
    assert_eq!(
        metric_f64(&m, "keygate_connections_limited_total{reason=\"full\"}"),
        0.0
    );
}

/// A fresh user: connections whose requests keygate itself holds back (a throttled client's
/// 429 is held for a second) counted as busy, so a full table could reclaim none of them: 8
/// addresses without a key kept a legitimate client to 9 of 30 requests. Only requests that
/// keygate admitted make a connection busy now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_held_in_the_throttle_tarpit_are_reclaimable() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_connections = 24")
        .server("max_connections_per_ip = 1000")
        .auth("failed_auth_limit = \"3/min\"")
        .key("k", &hash, "")
        .admin()
        .start();
    // The legitimate key is verified (cached) before the attack.
    assert_eq!(probe(&kg, [127, 0, 0, 2], &token).await, Some(200));
    let throttled = Arc::new(AtomicUsize::new(0));
    let wrong = "kg_k_wrongwrongwrongwrongwrongwrong1";
    let t = throttled.clone();
    let attackers = Attackers::start(&kg, 32, move |mut s| {
        let t = t.clone();
        async move {
            // Back to back on one connection: always one request held back.
            while let Some((status, _)) = exchange(&mut s, &get("/", wrong, false), b"").await {
                if status == 429 {
                    t.fetch_add(1, SeqCst);
                }
            }
        }
    });
    // Held in the tarpit, their connections are reclaimed before most 429s are sent: count
    // the throttled requests at keygate.
    wait_metric(&kg, "keygate_auth_throttled_total", |v| v >= 40.0).await;
    let mut ok = 0;
    let mut most_open = 0.0f64;
    for _ in 0..20 {
        if probe(&kg, [127, 0, 0, 2], &token).await == Some(200) {
            ok += 1;
        }
        // A reclaimed connection is closed, not left open until its held request ends (a
        // second fresh user: 1,536 open against a table of 512).
        most_open = most_open.max(metric_f64(&metrics(&kg).await, "keygate_open_connections"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    attackers.stop();
    assert_eq!(ok, 20, "probes that got through");
    assert!(
        most_open <= 28.0,
        "{most_open} connections open, table of 24"
    );
    let m = metrics(&kg).await;
    assert!(
        metric_f64(&m, "keygate_connections_limited_total{reason=\"idle\"}") >= 20.0,
        "{m}"
    );
}

/// A fresh user: a client that aborts its requests freed its key slot and upstream permit at
/// once, while the upstream's worker went on (uvicorn, Django and gunicorn do not stop on a
/// closed socket): a key capped at 2 kept 33 requests busy at the upstream by aborting each
/// after 0.3 s. The slots are now held until the upstream answers, whoever left. The upstream
/// here works like those: each request runs in a task of its own to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_requests_hold_their_slots_until_the_upstream_answers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let working = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (w2, m2) = (working.clone(), most.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (w, m) = (w2.clone(), m2.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: hyper::Request<hyper::body::Incoming>| {
                        let (w, m) = (w.clone(), m.clone());
                        // The worker: runs to the end even if the connection goes.
                        let work = tokio::spawn(async move {
                            m.fetch_max(w.fetch_add(1, SeqCst) + 1, SeqCst);
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                            w.fetch_sub(1, SeqCst);
                        });
                        async move {
                            let _ = work.await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(full(
                                Bytes::from("done"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream_url(&url)
        .key("k", &hash, "max_concurrent = 1")
        .admin()
        .start();
    // Abort-and-retry, over HTTP/1.1 (connection closed) and HTTP/2 (stream reset).
    let mut refused = 0;
    for c in [kg.client(), kg.client_h2(), kg.client(), kg.client_h2()] {
        for _ in 0..3 {
            let (url, headers) = (kg.url("/work"), [("x-api-key", token.as_str())]);
            if let Ok(r) =
                tokio::time::timeout(Duration::from_millis(200), c.get(&url, &headers)).await
            {
                assert_eq!(r.status, 429, "only refusals come back this fast");
                refused += 1;
            }
        }
    }
    assert!(refused >= 6, "the slot stayed taken: {refused} refusals");
    assert!(
        most.load(SeqCst) <= 1,
        "{} requests worked at the upstream at once for a key capped at 1",
        most.load(SeqCst)
    );
    // Once the upstream has answered, the slot is back.
    wait_until("the upstream's worker done", || working.load(SeqCst) == 0).await;
    let r = kg
        .client()
        .get(&kg.url("/work"), &[("x-api-key", &token)])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(most.load(SeqCst), 1);
    let m = metrics(&kg).await;
    assert_eq!(
        metric_f64(&m, "keygate_upstream_connections_in_use"),
        0.0,
        "{m}"
    );
}

/// A fresh user: clients that gave up while waiting for an upstream connection (their own
/// timeout, an HTTP/2 reset) kept their place in the wait queue: the queue gauge climbed with
/// nothing waiting, and once it read the limit every request got 503 at once, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_give_up_waiting_leave_the_upstream_queue() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .upstream_line("max_connections = 1")
        .upstream_line("queue_timeout = \"20s\"")
        .key("k", &hash, "max_concurrent = 100")
        .admin()
        .start();
    let holder = {
        let c = kg.client();
        let (url, token) = (kg.url("/slow?ms=3000"), token.clone());
        tokio::spawn(async move { c.get(&url, &[("x-api-key", &token)]).await.status })
    };
    wait_until("the slow request at the upstream", || up.count() == 1).await;
    for c in [kg.client(), kg.client_h2()] {
        for _ in 0..3 {
            let (url, headers) = (kg.url("/"), [("x-api-key", token.as_str())]);
            let get = c.get(&url, &headers);
            assert!(
                tokio::time::timeout(Duration::from_millis(300), get)
                    .await
                    .is_err(),
                "it waits"
            );
        }
    }
    wait_metric(&kg, "keygate_upstream_queue", |v| v == 0.0).await;
    assert_eq!(holder.await.unwrap(), 200);
    let r = kg
        .client()
        .get(&kg.url("/"), &[("x-api-key", &token)])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        metric_f64(&metrics(&kg).await, "keygate_upstream_queue"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_max_concurrent_gets_429_on_h1_and_h2_others_unaffected() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let (other, other_hash) = new_key("other");
    let (solo, solo_hash) = new_key("solo");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("k", &hash, "max_concurrent = 2")
        .key("other", &other_hash, "")
        // A role's max_concurrent applies to each of its keys.
        .raw("[roles.one-at-a-time]\nmax_concurrent = 1")
        .key("solo", &solo_hash, "role = \"one-at-a-time\"")
        .admin()
        .start();
    let c = kg.client();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let c = kg.client();
            let url = kg.url("/slow?ms=3000");
            let token = token.clone();
            tokio::spawn(async move { c.get(&url, &[("x-api-key", &token)]).await.status })
        })
        .collect();
    let solo_slow = {
        let c = kg.client();
        let url = kg.url("/slow?ms=3000");
        let solo = solo.clone();
        tokio::spawn(async move { c.get(&url, &[("x-api-key", &solo)]).await.status })
    };
    wait_until("3 slow requests at the upstream", || up.count() == 3).await;
    let r = kg.client().get(&kg.url("/"), &[("x-api-key", &solo)]).await;
    assert_eq!(r.status, 429, "the role's max_concurrent = 1");
    for client in [c, kg.client_h2()] {
        let r = client.get(&kg.url("/"), &[("x-api-key", &token)]).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["error"], "too many requests");
        assert!(r.json()["request_id"].is_string());
        assert_eq!(r.header("retry-after"), Some("1"));
        let r = client.get(&kg.url("/"), &[("x-api-key", &other)]).await;
        assert_eq!(r.status, 200, "another key is not limited");
    }
    assert_eq!(up.count(), 5, "refused requests never reached the upstream");
    let ev = kg.wait_log("concurrency event", |v| {
        v["event"] == "concurrency_limited" && v["key_id"] == "k"
    });
    assert_eq!(ev["max_concurrent"], 2);
    let m = metrics(&kg).await;
    assert_eq!(
        metric_f64(&m, "keygate_concurrency_limited_total{key_id=\"k\"}"),
        2.0,
        "{m}"
    );
    for s in slow.into_iter().chain([solo_slow]) {
        assert_eq!(s.await.unwrap(), 200);
    }
    // Slots come back when responses end.
    let r = kg
        .client()
        .get(&kg.url("/"), &[("x-api-key", &token)])
        .await;
    assert_eq!(r.status, 200);
    assert_no_secrets(&kg.logs(), &[&token, &other, &solo, &hash]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_capped_with_a_bounded_wait_then_503() {
    let (url, up) = counting_upstream().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream_url(&url)
        .upstream_line("max_connections = 2")
        .upstream_line("queue_timeout = \"20s\"")
        .key("k", &hash, "max_concurrent = 16")
        .admin()
        .start();
    // Eight requests at once through a cap of two: all served, never more than two at the
    // upstream at a time. (The key's own cap is raised: by default it would be a quarter of
    // max_connections.)
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = kg.client();
            let url = kg.url("/slow?ms=200");
            let token = token.clone();
            tokio::spawn(async move { c.get(&url, &[("x-api-key", &token)]).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(up.max_in_flight.load(SeqCst), 2);

    // With the queue bounded in time: 503 JSON once queue_timeout passes.
    let kg2 = Keygate::builder()
        .upstream_url(&url)
        .upstream_line("max_connections = 1")
        .upstream_line("queue_timeout = \"300ms\"")
        .key("k", &hash, "max_concurrent = 16")
        .admin()
        .start();
    let holder = {
        let c = kg2.client();
        let url = kg2.url("/slow?ms=4000");
        let token = token.clone();
        tokio::spawn(async move { c.get(&url, &[("x-api-key", &token)]).await.status })
    };
    wait_until("the slow request at the upstream", || {
        up.in_flight.load(SeqCst) == 1
    })
    .await;
    let r = kg2
        .client()
        .get(&kg2.url("/"), &[("x-api-key", &token)])
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "service unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    let ev = kg2.wait_log("saturation event", |v| v["event"] == "upstream_saturated");
    assert_eq!(ev["reason"], "queue_timeout");
    let m = metrics(&kg2).await;
    assert_eq!(
        metric_f64(
            &m,
            "keygate_upstream_saturated_total{reason=\"queue_timeout\"}"
        ),
        1.0
    );
    assert_eq!(metric_f64(&m, "keygate_upstream_connections_in_use"), 1.0);
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(
        metric_f64(&metrics(&kg2).await, "keygate_upstream_connections_in_use"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_small_upload_reaches_the_upstream_only_when_complete() {
    let (url, up) = counting_upstream().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream_url(&url)
        .server("request_buffer_timeout = \"2s\"")
        .key("k", &hash, "")
        .admin()
        .start();
    let head = |len: usize| {
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    // Half the body, then a pause: the upstream has not been contacted.
    let mut s = kg.tls_from([127, 0, 0, 1]).await.unwrap();
    s.write_all(head(1000).as_bytes()).await.unwrap();
    s.write_all(&[b'a'; 500]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        up.connections.load(SeqCst),
        0,
        "upstream contacted before the body was complete"
    );
    s.write_all(&[b'b'; 500]).await.unwrap();
    let (status, body) = read_response(&mut s).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "1000"));
    assert_eq!(up.connections.load(SeqCst), 1);

    // A body that never completes: 408 at request_buffer_timeout, the upstream never sees it.
    let mut s = kg.tls_from([127, 0, 0, 1]).await.unwrap();
    s.write_all(head(1000).as_bytes()).await.unwrap();
    s.write_all(&[b'a'; 10]).await.unwrap();
    let (status, body) = read_response(&mut s).await.unwrap();
    assert_eq!(status, 408);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "request timeout");
    assert_eq!(up.seen.lock().unwrap().len(), 1);
    kg.wait_log("client timeout event", |v| v["event"] == "client_timeout");
    assert_eq!(
        metric_f64(
            &metrics(&kg).await,
            "keygate_client_timeouts_total{phase=\"request_buffer\"}"
        ),
        1.0
    );

    // A small chunked body is sent on with a Content-Length; a large one streams as before.
    let mut s = kg.tls_from([127, 0, 0, 1]).await.unwrap();
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let (status, body) = exchange(&mut s, &chunked, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "11"));
    let big = vec![b'x'; 300 * 1024];
    let (status, body) = exchange(&mut s, &head(big.len()), &big).await.unwrap();
    assert_eq!((status, body), (200, big.len().to_string()));
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen[1], (Some("11".into()), None, 11), "{seen:?}");
    assert_eq!(seen[2].2, big.len());
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

/// Reads one response (head + Content-Length body) from a kept-alive connection; its status.
async fn read_one<S: AsyncRead + Unpin>(s: &mut S) -> u16 {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("response within 10 s")
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed; got {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    head[9..12].parse().unwrap()
}

/// Issue 9 §3: an HTTP/1.1 connection idle for a second is parked (hyper's buffers freed) and
/// rebuilt when the client sends again. Whatever the client does around it must not notice: a
/// request after the pause, a head sent in two halves across a pause, two pipelined requests,
/// and a request with a body (not parked while its body could still be unread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_idle_connections_keep_serving() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder().upstream(&up).key("k", &hash, "").start();
    let mut s = kg.tls_stream().await;
    let get = format!("GET /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n\r\n");
    let pause = || tokio::time::sleep(Duration::from_millis(1600));

    s.write_all(get.as_bytes()).await.unwrap();
    assert_eq!(read_one(&mut s).await, 200);
    pause().await;
    s.write_all(get.as_bytes()).await.unwrap();
    assert_eq!(read_one(&mut s).await, 200, "after a pause");

    pause().await;
    let (first, second) = get.split_at(20);
    s.write_all(first.as_bytes()).await.unwrap();
    pause().await;
    s.write_all(second.as_bytes()).await.unwrap();
    assert_eq!(read_one(&mut s).await, 200, "head split across a pause");

    pause().await;
    s.write_all(format!("{get}{get}").as_bytes()).await.unwrap();
    assert_eq!(read_one(&mut s).await, 200, "pipelined, first");
    assert_eq!(read_one(&mut s).await, 200, "pipelined, second");

    pause().await;
    let post = format!(
        "POST /b HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nContent-Length: 5\r\n\r\nhello"
    );
    s.write_all(post.as_bytes()).await.unwrap();
    assert_eq!(read_one(&mut s).await, 200, "with a body");
    pause().await;
    s.write_all(get.as_bytes()).await.unwrap();
    assert_eq!(read_one(&mut s).await, 200, "after a request with a body");
    assert_eq!(up.count(), 7);
}

/// A fresh user set `[upstream] max_connections = 8` (the service's worker pool), as the
/// example config advises, and one key with no `max_concurrent` still took all 8 and the wait
/// queue (the default stayed 256). The default is now a quarter of max_connections: 2 here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_per_key_cap_follows_a_lowered_upstream_max_connections() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let (other, other_hash) = new_key("other");
    let kg = Keygate::builder()
        .upstream(&up)
        .upstream_line("max_connections = 8")
        .key("k", &hash, "")
        .key("other", &other_hash, "")
        .start();
    let c = kg.client_h2();
    let url = kg.url("/slow?ms=1500");
    let hdr = [("x-api-key", token.as_str())];
    let statuses = futures_util::future::join_all((0..4).map(|_| c.get(&url, &hdr)))
        .await
        .iter()
        .map(|g| g.status)
        .collect::<Vec<_>>();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
    // Another key has its own two.
    let got = c.get(&kg.url("/"), &[("x-api-key", other.as_str())]).await;
    assert_eq!(got.status, 200);
}
