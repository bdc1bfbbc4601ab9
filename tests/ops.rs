//! Operations (issue 4, SPEC §6 and §8): SIGHUP reload of keys and certificates, failed
//! reloads, restart-only settings, graceful stop, systemd notifications, the admin listener,
//! the state file and `keygate keys`. Every test runs the real binary.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use hyper::Request;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The `auth_failed` event of a request.
async fn auth_failure(kg: &Keygate, r: &Got) -> serde_json::Value {
    let rid = r.header("x-request-id").unwrap().to_string();
    eventually("auth_failed event", kg, || {
        kg.events("auth_failed")
            .into_iter()
            .find(|v| v["request_id"] == rid.as_str())
    })
    .await
}

/// A self-signed certificate for localhost valid until `not_after` (midnight UTC of that day).
fn cert_until(date: jiff::civil::Date) -> (String, String, CertificateDer<'static>) {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params.not_after =
        rcgen::date_time_ymd(i32::from(date.year()), date.month() as u8, date.day() as u8);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

fn unix(date: jiff::civil::Date) -> i64 {
    date.to_zoned(jiff::tz::TimeZone::UTC)
        .unwrap()
        .timestamp()
        .as_second()
}

fn toml_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn days(n: i64) -> jiff::SignedDuration {
    jiff::SignedDuration::from_hours(24 * n)
}

/// One HTTP/1.1 keep-alive connection over TLS, trusting `roots`; remembers which certificate
/// the server presented in its handshake.
struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Body>,
    peer_cert: CertificateDer<'static>,
}

impl KeepAlive {
    async fn open(addr: SocketAddr, roots: &[&CertificateDer<'static>]) -> KeepAlive {
        let tls = tls_stream(addr, roots).await;
        let peer_cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        KeepAlive { sender, peer_cert }
    }

    async fn get(&mut self, path: &str, token: &str) -> u16 {
        let req = Request::get(path)
            .header("host", "localhost")
            .header("x-api-key", token)
            .body(empty())
            .unwrap();
        // The previous response may be fully read while the connection task has not yet
        // returned to idle; sending before it is ready fails with "connection was not ready".
        // A connection keygate closed fails here instead, as it should.
        self.sender
            .ready()
            .await
            .unwrap_or_else(|e| panic!("kept-alive connection closed before {path}: {e:?}"));
        let resp = self
            .sender
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("request on kept-alive connection {path}: {e:?}"));
        let status = resp.status().as_u16();
        resp.into_body().collect().await.unwrap();
        status
    }
}

