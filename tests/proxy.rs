//! The 0.1 proxy end to end: authentication, forwarding, error statuses, logs.

mod common;

use std::time::Duration;

use common::*;
use hyper::Request;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_key_reaches_upstream_without_credentials() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("ci-prod");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("ci-prod", &hash, "")
        .start();
    let c = kg.client();

    let r = c
        .get(
            &kg.url("/v1/docs?x=1"),
            &[
                ("x-api-key", &token),
                ("x-keygate-key-id", "admin"),
                ("X-Keygate-Key-Id", "root"),
                ("x-forwarded-for", "6.6.6.6"),
                ("cookie", "a=b"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "ok");
    let rid = r.header("x-request-id").unwrap().to_string();
    assert_eq!(rid.len(), 32);
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=31536000")
    );

    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.uri, "/v1/docs?x=1");
    assert_eq!(s.header("x-api-key"), None, "credential forwarded");
    assert_eq!(s.header("authorization"), None);
    assert_eq!(
        s.header_all("x-keygate-key-id"),
        vec!["ci-prod"],
        "identity header spoofable"
    );
    assert_eq!(
        s.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "untrusted XFF must not pass"
    );
    assert_eq!(s.header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        s.header("x-forwarded-host"),
        Some(&*format!("localhost:{}", kg.addr.port()))
    );
    assert_eq!(s.header("x-request-id"), Some(&*rid));
    // `[upstream] host = "client"` (default): the authority the client used.
    assert_eq!(
        s.header("host"),
        Some(&*format!("localhost:{}", kg.addr.port()))
    );

    // Bearer works too, and the second use is served from the verified cache.
    let r = c
        .get(
            &kg.url("/"),
            &[
                ("authorization", &format!("Bearer {token}")),
                ("x-request-id", "client-id_1.2"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("client-id_1.2"));
    assert_eq!(up.requests()[1].header("authorization"), None);

    let line = kg.access_line("client-id_1.2");
    assert_eq!(line["key_id"], "ci-prod");
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream_status"], 200);
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert_eq!(line["method"], "GET");
    for f in ["ts", "path", "bytes_in", "bytes_out", "duration_ms"] {
        assert!(!line[f].is_null(), "{f} missing in {line}");
    }
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_401_looks_the_same_and_logs_its_reason() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("alpha");
    let (disabled_token, disabled_hash) = new_key("old");
    let (expired_token, expired_hash) = new_key("gone");
    let (unknown_token, _) = new_key("nobody");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("alpha", &hash, "")
        .key("old", &disabled_hash, "disabled = true")
        .key("gone", &expired_hash, "expires = 2020-01-01T00:00:00Z")
        .start();
    let c = kg.client();
    let mut wrong = token.clone();
    // Same id, different secret, valid checksum: only argon2 can tell.
    let wrong_secret = {
        let other = keygate::auth::NewToken::generate("alpha");
        other.reveal().to_string()
    };
    wrong.pop();
    wrong.push('!');
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("missing", vec![]),
        ("malformed", vec![("x-api-key", "not-a-token".into())]),
        ("malformed", vec![("x-api-key", wrong.clone())]),
        ("unknown_key", vec![("x-api-key", unknown_token.clone())]),
        ("bad_secret", vec![("x-api-key", wrong_secret.clone())]),
        (
            "disabled",
            vec![("authorization", format!("Bearer {disabled_token}"))],
        ),
        ("expired", vec![("x-api-key", expired_token.clone())]),
    ];
    let mut bodies = Vec::new();
    for (reason, headers) in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let r = c.get(&kg.url("/"), &h).await;
        assert_eq!(r.status, 401, "{reason}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        let j = r.json();
        assert_eq!(j["error"], "unauthorized");
        assert_eq!(j["request_id"], r.header("x-request-id").unwrap());
        bodies.push(j["error"].clone());
        let rid = r.header("x-request-id").unwrap().to_string();
        let ev = kg.wait_log(reason, |v| {
            v["event"] == "auth_failed" && v["request_id"] == rid.as_str()
        });
        assert_eq!(ev["reason"], *reason, "{ev}");
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        up.count(),
        0,
        "nothing unauthenticated reached the upstream"
    );
    assert_no_secrets(
        &kg.logs(),
        &[
            &token,
            &disabled_token,
            &expired_token,
            &unknown_token,
            &wrong_secret,
            &hash,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_parameters_are_never_credentials() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("q");
    let kg = Keygate::builder().upstream(&up).key("q", &hash, "").start();
    let r = kg
        .client()
        .get(&kg.url(&format!("/?api_key={token}&token={token}")), &[])
        .await;
    assert_eq!(r.status, 401);
    let line = kg.access_line(r.header("x-request-id").unwrap());
    assert_eq!(line["path"], "/?api_key=REDACTED&token=REDACTED");
    assert_no_secrets(&kg.logs(), &[&token]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limits_413() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("up");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_body_bytes = 100000")
        .key("up", &hash, "")
        .start();
    let c = kg.client();

    // Announced too large: refused before the upstream is contacted.
    let req = Request::post(kg.url("/upload"))
        .header("x-api-key", &token)
        .body(full(vec![0u8; 100_001]))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "request body too large");
    assert_eq!(up.count(), 0);

    // At the limit: passes.
    let req = Request::post(kg.url("/upload"))
        .header("x-api-key", &token)
        .body(full(vec![0u8; 100_000]))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!((r.status, r.text()), (200, "100000".to_string()));

    // Streamed (chunked, no Content-Length) over the limit: cut off, 413, upstream aborted.
    let chunks = futures_util::stream::iter((0..20).map(|_| {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
            bytes::Bytes::from(vec![1u8; 10_000]),
        ))
    }));
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(chunks));
    let req = Request::post(kg.url("/upload"))
        .header("x-api-key", &token)
        .body(body)
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.status, 413);
    let seen = up.requests();
    assert!(
        seen.iter().all(|s| s.body_len <= 100_000),
        "upstream got more than the limit: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_431() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("h");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_header_bytes = 4096")
        .key("h", &hash, "")
        .start();
    let big = "a".repeat(5000);
    let r = kg
        .client()
        .get(&kg.url("/"), &[("x-api-key", &token), ("x-big", &big)])
        .await;
    assert_eq!(r.status, 431);
    assert_eq!(r.json()["error"], "request headers too large");
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_502_and_slow_504_without_detail() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (token, hash) = new_key("u");
    let kg = Keygate::builder()
        .upstream_url(&dead)
        .key("u", &hash, "")
        .start();
    let r = kg
        .client()
        .get(&kg.url("/"), &[("x-api-key", &token)])
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "bad gateway");
    let body = r.text();
    assert!(
        !body.contains("127.0.0.1") && !body.contains("onnect"),
        "{body}"
    );
    let ev = kg.wait_log("upstream error", |v| v["event"] == "upstream_error");
    assert_eq!(ev["kind"], "connect");
    assert!(
        ev["error"].as_str().unwrap().len() > 10,
        "operator gets the detail: {ev}"
    );

    let up = Upstream::start().await;
    let kg = Keygate::builder()
        .upstream(&up)
        .upstream_line("request_timeout = \"300ms\"")
        .key("u", &hash, "")
        .start();
    let r = kg
        .client()
        .get(&kg.url("/slow?ms=3000"), &[("x-api-key", &token)])
        .await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"], "gateway timeout");
    assert!(!r.text().contains(&up.addr.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_streaming_download() {
    let up = Upstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "dl");
    let r = kg
        .client_h2()
        .get(&kg.url("/bytes?n=5000000"), &[("x-api-key", &token)])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.body.len(), 5_000_000);
    let line = kg.access_line(r.header("x-request-id").unwrap());
    assert_eq!(line["bytes_out"], 5_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_hsts_wins_and_hop_by_hop_is_dropped() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("h");
    let kg = Keygate::builder().upstream(&up).key("h", &hash, "").start();
    let r = kg
        .client()
        .get(
            &kg.url("/set-hsts"),
            &[
                ("x-api-key", &token),
                ("connection", "x-secret-hop"),
                ("x-secret-hop", "1"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("strict-transport-security"), Some("max-age=60"));
    let s = &up.requests()[0];
    assert_eq!(s.header("x-secret-hop"), None);
    assert_eq!(s.header("proxy-authorization"), None);
    assert_eq!(s.header("te"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_after_auth() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "ws");

    // Without a key: 401, no upgrade.
    let mut s = kg.tls_stream().await;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 401"));

    let mut s = kg.tls_stream().await;
    s.write_all(format!("GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-API-Key: {token}\r\n\r\n").as_bytes()).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    s.write_all(b"ping over the tunnel").await.unwrap();
    let mut got = Vec::new();
    while got.len() < 20 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&got, b"ping over the tunnel");
    assert_eq!(up.requests()[0].header("x-api-key"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_tls_port_gets_no_service() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let (_, hash) = new_key("p");
    let kg = Keygate::builder().upstream(&up).key("p", &hash, "").start();
    let mut tcp = tokio::net::TcpStream::connect(kg.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).contains("HTTP/1.1 200"));
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_as_a_user_would() {
    let up = Upstream::start().await;
    let (kg, token) = Keygate::with_key(&up.url(), "curl");
    let ca = kg.dir.path().join("cert.pem");
    let ca = ca.to_str().unwrap();
    let url = kg.url("/hello");
    let hdr = format!("X-API-Key: {token}");
    let (code, out, err) = tokio::task::spawn_blocking({
        let (ca, url, hdr) = (ca.to_string(), url.clone(), hdr.clone());
        move || {
            curl(&[
                "-sS",
                "--cacert",
                &ca,
                "-H",
                &hdr,
                "-w",
                "\n%{http_code} %{http_version}",
                &url,
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("ok\n200 2"), "{out}");
    let (code, out, _) = tokio::task::spawn_blocking({
        let (ca, url) = (ca.to_string(), url.clone());
        move || {
            curl(&[
                "-sS",
                "--cacert",
                &ca,
                "--http1.1",
                "-w",
                "\n%{http_code}",
                &url,
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    assert!(
        out.contains("\"error\":\"unauthorized\"") && out.ends_with("401"),
        "{out}"
    );
    // TLS 1.1 is refused outright.
    let (code, _, _) = tokio::task::spawn_blocking({
        let (ca, url) = (ca.to_string(), url.clone());
        move || curl(&["-sS", "--cacert", &ca, "--tls-max", "1.1", &url])
    })
    .await
    .unwrap();
    assert_ne!(code, 0);
    assert_no_secrets(&kg.logs(), &[&token]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("t");
    let mut kg = Keygate::builder()
        .upstream(&up)
        .server("shutdown_grace = \"10s\"")
        .key("t", &hash, "")
        .start();
    let c = kg.client();
    // Warm the cache so the slow request is only slow upstream.
    assert_eq!(
        c.get(&kg.url("/"), &[("x-api-key", &token)]).await.status,
        200
    );
    let url = kg.url("/slow?ms=1500");
    let t = token.clone();
    let inflight = tokio::spawn(async move { c.get(&url, &[("x-api-key", &t)]).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    kg.signal("TERM");
    let r = inflight.await.unwrap();
    assert_eq!(r.status, 200, "in-flight request completes during drain");
    let code = tokio::task::spawn_blocking(move || {
        let c = kg.wait_exit(Duration::from_secs(10));
        (c, kg)
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0));
    // Not accepting any more.
    assert!(tokio::net::TcpStream::connect(code.1.addr).await.is_err());
}

/// Only keygate decides what is logged: a client sending an IP address as SNI (wrk does) made
/// rustls's own `log` output appear once per connection, with build-machine paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_log_noise_stays_out_of_the_log() {
    let up = Upstream::start().await;
    let (_, hash) = new_key("n");
    let kg = Keygate::builder().upstream(&up).key("n", &hash, "").start();
    let addr = kg.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr, "-servername", "127.0.0.1"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed")
    })
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("TLSv1.3"),
        "handshake happened"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = kg.logs();
    assert!(
        !logs.contains("SNI") && !logs.contains("rustls") && !logs.contains(".cargo/registry"),
        "{logs}"
    );
}
