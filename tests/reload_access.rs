//! A reload that takes access away applies to connections already open, at their next request
//! (SPEC §3, §8): the operator who denies an attacker's network by SIGHUP does not have to
//! wait for the attacker's connections to go idle.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;

use bytes::Bytes;
use common::h2client::h2_from;
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
    let mut h2 = h2_from(&kg, Ipv4Addr::new(127, 0, 18, 2)).await;
    let mut guesser = h2_from(&kg, Ipv4Addr::new(127, 0, 18, 3)).await;
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

/// A client CA (PEM) and a client certificate it issued, with its key.
fn client_pki(
    name: &str,
) -> (
    String,
    rustls_pki_types::CertificateDer<'static>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} client CA"));
    let ca = p.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(p, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut cp = rcgen::CertificateParams::new(vec!["client.example".to_string()]).unwrap();
    cp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = cp.signed_by(&key, &issuer).unwrap();
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    (ca.pem(), cert.der().clone(), der)
}

/// A TLS connection to keygate offering `alpn`, with a client certificate if given.
async fn mtls(
    kg: &Keygate,
    client: Option<&(
        rustls_pki_types::CertificateDer<'static>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(kg.ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(vec![cert.clone()], key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(kg.addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await?;
    // TLS 1.3: a refused client certificate shows at the first read, not in the handshake.
    use tokio::io::AsyncWriteExt;
    tls.flush().await?;
    Ok(tls)
}

/// A fresh user (T5-11): a reload that replaced `[tls] client_ca` (revoking a client CA)
/// left connections whose certificate the old CA had verified served indefinitely, over
/// HTTP/1.1 and HTTP/2 (nginx closes them at the reload). Now such a connection's chain is
/// verified against the new CA bundle before its next request: 403 when it no longer verifies
/// (or when the connection presented none and a certificate is now required); a bundle that
/// still holds the old CA keeps them served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_replaced_by_a_reload_is_enforced_on_open_connections() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let base = || Keygate::builder().upstream(&up).key("k", &hash, "");
    let kg = base().start();
    let (ca1, cert1, key1) = client_pki("one");
    let (ca2, _, _) = client_pki("two");
    std::fs::write(kg.dir.path().join("ca1.pem"), &ca1).unwrap();
    std::fs::write(kg.dir.path().join("ca2.pem"), &ca2).unwrap();
    std::fs::write(kg.dir.path().join("both.pem"), format!("{ca1}{ca2}")).unwrap();
    let with_ca = |file: &str| {
        base().config_text().replace(
            "key = \"key.pem\"\n",
            &format!("key = \"key.pem\"\nclient_ca = \"{file}\"\n"),
        )
    };
    // Opened before client certificates were required.
    let tls = mtls(&kg, None, b"http/1.1").await.unwrap();
    let (mut bare, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(status(&mut bare, Some(&token)).await, 200);

    let ev = reload_with(&kg, &with_ca("ca1.pem")).await;
    assert_eq!(ev["event"], "config_reloaded", "{ev}");
    assert_eq!(status(&mut bare, Some(&token)).await, 403, "no certificate");
    let client = (cert1, key1);
    let tls = mtls(&kg, Some(&client), b"http/1.1").await.unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let tls = mtls(&kg, Some(&client), b"h2").await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    assert_eq!(status(&mut h1, Some(&token)).await, 200);
    assert_eq!(status(&mut h2, Some(&token)).await, 200);

    // A bundle that still holds CA one: served (verified again, once).
    reload_with(&kg, &with_ca("both.pem")).await;
    assert_eq!(status(&mut h1, Some(&token)).await, 200);
    assert_eq!(status(&mut h2, Some(&token)).await, 200);
    // CA one revoked: the open connections are refused, and new ones fail their handshake.
    let forwarded = up.count();
    reload_with(&kg, &with_ca("ca2.pem")).await;
    for _ in 0..2 {
        assert_eq!(status(&mut h1, Some(&token)).await, 403);
        assert_eq!(status(&mut h2, Some(&token)).await, 403);
    }
    assert_eq!(up.count(), forwarded);
    let ev = kg.wait_log("client_cert_refused for a presented certificate", |v| {
        v["event"] == "client_cert_refused" && v["presented"] == true
    });
    assert!(ev["request_id"].is_string(), "{ev}");
    let refused = async {
        let mut tls = mtls(&kg, Some(&client), b"http/1.1").await?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await? {
            0 => Err(std::io::Error::other("closed")),
            _ => Ok(()),
        }
    };
    assert!(
        refused.await.is_err(),
        "a CA-one certificate completed a new connection"
    );
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}
