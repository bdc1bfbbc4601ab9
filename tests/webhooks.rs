//! Signed webhook routes (issue 13, SPEC §10) over real TLS: a real keygate process, a real
//! upstream that keeps every body byte for byte, senders' signatures computed here from each
//! scheme's documentation. For every scheme: valid, wrong secret, tampered body, missing header,
//! stale, replayed after a 2xx, retried after a 5xx, oversized, second secret during rotation.

mod common;

use common::webhooks::*;
use common::*;

/// Per-run secrets, so the leak checks look for values that exist nowhere else.
struct Secrets {
    hex: String,
    hex_next: String,
    github: String,
    stripe: String,
    standard: String,
    standard_next: String,
}

impl Secrets {
    fn new() -> Self {
        Secrets {
            hex: unique_secret("hexsecret"),
            hex_next: unique_secret("hexnext"),
            github: unique_secret("ghsecret"),
            stripe: unique_secret("whsec_stripe"),
            standard: random_whsec(24),
            standard_next: random_whsec(24),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("WH_HEX", self.hex.clone()),
            ("WH_HEX_NEXT", self.hex_next.clone()),
            ("WH_GITHUB", self.github.clone()),
            ("WH_STRIPE", self.stripe.clone()),
            ("WH_STANDARD", self.standard.clone()),
            ("WH_STANDARD_NEXT", self.standard_next.clone()),
        ]
    }

    fn all(&self) -> Vec<String> {
        let mut v: Vec<String> = self.env().into_iter().map(|(_, s)| s).collect();
        // The decoded Standard Webhooks key part, too.
        v.push(self.standard["whsec_".len()..].to_string());
        v
    }
}

const ROUTES: &str = r#"
[[webhooks]]
id = "plain"
path = "/hooks/plain"
scheme = "hmac-sha256-hex"
secrets = [{ env = "WH_HEX" }, { env = "WH_HEX_NEXT" }]
id_from = { json = "request_id" }
max_body_bytes = 4096

[[webhooks]]
id = "gh"
path = "/hooks/github"
scheme = "github"
secret = { env = "WH_GITHUB" }

[[webhooks]]
id = "pay"
path = "/hooks/stripe/"
scheme = "stripe"
secrets = [{ env = "WH_STRIPE" }]
tolerance = "2m"

[[webhooks]]
id = "std"
path = "/hooks/std"
scheme = "standard-webhooks"
secrets = [{ env = "WH_STANDARD" }, { env = "WH_STANDARD_NEXT" }]
"#;

const APP_KEY_ID: &str = "app";

fn start(up: &RecordingUpstream, secrets: &Secrets, extra: &str) -> Keygate {
    start_with_key(up, secrets, extra, &new_key(APP_KEY_ID).1)
}

fn start_with_key(up: &RecordingUpstream, secrets: &Secrets, extra: &str, hash: &str) -> Keygate {
    let env = secrets.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Keygate::builder()
        .upstream_url(&up.url())
        .upstream_line("request_timeout = \"1s\"")
        .admin()
        .key(APP_KEY_ID, hash, "")
        .raw(ROUTES)
        .raw(extra)
        .start_with(&env, None)
}

/// A body a re-serialising verifier would break: odd spacing, key order, escapes, non-ASCII.
fn awkward_body(n: u32) -> Vec<u8> {
    format!(
        "{{ \"request_id\" : \"req-{n}\",\n  \"z\":1, \"a\" :\"caf\\u00e9 ☕\", \"id\": \"evt_{n}_{:x}\",\"f\":1.0e0 }}\n",
        rand::random::<u32>()
    )
    .into_bytes()
}

/// The four schemes: (path, headers for a body). `id` is the delivery id where one is separate.
fn signed(s: &Secrets, scheme: &str, body: &[u8], id: &str) -> (String, Vec<(String, String)>) {
    match scheme {
        "plain" => ("/hooks/plain".into(), sign_hex(&s.hex, body)),
        "gh" => ("/hooks/github".into(), sign_github(&s.github, body, id)),
        "pay" => (
            "/hooks/stripe/events".into(),
            sign_stripe(&s.stripe, body, now()),
        ),
        "std" => (
            "/hooks/std".into(),
            sign_standard(&s.standard, body, id, now()),
        ),
        _ => unreachable!(),
    }
}

