//! Requests keygate itself cuts get one access line each that says so (README "Logs"), never
//! none and never the client's doing: `cut_by: shutdown` (SIGTERM's drain ran past
//! `shutdown_grace`; before, the process ended and wrote no line at all), `cut_by: reclaimed`
//! (the connection table took the connection while keygate held its request back; before,
//! logged as `cut_by: client`). A request keygate abandons before answering it is logged with
//! nginx's 444 ("connection closed without response"). Real TLS clients, HTTP/1.1 and HTTP/2.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIG: u64 = 256 << 20;

fn get_with_id(kg: &Keygate, path: &str, token: &str, id: &str) -> Request<Body> {
    Request::get(kg.url(path))
        .header("x-api-key", token)
        .header("x-request-id", id)
        .body(empty())
        .unwrap()
}

/// Sends a hand-written HTTP/1.1 GET on a fresh TLS connection.
async fn h1_get(
    kg: &Keygate,
    path: &str,
    token: &str,
    id: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut s = kg.tls_stream().await;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nX-Request-Id: {id}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    s
}

/// The access lines written for `id` (after the process exited: all of them).
fn lines_for(kg: &Keygate, id: &str) -> Vec<serde_json::Value> {
    kg.json_logs()
        .into_iter()
        .filter(|v| v["msg"] == "request" && v["request_id"] == id)
        .collect()
}

/// SIGTERM while two downloads are read slowly (HTTP/1.1 and HTTP/2) and a third request waits
/// for the upstream's answer, with `shutdown_grace = 1s`: at the grace, keygate closes them and
/// exits 0, and each has exactly one access line: the downloads with the 200 they were sending,
/// `completed: false`, `cut_by: shutdown`; the unanswered request 444, `cut_by: shutdown`.
/// Before, the process ended without writing any of the three lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_at_shutdown_grace_are_logged_cut_by_shutdown() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let mut kg = Keygate::builder()
        .upstream(&up)
        .server("shutdown_grace = \"1s\"")
        .key("k", &hash, "")
        .start();
    let path = format!("/bytes?n={BIG}");

    // A slow reader: 256 KiB of the body, then nothing more for now.
    let mut h1 = h1_get(&kg, &path, &token, "grace-h1").await;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 256 * 1024 {
        let n = h1.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    let h2 = kg.client_h2();
    let resp = h2
        .send_raw(get_with_id(&kg, &path, &token, "grace-h2"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0;
    while got < 256 * 1024 {
        got += body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .data_ref()
            .map_or(0, |d| d.len());
    }
    let waiting = h1_get(&kg, "/slow?ms=60000", &token, "grace-wait").await;
    eventually("grace-wait at the upstream", &kg, || {
        up.requests()
            .iter()
            .any(|s| s.header("x-request-id") == Some("grace-wait"))
            .then_some(())
    })
    .await;

    kg.signal("TERM");
    assert_eq!(
        kg.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        kg.logs()
    );
    for id in ["grace-h1", "grace-h2"] {
        let lines = lines_for(&kg, id);
        assert_eq!(lines.len(), 1, "one access line for {id}:\n{}", kg.logs());
        let line = &lines[0];
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["completed"], false, "{line}");
        assert_eq!(line["cut_by"], "shutdown", "{line}");
        let out = line["bytes_out"].as_u64().unwrap();
        assert!((256 * 1024..BIG).contains(&out), "{line}");
    }
    let lines = lines_for(&kg, "grace-wait");
    assert_eq!(lines.len(), 1, "{}", kg.logs());
    assert_eq!(lines[0]["status"], 444, "{}", lines[0]);
    assert_eq!(lines[0]["cut_by"], "shutdown", "{}", lines[0]);
    assert_eq!(lines[0]["key_id"], "k", "{}", lines[0]);
    // Written before the last line: nothing was lost in the flush.
    let logs = kg.json_logs();
    assert_eq!(logs.last().unwrap()["msg"], "stopped", "{}", kg.logs());
    drop((h1, body, waiting));
}

/// A drain that ends within `shutdown_grace` cuts nothing: the download finishes, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_finishing_within_the_grace_is_logged_whole() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let mut kg = Keygate::builder()
        .upstream(&up)
        .server("shutdown_grace = \"20s\"")
        .key("k", &hash, "")
        .start();
    let mut s = h1_get(&kg, "/slow?ms=1000", &token, "in-grace").await;
    eventually("in-grace at the upstream", &kg, || {
        up.requests()
            .iter()
            .any(|s| s.header("x-request-id") == Some("in-grace"))
            .then_some(())
    })
    .await;
    kg.signal("TERM");
    let mut head = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut head)).await;
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(kg.wait_exit(Duration::from_secs(20)), Some(0));
    let lines = lines_for(&kg, "in-grace");
    assert_eq!(lines.len(), 1, "{}", kg.logs());
    assert_eq!(lines[0]["completed"], true, "{}", lines[0]);
    assert!(lines[0]["cut_by"].is_null(), "{}", lines[0]);
}

/// A full connection table reclaims a connection whose request keygate holds back (a
/// throttled client's 429 is held for a second): that request is logged 444,
/// `cut_by: reclaimed`. Before, it was logged 499 `cut_by: client`, as if the client had left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_reclaimed_connection_is_logged_cut_by_reclaimed() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_connections = 2")
        .server("max_connections_per_ip = 1000")
        .auth("failed_auth_limit = \"1/min\"")
        .key("k", &hash, "")
        .start();
    let wrong = "kg_k_wrongwrongwrongwrongwrongwrong1";
    // The guesser's connection, opened first: idle longest once its requests are held back.
    let mut guesser = kg.tls_stream().await;
    // A client with a served request, then idle.
    let mut other = h1_get(&kg, "/", &token, "other").await;
    let mut buf = vec![0u8; 4096];
    assert!(other.read(&mut buf).await.unwrap() > 0);
    // The guesser's first wrong token spends its budget (401); the second is throttled, its
    // 429 held back for a second.
    let send = |id: &str| {
        format!(
            "GET / HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {wrong}\r\nX-Request-Id: {id}\r\n\r\n"
        )
    };
    guesser.write_all(send("guess-1").as_bytes()).await.unwrap();
    let n = guesser.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    guesser
        .write_all(send("guess-held").as_bytes())
        .await
        .unwrap();
    kg.wait_log("the guesser throttled", |v| {
        v["event"] == "auth_throttled" && v["request_id"] == "guess-held"
    });
    // A newcomer: the table is full, and the guesser's connection is the one reclaimed.
    let _newcomer = kg.tls_stream().await;
    let line = kg.access_line("guess-held");
    assert_eq!(line["status"], 444, "{line}");
    assert_eq!(line["completed"], false, "{line}");
    assert_eq!(line["cut_by"], "reclaimed", "{line}");
    // It is closed without an answer.
    let n = tokio::time::timeout(Duration::from_secs(5), guesser.read(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    assert_eq!(
        kg.json_logs()
            .iter()
            .filter(|v| v["msg"] == "request" && v["request_id"] == "guess-held")
            .count(),
        1
    );
}
