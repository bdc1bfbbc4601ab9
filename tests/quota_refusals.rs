//! keygate's own refusals cost the key nothing (fresh user T3-11): a request refused before it
//! reaches the upstream (429 `concurrency_limited`, 503 `upstream_saturated`) is not counted
//! against the key's quota, and the per-key concurrency cap is checked before the rate limit,
//! so a client obeying its `Retry-After: 1` does not empty its own bucket. Real TLS, real
//! upstream; usage read back from the introspection endpoint.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `quota.used` as the key itself sees it (`GET /.well-known/keygate/key`).
async fn quota_used(kg: &Keygate, token: &str) -> u64 {
    let got = kg
        .client()
        .get(&kg.url("/.well-known/keygate/key"), &[("x-api-key", token)])
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    got.json()["quota"]["used"].as_u64().unwrap()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn get_task(kg: &Keygate, path: &str, token: &str) -> tokio::task::JoinHandle<u16> {
    let c = kg.client();
    let url = kg.url(path);
    let token = token.to_string();
    tokio::spawn(async move { c.get(&url, &[("x-api-key", &token)]).await.status })
}

/// T3-11 and its addendum: with one slow request in flight, a `max_concurrent = 1` key's next
/// requests get 429 `concurrency_limited`; they took a rate-limit token each (the next request,
/// nothing in flight, got 429 `rate_limited`, Retry-After 18) and a unit of quota each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_refusals_take_no_token_and_no_quota() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("leg8");
    let kg = Keygate::builder()
        .upstream(&up)
        .key(
            "leg8",
            &hash,
            "max_concurrent = 1\nrate_limit = \"3/min\"\nburst = 3\nquota = \"10/day\"",
        )
        .start();
    let slow = get_task(&kg, "/slow?ms=2000", &token);
    wait_for("the slow request at the upstream", || up.count() == 1).await;
    for _ in 0..2 {
        let r = kg
            .client()
            .get(&kg.url("/"), &[("x-api-key", &token)])
            .await;
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_eq!(slow.await.unwrap(), 200);
    let r = kg
        .client()
        .get(&kg.url("/"), &[("x-api-key", &token)])
        .await;
    assert_eq!(
        r.status, 200,
        "two tokens left of three (old code: 429 rate_limited, the refusals took them)"
    );
    assert_eq!(quota_used(&kg, &token).await, 2, "two requests served");
}

/// T3-11: with the one upstream connection held by another key, a 4/day key's requests wait
/// `queue_timeout` and get 503 `upstream_saturated`; each was counted, so one served request and
/// three refusals used the day up. Over HTTP/2 as well as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_saturated_refusals_cost_no_quota() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("leg6");
    let (other, other_hash) = new_key("other");
    let kg = Keygate::builder()
        .upstream(&up)
        .upstream_line("max_connections = 1")
        .upstream_line("queue_timeout = \"300ms\"")
        .key("leg6", &hash, "quota = \"4/day\"")
        .key("other", &other_hash, "")
        .start();
    assert_eq!(
        kg.client()
            .get(&kg.url("/"), &[("x-api-key", &token)])
            .await
            .status,
        200
    );
    let slow = get_task(&kg, "/slow?ms=3000", &other);
    wait_for("the slow request at the upstream", || up.count() == 2).await;
    for client in [kg.client(), kg.client_h2(), kg.client()] {
        let r = client.get(&kg.url("/"), &[("x-api-key", &token)]).await;
        assert_eq!(r.status, 503);
    }
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(
        quota_used(&kg, &token).await,
        1,
        "one request served; the 503s cost nothing (old code: 4, the day used up)"
    );
    for _ in 0..3 {
        let r = kg
            .client()
            .get(&kg.url("/"), &[("x-api-key", &token)])
            .await;
        assert_eq!(r.status, 200, "the rest of the day's quota is there");
    }
    let r = kg
        .client()
        .get(&kg.url("/"), &[("x-api-key", &token)])
        .await;
    assert_eq!(r.status, 429, "and then used up");
    assert_eq!(quota_used(&kg, &token).await, 4);
}