const SCHEMES: [&str; 4] = ["plain", "gh", "pay", "std"];

#[tokio::test]
async fn every_scheme_forwards_a_valid_delivery_byte_for_byte_without_an_api_key() {
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let kg = start(&up, &s, "");
    for (h2, client) in [(false, kg.client()), (true, kg.client_h2())] {
        for (n, scheme) in SCHEMES.iter().enumerate() {
            let body = awkward_body(n as u32 + if h2 { 100 } else { 0 });
            let (path, mut headers) = signed(&s, scheme, &body, &format!("msg_{n}_{h2}"));
            // Client copies of keygate's managed headers, and look-alikes.
            headers.push(("x-keygate-webhook".into(), "forged".into()));
            headers.push(("x_keygate_webhook".into(), "forged".into()));
            headers.push(("x-keygate-key-id".into(), "forged".into()));
            headers.push(("x-api-key".into(), "not-a-key".into()));
            let before = up.count();
            let got = client.send(post(&kg.url(&path), &headers, &body)).await;
            assert_eq!(got.status, 200, "{scheme} h2={h2}: {}", got.text());
            assert_eq!(got.text(), "upstream says hi");
            let d = up.deliveries().pop().unwrap();
            assert_eq!(up.count(), before + 1);
            assert_eq!(d.body, body, "{scheme}: body changed on the way");
            assert_eq!(d.path, path);
            assert_eq!(
                d.headers
                    .get_all("x-keygate-webhook")
                    .iter()
                    .collect::<Vec<_>>(),
                vec![*scheme],
                "{scheme}"
            );
            assert!(!d.headers.contains_key("x_keygate_webhook"));
            assert!(!d.headers.contains_key("x-keygate-key-id"));
            assert!(!d.headers.contains_key("x-api-key"));
            // Signature headers are kept for an upstream that verifies again.
            let (sig_name, sig_value) = &headers[if *scheme == "std" { 2 } else { 0 }];
            assert_eq!(
                d.headers.get(sig_name.as_str()).unwrap(),
                sig_value.as_str()
            );
            assert_eq!(
                d.headers.get("content-length").unwrap(),
                &body.len().to_string()
            );
        }
    }
    // Every other path still needs an API key; so does a path that only normalises into a
    // webhook route (it would reach another upstream path).
    let c = kg.client();
    let body = awkward_body(9);
    // The last three are validly signed for the prefix route, spelled so that a servlet
    // container (Tomcat, Jetty, Spring) would serve another path: `..;` is `..` there.
    for (path, scheme) in [
        ("/other", "plain"),
        ("/hooks/plain/../../admin", "plain"),
        ("/hooks/%70lain", "plain"),
        ("/hooks//plain", "plain"),
        ("/hooks/github/x", "plain"),
        ("/hooks/stripe", "plain"),
        ("/hooks/stripe/..;/..;/admin", "pay"),
        ("/hooks/stripe/..;x/..;x/admin", "pay"),
        ("/hooks/stripe/a;x", "pay"),
    ] {
        let (_, headers) = signed(&s, scheme, &body, "");
        let before = up.count();
        let got = c.send(post(&kg.url(path), &headers, &body)).await;
        assert_eq!(got.status, 401, "{path}");
        assert_eq!(up.count(), before, "{path} reached the upstream");
    }
}

