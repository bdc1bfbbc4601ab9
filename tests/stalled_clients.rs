//! Clients that stop taking what keygate sends them give their slots back (fresh user T3-9,
//! T3-18; README "Timeouts"): a response the client takes nothing of for `[server]
//! send_timeout` is aborted (HTTP/1.1: connection closed; HTTP/2: stream reset), an upgraded
//! connection (WebSocket) silent both ways for `[upstream] tunnel_idle_timeout` is closed, and
//! client sockets have TCP keep-alive so vanished peers are found. Readers that are slow but
//! progressing, and tunnels that carry traffic, are left alone.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::python::{PyApp, client};
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS connection (ALPN http/1.1) with a 4 KiB receive buffer, so that what the client does
/// not read waits in keygate's buffers rather than in the client's kernel.
async fn small_window_tls(kg: &Keygate) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(kg.addr).await.unwrap();
    let mut cfg = kg.tls_config();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// Sends `GET path` and reads until the end of the response head; returns what was read.
async fn request_head(
    s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
    token: &str,
) -> Vec<u8> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nx-api-key: {token}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response head");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    got
}

/// An HTTP/2 connection whose streams' receive windows are 64 KiB: a response body the client
/// does not poll stops after that (hyper's client opens the window only as the body is read).
async fn h2_small_window(kg: &Keygate) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tls = kg.tls_stream_alpn(&[b"h2"]).await;
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

fn h2_get(kg: &Keygate, path: &str, token: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(kg.url(path))
        .header("x-api-key", token)
        .body(Empty::new())
        .unwrap()
}

