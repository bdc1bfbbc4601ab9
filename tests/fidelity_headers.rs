//! Headers keygate manages cannot be forged by look-alikes (issue 8 §2, SPEC §4): no client
//! field that a CGI/WSGI/ASGI server reads as one keygate manages reaches the upstream, in any
//! case, with `_` (or another separator) for `-`, or in several copies; on HTTP/1.1 and HTTP/2.
//! Also field-line rules (RFC 9113 §8.2.3 cookie crumbs, RFC 9110 §5.3 order, Via).

mod common;

use common::python::PyApp;
use common::*;

/// Every spelling of every managed field, with a forged value, next to a valid key.
fn forgeries(token: &str) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for name in [
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "Forwarded",
        "X-Real-IP",
        "X-Request-Id",
        "X-Keygate-Key-Id",
        "X-Keygate-Webhook",
        "X-Client-IP",
        "True-Client-IP",
        "X-HTTP-Method-Override",
        "X-Original-URL",
    ] {
        for spelled in [
            name.replace('-', "_"),
            name.to_ascii_uppercase().replace('-', "_"),
            name.to_ascii_lowercase().replace('-', "."),
            name.replacen('-', "_", 1),
        ] {
            if spelled != name {
                v.push((spelled, "forged-203.0.113.66".to_string()));
            }
        }
    }
    // The other client-address names "real IP" helpers read (a fresh user, T5-14): exact, and
    // as a CGI server spells it.
    for name in [
        "Client-IP",
        "X-Forwarded",
        "Forwarded-For",
        "CF-Connecting-IP",
        "Cf-Pseudo-IPv4",
        "Fastly-Client-IP",
        "Fly-Client-IP",
        "X-Appengine-User-IP",
        "X-Azure-ClientIP",
        "X-ProxyUser-IP",
        "X-Envoy-External-Address",
        "X-Originating-IP",
    ] {
        v.push((name.to_string(), "forged-203.0.113.67".to_string()));
        v.push((
            name.to_ascii_uppercase().replace('-', "_"),
            "forged-203.0.113.68".to_string(),
        ));
    }
    // The credential in look-alike spellings (next to the real one) must not leak either.
    for name in ["X_API_Key", "x_api_key", "X.Api.Key", "Authorization"] {
        v.push((name.to_string(), token.to_string()));
    }
    v
}

/// The attack of issue 8 §2 against the stdlib WSGI server (CGI-style variable names): only
/// keygate's values arrive, and no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookalikes_never_reach_a_wsgi_upstream() {
    let app = PyApp::wsgiref("wsgi_environ:app");
    let (kg, token) = Keygate::with_key(&app.url(), "wsgi");
    for client in [kg.client(), kg.client_h2()] {
        let mut headers: Vec<(String, String)> = forgeries(&token);
        headers.push(("x-api-key".into(), token.clone()));
        headers.push(("X-Forwarded-For".into(), "198.51.100.1".into()));
        headers.push(("X-Real-IP".into(), "198.51.100.2".into()));
        let refs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let got = client.get(&kg.url("/env"), &refs).await;
        assert_eq!(got.status, 200, "{}", got.text());
        let env = got.json();
        let body = got.text();
        assert!(!body.contains("forged"), "{env:#}");
        assert!(!body.contains("198.51.100"), "{env:#}");
        assert_no_secrets(&body, &[&token]);
        assert_eq!(env["HTTP_X_FORWARDED_FOR"], "127.0.0.1", "{env:#}");
        assert_eq!(env["HTTP_X_REAL_IP"], "127.0.0.1", "{env:#}");
        assert_eq!(env["HTTP_X_FORWARDED_PROTO"], "https", "{env:#}");
        assert_eq!(env["HTTP_X_KEYGATE_KEY_ID"], "wsgi", "{env:#}");
        assert_eq!(
            env["HTTP_X_REQUEST_ID"],
            got.header("x-request-id").unwrap(),
            "{env:#}"
        );
        for absent in [
            "HTTP_X_API_KEY",
            "HTTP_AUTHORIZATION",
            "HTTP_FORWARDED",
            "HTTP_X_KEYGATE_WEBHOOK",
            "HTTP_X_CLIENT_IP",
            "HTTP_TRUE_CLIENT_IP",
            "HTTP_X_HTTP_METHOD_OVERRIDE",
            "HTTP_X_ORIGINAL_URL",
        ] {
            assert!(env.get(absent).is_none(), "{absent} in {env:#}");
        }
    }
    assert_no_secrets(&kg.logs(), &[&token]);
}

/// The same, seen by keygate's in-process upstream, field by field: a look-alike of a managed
/// name never arrives; ordinary underscore names do (keygate does not drop them all, see
/// README "Header look-alikes").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_is_removed_on_h1_and_h2() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    let kg = Keygate::builder()
        .upstream(&up)
        .auth("identity_header = \"X-Auth-User\"")
        .key("k", &hash, "")
        .start();
    for (i, client) in [kg.client(), kg.client_h2()].into_iter().enumerate() {
        let mut headers = forgeries(&token);
        headers.push(("x-api-key".into(), token.clone()));
        headers.push(("X_Auth_User".into(), "root".into()));
        headers.push(("x-auth-user".into(), "root".into()));
        headers.push(("X.AUTH.USER".into(), "root".into()));
        headers.push(("X_Custom_Header".into(), "kept".into()));
        let refs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(client.get(&kg.url("/p"), &refs).await.status, 200);
        let seen = &up.requests()[i];
        for (n, v) in &seen.headers {
            assert!(
                !v.contains("forged") && v != "root",
                "{n}: {v} ({:?})",
                seen.headers
            );
            assert!(!v.contains(&token), "{n} carries the token");
        }
        assert_eq!(seen.header_all("x-auth-user"), ["k"]);
        assert_eq!(seen.header("x_custom_header"), Some("kept"));
    }
}

/// RFC 9113 §8.2.3: an HTTP/2 client's cookie crumbs reach an HTTP/1.1 WSGI app as one
/// `Cookie` joined with "; " (not `session=abc123,lang=en`); RFC 9110 §5.3: other repeated
/// fields keep their order; RFC 9110 §7.6.3: `Via` names keygate as a gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_crumbs_are_joined_and_field_order_kept() {
    let app = PyApp::wsgiref("wsgi_environ:app");
    let up = Upstream::start().await;
    let (token, hash) = new_key("k");
    for (url, wsgi) in [(app.url(), true), (up.url(), false)] {
        let kg = Keygate::builder()
            .upstream_url(&url)
            .key("k", &hash, "")
            .start();
        for (client, proto) in [(kg.client_h2(), "2"), (kg.client(), "1.1")] {
            let got = client
                .get(
                    &kg.url("/env"),
                    &[
                        ("x-api-key", &token),
                        ("cookie", "session=abc123"),
                        ("cookie", "lang=en"),
                        ("x-multi", "first"),
                        ("x-multi", "second"),
                        ("via", "1.1 edge-proxy"),
                    ],
                )
                .await;
            assert_eq!(got.status, 200);
            if wsgi {
                let env = got.json();
                assert_eq!(env["HTTP_COOKIE"], "session=abc123; lang=en", "{env:#}");
                assert_eq!(env["HTTP_X_MULTI"], "first,second", "{env:#}");
                assert_eq!(env["HTTP_VIA"], format!("1.1 edge-proxy, {proto} keygate"));
            } else {
                let seen = up.requests().pop().unwrap();
                assert_eq!(seen.header_all("cookie"), ["session=abc123; lang=en"]);
                assert_eq!(seen.header_all("x-multi"), ["first", "second"]);
            }
        }
    }
}
