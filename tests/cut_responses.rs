//! Access lines of responses that end before their body does (README "Logs"): `status` is what
//! was sent and `bytes_out` what went out, so a 200 cut short looked like a small whole one
//! (fresh user, session 5). Every access line now says `completed`, and a cut one `cut_by`:
//! `client` (closed the connection, or reset the HTTP/2 stream), `send_timeout` (keygate cut
//! a client that took nothing: `tests/stalled_clients.rs`), `upstream` (its body failed
//! mid-stream). Over HTTP/1.1 and HTTP/2, with real TLS clients and a real upstream.

mod common;

use common::*;
use http_body_util::BodyExt;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIG: u64 = 64 << 20;

fn get_with_id(kg: &Keygate, path: &str, token: &str, id: &str) -> Request<Body> {
    Request::get(kg.url(path))
        .header("x-api-key", token)
        .header("x-request-id", id)
        .body(empty())
        .unwrap()
}

fn assert_cut(line: &serde_json::Value, by: &str) {
    assert_eq!(line["completed"], false, "{line}");
    assert_eq!(line["cut_by"], by, "{line}");
    assert_eq!(line["status"], 200, "status is what was sent: {line}");
    let out = line["bytes_out"].as_u64().unwrap();
    assert!(out < BIG, "{line}");
}

/// Whole responses say `completed: true` and `cut_by: null`: a body, one with no content
/// (HEAD, over HTTP/1.1 and HTTP/2), keygate's own refusal, and a WebSocket tunnel closed by
/// its client (its normal end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_responses_are_logged_completed() {
    let up = Upstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "k");
    let (h1, h2) = (kg.client(), kg.client_h2());
    let mut ids = Vec::new();
    for (c, proto) in [(&h1, "h1"), (&h2, "h2")] {
        let id = format!("whole-get-{proto}");
        let r = c
            .send(get_with_id(&kg, "/bytes?n=300000", &token, &id))
            .await;
        assert_eq!((r.status, r.body.len()), (200, 300_000));
        ids.push(id);
        let id = format!("whole-head-{proto}");
        let mut req = get_with_id(&kg, "/bytes?n=300000", &token, &id);
        *req.method_mut() = http::Method::HEAD;
        assert_eq!(c.send(req).await.status, 200);
        ids.push(id);
        let id = format!("whole-refused-{proto}");
        let r = c.send(get_with_id(&kg, "/", "kg_k_nope", &id)).await;
        assert_eq!(r.status, 401);
        ids.push(id);
    }
    let mut tunnel = kg.open_tunnel("/ws", &token).await.expect("tunnel");
    echo(&mut tunnel, b"hello").await;
    tunnel.shutdown().await.unwrap();
    drop(tunnel);
    for id in &ids {
        let line = kg.access_line(id);
        assert_eq!(line["completed"], true, "{line}");
        assert!(line["cut_by"].is_null(), "{line}");
    }
    let line = kg.wait_log("tunnel access line", |v| {
        v["msg"] == "request" && v["status"] == 101
    });
    assert_eq!(line["completed"], true, "{line}");
}

/// A client that leaves mid-body: over HTTP/1.1 it closes the connection after the head and
/// some of the body; over HTTP/2 it drops the response (hyper's client resets the stream,
/// `RST_STREAM CANCEL`) while the connection stays. Before, both were logged as 200s with
/// nothing to tell them from a whole response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_body_is_logged_cut_by_the_client() {
    let up = Upstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "k");
    let path = format!("/bytes?n={BIG}");

    let mut s = kg.tls_stream().await;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nX-Request-Id: left-h1\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < 256 * 1024 {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    drop(s);
    assert_cut(&kg.access_line("left-h1"), "client");

    let h2 = kg.client_h2();
    let resp = h2
        .send_raw(get_with_id(&kg, &path, &token, "left-h2"))
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
    drop(body);
    assert_cut(&kg.access_line("left-h2"), "client");
    // The connection goes on, and its next response is whole.
    let r = h2.send(get_with_id(&kg, "/", &token, "after-h2")).await;
    assert_eq!(r.status, 200);
    assert_eq!(kg.access_line("after-h2")["completed"], true);
    assert!(kg.events("client_timeout").is_empty(), "{}", kg.logs());
}

/// The upstream's body fails after 256 KiB of 1 MiB: the client's stream is aborted (it must
/// not take the truncated body for a whole one) and the access line says `cut_by: upstream`;
/// the warning about it carries the request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failing_mid_body_is_logged_cut_by_the_upstream() {
    let up = Upstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "k");
    for (c, id) in [(kg.client(), "upcut-h1"), (kg.client_h2(), "upcut-h2")] {
        let resp = c
            .send_raw(get_with_id(&kg, "/bytes?n=1048576&cut=262144", &token, id))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let read = resp.into_body().collect().await;
        assert!(read.is_err(), "{id}: the client saw a whole body");
        let line = kg.access_line(id);
        assert_cut(&line, "upstream");
        assert_eq!(line["upstream_status"], 200, "{line}");
        let warn = kg.wait_log("mid-body warning", |v| {
            v["request_id"] == id && v["msg"] == "upstream response body failed mid-stream"
        });
        assert_eq!(warn["level"], "WARN", "{warn}");
    }
}

/// A client that leaves before keygate answers (it closes the connection, HTTP/1.1, or resets
/// the stream, HTTP/2, while the upstream is still working on the request): the request used
/// to leave no access line at all. It is logged with nginx's 499, `completed: false`,
/// `cut_by: client`, with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_the_answer_is_logged_499() {
    let up = Upstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "k");
    let at_upstream = |id: &str| {
        let id = id.to_string();
        let up = &up;
        move || {
            up.requests()
                .iter()
                .any(|s| s.header("x-request-id") == Some(id.as_str()))
                .then_some(())
        }
    };

    let mut s = kg.tls_stream().await;
    s.write_all(
        format!("GET /slow?ms=3000 HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nX-Request-Id: gone-h1\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    eventually("gone-h1 at the upstream", &kg, at_upstream("gone-h1")).await;
    drop(s);

    let h2 = kg.client_h2();
    let waiting = {
        let (h2, req) = (
            h2.clone(),
            get_with_id(&kg, "/slow?ms=3000", &token, "gone-h2"),
        );
        tokio::spawn(async move { h2.send_raw(req).await.map(|r| r.status()) })
    };
    eventually("gone-h2 at the upstream", &kg, at_upstream("gone-h2")).await;
    waiting.abort();

    for id in ["gone-h1", "gone-h2"] {
        let line = kg.access_line(id);
        assert_eq!(line["status"], 499, "{line}");
        assert_eq!(line["completed"], false, "{line}");
        assert_eq!(line["cut_by"], "client", "{line}");
        assert_eq!(line["key_id"], "k", "{line}");
        assert_eq!(line["bytes_out"], 0, "{line}");
    }
    // Answered requests are logged once, with their own status.
    let r = h2.send(get_with_id(&kg, "/", &token, "answered")).await;
    assert_eq!(r.status, 200);
    assert_eq!(kg.access_line("answered")["status"], 200);
    let lines = kg.json_logs();
    assert_eq!(
        lines.iter().filter(|v| v["msg"] == "request").count(),
        3,
        "{}",
        kg.logs()
    );
}
