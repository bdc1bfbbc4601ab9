//! Which authority a request names, and the URLs applications build from it (issue 8 §3, §4):
//! `[upstream] host = "client"` (default) gives the app the client's authority, so FastAPI's
//! redirects and `url_for` point at keygate's public origin; `host = "upstream"` sends the
//! upstream's own and rewrites `Location`. RFC 9112 §3.2 / RFC 9113 §8.3.1 refusals.

mod common;

use common::h2raw::RawH2;
use common::python::PyApp;
use common::*;
use tokio::io::AsyncWriteExt;

fn kg_for(url: &str, hash: &str, host: Option<&str>) -> Keygate {
    let mut b = Keygate::builder().upstream_url(url).key("k", hash, "");
    if let Some(h) = host {
        b = b.upstream_line(&format!("host = \"{h}\""));
    }
    b.start()
}

/// FastAPI's `GET /items` answers 307 with `Location` on the `public` origin.
async fn assert_items_redirect_to(client: &TestClient, kg: &Keygate, token: &str, public: &str) {
    let got = client.get(&kg.url("/items"), &[("x-api-key", token)]).await;
    assert_eq!(got.status, 307, "{}", got.text());
    assert_eq!(got.header("location"), Some(&*format!("{public}/items/")));
}

/// FastAPI on uvicorn (`--proxy-headers`): `GET /items` → 307 to `/items/`, and `url_for` in a
/// body, both on keygate's public origin, on HTTP/1.1 and HTTP/2; `curl -L` follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastapi_builds_urls_on_the_public_origin() {
    let app = PyApp::uvicorn();
    let (token, hash) = new_key("k");
    let kg = kg_for(&app.url(), &hash, None);
    let public = format!("https://localhost:{}", kg.addr.port());
    for client in [kg.client(), kg.client_h2()] {
        assert_items_redirect_to(&client, &kg, &token, &public).await;
        let got = client
            .get(&kg.url("/url-for"), &[("x-api-key", &token)])
            .await;
        let v = got.json();
        assert_eq!(v["url_for"], format!("{public}/items/"), "{v}");
        assert_eq!(v["base_url"], format!("{public}/"), "{v}");
    }
    let ca = kg.dir.path().join("cert.pem");
    let hdr = format!("x-api-key: {token}");
    let (code, out, err) = curl(&[
        "-sS",
        "-L",
        "--cacert",
        ca.to_str().unwrap(),
        "-H",
        &hdr,
        &kg.url("/items"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"items\""), "{out}");
}

/// `host = "upstream"`: the app sees its own authority; `Location` pointing there (http or
/// https, as the app builds it from `X-Forwarded-Proto`) is rewritten to the public origin.
/// Bodies are not rewritten (documented in README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_host_mode_rewrites_redirects() {
    let app = PyApp::uvicorn();
    let (token, hash) = new_key("k");
    let kg = kg_for(&app.url(), &hash, Some("upstream"));
    let public = format!("https://localhost:{}", kg.addr.port());
    for client in [kg.client(), kg.client_h2()] {
        assert_items_redirect_to(&client, &kg, &token, &public).await;
        let got = client.get(&kg.url("/echo"), &[("x-api-key", &token)]).await;
        let v = got.json();
        let host = v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == "host")
            .map(|h| h[1].as_str().unwrap().to_string());
        assert_eq!(host, Some(app.addr.to_string()), "{v}");
    }
    let up = Upstream::start().await;
    let kg = kg_for(&up.url(), &hash, Some("upstream"));
    kg.client()
        .get(&kg.url("/x"), &[("x-api-key", &token)])
        .await;
    assert_eq!(up.requests()[0].header("host"), Some(&*up.addr.to_string()));
    assert_eq!(
        up.requests()[0].header("x-forwarded-host"),
        Some(&*format!("localhost:{}", kg.addr.port()))
    );
}

