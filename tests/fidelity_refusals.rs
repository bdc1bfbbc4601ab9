//! Refusals, logs and leaks on the less travelled paths (issue 8 §6).

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt as _;
use hyper::Request;

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

/// curl uploading `len` bytes from stdin (so no Content-Length: chunked on HTTP/1.1, DATA frames
/// without a length on HTTP/2); returns (exit code, stdout, stderr).
fn curl_stream_upload(kg: &Keygate, token: &str, proto: &str, len: usize) -> (i32, String, String) {
    let ca = kg.dir.path().join("cert.pem");
    let mut child = Command::new("curl")
        .args(["-sS", proto, "--cacert", ca.to_str().unwrap()])
        .args(["-H", &format!("x-api-key: {token}")])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(["-T", "-", &kg.url("/upload")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'u'; 16 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            if stdin.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n;
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    captured(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_upload_over_the_limit_gets_the_413_on_both_protocols() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("big");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_body_bytes = 100000")
        .key("big", &hash, "")
        .start();
    for (proto, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (code, out, err) = curl_stream_upload(&kg, &token, proto, 1 << 20);
        assert_eq!(code, 0, "{proto}: curl failed: {err}\n{out}");
        let (body, tail) = out.rsplit_once('\n').unwrap();
        assert_eq!(tail, format!("413 {version}"), "{proto}: {out}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{out}"));
        assert_eq!(v["error"], "request body too large");
    }
    // The rustls/hyper HTTP/2 client, body streamed without a length, 4 MiB: past what keygate
    // reads and discards after refusing (1 MiB), so the stream is reset, after the complete
    // response and with NO_ERROR (RFC 9113 §8.1), which hyper, like any client, must accept.
    let chunks =
        futures_util::stream::iter((0..256).map(|_| {
            Ok::<_, BoxErr>(hyper::body::Frame::data(Bytes::from(vec![b'h'; 16 * 1024])))
        }));
    let req = Request::post(kg.url("/upload"))
        .header("x-api-key", &token)
        .body(http_body_util::StreamBody::new(chunks).boxed())
        .unwrap();
    let r = kg.client_h2().send(req).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "request body too large");
    assert!(up.requests().iter().all(|s| s.body_len <= 100_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_is_logged_when_it_closes_with_its_bytes_and_duration() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "ws");
    let mut s = kg.tls_stream().await;
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nx-api-key: {token}\r\nx-request-id: ws-1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
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
    // 3 rounds of 10 000 bytes through the echoing upstream, 400 ms apart.
    let started = std::time::Instant::now();
    for round in 0..3u8 {
        let msg = vec![b'0' + round; 10_000];
        s.write_all(&msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    // Still open: no access line yet (it would carry neither the bytes nor the duration).
    assert!(
        !kg.json_logs()
            .iter()
            .any(|v| v["msg"] == "request" && v["request_id"] == "ws-1"),
        "access line written before the tunnel closed:\n{}",
        kg.logs()
    );
    s.shutdown().await.unwrap();
    drop(s);
    let line = kg.access_line("ws-1");
    let open_for = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["bytes_in"], 30_000, "{line}");
    assert_eq!(line["bytes_out"], 30_000, "{line}");
    let ms = line["duration_ms"].as_f64().unwrap();
    assert!(
        ms >= 1200.0,
        "duration {ms} ms, open for {open_for} ms: {line}"
    );
    assert_no_secrets(&kg.logs(), &[&token]);
}