async fn tls_stream(
    addr: SocketAddr,
    roots: &[&CertificateDer<'static>],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

async fn metrics(kg: &Keygate) -> String {
    let (status, ctype, body) = admin_parts(kg, "/metrics").await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    body
}

// ---------------------------------------------------------------------------------------------
// Reload: keys
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_removes_and_disables_keys_at_once() {
    let up = Upstream::start().await;
    let (alpha, alpha_hash) = new_key("alpha");
    let (beta, beta_hash) = new_key("beta");
    let base = || Keygate::builder().upstream(&up);
    let kg = base().key("alpha", &alpha_hash, "").start();
    let (pid, addr) = (kg.pid(), kg.addr);
    let c = kg.client();
    let get = |token: &str| {
        let url = kg.url("/");
        let token = token.to_string();
        let c = &c;
        async move { c.get(&url, &[("x-api-key", &token)]).await }
    };

    assert_eq!(get(&alpha).await.status, 200);
    assert_eq!(get(&beta).await.status, 401);

    // Add beta: it works on the next request, no restart.
    let ev = reload_with(
        &kg,
        &base()
            .key("alpha", &alpha_hash, "")
            .key("beta", &beta_hash, "")
            .config_text(),
    )
    .await;
    assert_eq!(ev["event"], "config_reloaded", "{ev}");
    assert_eq!(ev["keys"], 2);
    assert_eq!(get(&beta).await.status, 200);
    assert_eq!(
        get(&alpha).await.status,
        200,
        "alpha is in the verified cache"
    );

    // Remove alpha: refused at once although its token was verified and cached.
    reload_with(&kg, &base().key("beta", &beta_hash, "").config_text()).await;
    let r = get(&alpha).await;
    assert_eq!(r.status, 401);
    assert_eq!(auth_failure(&kg, &r).await["reason"], "unknown_key");
    assert_eq!(get(&beta).await.status, 200);

    // Disable beta (cached too): refused at once, logged as disabled.
    reload_with(
        &kg,
        &base()
            .key("alpha", &alpha_hash, "")
            .key("beta", &beta_hash, "disabled = true")
            .config_text(),
    )
    .await;
    let r = get(&beta).await;
    assert_eq!(r.status, 401);
    assert_eq!(auth_failure(&kg, &r).await["reason"], "disabled");
    assert_eq!(
        get(&alpha).await.status,
        200,
        "re-added alpha verifies again"
    );

    // Same process, same listener, throughout.
    assert_eq!((kg.pid(), kg.addr), (pid, addr));
    assert_eq!(kg.events("config_reloaded").len(), 3);
    assert_no_secrets(&kg.logs(), &[&alpha, &beta, &alpha_hash, &beta_hash]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_replacing_a_keys_hash_switches_tokens_at_once() {
    let up = Upstream::start().await;
    let (old, old_hash) = new_key("ci");
    let (new, new_hash) = new_key("ci");
    let base = || Keygate::builder().upstream(&up);
    let kg = base().key("ci", &old_hash, "").start();
    let c = kg.client();
    let get = |token: &str| {
        let (c, url, token) = (&c, kg.url("/"), token.to_string());
        async move { c.get(&url, &[("x-api-key", &token)]).await }
    };
    assert_eq!(get(&old).await.status, 200);
    // The client tries its new token a little early: wrong secret for the loaded hash.
    let r = get(&new).await;
    assert_eq!(r.status, 401);
    assert_eq!(auth_failure(&kg, &r).await["reason"], "bad_secret");

    reload_with(&kg, &base().key("ci", &new_hash, "").config_text()).await;
    // The new token works at once (its earlier failure is not held against it)…
    assert_eq!(get(&new).await.status, 200);
    // …and the old one, although verified and cached before, does not.
    let r = get(&old).await;
    assert_eq!(r.status, 401);
    assert_eq!(auth_failure(&kg, &r).await["reason"], "bad_secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_rate_limit_state_of_keys_whose_quota_is_unchanged() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("metered");
    let (_, other_hash) = new_key("other");
    let base = || Keygate::builder().upstream(&up);
    let kg = base()
        .key("metered", &hash, "rate_limit = \"1/min\"\nburst = 2")
        .start();
    let c = kg.client();
    let (url, hdr) = (kg.url("/"), [("x-api-key", token.as_str())]);
    let get = || c.get(&url, &hdr);

    assert_eq!(get().await.status, 200);
    assert_eq!(get().await.status, 200);
    let r = get().await;
    assert_eq!(r.status, 429, "burst of 2 used up");

    // Same quota, another key added: the bucket is carried over, still empty.
    reload_with(
        &kg,
        &base()
            .key("metered", &hash, "rate_limit = \"1/min\"\nburst = 2")
            .key("other", &other_hash, "")
            .config_text(),
    )
    .await;
    let r = get().await;
    assert_eq!(r.status, 429, "a reload must not refill the bucket");
    assert!(r.header("retry-after").is_some());

    // A changed quota starts a fresh bucket.
    reload_with(
        &kg,
        &base()
            .key("metered", &hash, "rate_limit = \"1/min\"\nburst = 3")
            .config_text(),
    )
    .await;
    let r = get().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit-limit"), Some("3"));
    assert_eq!(r.header("ratelimit-remaining"), Some("2"));
}

// ---------------------------------------------------------------------------------------------
// Reload: certificate
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_certificate_for_new_handshakes_only() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("alpha");
    let kg = Keygate::builder()
        .upstream(&up)
        .admin()
        .key("alpha", &hash, "")
        .start();
    let old_cert = kg.ca.clone();
    let next = jiff::civil::date(2031, 1, 31);
    let (new_pem, new_key_pem, new_cert) = cert_until(next);
    let roots = [&old_cert, &new_cert];

    let mut before = KeepAlive::open(kg.addr, &roots).await;
    assert_eq!(before.peer_cert, old_cert);
    assert_eq!(before.get("/", &token).await, 200);
    let m = metrics(&kg).await;
    assert_eq!(
        metric_f64(&m, "keygate_certificate_not_after_seconds"),
        unix(jiff::civil::date(4096, 1, 1)) as f64,
        "rcgen's default validity"
    );

    std::fs::write(kg.dir.path().join("cert.pem"), &new_pem).unwrap();
    std::fs::write(kg.dir.path().join("key.pem"), &new_key_pem).unwrap();
    let ev = reload(&kg).await;
    assert_eq!(ev["event"], "config_reloaded", "{ev}");

    // A new handshake gets the new certificate…
    let mut after = KeepAlive::open(kg.addr, &roots).await;
    assert_eq!(after.peer_cert, new_cert);
    assert_eq!(after.get("/", &token).await, 200);
    // …while the connection opened before the reload keeps serving.
    for _ in 0..3 {
        assert_eq!(before.get("/", &token).await, 200);
    }
    let m = metrics(&kg).await;
    assert_eq!(
        metric_f64(&m, "keygate_certificate_not_after_seconds"),
        unix(next) as f64
    );
    assert!(kg.events("cert_expiring").is_empty());
    assert_no_secrets(
        &kg.logs(),
        &[&token, &hash, new_key_pem.lines().nth(1).unwrap()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_expiring_is_logged_at_start_up() {
    let soon = jiff::Timestamp::now()
        .checked_add(days(6))
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let (_, hash) = new_key("alpha");
    let kg = Keygate::builder()
        .key("alpha", &hash, "")
        .start_with(&[], Some(cert_until(soon)));
    let ev = eventually("cert_expiring", &kg, || {
        kg.events("cert_expiring").into_iter().next()
    })
    .await;
    assert_eq!(ev["not_after"], unix(soon));
    let left = ev["days_left"].as_i64().unwrap();
    assert!((4..=6).contains(&left), "{ev}");
    assert_eq!(ev["level"], "WARN");
}

// ---------------------------------------------------------------------------------------------
// Reload: failures and restart-only settings
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reloads_keep_the_old_config_serving() {
    let up = Upstream::start().await;
    let (alpha, alpha_hash) = new_key("alpha");
    let (beta, beta_hash) = new_key("beta");
    let base = || Keygate::builder().upstream(&up).admin();
    // Each broken variant would also add beta and disable alpha: neither may happen.
    let changed = base()
        .key("alpha", &alpha_hash, "disabled = true")
        .key("beta", &beta_hash, "")
        .config_text();
    let kg = base().key("alpha", &alpha_hash, "").start();
    let c = kg.client();
    let original_key_pem = std::fs::read_to_string(kg.dir.path().join("key.pem")).unwrap();
    let (_, other_key_pem, _) = test_cert();

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "TOML syntax error (a token pasted unquoted)",
            format!("{changed}\n[[keys]]\nid = \"gamma\"\nhash = {beta}\n"),
            "TOML syntax error",
        ),
        (
            "a token pasted instead of its hash",
            format!("{changed}\n[[keys]]\nid = \"gamma\"\nhash = \"{beta}\"\n"),
            "keys[2].hash (id \"gamma\"): not an argon2id PHC hash",
        ),
        (
            "missing certificate file",
            changed.replace("cert = \"cert.pem\"", "cert = \"missing.pem\""),
            "tls.cert: cannot read",
        ),
        (
            "cert/key mismatch",
            changed.clone(),
            "tls.key: private key does not match",
        ),
    ];
    for (i, (what, text, reason)) in cases.iter().enumerate() {
        if what.contains("mismatch") {
            std::fs::write(kg.dir.path().join("key.pem"), &other_key_pem).unwrap();
        }
        let ev = reload_with(&kg, text).await;
        assert_eq!(ev["event"], "config_reload_failed", "{what}: {ev}");
        assert_eq!(ev["level"], "ERROR");
        let error = ev["error"].as_str().unwrap();
        assert!(error.contains(reason), "{what}: {error}");

        // The old config keeps serving: alpha works, beta does not exist, same certificate.
        let r = c.get(&kg.url("/"), &[("x-api-key", &alpha)]).await;
        assert_eq!(r.status, 200, "{what}");
        let r = c.get(&kg.url("/"), &[("x-api-key", &beta)]).await;
        assert_eq!(r.status, 401, "{what}");
        let fresh = KeepAlive::open(kg.addr, &[&kg.ca]).await;
        assert_eq!(fresh.peer_cert, kg.ca, "{what}");
        let m = metrics(&kg).await;
        assert_eq!(
            metric_f64(&m, "keygate_config_reloads_total{result=\"failure\"}"),
            (i + 1) as f64
        );
        assert_eq!(
            metric_f64(&m, "keygate_config_reloads_total{result=\"success\"}"),
            0.0
        );
    }

    // Fixed: the next reload applies.
    std::fs::write(kg.dir.path().join("key.pem"), &original_key_pem).unwrap();
    let ev = reload_with(&kg, &changed).await;
    assert_eq!(ev["event"], "config_reloaded", "{ev}");
    assert_eq!(
        c.get(&kg.url("/"), &[("x-api-key", &beta)]).await.status,
        200
    );
    assert_eq!(
        c.get(&kg.url("/"), &[("x-api-key", &alpha)]).await.status,
        401
    );
    let m = metrics(&kg).await;
    assert_eq!(
        metric_f64(&m, "keygate_config_reloads_total{result=\"success\"}"),
        1.0
    );

    let all = format!("{}{m}", kg.logs());
    assert_no_secrets(
        &all,
        &[
            &alpha,
            &beta,
            &alpha_hash,
            &beta_hash,
            other_key_pem.lines().nth(1).unwrap(),
            original_key_pem.lines().nth(1).unwrap(),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_and_sizing_changes_are_reported_as_needing_a_restart() {
    let up = Upstream::start().await;
    let (alpha, alpha_hash) = new_key("alpha");
    let (beta, beta_hash) = new_key("beta");
    let base = || Keygate::builder().upstream(&up).admin();
    let kg = base().key("alpha", &alpha_hash, "").start();
    let c = kg.client();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (new_listen, new_admin) = (free_port(), free_port());

    let text = base()
        .key("alpha", &alpha_hash, "")
        .key("beta", &beta_hash, "")
        .server("max_connections = 10")
        .auth("verify_concurrency = 7")
        .config_text()
        .replace(
            "listen = \"127.0.0.1:0\"\nworkers = 2",
            &format!("listen = \"{new_listen}\"\nworkers = 1"),
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{new_admin}\""),
        )
        .replace("format = \"json\"", "format = \"text\"");
    let expected = "server.listen, admin.listen, server.workers, server.max_connections, auth.verify_concurrency, log.format";
    for round in 0..2 {
        let ev = reload_with(&kg, &text).await;
        assert_eq!(ev["event"], "config_reloaded", "{ev}");
        assert_eq!(ev["level"], "WARN");
        // Reported again on the second reload: the settings are still not in effect.
        assert_eq!(ev["restart_needed"], expected, "round {round}: {ev}");

        // The rest is applied (beta works), on the old listeners; nothing is half-applied.
        assert_eq!(
            c.get(&kg.url("/"), &[("x-api-key", &beta)]).await.status,
            200
        );
        assert_eq!(admin_parts(&kg, "/healthz").await.0, 200);
        assert!(tokio::net::TcpStream::connect(new_listen).await.is_err());
        assert!(tokio::net::TcpStream::connect(new_admin).await.is_err());
    }
    // Still JSON logs (log.format kept), still every key usable.
    let r = c.get(&kg.url("/"), &[("x-api-key", &alpha)]).await;
    assert_eq!(r.status, 200);
    kg.access_line(r.header("x-request-id").unwrap());

    // Back to the running values: nothing to report.
    let ev = reload_with(&kg, &base().key("alpha", &alpha_hash, "").config_text()).await;
    assert_eq!(ev["event"], "config_reloaded");
    assert!(ev.get("restart_needed").is_none(), "{ev}");
}

// ---------------------------------------------------------------------------------------------
// Connections in progress across SIGHUP and SIGTERM
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_and_websocket_in_progress_survive_a_reload() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("alpha");
    let (_, other_hash) = new_key("other");
    // The WebSocket's key stays (a reload that removes a tunnel's key closes the tunnel:
    // tests/reload_tunnels.rs); the download's is removed under it.
    let (ws_token, ws_hash) = new_key("sockets");
    let kg = Keygate::builder()
        .upstream(&up)
        .key("alpha", &hash, "")
        .key("sockets", &ws_hash, "")
        .start();
    let c = kg.client();

    // A 32 MiB download, read slowly: most of it is still to come when the reload happens.
    const SIZE: u64 = 32 << 20;
    let resp = c
        .send_raw(
            Request::get(kg.url(&format!("/bytes?n={SIZE}")))
                .header("x-api-key", &token)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while got < (1 << 20) {
        got += body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .map_or(0, |d| d.len() as u64);
    }

    // A WebSocket-style upgrade, echoing through keygate.
    let mut ws = kg.tls_stream().await;
    ws.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-API-Key: {ws_token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(ws.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    echo(&mut ws, b"before reload").await;

    // The reload removes the very key the download is using, and swaps the certificate.
    write_cert(kg.dir.path(), None);
    let ev = reload_with(
        &kg,
        &Keygate::builder()
            .upstream(&up)
            .key("other", &other_hash, "")
            .key("sockets", &ws_hash, "")
            .config_text(),
    )
    .await;
    assert_eq!(ev["event"], "config_reloaded", "{ev}");

    echo(&mut ws, b"after reload").await;
    while let Some(frame) = body.frame().await {
        got += frame
            .expect("download cut off")
            .into_data()
            .map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, SIZE, "download completed across the reload");
    echo(&mut ws, b"still there").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_saves_state_and_keys_reports_it() {
    let up = Upstream::start().await;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("state.json");
    let now = jiff::Timestamp::now();
    let ago = |n| toml_time(now.checked_sub(days(n)).unwrap());
    // A key last used 200 days ago, recorded by an earlier run.
    let stale_used = now.checked_sub(days(200)).unwrap().as_second();
    std::fs::write(
        &state,
        format!(r#"{{"version":1,"keys":{{"stale":{{"last_used":{stale_used},"last_ip":"192.0.2.7"}}}}}}"#),
    )
    .unwrap();
    let (live, live_hash) = new_key("live");
    let hashes: Vec<String> = (0..5).map(|i| new_key(&format!("k{i}")).1).collect();
    let soon = toml_time(
        now.checked_add(days(5))
            .unwrap()
            .checked_add(jiff::SignedDuration::from_hours(1))
            .unwrap(),
    );
    let kg = Keygate::builder()
        .upstream(&up)
        .server("shutdown_grace = \"10s\"")
        .raw(&format!(
            "[state]\npath = \"{}\"\nrotation_period = \"30d\"",
            state.display()
        ))
        .key("live", &live_hash, &format!("created = {}", ago(10)))
        .key("stale", &hashes[0], &format!("created = {}", ago(400)))
        .key("never", &hashes[1], &format!("created = {}", ago(100)))
        .key(
            "soon",
            &hashes[2],
            &format!("created = {}\nexpires = {soon}", ago(1)),
        )
        .key(
            "off",
            &hashes[3],
            &format!("created = {}\ndisabled = true", ago(1)),
        )
        .key(
            "gone",
            &hashes[4],
            &format!("created = {}\nexpires = {}", ago(60), ago(1)),
        )
        .start();
    let c = kg.client();
    assert_eq!(
        c.get(&kg.url("/"), &[("x-api-key", &live)]).await.status,
        200
    );

    // A slow request is in flight when SIGTERM arrives: it completes, then keygate exits 0.
    let slow = {
        let c = kg.client();
        let url = kg.url("/slow?ms=1500");
        let live = live.clone();
        tokio::spawn(async move { c.get(&url, &[("x-api-key", &live)]).await })
    };
    eventually("slow request upstream", &kg, || {
        (up.count() == 2).then_some(())
    })
    .await;
    kg.signal("TERM");
    eventually("shutting down", &kg, || {
        kg.json_logs()
            .into_iter()
            .find(|v| v["msg"] == "shutting down")
    })
    .await;
    assert!(
        tokio::net::TcpStream::connect(kg.addr).await.is_err(),
        "no new connections while draining"
    );
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let mut kg = kg;
    assert_eq!(
        kg.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        kg.logs()
    );
    assert!(
        kg.logs().contains("\"msg\":\"stopped\""),
        "last lines flushed:\n{}",
        kg.logs()
    );

    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let live_used = saved["keys"]["live"]["last_used"].as_i64().unwrap();
    assert!((live_used - now.as_second()).abs() < 60, "{saved}");
    assert_eq!(saved["keys"]["live"]["last_ip"], "127.0.0.1");
    assert_eq!(
        saved["keys"]["stale"]["last_used"], stale_used,
        "older entries are kept"
    );
    assert!(saved["keys"].get("never").is_none());

    // Restart on the same files and stop again without traffic: the state survives.
    let mut kg = kg.restart(&[]);
    kg.signal("TERM");
    assert_eq!(
        kg.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        kg.logs()
    );
    let resaved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(resaved, saved);
    assert!(
        std::fs::read_dir(state_dir.path()).unwrap().count() == 1,
        "no temp files left"
    );

    // `keygate keys` reads the config and the state file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["keys", "-c"])
        .arg(&kg.config)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |id: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{text}"))
            .to_string()
    };
    let header = text.lines().next().unwrap();
    for col in ["ID", "STATUS", "EXPIRES", "LAST USED", "WARNINGS"] {
        assert!(header.contains(col), "{header}");
    }
    let r = row("live");
    assert!(r.contains(" active "), "{r}");
    let used = jiff::Timestamp::from_second(live_used)
        .unwrap()
        .strftime("%Y-%m-%d %H:%M")
        .to_string();
    assert!(r.contains(&format!("{used} from 127.0.0.1")), "{r}");
    assert!(
        r.trim_end().ends_with("127.0.0.1"),
        "no warnings expected: {r}"
    );
    let r = row("stale");
    assert!(r.contains("from 192.0.2.7"), "{r}");
    assert!(r.contains("unused for 200 days"), "{r}");
    assert!(
        r.contains("older than the rotation period (400 days old)"),
        "{r}"
    );
    let r = row("never");
    assert!(r.contains(" never "), "{r}");
    assert!(r.contains("never used, created over 90 days ago"), "{r}");
    assert!(
        r.contains("older than the rotation period (100 days old)"),
        "{r}"
    );
    let r = row("soon");
    assert!(r.contains("expires in 5 days"), "{r}");
    assert!(r.contains("expires within 14 days"), "{r}");
    assert!(row("off").contains(" disabled "));
    assert!(row("gone").contains(" expired "));
    assert_no_secrets(&text, &[&live, &live_hash]);
}

// ---------------------------------------------------------------------------------------------
// systemd notifications
// ---------------------------------------------------------------------------------------------

#[test]
fn systemd_is_notified_of_ready_reloading_and_stopping() {
    let sock_dir = tempfile::tempdir().unwrap();
    let path = sock_dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    let lines = |msg: &str| msg.lines().map(str::to_string).collect::<Vec<_>>();
    let (_, hash) = new_key("alpha");
    let mut kg = Keygate::builder()
        .admin()
        .key("alpha", &hash, "")
        .start_with(&[("NOTIFY_SOCKET", path.to_str().unwrap())], None);

    // READY=1 comes once both listeners accept connections.
    let ready = recv();
    assert_eq!(lines(&ready)[0], "READY=1", "{ready}");
    assert!(ready.contains("STATUS=serving on 127.0.0.1:"), "{ready}");
    std::net::TcpStream::connect(kg.addr).unwrap();
    std::net::TcpStream::connect(kg.admin.unwrap()).unwrap();

    // A good reload and a failed one: both RELOADING=1 + MONOTONIC_USEC, then READY=1.
    let mut stamps = Vec::new();
    for broken in [false, true] {
        if broken {
            std::thread::sleep(Duration::from_millis(500));
            std::fs::write(&kg.config, "[server\n").unwrap();
        }
        kg.signal("HUP");
        let reloading = lines(&recv());
        let at = Instant::now();
        assert_eq!(reloading[0], "RELOADING=1", "{reloading:?}");
        let usec: i128 = reloading[1]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{reloading:?}"))
            .parse()
            .unwrap();
        assert!(usec > 0, "{usec}");
        stamps.push((usec, at));
        let done = recv();
        assert_eq!(lines(&done)[0], "READY=1", "{done}");
        if broken {
            assert!(done.contains("STATUS=last reload failed"), "{done}");
            assert!(done.contains("TOML syntax error"), "{done}");
        } else {
            assert!(done.contains("STATUS=reloaded: 1 keys"), "{done}");
        }
    }
    // MONOTONIC_USEC is a clock in microseconds: the two stamps are as far apart as the two
    // reloads were (at least the 0.5 s pause), not 1000 times more or less.
    let apart = stamps[1].0 - stamps[0].0;
    let elapsed = stamps[1].1.duration_since(stamps[0].1).as_micros() as i128;
    assert!(
        (250_000..=elapsed + 1_000_000).contains(&apart),
        "{apart} µs apart, {elapsed} µs measured"
    );

    kg.signal("TERM");
    let stopping = recv();
    assert_eq!(lines(&stopping)[0], "STOPPING=1", "{stopping}");
    assert_eq!(kg.wait_exit(Duration::from_secs(10)), Some(0));
}

// ---------------------------------------------------------------------------------------------
// Admin listener
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_readiness_and_metrics_move_with_traffic() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("metered");
    let (_, other_hash) = new_key("other");
    let (unknown, _) = new_key("intruder");
    let wrong_secret = keygate::auth::NewToken::generate("metered")
        .reveal()
        .to_string();
    let base = || Keygate::builder().upstream(&up).admin();
    let kg = base().key("metered", &hash, "").start();
    let c = kg.client();

    let (status, _, body) = admin_parts(&kg, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert_eq!(admin_parts(&kg, "/readyz").await.0, 200);
    assert_eq!(admin_parts(&kg, "/nope").await.0, 404);
    // Never on the public listener.
    let r = c.get(&kg.url("/metrics"), &[]).await;
    assert_eq!(r.status, 401);

    let m0 = metrics(&kg).await;
    assert_eq!(metric_f64(&m0, "keygate_up"), 1.0);
    for _ in 0..3 {
        assert_eq!(
            c.get(&kg.url("/"), &[("x-api-key", &token)]).await.status,
            200
        );
    }
    for (headers, reason) in [
        (vec![], "missing"),
        (vec![("x-api-key", wrong_secret.as_str())], "bad_secret"),
        (vec![("x-api-key", unknown.as_str())], "unknown_key"),
        (vec![("x-api-key", "kg_nope")], "malformed"),
    ] {
        let r = c.get(&kg.url("/"), &headers).await;
        assert_eq!(r.status, 401, "{reason}");
    }
    assert_eq!(
        reload_with(
            &kg,
            &base()
                .key("metered", &hash, "")
                .key("other", &other_hash, "")
                .config_text()
        )
        .await["event"],
        "config_reloaded"
    );
    assert_eq!(
        reload_with(&kg, "[server\n").await["event"],
        "config_reload_failed"
    );

    // Access-log lines (and so request metrics) are written when the body ends: wait for them.
    let m = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = metrics(&kg).await;
            let d = |s: &str| metric_f64(&m, s) - metric_f64(&m0, s);
            if d("keygate_requests_total{status_class=\"4xx\",key_id=\"\"}") >= 4.0
                && d("keygate_requests_total{status_class=\"2xx\",key_id=\"metered\"}") >= 3.0
            {
                break m;
            }
            assert!(Instant::now() < deadline, "{m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let d = |s: &str| metric_f64(&m, s) - metric_f64(&m0, s);
    assert_eq!(
        d("keygate_requests_total{status_class=\"2xx\",key_id=\"metered\"}"),
        3.0,
        "{m}"
    );
    assert_eq!(
        d("keygate_requests_total{status_class=\"4xx\",key_id=\"\"}"),
        4.0,
        "{m}"
    );
    for reason in ["missing", "bad_secret", "unknown_key", "malformed"] {
        assert_eq!(
            d(&format!(
                "keygate_auth_failures_total{{reason=\"{reason}\"}}"
            )),
            1.0,
            "{reason}: {m}"
        );
    }
    assert_eq!(d("keygate_auth_failures_total{reason=\"disabled\"}"), 0.0);
    assert_eq!(d("keygate_request_duration_seconds_count"), 7.0, "{m}");
    assert_eq!(
        metric_f64(&m, "keygate_config_reloads_total{result=\"success\"}"),
        1.0
    );
    assert_eq!(
        metric_f64(&m, "keygate_config_reloads_total{result=\"failure\"}"),
        1.0
    );
    assert_eq!(
        metric_f64(&m, "keygate_certificate_not_after_seconds"),
        unix(jiff::civil::date(4096, 1, 1)) as f64
    );
    for name in [
        "keygate_requests_total",
        "keygate_request_duration_seconds",
        "keygate_auth_failures_total",
        "keygate_auth_throttled_total",
        "keygate_ip_denied_total",
        "keygate_upstream_errors_total",
        "keygate_open_connections",
        "keygate_config_reloads_total",
        "keygate_certificate_not_after_seconds",
    ] {
        assert!(
            m.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{m}"
        );
    }
    // Families labelled by key id appear with their first series (tests/metrics_format.rs).
    assert!(!m.contains("keygate_rate_limited_total"), "{m}");
    // Key ids are labels only once authenticated: an unknown id never becomes a series.
    assert!(!m.contains("intruder"), "{m}");
    assert_no_secrets(&m, &[&token, &hash, &other_hash, &wrong_secret, &unknown]);

    // Open connections: three more held open, then closed again.
    let base_open = metric_f64(&metrics(&kg).await, "keygate_open_connections");
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut k = KeepAlive::open(kg.addr, &[&kg.ca]).await;
        assert_eq!(k.get("/", &token).await, 200);
        held.push(k);
    }
    assert_eq!(
        metric_f64(&metrics(&kg).await, "keygate_open_connections"),
        base_open + 3.0
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_f64(&metrics(&kg).await, "keygate_open_connections") != base_open {
        assert!(Instant::now() < deadline, "connections not closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Upstream gone: not ready (alive still).
    drop(up);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = admin_parts(&kg, "/readyz").await;
        if status == 503 {
            assert_eq!(body, "upstream unreachable\n");
            break;
        }
        assert!(Instant::now() < deadline, "readyz still {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(admin_parts(&kg, "/healthz").await.0, 200);
}