async fn raw_h1(kg: &Keygate, request: &str) -> (u16, String) {
    let mut s = kg.tls_stream().await;
    s.write_all(request.as_bytes()).await.unwrap();
    let text = String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// RFC 9112 §3.2: an HTTP/1.1 request without exactly one valid `Host` is a 400 (JSON), before
/// authentication, and nothing is forwarded. HTTP/1.0 may omit it. Absolute-form targets name
/// the authority themselves (RFC 9112 §3.2.2) and are forwarded in origin form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_needs_exactly_one_host() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = kg_for(&up.url(), &hash, None);
    for (head, want) in [
        ("GET /a HTTP/1.1\r\n", 400),
        (
            "GET /b HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n",
            400,
        ),
        ("GET /c HTTP/1.1\r\nHost: localhost\r\nhost: other\r\n", 400),
        ("GET /d HTTP/1.1\r\nHost: user@localhost\r\n", 400),
        ("GET /e HTTP/1.1\r\nHost: localhost:x\r\n", 400),
        ("GET /f HTTP/1.0\r\n", 200),
        (
            "GET https://public.example/g?q=1 HTTP/1.1\r\nHost: localhost\r\n",
            200,
        ),
    ] {
        for key in [token.as_str(), "none"] {
            let (status, text) = raw_h1(
                &kg,
                &format!("{head}X-API-Key: {key}\r\nConnection: close\r\n\r\n"),
            )
            .await;
            let want = if key == "none" && want == 200 {
                401
            } else {
                want
            };
            assert_eq!(status, want, "{head:?}: {text}");
            if want == 400 {
                assert!(text.contains("{\"error\":\"bad request\""), "{text}");
            }
        }
    }
    let seen = up.requests();
    let uris: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(uris, ["/f", "/g?q=1"]);
    assert_eq!(seen[1].header("host"), Some("public.example"));
}

/// RFC 9113 §8.3.1: an HTTP/2 `host` naming another authority than `:authority` is a 400; the
/// same authority in another case passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_host_must_agree_with_authority() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = kg_for(&up.url(), &hash, None);
    let authority = format!("localhost:{}", kg.addr.port());
    let upper = authority.to_ascii_uppercase();
    let mut h2 = RawH2::connect(&kg).await;
    let mut id = 1;
    for (host, want) in [
        (Some("evil.example"), 400),
        (Some(upper.as_str()), 200),
        (None, 200),
    ] {
        let mut fields = vec![
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", authority.as_str()),
            (":path", "/h2"),
            ("x-api-key", token.as_str()),
        ];
        if let Some(h) = host {
            fields.push(("host", h));
        }
        h2.headers(id, &fields, true).await;
        let out = h2.outcome(id).await;
        assert_eq!(out.indexed_status, Some(want), "{host:?}: {out:?}");
        if want == 400 {
            assert!(String::from_utf8_lossy(&out.body).contains("bad request"));
        }
        id += 2;
    }
    assert_eq!(up.count(), 2);
    assert!(
        up.requests()
            .iter()
            .all(|s| s.header("host") == Some(&*authority) || s.header("host") == Some(&*upper))
    );
}