#[tokio::test]
async fn wrong_secret_tampered_body_and_missing_headers_never_reach_the_upstream() {
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let kg = start(&up, &s, "");
    let c = kg.client();
    let wrong = Secrets::new();
    for scheme in SCHEMES {
        let body = awkward_body(1);
        let id = format!("msg_{scheme}_bad");
        let (path, good) = signed(&s, scheme, &body, &id);
        let (_, bad) = signed(&wrong, scheme, &body, &id);
        let mut tampered = body.clone();
        tampered[3] ^= 0x20;
        let without_sig: Vec<_> = good
            .iter()
            .filter(|(n, _)| !n.contains("signature"))
            .cloned()
            .collect();
        let mut doubled = good.clone();
        doubled.extend(bad.iter().filter(|(n, _)| n.contains("signature")).cloned());
        for (what, headers, body, reason) in [
            ("wrong secret", &bad, &body, "bad_signature"),
            ("tampered body", &good, &tampered, "bad_signature"),
            ("no signature", &without_sig, &body, "missing_signature"),
            ("two signature headers", &doubled, &body, "bad_signature"),
        ] {
            let got = c.send(post(&kg.url(&path), headers, body)).await;
            assert_eq!(got.status, 401, "{scheme} {what}");
            assert_eq!(got.json()["error"], "unauthorized");
            let rid = got.header("x-request-id").unwrap().to_string();
            let ev = kg.wait_log("webhook_rejected", |v| {
                v["event"] == "webhook_rejected" && v["request_id"] == rid.as_str()
            });
            assert_eq!(ev["reason"], reason, "{scheme} {what}: {ev}");
            assert_eq!(ev["route"], scheme);
            assert_eq!(ev["client_ip"], "127.0.0.1");
        }
    }
    assert_eq!(up.count(), 0, "a refused delivery reached the upstream");
    // Standard Webhooks: each of its three headers is needed.
    let body = b"{}";
    let (path, good) = signed(&s, "std", body, "msg_x");
    for drop in ["webhook-id", "webhook-timestamp"] {
        let h: Vec<_> = good.iter().filter(|(n, _)| n != drop).cloned().collect();
        let got = c.send(post(&kg.url(&path), &h, body)).await;
        assert_eq!(got.status, 401, "without {drop}");
    }
    // A different id under the same signature is a different signed message.
    let mut h = good.clone();
    h[0].1 = "msg_y".into();
    assert_eq!(c.send(post(&kg.url(&path), &h, body)).await.status, 401);
    assert_eq!(up.count(), 0);
    assert_no_secrets(
        &kg.logs(),
        &s.all().iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[tokio::test]
async fn stale_and_future_timestamps_are_refused() {
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let kg = start(&up, &s, "");
    let c = kg.client();
    let body = br#"{"id":"evt_stale"}"#;
    // Stripe route: tolerance 2m. Standard Webhooks: default 5m.
    for (path, headers) in [
        ("/hooks/stripe/x", sign_stripe(&s.stripe, body, now() - 180)),
        ("/hooks/stripe/x", sign_stripe(&s.stripe, body, now() + 180)),
        (
            "/hooks/std",
            sign_standard(&s.standard, body, "msg_old", now() - 400),
        ),
        (
            "/hooks/std",
            sign_standard(&s.standard, body, "msg_new", now() + 400),
        ),
    ] {
        let got = c.send(post(&kg.url(path), &headers, body)).await;
        assert_eq!(got.status, 401, "{path} {headers:?}");
        let rid = got.header("x-request-id").unwrap().to_string();
        let ev = kg.wait_log("stale", |v| v["request_id"] == rid.as_str());
        assert_eq!(ev["reason"], "stale");
    }
    assert_eq!(up.count(), 0);
    // Within the tolerance (sender clock a minute off either way) is fine.
    for t in [now() - 60, now() + 60] {
        let got = c
            .send(post(
                &kg.url("/hooks/stripe/x"),
                &sign_stripe(&s.stripe, body, t),
                body,
            ))
            .await;
        assert_eq!(got.status, 200);
        // Same event id: the second is a duplicate of the first, accepted, delivery.
    }
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn duplicates_of_an_accepted_delivery_are_answered_here_and_retries_after_failure_forwarded()
{
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let kg = start(&up, &s, "");
    let c = kg.client();
    for scheme in SCHEMES {
        let body = awkward_body(7);
        let id = format!("msg_dup_{scheme}_{:x}", rand::random::<u32>());
        let send = |status: u16| {
            // Each attempt is signed afresh (new timestamp), as senders do for retries.
            let (path, mut h) = signed(&s, scheme, &body, &id);
            h.push(("x-upstream-status".into(), status.to_string()));
            c.send(post(&kg.url(&path), &h, &body))
        };
        let before = up.count();
        assert_eq!(
            send(503).await.status,
            503,
            "{scheme}: first attempt fails upstream"
        );
        assert_eq!(
            send(500).await.status,
            500,
            "{scheme}: retry after a 5xx is forwarded"
        );
        assert_eq!(up.count(), before + 2);
        assert_eq!(send(200).await.status, 200, "{scheme}: retry accepted");
        assert_eq!(up.count(), before + 3);
        // Now accepted: a retry or a replay is answered by keygate, not forwarded.
        for _ in 0..2 {
            let got = send(500).await;
            assert_eq!(got.status, 200, "{scheme}: duplicate");
            assert_eq!(got.json()["status"], "duplicate");
            let rid = got.header("x-request-id").unwrap().to_string();
            let ev = kg.wait_log("replayed", |v| v["request_id"] == rid.as_str());
            assert_eq!(ev["reason"], "replayed");
            assert_eq!(ev["route"], scheme);
        }
        assert_eq!(
            up.count(),
            before + 3,
            "{scheme}: a duplicate reached the upstream"
        );
    }
    // A 4xx is not an acceptance either: the same delivery sent again is forwarded.
    let body = br#"{"request_id":"four-oh-oh"}"#.to_vec();
    let before = up.count();
    for (upstream_says, expect) in [("422", 422), ("200", 200), ("200", 200)] {
        let mut h = sign_hex(&s.hex, &body);
        h.push(("x-upstream-status".into(), upstream_says.into()));
        let got = c.send(post(&kg.url("/hooks/plain"), &h, &body)).await;
        assert_eq!(got.status, expect);
    }
    assert_eq!(
        up.count(),
        before + 2,
        "the third was a duplicate of the accepted second"
    );
    // Without a delivery id (hmac route, body has no request_id), nothing is deduplicated.
    let body = b"no id here".to_vec();
    let before = up.count();
    for _ in 0..2 {
        let got = c
            .send(post(
                &kg.url("/hooks/plain"),
                &sign_hex(&s.hex, &body),
                &body,
            ))
            .await;
        assert_eq!(got.status, 200);
    }
    assert_eq!(up.count(), before + 2);
}

#[tokio::test]
async fn a_retry_after_an_upstream_timeout_is_forwarded() {
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let kg = start(&up, &s, "");
    let c = kg.client();
    let body = b"{\"id\":\"evt_slow\"}";
    let mut h = sign_stripe(&s.stripe, body, now());
    h.push(("x-upstream-sleep-ms".into(), "3000".into()));
    let got = c.send(post(&kg.url("/hooks/stripe/x"), &h, body)).await;
    assert_eq!(got.status, 504);
    let got = c
        .send(post(
            &kg.url("/hooks/stripe/x"),
            &sign_stripe(&s.stripe, body, now()),
            body,
        ))
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(up.count(), 2);
    let got = c
        .send(post(
            &kg.url("/hooks/stripe/x"),
            &sign_stripe(&s.stripe, body, now()),
            body,
        ))
        .await;
    assert_eq!(got.json()["status"], "duplicate");
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn oversized_bodies_are_413_announced_or_streamed() {
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let kg = start(&up, &s, "");
    let c = kg.client();
    // The plain route takes 4096 bytes; exactly that is fine.
    let fits = vec![b'a'; 4096];
    let got = c
        .send(post(
            &kg.url("/hooks/plain"),
            &sign_hex(&s.hex, &fits),
            &fits,
        ))
        .await;
    assert_eq!(got.status, 200);
    let big = vec![b'a'; 4097];
    let got = c
        .send(post(&kg.url("/hooks/plain"), &sign_hex(&s.hex, &big), &big))
        .await;
    assert_eq!(got.status, 413);
    // Streamed (chunked, no Content-Length): cut off when it crosses the limit.
    let sig = sign_hex(&s.hex, &vec![b'a'; 64 * 1024]);
    let chunks = futures_util::stream::iter((0..16).map(|_| {
        Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![
            b'a';
            4096
        ])))
    }));
    let body = http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
        http_body_util::StreamBody::new(chunks),
        |e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>,
    ));
    let mut req = hyper::Request::post(kg.url("/hooks/plain"));
    for (n, v) in &sig {
        req = req.header(n.as_str(), v.as_str());
    }
    let got = c.send(req.body(body).unwrap()).await;
    assert_eq!(got.status, 413);
    // The default limit (1 MiB) on the other routes, announced.
    let huge = vec![b'{'; 1024 * 1024 + 1];
    let got = c
        .send(post(
            &kg.url("/hooks/github"),
            &sign_github(&s.github, &huge, "d"),
            &huge,
        ))
        .await;
    assert_eq!(got.status, 413);
    let rid = got.header("x-request-id").unwrap().to_string();
    let ev = kg.wait_log("too_large", |v| v["request_id"] == rid.as_str());
    assert_eq!(ev["reason"], "too_large");
    assert_eq!(up.count(), 1, "only the delivery that fits was forwarded");
}

