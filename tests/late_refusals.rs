//! A response that comes while the client is still uploading is readable by that client. A
//! fresh user found that the 503 after `[upstream] queue_timeout` reset an HTTP/1.1 upload in
//! progress (the client got ECONNRESET, never the JSON) and that curl over HTTP/2 reported no
//! status, while keygate's own early refusals (401, 413, 429) drained the body first. The same
//! kind: every answer given after the body was handed to the forwarding path: 503 (queue
//! timeout), 502 (upstream unreachable), and an upstream that answers without reading the body.
//! Real TLS, a raw HTTP/1.1 client that keeps uploading, and curl over HTTP/2.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Body size announced by the slow uploads (sent 8 KiB every 40 ms: about 2 s in all, within
/// the lingering bound of 1 MiB and 5 s).
const UPLOAD: usize = 400 * 1024;

/// Sends a POST head announcing [`UPLOAD`] bytes and the body slowly, then reads the response,
/// as Python's http.client, requests and httpx (h1) do: a write that fails (the connection was
/// closed or reset under the upload) means the client never reads the response. Returns
/// (status, body) or what the client saw go wrong.
async fn slow_upload(kg: &Keygate, token: &str, path: &str) -> Result<(u16, String), String> {
    upload(kg, token, path, UPLOAD, 8 * 1024, Duration::from_millis(40)).await
}

/// [`slow_upload`] of `size` bytes in chunks of `chunk`, one every `pace`.
async fn upload(
    kg: &Keygate,
    token: &str,
    path: &str,
    size: usize,
    chunk: usize,
    pace: Duration,
) -> Result<(u16, String), String> {
    let mut tls = kg.tls_from([127, 0, 0, 1]).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nContent-Length: {size}\r\n\r\n"
    );
    let run = async {
        tls.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("head: {:?}", e.kind()))?;
        let chunk = vec![b'u'; chunk];
        for i in 0..size / chunk.len() {
            tls.write_all(&chunk)
                .await
                .and(tls.flush().await)
                .map_err(|e| format!("{:?} writing chunk {i}", e.kind()))?;
            tokio::time::sleep(pace).await;
        }
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            match tls.read(&mut byte).await {
                Ok(1) => buf.push(byte[0]),
                Ok(_) => return Err(format!("closed in the head after {buf:?}")),
                Err(e) => return Err(format!("{:?} in the head after {buf:?}", e.kind())),
            }
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let status: u16 = head[9..12].parse().unwrap();
        let mut body = vec![0; content_length(&head)];
        tls.read_exact(&mut body)
            .await
            .map_err(|e| format!("{:?} in the body after {head}", e.kind()))?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("a response within 20 s")
}

/// The same upload with curl over HTTP/2 (`-T` from a file, `--limit-rate`): curl's exit code,
/// the status it printed, and the body.
async fn curl_h2_upload(kg: &Keygate, token: &str, path: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, vec![b'u'; UPLOAD]).unwrap();
    let url = kg.url(path);
    let ca = kg.dir.path().join("cert.pem").to_str().unwrap().to_string();
    let key = format!("X-API-Key: {token}");
    let file = file.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        curl(&[
            "-sS",
            "--http2",
            "--cacert",
            &ca,
            "-H",
            &key,
            "--limit-rate",
            "200k",
            "-T",
            &file,
            "-w",
            "\n%{http_code}",
            "--max-time",
            "20",
            &url,
        ])
    })
    .await
    .unwrap()
}

fn split_curl(out: &str) -> (&str, &str) {
    out.rsplit_once('\n').unwrap_or(("", out))
}