/// Asks as the key with one slot until it is served (the slot was given back); panics after
/// `within`.
async fn slot_comes_back(kg: &Keygate, token: &str, within: Duration) -> Duration {
    let start = Instant::now();
    let client = kg.client();
    loop {
        let got = client.get(&kg.url("/"), &[("x-api-key", token)]).await;
        if got.status == 200 {
            return start.elapsed();
        }
        assert_eq!(got.status, 429, "{}", got.text());
        assert!(
            start.elapsed() < within,
            "the key's only slot is still held by a client that reads nothing:\n{}",
            kg.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn stalled_keygate(up: &Upstream, hash: &str) -> Keygate {
    Keygate::builder()
        .upstream(up)
        .server("send_timeout = \"2s\"")
        .key("k", hash, "max_concurrent = 1")
        .start()
}

/// T3-18 over HTTP/1.1: the client reads the head of a 64 MiB response, then nothing. After
/// `send_timeout` (2 s) keygate closes the connection: the key's only slot serves the next
/// request, the event is a client timeout (not an upstream error), and the client finds its
/// stream cut short. On the old code the slot stayed held (429 for as long as the client sat).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_stops_reading_is_cut_after_send_timeout() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = stalled_keygate(&up, &hash);
    let mut s = small_window_tls(&kg).await;
    let head = request_head(&mut s, &format!("/bytes?n={}", 64 << 20), &token).await;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let request_id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("x-request-id")
        .trim()
        .to_string();

    let waited = slot_comes_back(&kg, &token, Duration::from_secs(20)).await;
    assert!(
        waited >= Duration::from_secs(1),
        "cut before send_timeout: {waited:?}"
    );
    let ev = kg.wait_log("send timeout", |v| {
        v["event"] == "client_timeout" && v["phase"] == "send"
    });
    assert_eq!(ev["protocol"], "HTTP/1.1", "{ev}");
    assert!(kg.events("upstream_error").is_empty(), "{}", kg.logs());
    // The event names the response it cut, whose access line says it was cut.
    assert_eq!(ev["request_id"], request_id.as_str(), "{ev}");
    let line = kg.access_line(&request_id);
    assert_eq!(line["completed"], false, "{line}");
    assert_eq!(line["cut_by"], "send_timeout", "{line}");

    // What the client finds when it reads again: the rest of what was in flight, then the end.
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("the connection was not closed");
    assert!(total < 32 << 20, "{total} bytes: the response was not cut");
}

/// T3-18 over HTTP/2: the stream's window stays shut after 64 KiB. After `send_timeout` the
/// stream is reset (the slot serves the next request) but the connection goes on: another
/// stream on it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_whose_window_stays_shut_is_reset_after_send_timeout() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = stalled_keygate(&up, &hash);
    let mut h2 = h2_small_window(&kg).await;
    let resp = h2
        .send_request(h2_get(&kg, &format!("/bytes?n={}", 64 << 20), &token))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();

    let waited = slot_comes_back(&kg, &token, Duration::from_secs(20)).await;
    assert!(
        waited >= Duration::from_secs(1),
        "cut before send_timeout: {waited:?}"
    );
    let ev = kg.wait_log("send timeout", |v| {
        v["event"] == "client_timeout" && v["phase"] == "send"
    });
    assert_eq!(ev["protocol"], "HTTP/2", "{ev}");
    assert!(kg.events("upstream_error").is_empty(), "{}", kg.logs());
    assert_eq!(ev["request_id"], request_id.as_str(), "{ev}");
    let line = kg.access_line(&request_id);
    assert_eq!(line["completed"], false, "{line}");
    assert_eq!(line["cut_by"], "send_timeout", "{line}");

    // The stalled stream was reset: reading it now ends in an error, well short of 64 MiB.
    let mut body = resp.into_body();
    let mut total = 0usize;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match body.frame().await {
                Some(Ok(f)) => total += f.data_ref().map_or(0, |d| d.len()),
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the stalled stream was not reset");
    assert!(
        ended.is_some(),
        "the stream ended cleanly after {total} bytes"
    );
    assert!(total < 1 << 20, "{total} bytes");
    // The connection itself is fine.
    h2.ready().await.unwrap();
    let again = h2.send_request(h2_get(&kg, "/", &token)).await.unwrap();
    assert_eq!(again.status(), 200);
}

/// Slow readers that make progress are never cut: 1 MiB taken in small bites, several of them
/// per `send_timeout`, over HTTP/1.1 and HTTP/2, arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_but_progressing_readers_are_not_cut() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("send_timeout = \"2s\"")
        .key("k", &hash, "")
        .start();
    const N: usize = 1 << 20;
    let path = format!("/bytes?n={N}");

    let h1 = async {
        let mut s = small_window_tls(&kg).await;
        let head = request_head(&mut s, &path, &token).await;
        let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let mut total = head.len() - end;
        let mut buf = vec![0u8; 32 * 1024];
        while total < N {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "HTTP/1.1 reader cut after {total} bytes:\n{}",
                kg.logs()
            );
            total += n;
        }
        assert_eq!(total, N);
    };
    let h2 = async {
        let mut h2 = h2_small_window(&kg).await;
        let resp = h2.send_request(h2_get(&kg, &path, &token)).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut total = 0;
        while let Some(f) = body.frame().await {
            let f = f.unwrap_or_else(|e| panic!("HTTP/2 reader cut after {total} bytes: {e}"));
            total += f.data_ref().map_or(0, |d| d.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(total, N);
    };
    tokio::join!(h1, h2);
    assert!(kg.events("client_timeout").is_empty(), "{}", kg.logs());
}

/// T3-9: a real WebSocket stack (uvicorn's echo, the Python websockets client, no pings) with
/// `tunnel_idle_timeout = "2s"`. A session that echoes a message every 0.6 s for 4.8 s stays
/// open; one that goes silent is closed by keygate after about 2 s (on the old code it stayed
/// open for the client's whole 12 s wait), logged as `client_timeout` `tunnel_idle`, and the
/// key's only slot serves again.
#[test]
fn a_silent_websocket_is_closed_after_tunnel_idle_timeout_and_a_busy_one_is_not() {
    let app = PyApp::uvicorn();
    let (token, hash) = new_key("ws");
    let kg = Keygate::builder()
        .upstream_url(&app.url())
        .upstream_line("tunnel_idle_timeout = \"2s\"")
        .key("ws", &hash, "max_concurrent = 1")
        .start();
    let ca = kg.dir.path().join("cert.pem");
    let url = format!("wss://localhost:{}/ws", kg.addr.port());
    let hdr = format!("x-api-key: {token}");

    let busy = client(
        &ca,
        "ws-echo",
        &url,
        &["-H", &hdr, "--messages", "8", "--pause-ms", "600"],
    );
    assert_eq!(busy["echoed"], 8, "{busy}");
    assert_eq!(busy["text"], "bye", "{busy}");

    let silent = client(
        &ca,
        "ws-echo",
        &url,
        &["-H", &hdr, "--messages", "1", "--idle-s", "12"],
    );
    assert_eq!(silent["echoed"], 1, "{silent}");
    let after = silent["closed_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("the silent tunnel was not closed: {silent}"));
    assert!((1.5..10.0).contains(&after), "closed after {after} s");
    let ev = kg.wait_log("tunnel idle", |v| {
        v["event"] == "client_timeout" && v["phase"] == "tunnel_idle"
    });
    assert_eq!(ev["key_id"], "ws", "{ev}");
    assert_eq!(kg.events("client_timeout").len(), 1, "{}", kg.logs());
    // The sessions' access lines: the busy one whole, the silent one cut by keygate.
    let silent_line = kg.wait_log("the silent session's access line", |v| {
        v["msg"] == "request" && v["status"] == 101 && v["request_id"] == ev["request_id"]
    });
    assert_eq!(silent_line["completed"], false, "{silent_line}");
    assert_eq!(silent_line["cut_by"], "tunnel_idle", "{silent_line}");
    let busy_line = kg.wait_log("the busy session's access line", |v| {
        v["msg"] == "request" && v["status"] == 101 && v["request_id"] != ev["request_id"]
    });
    assert_eq!(busy_line["completed"], true, "{busy_line}");

    let (code, out, err) = curl(&[
        "-sS",
        "--cacert",
        ca.to_str().unwrap(),
        "-H",
        &hdr,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &kg.url("/echo"),
    ]);
    assert_eq!((code, out.as_str()), (0, "200"), "{err}");
    assert_no_secrets(&kg.logs(), &[&token]);
}

/// The kernel's view of keygate's side of a connection (`/proc/net/tcp`): its timer field
/// (`tr:when`) for the socket whose local port is keygate's and remote port is `client_port`.
fn server_socket_timer(server_port: u16, client_port: u16) -> Option<String> {
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let table = std::fs::read_to_string(file).unwrap_or_default();
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).ok();
            if f.len() > 5 && port(f[1]) == Some(server_port) && port(f[2]) == Some(client_port) {
                return Some(f[5].to_string());
            }
        }
    }
    None
}