#[tokio::test]
async fn a_second_secret_verifies_during_rotation() {
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let kg = start(&up, &s, "");
    let c = kg.client();
    let body = b"rotating".to_vec();
    for secret in [&s.hex, &s.hex_next] {
        let got = c
            .send(post(
                &kg.url("/hooks/plain"),
                &sign_hex(secret, &body),
                &body,
            ))
            .await;
        assert_eq!(got.status, 200);
    }
    for (n, secret) in [&s.standard, &s.standard_next].into_iter().enumerate() {
        let h = sign_standard(secret, &body, &format!("msg_rot_{n}"), now());
        let got = c.send(post(&kg.url("/hooks/std"), &h, &body)).await;
        assert_eq!(got.status, 200);
    }
    // A sender mid-rotation may send both signatures in one header.
    let a = sign_standard(&s.standard, &body, "msg_both", now());
    let b = sign_standard(&Secrets::new().standard, &body, "msg_both", now());
    let mut h = a.clone();
    h[2].1 = format!("{} {}", b[2].1, a[2].1);
    let got = c.send(post(&kg.url("/hooks/std"), &h, &body)).await;
    assert_eq!(got.status, 200);
    assert_eq!(up.count(), 5);
}

#[tokio::test]
async fn sender_allowlist_rate_limit_and_methods() {
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let extra = r#"
[[webhooks]]
id = "far"
path = "/hooks/far"
scheme = "hmac-sha256-hex"
secrets = [{ env = "WH_HEX" }]
allow = ["192.0.2.0/24"]

[[webhooks]]
id = "slow"
path = "/hooks/slow"
scheme = "hmac-sha256-hex"
secrets = [{ env = "WH_HEX" }]
rate_limit = "3/min"
methods = ["POST", "put"]
"#;
    let kg = start(&up, &s, extra);
    let c = kg.client();
    let body = b"x".to_vec();
    let h = sign_hex(&s.hex, &body);
    let got = c.send(post(&kg.url("/hooks/far"), &h, &body)).await;
    assert_eq!(got.status, 403);
    // Only verified deliveries count against the route's rate limit (it protects the
    // upstream): refused ones, forged ones above all, do not (tests/webhook_forgery.rs).
    let got = c.get(&kg.url("/hooks/slow"), &[]).await;
    assert_eq!(got.status, 405);
    assert_eq!(got.header("allow"), Some("POST, PUT"));
    let statuses = {
        let mut v = vec![];
        for _ in 0..3 {
            v.push(c.send(post(&kg.url("/hooks/slow"), &h, &body)).await.status);
        }
        v
    };
    assert_eq!(statuses, vec![200, 200, 200]);
    let got = c.send(post(&kg.url("/hooks/slow"), &h, &body)).await;
    assert_eq!(got.status, 429);
    assert!(got.header("retry-after").is_some());
    for (route, reason) in [
        ("far", "ip_denied"),
        ("slow", "method_not_allowed"),
        ("slow", "rate_limited"),
    ] {
        kg.wait_log(reason, |v| {
            v["event"] == "webhook_rejected" && v["route"] == route && v["reason"] == reason
        });
    }
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn metrics_count_by_route_and_reason_and_no_output_holds_a_secret_or_payload() {
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let kg = start(&up, &s, "");
    let c = kg.client();
    let mut sent: Vec<String> = s.all();
    for scheme in SCHEMES {
        let marker = format!("payload-marker-{:016x}", rand::random::<u64>());
        let body = format!("{{\"request_id\":\"{marker}\",\"id\":\"{marker}\"}}").into_bytes();
        let (path, good) = signed(&s, scheme, &body, &marker);
        let (_, bad) = signed(&Secrets::new(), scheme, &body, &marker);
        for (_, v) in good.iter().chain(&bad) {
            if v.len() > 20 {
                sent.push(v.clone());
            }
        }
        sent.push(marker);
        assert_eq!(c.send(post(&kg.url(&path), &good, &body)).await.status, 200);
        assert_eq!(c.send(post(&kg.url(&path), &good, &body)).await.status, 200);
        assert_eq!(c.send(post(&kg.url(&path), &bad, &body)).await.status, 401);
    }
    let metrics = admin_get(&kg, "/metrics").await;
    for scheme in SCHEMES {
        for line in [
            format!(
                "keygate_webhook_rejected_total{{route=\"{scheme}\",reason=\"bad_signature\"}} 1"
            ),
            format!("keygate_webhook_rejected_total{{route=\"{scheme}\",reason=\"replayed\"}} 1"),
            format!("keygate_webhook_forwarded_total{{route=\"{scheme}\"}} 1"),
        ] {
            assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
        }
    }
    let mut everything = kg.logs();
    everything.push_str(&metrics);
    assert_no_secrets(
        &everything,
        &sent.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// An API-key client cannot make the upstream believe a request is a verified delivery.
#[tokio::test]
async fn key_authenticated_requests_cannot_claim_to_be_webhook_deliveries() {
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let (token, hash) = new_key(APP_KEY_ID);
    let kg = start_with_key(&up, &s, "", &hash);
    for client in [kg.client(), kg.client_h2()] {
        let got = client
            .get(
                &kg.url("/api/thing"),
                &[
                    ("x-api-key", &token),
                    ("x-keygate-webhook", "gh"),
                    ("x_keygate_webhook", "gh"),
                    ("X_Keygate_Webhook", "gh"),
                ],
            )
            .await;
        assert_eq!(got.status, 200);
        let d = up.deliveries().pop().unwrap();
        assert!(
            !d.headers.contains_key("x-keygate-webhook"),
            "{:?}",
            d.headers
        );
        assert!(
            !d.headers.contains_key("x_keygate_webhook"),
            "{:?}",
            d.headers
        );
        assert_eq!(d.headers.get("x-keygate-key-id").unwrap(), APP_KEY_ID);
    }
}

/// A sender that stops mid-body gets 408 after body_read_timeout; nothing is forwarded.
#[tokio::test]
async fn a_stalled_delivery_body_is_408_and_never_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = RecordingUpstream::start().await;
    let s = Secrets::new();
    let (_, hash) = new_key(APP_KEY_ID);
    let env = s.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .server("body_read_timeout = \"1s\"")
        .key(APP_KEY_ID, &hash, "")
        .raw(ROUTES)
        .start_with(&env, None);
    let body = b"0123456789";
    let sig = &sign_hex(&s.hex, body)[0].1;
    let mut tls = kg.tls_stream().await;
    let head = format!(
        "POST /hooks/plain HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\nX-Webhook-Signature: {sig}\r\n\r\n01234"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut out),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(up.count(), 0);
}
