//! Access control and abuse limits end to end (issue 3): who may reach the upstream, from where,
//! how often and for what. Global allow/deny at accept, `max_connections`, trusted proxies and
//! `X-Forwarded-For`, the PROXY protocol, per-key allowlists and scopes, rate limits and their
//! headers, failed-auth throttling, key expiry and disabling. Everything over real TLS.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A new TCP connection to keygate, then the TLS handshake.
async fn try_tls(kg: &Keygate) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(kg.addr).await?;
    kg.handshake(tcp).await
}

/// A new TCP connection that starts with `header` (a PROXY protocol header), then TLS.
async fn tls_after(kg: &Keygate, header: &[u8]) -> std::io::Result<Tls> {
    let mut tcp = TcpStream::connect(kg.addr).await?;
    tcp.write_all(header).await?;
    kg.handshake(tcp).await
}

/// A hand-written HTTP/1.1 request (the path goes out exactly as written; some clients
/// normalise dot-segments themselves). Returns the status and the response head.
async fn raw_request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let text = String::from_utf8_lossy(&read_to_close(s).await).into_owned();
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    (status, head)
}

fn head_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn num(r: &Got, name: &str) -> u64 {
    r.header(name)
        .unwrap_or_else(|| panic!("{name} missing: {:?}", r.headers))
        .parse()
        .unwrap_or_else(|_| panic!("{name} not a number: {:?}", r.headers))
}

fn rid(r: &Got) -> String {
    r.header("x-request-id").unwrap().to_string()
}

