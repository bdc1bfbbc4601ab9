//! Forged deliveries cannot stop genuine ones (fresh user T3-4). A route's `rate_limit` was one
//! bucket for everybody, charged before the signature check: anyone who knew the URL kept the
//! genuine sender at 429 with 5 forged requests a second. Now the bucket is charged only for
//! deliveries whose signature verified (it protects the upstream), and unverified ones (no, a
//! wrong or a stale signature) are bounded per client address by `[auth] failed_auth_limit`,
//! past which that address gets 429 before its body is read. Real TLS, raw HTTP/1.1 senders
//! from distinct loopback addresses.

mod common;

use common::webhooks::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET_ENV: &str = "WH_GH";

fn start(up: &RecordingUpstream, secret: &str) -> Keygate {
    Keygate::builder()
        .upstream_url(&up.url())
        .auth("failed_auth_limit = \"10/min\"")
        .raw(
            "[[webhooks]]\nid = \"gh\"\npath = \"/hooks/github\"\nscheme = \"github\"\n\
             secret = { env = \"WH_GH\" }\nrate_limit = \"3/min\"\n",
        )
        .admin()
        .start_with(&[(SECRET_ENV, secret)], None)
}

/// One delivery from the loopback address `from` with these header fields; the status.
async fn deliver(kg: &Keygate, from: [u8; 4], headers: &[(String, String)], body: &[u8]) -> u16 {
    let mut tls = kg.tls_from(from).await.unwrap();
    let mut head = format!(
        "POST /hooks/github HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut got = Vec::new();
    let _ = tls.read_to_end(&mut got).await;
    let text = String::from_utf8_lossy(&got);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

/// The fresh user's repro, with every kind of unverified delivery: 30 forged ones from one
/// address (a wrong signature, none, a right-looking one over another body) get their 401s up
/// to the address's budget, then 429 `throttled` unread; the genuine sender at another address
/// is served throughout, and the route's 3/min bucket counts only its verified deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_deliveries_cannot_rate_limit_the_genuine_sender() {
    let up = RecordingUpstream::start().await;
    let secret = unique_secret("gh");
    let kg = start(&up, &secret);

    let attacker = [127, 0, 5, 5];
    let forged_body = br#"{"forged":1}"#;
    let zeros = vec![(
        "X-Hub-Signature-256".to_string(),
        format!("sha256={}", "0".repeat(64)),
    )];
    // Signed for another body: a genuine signature replayed over a tampered payload.
    let other = sign_github(&secret, br#"{"other":1}"#, "d-x");
    let mut statuses = Vec::new();
    for i in 0..30 {
        let headers = match i % 3 {
            0 => zeros.clone(),
            1 => Vec::new(),
            _ => other.clone(),
        };
        statuses.push(deliver(&kg, attacker, &headers, forged_body).await);
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 401).count(),
        10,
        "unverified deliveries up to the address's budget: {statuses:?}"
    );
    assert!(
        statuses[10..].iter().all(|&s| s == 429),
        "then 429 (old code: 401 x3, 429 x27, the route's bucket): {statuses:?}"
    );

    // The genuine sender, meanwhile: its 3/min bucket is whole (old code: 429 at once).
    let sender = [127, 0, 6, 6];
    let mut served = Vec::new();
    for n in 0..4 {
        let body = format!("{{\"n\":{n}}}");
        let h = sign_github(&secret, body.as_bytes(), &format!("d-{n}"));
        served.push(deliver(&kg, sender, &h, body.as_bytes()).await);
    }
    assert_eq!(
        served,
        [200, 200, 200, 429],
        "the route's rate limit counts verified deliveries only"
    );
    assert_eq!(up.count(), 3, "nothing forged reached the upstream");

    let m = metrics(&kg).await;
    assert_eq!(
        metric(
            &m,
            "keygate_webhook_rejected_total{route=\"gh\",reason=\"throttled\"}"
        ),
        20
    );
    assert_eq!(
        metric(
            &m,
            "keygate_webhook_rejected_total{route=\"gh\",reason=\"rate_limited\"}"
        ),
        1
    );
    assert_no_secrets(&kg.logs(), &[&secret]);
}
