//! Replays of webhook schemes whose delivery id is not signed (`github`'s `X-GitHub-Delivery`,
//! an `id_from` header): the duplicate key comes only from signed content (docs/webhooks.md,
//! "Duplicates"), so changing, dropping or doubling the unsigned id header does not get a
//! captured delivery forwarded again. Over real TLS, HTTP/1.1 and HTTP/2. Also: `bytes_in` of
//! refused and duplicate deliveries.

mod common;

use common::webhooks::*;
use common::*;

const ROUTES: &str = r#"
[[webhooks]]
id = "gh"
path = "/hooks/github"
scheme = "github"
secret = { env = "WH_GITHUB" }

[[webhooks]]
id = "hexid"
path = "/hooks/hex"
scheme = "hmac-sha256-hex"
secret = { env = "WH_HEX" }
id_from = { header = "X-Delivery-Id" }

[[webhooks]]
id = "payh"
path = "/hooks/pay"
scheme = "stripe"
secret = { env = "WH_STRIPE" }
id_from = { header = "X-Event-Id" }
"#;

struct Env {
    github: String,
    hex: String,
    stripe: String,
}

fn start(up: &RecordingUpstream) -> (Keygate, Env) {
    let r = || {
        format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        )
    };
    let e = Env {
        github: format!("gh{}", r()),
        hex: format!("hex{}", r()),
        stripe: format!("whsec_pay{}", r()),
    };
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .key("app", &new_key("app").1, "")
        // Every refusal's line is looked at: no per-client log budget in the way.
        .log("client_event_limit = \"100000/min\"")
        .raw(ROUTES)
        .start_with(
            &[
                ("WH_GITHUB", e.github.as_str()),
                ("WH_HEX", e.hex.as_str()),
                ("WH_STRIPE", e.stripe.as_str()),
            ],
            None,
        );
    (kg, e)
}

/// (path, id header, signature headers without any id header) for a route; signed afresh
/// (Stripe: a new `t`) on every call, as a sender's retry or a replayer would.
fn sig(e: &Env, route: &str, body: &[u8]) -> (&'static str, &'static str, Vec<(String, String)>) {
    match route {
        "gh" => {
            let mut h = sign_github(&e.github, body, "unused");
            h.retain(|(n, _)| !n.eq_ignore_ascii_case("x-github-delivery"));
            ("/hooks/github", "X-GitHub-Delivery", h)
        }
        "hexid" => ("/hooks/hex", "X-Delivery-Id", sign_hex(&e.hex, body)),
        "payh" => (
            "/hooks/pay",
            "X-Event-Id",
            sign_stripe(&e.stripe, body, now()),
        ),
        _ => unreachable!(),
    }
}

fn with_ids(mut h: Vec<(String, String)>, name: &str, ids: &[&str]) -> Vec<(String, String)> {
    for id in ids {
        h.push((name.to_string(), id.to_string()));
    }
    h
}

const ROUTE_IDS: [&str; 3] = ["gh", "hexid", "payh"];

#[tokio::test]
async fn a_captured_delivery_is_not_forwarded_again_with_a_changed_missing_or_doubled_id() {
    let up = RecordingUpstream::start().await;
    let (kg, e) = start(&up);
    for (proto, c) in [("h1", kg.client()), ("h2", kg.client_h2())] {
        for route in ROUTE_IDS {
            let what = format!("{route} over {proto}");
            let body = format!(
                "{{\"action\":\"opened\",\"n\":\"{route}-{proto}-{:x}\"}}",
                rand::random::<u64>()
            )
            .into_bytes();
            let real = format!("real-{route}-{proto}");
            let send = |ids: Vec<&str>, body: Vec<u8>| {
                let (path, id_header, h) = sig(&e, route, &body);
                let h = with_ids(h, id_header, &ids);
                c.send(post(&kg.url(path), &h, &body))
            };
            let before = up.count();
            let got = send(vec![real.as_str()], body.clone()).await;
            assert_eq!(got.status, 200, "{what}: first delivery");
            assert_eq!(up.count(), before + 1, "{what}: first delivery forwarded");
            assert_eq!(
                up.deliveries().last().unwrap().body,
                body,
                "{what}: byte for byte"
            );

            // The fresh user's replays: a fresh id, no id, and the real one behind another.
            for ids in [vec!["fresh-1"], vec![], vec![real.as_str()]] {
                let got = send(ids.clone(), body.clone()).await;
                assert_eq!(got.status, 200, "{what}: replay with ids {ids:?}");
                assert_eq!(
                    got.json()["status"],
                    "duplicate",
                    "{what}: replay with ids {ids:?}"
                );
            }
            for ids in [vec!["other", real.as_str()], vec![real.as_str(), "fresh-2"]] {
                let got = send(ids.clone(), body.clone()).await;
                assert_eq!(got.status, 400, "{what}: two id headers {ids:?}");
                assert_eq!(got.json()["error"], "bad request");
                let rid = got.header("x-request-id").unwrap().to_string();
                let ev = kg.wait_log("ambiguous_id", |v| {
                    v["event"] == "webhook_rejected" && v["request_id"] == rid.as_str()
                });
                assert_eq!(ev["reason"], "ambiguous_id", "{what}");
                assert_eq!(ev["route"], route);
            }
            assert_eq!(
                up.count(),
                before + 1,
                "{what}: a replay reached the upstream"
            );

            // Two id headers are refused on a fresh delivery too: nothing is forwarded.
            let fresh = format!("{{\"n\":{}}}", rand::random::<u64>()).into_bytes();
            let got = send(vec!["a", "b"], fresh.clone()).await;
            assert_eq!(got.status, 400, "{what}: fresh delivery, two ids");
            assert_eq!(up.count(), before + 1, "{what}");

            // Another body with the same (unsigned) id is another delivery: forwarded.
            let got = send(vec![real.as_str()], fresh.clone()).await;
            assert_eq!(got.status, 200, "{what}: other body, same id");
            assert_eq!(got.text(), "upstream says hi", "{what}");
            assert_eq!(up.count(), before + 2, "{what}: other body forwarded");
            assert_eq!(up.deliveries().last().unwrap().body, fresh);
        }
    }
}