/// Waits until `n` log lines satisfy `pred` (lines reach the harness a moment after responses).
fn wait_count(kg: &Keygate, what: &str, n: usize, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let have = kg.json_logs().iter().filter(|v| pred(v)).count();
        if have >= n {
            assert_eq!(have, n, "{what}: more than {n}\n{}", kg.logs());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {have} of {n}\n{}",
            kg.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- global allow / deny

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_peer_is_closed_before_the_tls_handshake() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    // IPv4-mapped IPv6 spellings name the same IPv4 clients (a fresh user: they passed
    // `check` and matched nothing, so such a deny rule was silently not enforced).
    for access in [
        r#"deny = ["127.0.0.0/8"]"#,
        r#"allow = ["10.0.0.0/8"]"#,
        r#"deny = ["::ffff:127.0.0.0/104"]"#,
        r#"deny = ["::ffff:127.0.0.1"]"#,
        r#"allow = ["::ffff:10.0.0.0/104"]"#,
    ] {
        let kg = Keygate::builder()
            .upstream(&up)
            .access(access)
            .key("k", &hash, "")
            .start();
        let e = try_tls(&kg).await;
        assert!(e.is_err(), "{access}: TLS handshake succeeded");
        let ev = kg.wait_log("ip_denied at accept", |v| v["event"] == "ip_denied");
        assert_eq!(ev["client_ip"], "127.0.0.1", "{ev}");
        assert_eq!(ev["scope"], "global", "{ev}");
        // Nothing past the gate ran: no TLS, no request, no access line.
        assert!(kg.events("auth_failed").is_empty());
        assert!(kg.json_logs().iter().all(|v| v["msg"] != "request"));
        assert_no_secrets(&kg.logs(), &[&token, &hash]);
    }
    assert_eq!(up.count(), 0, "the upstream saw a denied client");

    // Allowed, and not matched by deny: served.
    let kg = Keygate::builder()
        .upstream(&up)
        .access(r#"allow = ["127.0.0.1/32", "2001:db8::/32"]"#)
        .access(r#"deny = ["127.0.0.2/32", "10.0.0.0/8"]"#)
        .key("k", &hash, "")
        .start();
    let r = kg
        .client()
        .get(&kg.url("/"), &[("x-api-key", &token)])
        .await;
    assert_eq!(r.status, 200);
    assert!(kg.events("ip_denied").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_excess_at_accept_when_every_connection_is_busy() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("max_connections = 2")
        .server("max_connections_per_ip = 100")
        .key("k", &hash, "")
        .start();
    // Idle or unfinished connections would make room (tests/attack_caps.rs); busy ones do not.
    let busy: Vec<_> = [
        try_tls(&kg).await.expect("first connection"),
        try_tls(&kg).await.expect("second connection"),
    ]
    .into_iter()
    .map(|mut s| {
        let token = token.clone();
        tokio::spawn(async move {
            raw_request(&mut s, "GET", "/slow?ms=3000", &[("x-api-key", &token)])
                .await
                .0
        })
    })
    .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.count() < 2 {
        assert!(Instant::now() < deadline, "slow requests did not arrive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        try_tls(&kg).await.is_err(),
        "a third connection was served with max_connections = 2, both busy"
    );
    kg.wait_log("refusal logged", |v| {
        v["event"] == "connection_limited" && v["reason"] == "full"
    });
    // The two busy connections are unaffected.
    for b in busy {
        assert_eq!(b.await.unwrap(), 200);
    }

    // A closed connection frees its slot.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        if let Ok(s) = try_tls(&kg).await {
            break s;
        }
        assert!(Instant::now() < deadline, "slots were not freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (status, _) = raw_request(&mut s, "GET", "/", &[("x-api-key", &token)]).await;
    assert_eq!(status, 200);
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

// ---------------------------------------------------------------- client IP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_xff_is_honoured_for_allowlists_and_logs() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("office");
    let kg = Keygate::builder()
        .upstream(&up)
        .access(r#"trusted_proxies = ["127.0.0.1/32"]"#)
        .access(r#"deny = ["192.0.2.0/24"]"#)
        .key("office", &hash, r#"allow = ["203.0.113.0/24"]"#)
        .start();
    let c = kg.client();
    let key = ("x-api-key", token.as_str());

    // The right-most address that is not a trusted proxy is the client.
    let r = c
        .get(
            &kg.url("/"),
            &[
                key,
                ("x-forwarded-for", "198.51.100.1, 203.0.113.7, 127.0.0.1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let line = kg.access_line(&rid(&r));
    assert_eq!(line["client_ip"], "203.0.113.7");
    assert_eq!(
        up.requests()[0].header("x-forwarded-for"),
        Some("198.51.100.1, 203.0.113.7, 127.0.0.1, 127.0.0.1"),
        "a trusted proxy's chain is kept and the peer appended"
    );

    // The key's allowlist is applied to that client.
    let r = c
        .get(&kg.url("/"), &[key, ("x-forwarded-for", "198.51.100.1")])
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "forbidden");
    let id = rid(&r);
    let ev = kg.wait_log("ip_denied (key)", |v| {
        v["event"] == "ip_denied" && v["request_id"] == id.as_str()
    });
    assert_eq!(ev["scope"], "key");
    assert_eq!(ev["key_id"], "office");
    assert_eq!(ev["client_ip"], "198.51.100.1");
    assert_eq!(kg.access_line(&id)["client_ip"], "198.51.100.1");

    // Behind trusted proxies the global deny list cannot act at accept: 403 per request.
    let r = c
        .get(&kg.url("/"), &[key, ("x-forwarded-for", "192.0.2.9")])
        .await;
    assert_eq!(r.status, 403);
    let id = rid(&r);
    let ev = kg.wait_log("ip_denied (global)", |v| {
        v["event"] == "ip_denied" && v["request_id"] == id.as_str()
    });
    assert_eq!(ev["scope"], "global");
    assert_eq!(ev["client_ip"], "192.0.2.9");
    // Refused before authentication: no key id, no auth event.
    assert!(kg.access_line(&id)["key_id"].is_null());

    // No X-Forwarded-For from the trusted proxy: the proxy itself is the client.
    let r = c.get(&kg.url("/"), &[key]).await;
    assert_eq!(r.status, 403);
    assert_eq!(kg.access_line(&rid(&r))["client_ip"], "127.0.0.1");
    assert_eq!(up.count(), 1);
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_xff_from_an_untrusted_peer_is_ignored() {
    let up = Upstream::start().await;
    let (office_token, office_hash) = new_key("office");
    let (open_token, open_hash) = new_key("open");
    // No trusted proxies: 127.0.0.1 is the client, whatever it claims.
    let kg = Keygate::builder()
        .upstream(&up)
        .access(r#"deny = ["198.51.100.0/24"]"#)
        .key("office", &office_hash, r#"allow = ["203.0.113.0/24"]"#)
        .key("open", &open_hash, "")
        .start();
    let c = kg.client();

    // Claiming an allowed address does not get past the key's allowlist…
    let r = c
        .get(
            &kg.url("/"),
            &[
                ("x-api-key", &office_token),
                ("x-forwarded-for", "203.0.113.7"),
            ],
        )
        .await;
    assert_eq!(r.status, 403);
    let id = rid(&r);
    let ev = kg.wait_log("ip_denied", |v| {
        v["event"] == "ip_denied" && v["request_id"] == id.as_str()
    });
    assert_eq!(ev["client_ip"], "127.0.0.1", "{ev}");
    assert_eq!(kg.access_line(&id)["client_ip"], "127.0.0.1");

    // …and claiming a denied address does not get anyone refused; logs and the upstream see the
    // real peer.
    let r = c
        .get(
            &kg.url("/"),
            &[
                ("x-api-key", &open_token),
                ("x-forwarded-for", "198.51.100.1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(kg.access_line(&rid(&r))["client_ip"], "127.0.0.1");
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-forwarded-for"), Some("127.0.0.1"));
    assert!(!kg.logs().contains("203.0.113.7"), "spoofed address logged");
    assert!(
        !kg.logs().contains("198.51.100.1"),
        "spoofed address logged"
    );
    assert_no_secrets(
        &kg.logs(),
        &[&office_token, &office_hash, &open_token, &open_hash],
    );
}

// ---------------------------------------------------------------- per-key rules

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_allowlist_403() {
    let up = Upstream::start().await;
    let (far_token, far_hash) = new_key("far");
    let (near_token, near_hash) = new_key("near");
    let kg = Keygate::builder()
        .upstream(&up)
        .key(
            "far",
            &far_hash,
            r#"allow = ["10.0.0.0/8", "2001:db8::/32"]"#,
        )
        .key("near", &near_hash, r#"allow = ["127.0.0.0/8"]"#)
        .start();
    let c = kg.client();
    let r = c.get(&kg.url("/"), &[("x-api-key", &far_token)]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["error"], "forbidden");
    assert!(!r.text().contains("far") && !r.text().contains("127.0.0.1"));
    let id = rid(&r);
    let ev = kg.wait_log("ip_denied", |v| {
        v["event"] == "ip_denied" && v["request_id"] == id.as_str()
    });
    assert_eq!(
        (ev["scope"].as_str(), ev["key_id"].as_str()),
        (Some("key"), Some("far"))
    );
    let r = c.get(&kg.url("/"), &[("x-api-key", &near_token)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 1);
    assert_no_secrets(
        &kg.logs(),
        &[&far_token, &far_hash, &near_token, &near_hash],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_methods_and_paths_cannot_be_escaped() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("reader");
    let kg = Keygate::builder()
        .upstream(&up)
        .key(
            "reader",
            &hash,
            "methods = [\"GET\", \"HEAD\"]\npaths = [\"/v1/\", \"/status\"]",
        )
        .start();
    let c = kg.client();
    let key = ("x-api-key", token.as_str());

    for ok in [
        "/v1/docs",
        "/v1/",
        "/status",
        "/status/deep",
        "/v1/./a/../docs",
    ] {
        let r = c.get(&kg.url(ok), &[key]).await;
        assert_eq!(r.status, 200, "{ok}");
    }
    let allowed = up.count();
    assert_eq!(allowed, 5);

    // Outside the prefixes (segment-aware: /status does not cover /statuses).
    for path in ["/admin", "/v1", "/statuses", "/V1/docs"] {
        let r = c.get(&kg.url(path), &[key]).await;
        assert_eq!(r.status, 403, "{path}");
    }
    // Methods.
    let r = c
        .send(
            hyper::Request::post(kg.url("/v1/docs"))
                .header("x-api-key", &token)
                .body(full("x"))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 403);
    let id = rid(&r);
    let ev = kg.wait_log("scope_denied", |v| {
        v["event"] == "scope_denied" && v["request_id"] == id.as_str()
    });
    assert_eq!(ev["method"], "POST");
    assert_eq!(ev["key_id"], "reader");
    assert_eq!(r.json()["error"], "forbidden");

    // Escapes by dot-segments and encodings, sent byte for byte on a raw TLS stream.
    for escape in [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2E/admin",
        "/v1/.%2e/admin",
        "/v1%2f..%2fadmin",
        "/v1/..%2fadmin",
        "/v1/..%5cadmin",
        "/v1//../../admin",
        "/v1/%2e%2e%2f%2e%2e/admin",
        "/v1/%00/../admin",
        // Path parameters: Tomcat, Jetty and Spring drop `;…` before resolving dot-segments.
        "/v1/..;/admin",
        "/v1/..;jsessionid=1/admin",
        "/v1/..%3b/admin",
        "/v1/%2e%2e;/admin",
        "/status/..;/admin",
        "/status;x/..;/..;/admin",
        // A server that routes on the path as sent reads these under /admin/.
        "/admin/../v1/docs",
        "/admin/..;/v1/docs",
        "/admin/%2e%2e/v1/docs",
    ] {
        let mut s = kg.tls_stream().await;
        let (status, _) = raw_request(&mut s, "GET", escape, &[key]).await;
        assert_eq!(status, 403, "{escape} escaped the /v1/ scope");
        // Logged as sent, but for a session id in a path parameter (README, "Logs").
        let logged = escape.replace("jsessionid=1", "jsessionid=REDACTED");
        kg.wait_log(escape, |v| {
            v["event"] == "scope_denied" && v["path"] == logged.as_str()
        });
    }
    // Method overrides in the query, which Laravel/Symfony and Express read on a request
    // (a fresh user, T5-15): the method they name must be in the scope too.
    for q in [
        "_method=DELETE",
        "_METHOD=put",
        "%5Fmethod=PATCH",
        "a=1&_method=%44ELETE",
        // As PHP reads names (fresh user T8-8): cut at a NUL, `.`/space as `_`, arrays.
        "_method%00=DELETE",
        "_method%00x=DELETE",
        ".method=DELETE",
        "%20.method=DELETE",
        "_method[]=DELETE",
        "_%6Dethod=DELETE",
    ] {
        let target = format!("/v1/docs?{q}");
        let mut s = kg.tls_stream().await;
        let (status, _) = raw_request(&mut s, "GET", &target, &[key]).await;
        assert_eq!(status, 403, "{target}");
    }
    let mut s = kg.tls_stream().await;
    let (status, _) = raw_request(&mut s, "GET", "/v1/docs?_method=HEAD&method=x", &[key]).await;
    assert_eq!(status, 200, "an override inside the scope");
    // A dot-segment that stays inside the scope is fine, and is forwarded as sent.
    let mut s = kg.tls_stream().await;
    let (status, _) = raw_request(&mut s, "GET", "/v1/x/%2e%2e/docs", &[key]).await;
    assert_eq!(status, 200);
    assert_eq!(up.requests().last().unwrap().uri, "/v1/x/%2e%2e/docs");
    assert_eq!(
        up.count(),
        allowed + 2,
        "a refused request reached the upstream"
    );
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

// ---------------------------------------------------------------- rate limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_429_with_retry_after_and_ratelimit_headers() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("metered");
    let (fast_token, fast_hash) = new_key("fast");
    let kg = Keygate::builder()
        .upstream(&up)
        // 3 per hour: nothing refills while the test runs.
        .key("metered", &hash, "rate_limit = \"3/h\"")
        // One at a time, one every 500 ms.
        .key("fast", &fast_hash, "rate_limit = \"2/s\"\nburst = 1")
        .start();
    let c = kg.client();
    let key = ("x-api-key", token.as_str());

    for expected_remaining in [2, 1, 0] {
        let r = c.get(&kg.url("/"), &[key]).await;
        assert_eq!(r.status, 200);
        assert_eq!(num(&r, "ratelimit-limit"), 3);
        assert_eq!(num(&r, "ratelimit-remaining"), expected_remaining);
        // Whole seconds until the bucket is full again: 20 minutes per used request.
        let reset = num(&r, "ratelimit-reset");
        let used = 3 - expected_remaining;
        assert!(
            (1..=used * 1200).contains(&reset) && reset > (used - 1) * 1200,
            "reset {reset} after {used} used"
        );
        assert!(r.header("retry-after").is_none());
    }
    let r = c.get(&kg.url("/"), &[key]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "too many requests");
    let retry_after = num(&r, "retry-after");
    assert!((1..=1200).contains(&retry_after), "{retry_after}");
    assert_eq!(num(&r, "ratelimit-limit"), 3);
    assert_eq!(num(&r, "ratelimit-remaining"), 0);
    let reset = num(&r, "ratelimit-reset");
    assert!(reset >= retry_after && reset <= 3600, "{reset}");
    let id = rid(&r);
    let ev = kg.wait_log("rate_limited", |v| {
        v["event"] == "rate_limited" && v["request_id"] == id.as_str()
    });
    assert_eq!(ev["key_id"], "metered");
    assert_eq!(up.count(), 3, "a rate-limited request reached the upstream");

    // Other keys have their own buckets; unauthenticated answers carry no RateLimit headers.
    let r = c.get(&kg.url("/"), &[("x-api-key", &fast_token)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(num(&r, "ratelimit-limit"), 1);
    let r = c.get(&kg.url("/"), &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.header("ratelimit-limit").is_none());

    // Retry-After is honest: waiting that long is enough.
    let mut refused = None;
    for _ in 0..50 {
        let r = c.get(&kg.url("/"), &[("x-api-key", &fast_token)]).await;
        if r.status == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 200);
    }
    let refused = refused.expect("2/s with burst 1 never refused 50 back-to-back requests");
    let wait = num(&refused, "retry-after");
    assert_eq!(wait, 1);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let r = c.get(&kg.url("/"), &[("x-api-key", &fast_token)]).await;
    assert_eq!(r.status, 200, "still refused after Retry-After");
    assert_no_secrets(&kg.logs(), &[&token, &hash, &fast_token, &fast_hash]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_rate_limit_applies_to_keys_without_their_own() {
    let up = Upstream::start().await;
    let (plain_token, plain_hash) = new_key("plain");
    let (bursty_token, bursty_hash) = new_key("bursty");
    let (own_token, own_hash) = new_key("own");
    let kg = Keygate::builder()
        .upstream(&up)
        .auth("default_rate_limit = \"2/h\"")
        .key("plain", &plain_hash, "")
        .key("bursty", &bursty_hash, "burst = 4")
        .key("own", &own_hash, "rate_limit = \"100/h\"")
        .start();
    let c = kg.client();
    for status in [200, 200, 429] {
        let r = c.get(&kg.url("/"), &[("x-api-key", &plain_token)]).await;
        assert_eq!(r.status, status);
        assert_eq!(num(&r, "ratelimit-limit"), 2);
    }
    let r = c.get(&kg.url("/"), &[("x-api-key", &bursty_token)]).await;
    assert_eq!((r.status, num(&r, "ratelimit-limit")), (200, 4));
    let r = c.get(&kg.url("/"), &[("x-api-key", &own_token)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(num(&r, "ratelimit-limit"), 100);
    assert_eq!(num(&r, "ratelimit-remaining"), 99);
    assert_no_secrets(
        &kg.logs(),
        &[
            &plain_token,
            &plain_hash,
            &bursty_token,
            &bursty_hash,
            &own_token,
            &own_hash,
        ],
    );
}

// ---------------------------------------------------------------- failed-auth throttling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_auth_throttle_spares_verified_clients_and_lifts() {
    let up = Upstream::start().await;
    let (alice, alice_hash) = new_key("alice");
    let (bob, bob_hash) = new_key("bob");
    // 6 failures per minute: after 6, one more every 10 s.
    let kg = Keygate::builder()
        .upstream(&up)
        .auth("failed_auth_limit = \"6/min\"")
        .key("alice", &alice_hash, "")
        .key("bob", &bob_hash, "")
        .start();
    let c = kg.client();

    // Alice is verified once (her token goes into the verified cache).
    let r = c.get(&kg.url("/"), &[("x-api-key", &alice)]).await;
    assert_eq!(r.status, 200);

    // An attacker on the same IP: 6 wrong secrets (each needs argon2 to be refused)…
    let mut sent = Vec::new();
    for _ in 0..6 {
        let t = wrong_token("alice");
        let r = c.get(&kg.url("/"), &[("x-api-key", &t)]).await;
        assert_eq!(r.status, 401);
        sent.push(t);
    }
    wait_count(&kg, "bad_secret verdicts", 6, |v| {
        v["event"] == "auth_failed" && v["reason"] == "bad_secret"
    });
    // …and the 7th is refused without hashing: no bad_secret verdict, an auth_throttled event.
    let t = wrong_token("alice");
    let r = c.get(&kg.url("/"), &[("x-api-key", &t)]).await;
    sent.push(t);
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "too many requests");
    let retry_after = num(&r, "retry-after");
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    let id = rid(&r);
    let ev = kg.wait_log("auth_throttled", |v| {
        v["event"] == "auth_throttled" && v["request_id"] == id.as_str()
    });
    assert_eq!(ev["client_ip"], "127.0.0.1");
    assert!(
        !kg.events("auth_failed")
            .iter()
            .any(|e| e["request_id"] == id.as_str()),
        "a throttled attempt was verified"
    );

    // Alice, verified before from this IP, keeps working.
    for _ in 0..3 {
        let r = c.get(&kg.url("/"), &[("x-api-key", &alice)]).await;
        assert_eq!(r.status, 200, "a verified client was locked out");
    }
    // Any token that is not in the verified cache is refused: a real but unverified key, an
    // unknown key id, a malformed token.
    for t in [
        bob.clone(),
        wrong_token("nobody"),
        "kg_x_nonsense".to_string(),
    ] {
        let r = c.get(&kg.url("/"), &[("x-api-key", &t)]).await;
        assert_eq!(r.status, 429);
        assert!(num(&r, "retry-after") >= 1);
    }

    // The throttle lifts once the window has let a failure go: Bob gets in.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let r = c.get(&kg.url("/"), &[("x-api-key", &bob)]).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429);
        assert!(Instant::now() < deadline, "the throttle never lifted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut secrets: Vec<&str> = vec![&alice, &alice_hash, &bob, &bob_hash];
    secrets.extend(sent.iter().map(|s| s.as_str()));
    assert_no_secrets(&kg.logs(), &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_is_per_client_ip_behind_a_trusted_proxy() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .auth("failed_auth_limit = \"3/h\"")
        .access(r#"trusted_proxies = ["127.0.0.1/32"]"#)
        .key("k", &hash, "")
        .start();
    let c = kg.client();
    let attacker = ("x-forwarded-for", "198.51.100.66");
    for _ in 0..3 {
        let t = wrong_token("k");
        let r = c.get(&kg.url("/"), &[("x-api-key", &t), attacker]).await;
        assert_eq!(r.status, 401);
    }
    let r = c
        .get(&kg.url("/"), &[("x-api-key", &token), attacker])
        .await;
    assert_eq!(r.status, 429, "the attacker's IP is throttled");
    let ev = kg.wait_log("auth_throttled", |v| v["event"] == "auth_throttled");
    assert_eq!(ev["client_ip"], "198.51.100.66");
    // A neighbour behind the same proxy, with a key never verified before, gets in.
    let r = c
        .get(
            &kg.url("/"),
            &[("x-api-key", &token), ("x-forwarded-for", "198.51.100.67")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

// ---------------------------------------------------------------- key lifetime

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_key_stops_at_its_instant_even_when_cached() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("temp");
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(8);
    let kg = Keygate::builder()
        .upstream(&up)
        .key("temp", &hash, &format!("expires = \"{expires}\""))
        .start();
    let c = kg.client();
    assert!(
        jiff::Timestamp::now() < expires,
        "keygate took too long to start for this test"
    );
    // Verified, then served from the verified cache until the instant.
    let mut oks = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let sent_at = jiff::Timestamp::now();
        let r = c.get(&kg.url("/"), &[("x-api-key", &token)]).await;
        let answered_at = jiff::Timestamp::now();
        match r.status {
            200 => {
                assert!(
                    sent_at < expires,
                    "served after expiry ({sent_at} ≥ {expires})"
                );
                oks += 1;
            }
            401 => {
                assert!(answered_at >= expires, "refused before expiry");
                break r;
            }
            s => panic!("unexpected status {s}"),
        }
        assert!(Instant::now() < deadline, "the key never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(oks >= 2, "the key was not used (and cached) before expiry");
    let id = rid(&refused);
    let ev = kg.wait_log("auth_failed expired", |v| {
        v["event"] == "auth_failed" && v["request_id"] == id.as_str()
    });
    assert_eq!(ev["reason"], "expired");
    assert_eq!(ev["key_id"], "temp");
    assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    // Every later request is refused too.
    let r = c.get(&kg.url("/"), &[("x-api-key", &token)]).await;
    assert_eq!(r.status, 401);
    assert_eq!(up.count(), oks);
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_key_401_logged_and_not_counted_as_a_guess() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("paused");
    let kg = Keygate::builder()
        .upstream(&up)
        .auth("failed_auth_limit = \"2/h\"")
        .key("paused", &hash, "disabled = true")
        .start();
    let c = kg.client();
    // A real key that is switched off is not a brute-force attempt: 401 every time, never 429.
    for _ in 0..5 {
        let r = c.get(&kg.url("/"), &[("x-api-key", &token)]).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.json()["error"], "unauthorized");
        let id = rid(&r);
        let ev = kg.wait_log("auth_failed disabled", |v| {
            v["event"] == "auth_failed" && v["request_id"] == id.as_str()
        });
        assert_eq!(ev["reason"], "disabled");
        assert_eq!(ev["key_id"], "paused");
    }
    assert!(kg.events("auth_throttled").is_empty());
    assert_eq!(up.count(), 0);
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

// ---------------------------------------------------------------- PROXY protocol

fn v1(src: &str, sport: u16) -> Vec<u8> {
    let fam = if src.contains(':') { "TCP6" } else { "TCP4" };
    let dst = if src.contains(':') {
        "::1"
    } else {
        "127.0.0.1"
    };
    format!("PROXY {fam} {src} {dst} {sport} 443\r\n").into_bytes()
}

fn v2(cmd: u8, src: Option<SocketAddr>, tlv: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | cmd);
    let mut addr = Vec::new();
    match src {
        Some(SocketAddr::V4(a)) => {
            h.push(0x11);
            addr.extend_from_slice(&a.ip().octets());
            addr.extend_from_slice(&[127, 0, 0, 1]);
            addr.extend_from_slice(&a.port().to_be_bytes());
            addr.extend_from_slice(&443u16.to_be_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            h.push(0x21);
            addr.extend_from_slice(&a.ip().octets());
            addr.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
            addr.extend_from_slice(&a.port().to_be_bytes());
            addr.extend_from_slice(&443u16.to_be_bytes());
        }
        None => h.push(0x00),
    }
    addr.extend_from_slice(tlv);
    h.extend_from_slice(&(addr.len() as u16).to_be_bytes());
    h.extend_from_slice(&addr);
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_v2_source_is_the_client() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("lb");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("proxy_protocol = true")
        .server("tls_handshake_timeout = \"2s\"")
        .access(r#"trusted_proxies = ["127.0.0.1/32"]"#)
        .access(r#"deny = ["198.51.100.0/24"]"#)
        .key(
            "lb",
            &hash,
            r#"allow = ["203.0.113.0/24", "2001:db8::/32"]"#,
        )
        .start();
    let key = ("x-api-key", token.as_str());
    let rid_of = |head: &str| head_header(head, "x-request-id").unwrap().to_string();

    // v1, TCP4: the header's source is the client (allowlist, logs, X-Forwarded-For). Its own
    // X-Forwarded-For is not trusted: the source is not a trusted proxy.
    let mut s = tls_after(&kg, &v1("203.0.113.9", 50123)).await.unwrap();
    let (status, head) = raw_request(
        &mut s,
        "GET",
        "/v1",
        &[key, ("x-forwarded-for", "192.0.2.200")],
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(kg.access_line(&rid_of(&head))["client_ip"], "203.0.113.9");
    assert_eq!(
        up.requests().last().unwrap().header("x-forwarded-for"),
        Some("203.0.113.9")
    );

    // v2, IPv6, with a TLV after the addresses.
    let src: SocketAddr = "[2001:db8::7]:4444".parse().unwrap();
    let mut s = tls_after(
        &kg,
        &v2(1, Some(src), &[0x02, 0x00, 0x03, b'a', b'b', b'c']),
    )
    .await
    .unwrap();
    let (status, head) = raw_request(&mut s, "GET", "/v2", &[key]).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(kg.access_line(&rid_of(&head))["client_ip"], "2001:db8::7");

    // v2, IPv4.
    let src: SocketAddr = "203.0.113.10:1".parse().unwrap();
    let mut s = tls_after(&kg, &v2(1, Some(src), &[])).await.unwrap();
    let (status, head) = raw_request(&mut s, "GET", "/v2", &[key]).await;
    assert_eq!(status, 200);
    assert_eq!(kg.access_line(&rid_of(&head))["client_ip"], "203.0.113.10");

    // v2 LOCAL (the balancer's health check) and v1 UNKNOWN: the balancer is the peer, so the
    // key's allowlist refuses it.
    for header in [v2(0, None, &[]), b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut s = tls_after(&kg, &header).await.unwrap();
        let (status, head) = raw_request(&mut s, "GET", "/", &[key]).await;
        assert_eq!(status, 403);
        assert_eq!(kg.access_line(&rid_of(&head))["client_ip"], "127.0.0.1");
    }

    // The global deny list applies to the header's source at accept: closed before TLS.
    let before = up.count();
    assert!(tls_after(&kg, &v1("198.51.100.5", 1)).await.is_err());
    let ev = kg.wait_log("ip_denied", |v| {
        v["event"] == "ip_denied" && v["client_ip"] == "198.51.100.5"
    });
    assert_eq!(ev["scope"], "global");

    // No header, a malformed one, a truncated one: closed.
    assert!(try_tls(&kg).await.is_err(), "TLS without a PROXY header");
    for bad in [
        &b"PROXY TCP4 999.0.113.9 127.0.0.1 1 443\r\n"[..],
        b"PROXY TCP4 203.0.113.9 127.0.0.1 1 443\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"PROXY TCP4 203.0.113.9 ",
    ] {
        assert!(
            tls_after(&kg, bad).await.is_err(),
            "{:?} accepted",
            String::from_utf8_lossy(bad)
        );
    }
    kg.wait_log("malformed header warning", |v| {
        v["level"] == "WARN"
            && v["msg"]
                .as_str()
                .is_some_and(|m| m.contains("PROXY protocol setting"))
    });
    // A silent peer is dropped after tls_handshake_timeout.
    let mut silent = TcpStream::connect(kg.addr).await.unwrap();
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut [0u8; 16]))
        .await
        .expect("a silent connection was kept open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert_eq!(up.count(), before);
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

/// Behind the PROXY protocol the two hops have two lists (fresh user T8-10): `trusted_proxies`
/// are the balancers that may send the header; a client the header names inside that range
/// (an internal client reaching keygate through the balancer) does NOT get its own
/// `X-Forwarded-For` believed. Only an address in `trusted_http_proxies` (an HTTP proxy in
/// front of the balancer) does. Before, 127.0.0.9 named by the header and sending
/// `X-Forwarded-For: 10.99.1.1` passed a key's `allow = ["10.99.0.0/16"]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_proxy_protocol_only_http_proxies_may_name_the_client() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("far");
    let start = |http_proxies: &str| {
        Keygate::builder()
            .upstream(&up)
            .server("proxy_protocol = true")
            .access(r#"trusted_proxies = ["127.0.0.0/8"]"#)
            .access(http_proxies)
            .key("far", &hash, r#"allow = ["10.99.0.0/16"]"#)
            .start()
    };
    let key = ("x-api-key", token.as_str());
    let kg = start("");
    for named in ["127.0.0.9", "203.0.113.5"] {
        let mut s = tls_after(&kg, &v1(named, 40000)).await.unwrap();
        let (status, head) = raw_request(
            &mut s,
            "GET",
            "/pp",
            &[key, ("x-forwarded-for", "10.99.1.1")],
        )
        .await;
        assert_eq!(status, 403, "named {named}: {head}");
    }
    // UNKNOWN: the balancer itself is the client; its X-Forwarded-For is not believed either.
    let mut s = tls_after(&kg, b"PROXY UNKNOWN\r\n").await.unwrap();
    let (status, _) = raw_request(
        &mut s,
        "GET",
        "/pp",
        &[key, ("x-forwarded-for", "10.99.1.1")],
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(up.count(), 0);

    // A CDN in front of the balancer, listed as an HTTP proxy: its X-Forwarded-For names the
    // client.
    let kg = start(r#"trusted_http_proxies = ["198.51.100.0/24"]"#);
    let mut s = tls_after(&kg, &v1("198.51.100.7", 40000)).await.unwrap();
    let (status, head) = raw_request(
        &mut s,
        "GET",
        "/pp",
        &[key, ("x-forwarded-for", "10.99.1.1")],
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        up.requests().last().unwrap().header("x-forwarded-for"),
        Some("10.99.1.1, 198.51.100.7")
    );

    // The balancers' own range as HTTP proxies is T8-10's configuration again (T9-1): refused,
    // also when spelled wider (everyone).
    for overlapping in [
        r#"["127.0.0.0/8"]"#,
        r#"["127.0.0.9/32"]"#,
        r#"["0.0.0.0/0", "::/0"]"#,
    ] {
        let (_dir, config) = Keygate::builder()
            .server("proxy_protocol = true")
            .access(r#"trusted_proxies = ["127.0.0.0/8"]"#)
            .access(&format!("trusted_http_proxies = {overlapping}"))
            .key("far", &hash, "")
            .config_dir();
        let (code, out, err) = keygate_cli(&["check"], &config);
        assert_eq!(code, 1, "{overlapping}: {out}{err}");
        assert!(
            format!("{out}{err}")
                .contains("access.trusted_http_proxies: overlaps access.trusted_proxies"),
            "{out}{err}"
        );
    }

    // Without the PROXY protocol the list means nothing: check refuses it.
    let (_dir, config) = Keygate::builder()
        .access(r#"trusted_http_proxies = ["198.51.100.0/24"]"#)
        .key("far", &hash, "")
        .config_dir();
    let (code, out, err) = keygate_cli(&["check"], &config);
    assert_eq!(code, 1);
    assert!(
        format!("{out}{err}")
            .contains("access.trusted_http_proxies: only applies with server.proxy_protocol"),
        "{out}{err}"
    );
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_is_accepted_only_from_trusted_proxies() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("lb");
    let kg = Keygate::builder()
        .upstream(&up)
        .server("proxy_protocol = true")
        .access(r#"trusted_proxies = ["10.0.0.0/8"]"#)
        .key("lb", &hash, "")
        .start();
    // 127.0.0.1 is not a balancer: its claim to be 203.0.113.9 is not even read.
    assert!(tls_after(&kg, &v1("203.0.113.9", 1)).await.is_err());
    let ev = kg.wait_log("ip_denied", |v| v["event"] == "ip_denied");
    assert_eq!(ev["client_ip"], "127.0.0.1");
    assert_eq!(ev["scope"], "proxy_protocol");
    assert!(!kg.logs().contains("203.0.113.9"));
    assert_eq!(up.count(), 0);

    // And the setting needs trusted proxies at all.
    let (_dir, config) = Keygate::builder()
        .server("proxy_protocol = true")
        .key("lb", &hash, "")
        .config_dir();
    let (code, out, err) = keygate_cli(&["check"], &config);
    assert_eq!(code, 1);
    let all = format!("{out}{err}");
    assert!(
        all.contains("server.proxy_protocol: needs access.trusted_proxies"),
        "{all}"
    );
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}