/// A fresh user: userinfo in the request target's authority (`https://user:<key>@host/…` in
/// HTTP/1.1 absolute form, or in HTTP/2 `:authority`) was taken as the client's authority and
/// forwarded as `Host` and `X-Forwarded-Host`, key and all (nginx: 400). RFC 9110 §4.2.4 and
/// RFC 9113 §8.3.1: it is a 400 now, with or without a valid key, nothing forwarded, nothing
/// of it logged. Same kind: a key pasted as the method (logged and forwarded as it was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userinfo_in_the_authority_and_a_key_as_the_method_are_refused() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = kg_for(&up.url(), &hash, None);
    let port = kg.addr.port();
    for target in [
        format!("https://user:{token}@localhost:{port}/redirect"),
        format!("https://{token}@localhost/redirect"),
        format!("http://@localhost:{port}/redirect"),
    ] {
        for key in [token.as_str(), "none"] {
            let (status, text) = raw_h1(
                &kg,
                &format!(
                    "GET {target} HTTP/1.1\r\nHost: localhost:{port}\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n"
                ),
            )
            .await;
            assert_eq!(status, 400, "{target}: {text}");
            assert!(text.contains("{\"error\":\"bad request\""), "{text}");
        }
    }
    let (status, text) = raw_h1(
        &kg,
        &format!(
            "{token} /echo HTTP/1.1\r\nHost: localhost:{port}\r\nX-API-Key: {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let mut h2 = RawH2::connect(&kg).await;
    let mut id = 1;
    for authority in [
        format!("user:{token}@localhost:{port}"),
        format!("{token}@localhost:{port}"),
    ] {
        h2.headers(
            id,
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", authority.as_str()),
                (":path", "/redirect"),
                ("x-api-key", token.as_str()),
            ],
            true,
        )
        .await;
        let out = h2.outcome(id).await;
        assert!(
            matches!(out.indexed_status, Some(400)) || out.reset.is_some(),
            "{out:?}"
        );
        id += 2;
    }
    // The well-formed request still goes through on the same connection.
    let authority = format!("localhost:{port}");
    h2.headers(
        id,
        &[
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", authority.as_str()),
            (":path", "/ok"),
            ("x-api-key", token.as_str()),
        ],
        true,
    )
    .await;
    assert_eq!(h2.outcome(id).await.indexed_status, Some(200));
    let seen = up.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].uri, "/ok");
    for reason in ["invalid_authority", "credential_in_method"] {
        kg.wait_log(reason, |v| v["reason"] == reason);
    }
    let secret = &token["kg_k_".len()..];
    assert_no_secrets(&kg.logs(), &[secret]);
}

/// A fresh user: with an upstream base path (`url = "http://…/api"`) dot-segments were
/// forwarded under it (`GET /../admin` reached the upstream as `/api/../admin`, which servers
/// that resolve dot-segments serve as `/admin`). A path that leaves the base path under any
/// reading is a 400 now (raw, escaped, double-escaped, with path parameters; HTTP/1.1 and
/// HTTP/2); dot-segments that stay inside it pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_leave_the_upstream_base_path_are_refused() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = kg_for(&format!("{}/api", up.url()), &hash, None);
    let port = kg.addr.port();
    for path in [
        "/../admin",
        "/%2e%2e/admin",
        "/.%2E/admin",
        "/..%2fadmin",
        "/%252e%252e/admin",
        "/..;/admin",
        "/x/../../admin",
        "/..",
        // WHATWG URL parsers and Python's urlsplit drop tab, LF and CR: `..\t` is `..`.
        "/..%09/admin",
        "/.%0a./admin",
        "/%0d../admin",
    ] {
        let (status, text) = raw_h1(
            &kg,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nX-API-Key: {token}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(status, 400, "{path}: {text}");
    }
    let mut h2 = RawH2::connect(&kg).await;
    let authority = format!("localhost:{port}");
    let mut id = 1;
    for (path, want) in [("/%2e%2e/admin", 400), ("/v1/../jobs", 200), ("/jobs", 200)] {
        h2.headers(
            id,
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", authority.as_str()),
                (":path", path),
                ("x-api-key", token.as_str()),
            ],
            true,
        )
        .await;
        assert_eq!(h2.outcome(id).await.indexed_status, Some(want), "{path}");
        id += 2;
    }
    let (status, _) = raw_h1(
        &kg,
        &format!(
            "GET /a/./b/../c?x=1 HTTP/1.1\r\nHost: localhost:{port}\r\nX-API-Key: {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200);
    let uris: Vec<String> = up.requests().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(
        uris,
        ["/api/v1/../jobs", "/api/jobs", "/api/a/./b/../c?x=1"]
    );
}