/// T3-9: accepted client sockets have TCP keep-alive (the kernel's keep-alive timer runs on
/// keygate's side of an idle connection, first probe within 60 s), so a client that vanished
/// without a FIN is found even when keygate has nothing to send it. The old code set none
/// (timer field `00`).
#[tokio::test]
async fn client_sockets_have_tcp_keepalive() {
    let up = Upstream::start().await;
    let (kg, _token) = Keygate::with_key(&up.url(), "k");
    let s = kg.tls_stream().await;
    let client_port = s.get_ref().0.local_addr().unwrap().port();
    let deadline = Instant::now() + Duration::from_secs(10);
    let timer = loop {
        let timer = server_socket_timer(kg.addr.port(), client_port);
        // `02`: keep-alive timer; `01` would be a retransmission still pending.
        if timer.as_deref().is_some_and(|t| t.starts_with("02:")) || Instant::now() > deadline {
            break timer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let timer = timer.expect("keygate's socket not found in /proc/net/tcp");
    assert!(
        timer.starts_with("02:"),
        "no keep-alive timer on keygate's socket: {timer}"
    );
    // When the first probe is due, in clock ticks (USER_HZ, 100 per second): at most 60 s.
    let when = u64::from_str_radix(&timer[3..], 16).unwrap();
    assert!(when <= 60 * 100, "first keep-alive probe in {when} ticks");
    drop(s);
}

/// T3-9, the other way a tunnel stops moving: the client keeps sending but reads nothing back
/// from an echoing upstream. Once every buffer on the way is full nothing moves either way, and
/// `tunnel_idle_timeout` closes the tunnel (on the old code it stayed open, holding the slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_client_reads_nothing_back_is_closed_too() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .upstream_line("tunnel_idle_timeout = \"2s\"")
        .key("k", &hash, "max_concurrent = 1")
        .start();
    let mut s = small_window_tls(&kg).await;
    let head = format!(
        "GET /ws HTTP/1.1\r\nhost: localhost\r\nx-api-key: {token}\r\nconnection: upgrade\r\n\
         upgrade: websocket\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // Write until the writes block (every buffer full), without reading the echo.
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    while let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(3), s.write_all(&chunk)).await {
        sent += chunk.len();
        assert!(
            sent < 1 << 30,
            "a GiB went through without the client reading"
        );
    }
    let waited = slot_comes_back(&kg, &token, Duration::from_secs(20)).await;
    assert!(waited < Duration::from_secs(20));
    let ev = kg.wait_log("tunnel idle", |v| {
        v["event"] == "client_timeout" && v["phase"] == "tunnel_idle"
    });
    assert_eq!(ev["key_id"], "k", "{ev}");
}