/// Someone who learns the id of a delivery that is on its way (an unsigned header) and
/// sends first, with a forged body or with another captured delivery, must not make keygate
/// answer the real delivery as a duplicate.
#[tokio::test]
async fn claiming_a_pending_unsigned_id_first_does_not_block_the_real_delivery() {
    let up = RecordingUpstream::start().await;
    let (kg, e) = start(&up);
    let c = kg.client_h2();
    for route in ROUTE_IDS {
        let old = format!("{{\"old\":{}}}", rand::random::<u64>()).into_bytes();
        let new = format!("{{\"new\":{}}}", rand::random::<u64>()).into_bytes();
        let pending = format!("pending-{route}");
        let (path, id_header, h) = sig(&e, route, &old);
        // A delivery captured earlier, accepted.
        let got = c
            .send(post(
                &kg.url(path),
                &with_ids(h.clone(), id_header, &["old-id"]),
                &old,
            ))
            .await;
        assert_eq!(got.status, 200);
        let before = up.count();
        // The attacker: the old captured delivery under the pending id, then a forgery.
        let got = c
            .send(post(
                &kg.url(path),
                &with_ids(h.clone(), id_header, &[pending.as_str()]),
                &old,
            ))
            .await;
        assert_eq!(got.json()["status"], "duplicate", "{route}");
        let got = c
            .send(post(
                &kg.url(path),
                &with_ids(h, id_header, &[pending.as_str()]),
                &new,
            ))
            .await;
        assert_eq!(got.status, 401, "{route}: forged body");
        assert_eq!(up.count(), before);
        // The real delivery arrives: forwarded.
        let (_, _, h) = sig(&e, route, &new);
        let got = c
            .send(post(
                &kg.url(path),
                &with_ids(h, id_header, &[pending.as_str()]),
                &new,
            ))
            .await;
        assert_eq!(got.status, 200, "{route}");
        assert_eq!(got.text(), "upstream says hi", "{route}");
        assert_eq!(
            up.count(),
            before + 1,
            "{route}: the real delivery was blocked"
        );
    }
}

/// The access line counts the body bytes keygate read to verify a delivery, also when it
/// refused it or answered it as a duplicate.
#[tokio::test]
async fn access_lines_of_refused_and_duplicate_deliveries_count_the_bytes_read() {
    let up = RecordingUpstream::start().await;
    let (kg, e) = start(&up);
    for (proto, c) in [("h1", kg.client()), ("h2", kg.client_h2())] {
        let body = format!("{{\"bytes\":\"{proto}-{:x}\"}}", rand::random::<u64>()).into_bytes();
        let (path, _, h) = sig(&e, "gh", &body);
        let mut forged = h.clone();
        for (n, v) in &mut forged {
            if n.eq_ignore_ascii_case("x-hub-signature-256") {
                *v = format!("sha256={}", "0".repeat(64));
            }
        }
        for (what, headers, status) in [
            ("forwarded", h.clone(), 200),
            ("duplicate", h.clone(), 200),
            ("bad signature", forged, 401),
            (
                "two ids",
                with_ids(h, "X-GitHub-Delivery", &["a", "b"]),
                400,
            ),
        ] {
            let got = c.send(post(&kg.url(path), &headers, &body)).await;
            assert_eq!(got.status, status, "{what} over {proto}");
            let rid = got.header("x-request-id").unwrap().to_string();
            let line = kg.access_line(&rid);
            assert_eq!(line["bytes_in"], body.len(), "{what} over {proto}: {line}");
        }
    }
}
