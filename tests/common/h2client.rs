//! HTTP/2 connections of their own (hyper's client over TLS, ALPN h2) from a chosen loopback
//! address, for tests that cancel requests: aborting the task of [`h2_get`] resets its stream.

use std::net::Ipv4Addr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;

use super::Keygate;

/// An HTTP/2 connection over TLS from the loopback address `from`.
pub async fn h2_from(kg: &Keygate, from: Ipv4Addr) -> SendRequest<Empty<Bytes>> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::from((from, 0))).unwrap();
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
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

/// `GET /` with this token on an HTTP/2 connection, as a task: aborting it resets the stream
/// (and, when it held the connection's last handle, closes the connection), and keygate drops
/// the request. Returns the status.
pub fn h2_get(send: &SendRequest<Empty<Bytes>>, token: &str) -> tokio::task::JoinHandle<u16> {
    let mut send = send.clone();
    let req = http::Request::get("https://localhost/")
        .header("x-api-key", token)
        .body(Empty::new())
        .unwrap();
    tokio::spawn(async move {
        send.ready().await.unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    })
}
