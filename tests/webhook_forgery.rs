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

/// A fresh user (T6-3, T5-7's kind on the webhook path): forged deliveries whose bodies were
/// still arriving when the address's budget ran out were each answered 401 and charged after
/// the fact (150 in parallel: 150 x 401 for a budget of 20, the address blocked for 393 s, API
/// keys from it included). They are now charged as they are answered, within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_forged_deliveries_cannot_overdraw_the_budget() {
    let up = RecordingUpstream::start().await;
    let secret = unique_secret("gh");
    let kg = start(&up, &secret);
    let from = [127, 0, 33, 1];
    let body = br#"{"forged":true}"#;
    // 40 senders send their heads, all of them, and only then their bodies.
    let mut conns = Vec::new();
    for _ in 0..40 {
        let mut tls = kg.tls_from(from).await.unwrap();
        let head = format!(
            "POST /hooks/github HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\nX-Hub-Signature-256: sha256={}\r\n\r\n",
            body.len(),
            "0".repeat(64)
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        conns.push(tls);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let statuses = futures_util::future::join_all(conns.into_iter().map(|mut tls| async move {
        tls.write_all(body).await.unwrap();
        common::raw::read_response(&mut tls).await.0
    }))
    .await;
    let unauthorized = statuses.iter().filter(|s| **s == 401).count();
    assert!(
        statuses.iter().all(|s| matches!(*s, 401 | 429)),
        "{statuses:?}"
    );
    assert!(
        unauthorized <= 11,
        "{unauthorized} x 401 for a budget of 10: {statuses:?}"
    );
    assert_eq!(up.got.lock().unwrap().len(), 0);
    // The address may try again within a period or so (6 s for 10/min), not minutes.
    let mut tls = kg.tls_from(from).await.unwrap();
    tls.write_all(b"POST /hooks/github HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = common::raw::read_response(&mut tls).await;
    assert_eq!(status, 429, "{head}");
    let retry: u64 = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    assert!(retry <= 12, "Retry-After {retry}");
    assert_no_secrets(&kg.logs(), &[&secret]);
}
