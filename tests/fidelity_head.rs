//! keygate's own answers to HEAD requests (refusals, introspection) carry no content on either
//! protocol (RFC 9110 §9.3.2); over HTTP/2 a HEAD response with DATA is a stream error that
//! clients (curl: "PROTOCOL_ERROR") report instead of the status. Found by a fresh-user test.

mod common;

use common::*;

#[tokio::test]
async fn refusals_to_head_have_a_status_and_no_content_on_h1_and_h2() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("scoped");
    let kg = Keygate::builder()
        .upstream(&up)
        .key(
            "scoped",
            &hash,
            "methods = [\"GET\"]\npaths = [\"/public/\"]",
        )
        .start();
    for h2 in [false, true] {
        let c = if h2 { kg.client_h2() } else { kg.client() };
        let req = |path: &str, key: Option<&str>| {
            let mut b = hyper::Request::head(kg.url(path));
            if let Some(k) = key {
                b = b.header("x-api-key", k);
            }
            b.body(empty()).unwrap()
        };
        let r = c.send(req("/x", None)).await;
        assert_eq!(r.status, 401, "h2={h2}");
        assert!(r.body.is_empty(), "h2={h2}: {:?}", r.body);
        assert!(r.header("x-request-id").is_some());
        let r = c.send(req("/public/x", Some(&token))).await;
        assert_eq!(r.status, 403, "HEAD is outside a GET-only scope (h2={h2})");
        assert!(r.body.is_empty());
        let r = c.send(req("/.well-known/keygate/key", Some(&token))).await;
        assert_eq!(r.status, 200, "h2={h2}");
        assert!(r.body.is_empty());
    }
    // curl, as the user who found it ran it.
    for proto in ["--http1.1", "--http2"] {
        let (code, out, err) = curl(&[
            "-sk",
            proto,
            "-I",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &kg.url("/x"),
        ]);
        assert_eq!(code, 0, "{proto}: {err}");
        assert_eq!(out, "401", "{proto}");
    }
    assert_no_secrets(&kg.logs(), &[&token]);
    assert_eq!(up.count(), 0, "nothing was forwarded");
}
