//! A reload that takes access away applies to connections already open, at their next request
//! (SPEC §3, §8): the operator who denies an attacker's network by SIGHUP does not have to
//! wait for the attacker's connections to go idle.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::reload::reload_with;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Status of `GET /` with `token` (if any) on an open connection, HTTP/1.1 or HTTP/2.
async fn status<S>(send: &mut S, token: Option<&str>) -> u16
where
    S: Sender,
{
    let mut req = http::Request::get(send.uri()).header("host", "localhost");
    if let Some(t) = token {
        req = req.header("x-api-key", t);
    }
    send.send(req.body(Empty::new()).unwrap()).await
}

trait Sender {
    fn uri(&self) -> &'static str;
    async fn send(&mut self, req: http::Request<Empty<Bytes>>) -> u16;
}

impl Sender for hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    fn uri(&self) -> &'static str {
        "/"
    }
    async fn send(&mut self, req: http::Request<Empty<Bytes>>) -> u16 {
        self.ready().await.unwrap();
        let resp = self.send_request(req).await.unwrap();
        let s = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        s
    }
}

impl Sender for hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    fn uri(&self) -> &'static str {
        "https://localhost/"
    }
    async fn send(&mut self, mut req: http::Request<Empty<Bytes>>) -> u16 {
        req.headers_mut().remove("host");
        self.ready().await.unwrap();
        let resp = self.send_request(req).await.unwrap();
        let s = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        s
    }
}

async fn h1_from(
    kg: &Keygate,
    src: [u8; 4],
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tls = kg.tls_from(src).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn h2_from(
    kg: &Keygate,
    src: [u8; 4],
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((src, 0))).unwrap();
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
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A fresh user (T5-12): with no trusted proxies the global rules are applied at accept, and a
/// network denied by a reload kept being served on its open HTTP/1.1 and HTTP/2 connections,
/// with a key or guessing without one, until they went idle (nginx closes them at the reload,
/// and evaluates `deny` per request anyway). Now a request under a newer snapshot than the one
/// that admitted its connection meets the new rules: 403, and nothing is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_denied_by_a_reload_is_refused_on_its_open_connections() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let base = || Keygate::builder().upstream(&up).key("k", &hash, "");
    let kg = base().start();
    let mut h1 = h1_from(&kg, [127, 0, 18, 1]).await;
    let mut h2 = h2_from(&kg, [127, 0, 18, 2]).await;
    let mut guesser = h2_from(&kg, [127, 0, 18, 3]).await;
    let mut other = h1_from(&kg, [127, 0, 19, 1]).await;
    assert_eq!(status(&mut h1, Some(&token)).await, 200);
    assert_eq!(status(&mut h2, Some(&token)).await, 200);
    assert_eq!(status(&mut guesser, None).await, 401);
    assert_eq!(status(&mut other, Some(&token)).await, 200);
    let forwarded = up.count();

    let ev = reload_with(
        &kg,
        &base().access(r#"deny = ["127.0.18.0/24"]"#).config_text(),
    )
    .await;
    assert_eq!(ev["event"], "config_reloaded", "{ev}");
    for _ in 0..2 {
        assert_eq!(status(&mut h1, Some(&token)).await, 403);
        assert_eq!(status(&mut h2, Some(&token)).await, 403);
        assert_eq!(status(&mut guesser, None).await, 403);
    }
    assert_eq!(
        up.count(),
        forwarded,
        "a denied request reached the upstream"
    );
    // Others keep their connections and are served; a new connection from the denied network
    // is closed at accept.
    assert_eq!(status(&mut other, Some(&token)).await, 200);
    assert!(kg.tls_from([127, 0, 18, 4]).await.is_err());
    let ev = kg.wait_log("ip_denied on an open connection", |v| {
        v["event"] == "ip_denied" && v["client_ip"] == "127.0.18.1"
    });
    assert_eq!(ev["scope"], "global", "{ev}");
    assert!(ev["request_id"].is_string(), "{ev}");

    // A reload that lifts the rule lets the same connection through again.
    reload_with(&kg, &base().config_text()).await;
    assert_eq!(status(&mut h1, Some(&token)).await, 200);
    // So does `allow`: narrowing it applies the same way.
    reload_with(
        &kg,
        &base().access(r#"allow = ["127.0.19.0/24"]"#).config_text(),
    )
    .await;
    assert_eq!(status(&mut h1, Some(&token)).await, 403);
    assert_eq!(status(&mut other, Some(&token)).await, 200);
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}