/// The upstream connection cap is taken by a slow request; an upload that waits in line gets
/// the 503 JSON after `queue_timeout`, readable over HTTP/1.1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_timeout_503_reaches_a_client_still_uploading() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .upstream_line("max_connections = 1")
        .upstream_line("queue_timeout = \"300ms\"")
        .key("k", &hash, "max_concurrent = 8")
        .start();
    let holder = {
        let c = kg.client();
        let url = kg.url("/slow?ms=15000");
        let token = token.clone();
        tokio::spawn(async move { c.get(&url, &[("x-api-key", &token)]).await.status })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = slow_upload(&kg, &token, "/upload").await.expect("HTTP/1.1");
    assert_eq!(status, 503, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "service unavailable");
    assert!(json["request_id"].is_string());

    let (code, out, err) = curl_h2_upload(&kg, &token, "/upload").await;
    let (body, status) = split_curl(&out);
    assert_eq!((code, status), (0, "503"), "curl: {err} {out}");
    assert!(body.contains("request_id"), "{body}");
    holder.abort();
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

/// An upstream that cannot be reached while the client uploads: the 502 JSON is readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_reaches_a_client_still_uploading() {
    // A port that was free a moment ago: connections are refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream_url(&format!("http://{closed}"))
        .key("k", &hash, "")
        .start();
    let (status, body) = slow_upload(&kg, &token, "/upload").await.expect("HTTP/1.1");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("request_id"), "{body}");
    // A document of several megabytes (past a refusal's 1 MiB drain): still readable, as the
    // authenticated client's upload is drained for up to 30 s (nginx's lingering_time).
    let big = 6 * 1024 * 1024;
    let (status, body) = upload(
        &kg,
        &token,
        "/upload",
        big,
        64 * 1024,
        Duration::from_millis(5),
    )
    .await
    .expect("HTTP/1.1, 6 MiB");
    assert_eq!(status, 502, "{body}");
    let (code, out, err) = curl_h2_upload(&kg, &token, "/upload").await;
    let (body, status) = split_curl(&out);
    assert_eq!((code, status), (0, "502"), "curl: {err} {out}");
    assert!(body.contains("request_id"), "{body}");
}

/// An upstream that answers at once without reading the upload (a 413 of its own, as an
/// application with a smaller body limit does): the client reads the upstream's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_that_skips_the_body_reaches_a_client_still_uploading() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Reads the head only, answers, and closes (like an application refusing an
                // upload by its Content-Length).
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let body = "{\"detail\":\"too large for this application\"}";
                let resp = format!(
                    "HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
                // Keeps reading (and discarding) so the close is not a reset towards keygate.
                let mut sink = vec![0u8; 64 * 1024];
                while s.read(&mut sink).await.unwrap_or(0) > 0 {}
            });
        }
    });
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream_url(&url)
        .key("k", &hash, "")
        .start();
    let (status, body) = slow_upload(&kg, &token, "/upload").await.expect("HTTP/1.1");
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("too large for this application"), "{body}");
    let (code, out, err) = curl_h2_upload(&kg, &token, "/upload").await;
    let (body, status) = split_curl(&out);
    assert_eq!((code, status), (0, "413"), "curl: {err} {out}");
    assert!(body.contains("too large for this application"), "{body}");
}

/// Sockets of process `pid` connected to `port` on 127.0.0.1 (from /proc: the process's fds
/// and the kernel's TCP table).
fn sockets_to(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9 && f[2].ends_with(&format!(":{port:04X}")) && inodes.contains(f[9])
        })
        .count()
}

/// A second fresh user: after the 504 for an upstream that had stopped reading the body,
/// keygate kept that upstream connection open (blocked writing, and no longer counted by
/// `[upstream] max_connections`) until the upstream read again. Now the abandoned request's
/// connection is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_gets_its_connection_closed_at_the_504() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Reads 20 KB, then nothing for 30 s (a hung worker), keeping the socket open.
                let mut got = 0;
                let mut buf = vec![0u8; 4096];
                while got < 20_000 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream_url(&format!("http://127.0.0.1:{port}"))
        .upstream_line("request_timeout = \"1s\"")
        .key("k", &hash, "")
        .start();
    let (status, body) = upload(
        &kg,
        &token,
        "/upload",
        16 * 1024 * 1024,
        256 * 1024,
        Duration::ZERO,
    )
    .await
    .unwrap_or_else(|e| (0, e));
    // The client reads its 504 (it may also be cut off: the point here is the upstream side).
    assert!(matches!(status, 504 | 0), "{status} {body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sockets_to(kg.pid(), port) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "keygate still holds its connection to the stalled upstream 10 s after the 504"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
