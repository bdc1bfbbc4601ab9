//! A key's live state across sequences of SIGHUP reloads (SPEC §8; fresh user T3-15): a key
//! removed (or renamed away) by one reload and put back by a later one. Its requests in flight
//! (`max_concurrent`: tunnels for their whole life, held requests) keep counting whatever the
//! sequence; its quota usage is kept by key id. The same for a webhook route's delivery ids.
//! Every test runs the real binary and reloads it with SIGHUP.

mod common;

use std::time::{Duration, Instant};

use common::webhooks::*;
use common::*;

/// Opens tunnels with `token` until `n` are open at once; a refusal (the key's slots are still
/// held by tunnels the test just closed) is retried for up to 10 s.
async fn open_n(kg: &Keygate, token: &str, n: usize) -> Vec<Tls> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut open = Vec::new();
    while open.len() < n {
        match kg.open_tunnel("/ws", token).await {
            Ok(t) => open.push(t),
            Err(status) => {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} tunnels open, then {status}",
                    open.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    open
}

/// T3-15: `small` (max_concurrent 2) holds two slow requests (HTTP/1.1 and HTTP/2). A reload
/// renames it away (another key in its place), a second puts it back: its two in flight still
/// count, so a tunnel and a third request get 429 (on the old code, the count restarted at 0
/// and a third and fourth were let through). A later reload raising its cap to 3 admits
/// exactly one more; everything closed, all three slots are free again. (A tunnel held a slot
/// here before; since T6-1 a reload that removes its key closes it and gives the slot back:
/// `tests/reload_tunnels.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_and_put_back_keeps_counting_its_tunnels_and_requests_in_flight() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("small");
    let (_, renamed_hash) = new_key("small-v2");
    let with = |extra: &str| {
        Keygate::builder()
            .upstream(&up)
            .key("small", &hash, extra)
            .config_text()
    };
    let kg = Keygate::builder()
        .upstream(&up)
        .key("small", &hash, "max_concurrent = 2")
        .start();

    let h1 = kg.client();
    let h2 = kg.client_h2();
    let hold = |c: &TestClient| {
        let (c, url, token) = (c.clone(), kg.url("/slow?ms=10000"), token.clone());
        tokio::spawn(async move { c.get(&url, &[("x-api-key", &token)]).await.status })
    };
    let first = hold(&h1);
    let held = hold(&h2);
    eventually("the slow requests at the upstream", &kg, || {
        (up.requests()
            .iter()
            .filter(|s| s.uri.contains("/slow"))
            .count()
            == 2)
            .then_some(())
    })
    .await;
    assert_eq!(kg.open_tunnel("/ws", &token).await.err(), Some(429));

    // Renamed away (its requests in flight stay, as README says), then put back.
    let renamed = Keygate::builder()
        .upstream(&up)
        .key("small-v2", &renamed_hash, "max_concurrent = 2")
        .config_text();
    assert_eq!(reload_with(&kg, &renamed).await["event"], "config_reloaded");
    assert_eq!(
        reload_with(&kg, &with("max_concurrent = 2")).await["event"],
        "config_reloaded"
    );
    assert_eq!(
        kg.open_tunnel("/ws", &token).await.err(),
        Some(429),
        "two in flight for a key capped at 2"
    );
    let r = h2.get(&kg.url("/"), &[("x-api-key", &token)]).await;
    assert_eq!(r.status, 429, "{}", r.text());

    // Removed outright, then back with room for one more: exactly one more.
    let none = Keygate::builder().upstream(&up).config_text();
    assert_eq!(reload_with(&kg, &none).await["event"], "config_reloaded");
    assert_eq!(
        reload_with(&kg, &with("max_concurrent = 3")).await["event"],
        "config_reloaded"
    );
    let third = kg.open_tunnel("/ws", &token).await.expect("a third slot");
    assert_eq!(kg.open_tunnel("/ws", &token).await.err(), Some(429));
    eventually("a refusal at max_concurrent 3", &kg, || {
        kg.events("concurrency_limited")
            .into_iter()
            .find(|ev| ev["max_concurrent"] == 3)
    })
    .await;

    // Everything ends: the slots come back to the same count.
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(held.await.unwrap(), 200);
    drop(third);
    let all = open_n(&kg, &token, 3).await;
    assert_eq!(all.len(), 3);
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}

/// The rest of T3-15's kind: quota usage (SPEC §9, "usage survives reloads") is kept by key id
/// through a remove-then-re-add, so deleting and restoring a key is no way to refill its quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_and_put_back_keeps_its_quota_usage() {
    let up = Upstream::start().await;
    let (token, hash) = new_key("metered");
    let with_key = || {
        Keygate::builder()
            .upstream(&up)
            .key("metered", &hash, "quota = \"3/day\"")
            .config_text()
    };
    let kg = Keygate::builder()
        .upstream(&up)
        .key("metered", &hash, "quota = \"3/day\"")
        .start();
    let c = kg.client();
    let (url, hdr) = (kg.url("/"), [("x-api-key", token.as_str())]);
    let get = || c.get(&url, &hdr);
    assert_eq!(get().await.status, 200);
    assert_eq!(get().await.status, 200);

    let none = Keygate::builder().upstream(&up).config_text();
    assert_eq!(reload_with(&kg, &none).await["event"], "config_reloaded");
    assert_eq!(get().await.status, 401);
    assert_eq!(
        reload_with(&kg, &with_key()).await["event"],
        "config_reloaded"
    );
    assert_eq!(get().await.status, 200, "the third of 3");
    let r = get().await;
    assert_eq!(r.status, 429, "{}", r.text());
    eventually("quota_exceeded", &kg, || {
        kg.events("quota_exceeded").into_iter().next()
    })
    .await;
}

/// The same kind for webhook routes: a delivery the upstream accepted is still answered as a
/// duplicate (200, not forwarded) after its route was removed by one reload and put back by
/// another; on the old code the store started empty and the sender's retry was forwarded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_route_removed_and_put_back_still_knows_its_deliveries() {
    let up = RecordingUpstream::start().await;
    let secret = unique_secret("gh");
    let (_, hash) = new_key("app");
    let route = "[[webhooks]]\nid = \"gh\"\npath = \"/hooks/github\"\nscheme = \"github\"\n\
                 secret = { env = \"WH_RELOAD\" }\n";
    let base = || {
        Keygate::builder()
            .upstream_url(&up.url())
            .key("app", &hash, "")
    };
    let kg = base()
        .raw(route)
        .start_with(&[("WH_RELOAD", secret.as_str())], None);
    let c = kg.client();
    let body = br#"{"action":"opened","number":1}"#;
    let send = || {
        c.send(post(
            &kg.url("/hooks/github"),
            &sign_github(&secret, body, "d-1"),
            body,
        ))
    };
    assert_eq!(send().await.status, 200);
    assert_eq!(up.count(), 1);
    assert_eq!(send().await.json()["status"], "duplicate");

    assert_eq!(
        reload_with(&kg, &base().config_text()).await["event"],
        "config_reloaded"
    );
    assert_eq!(
        reload_with(&kg, &base().raw(route).config_text()).await["event"],
        "config_reloaded"
    );
    let r = send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "duplicate", "{}", r.text());
    assert_eq!(up.count(), 1, "forwarded again after the route came back");
    // A longer dedupe_window (docs/webhooks.md recommends raising it) and a smaller
    // dedupe_max_ids keep the ids already known (fresh user T5-22 / T6-4: forgot them).
    for settings in [
        "dedupe_window = \"2h\"\n",
        "dedupe_window = \"2h\"\ndedupe_max_ids = 100\n",
    ] {
        let changed = format!("{route}{settings}");
        assert_eq!(
            reload_with(&kg, &base().raw(&changed).config_text()).await["event"],
            "config_reloaded"
        );
        let r = send().await;
        assert_eq!(r.json()["status"], "duplicate", "{settings}: {}", r.text());
        assert_eq!(
            up.count(),
            1,
            "{settings}: forwarded again after the window changed"
        );
    }
    assert_no_secrets(&kg.logs(), &[&secret]);
}

/// The failed-auth budget of SPEC §3 across a reload that changes `[auth] failed_auth_limit`
/// (fresh user T8-1): each client keeps its outstanding failures. Before, a changed limit built
/// a fresh table, so every throttled address got a whole new budget, also when the operator
/// tightened the limit during an attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_failed_auth_limit_keeps_each_clients_failures() {
    let up = Upstream::start().await;
    let (_, hash) = new_key("k");
    let with_limit = |limit: &str| {
        Keygate::builder()
            .upstream(&up)
            .auth(&format!("failed_auth_limit = \"{limit}\""))
            .key("k", &hash, "")
    };
    let kg = with_limit("4/h").start();
    let c = kg.client();
    let url = kg.url("/");
    let guess = || async {
        let wrong = wrong_token("k");
        c.get(&url, &[("x-api-key", wrong.as_str())]).await.status
    };
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(guess().await);
    }
    assert_eq!(seen, [401, 401, 401, 401, 429]);

    // Raised by one: one more guess is hashed, not five.
    let raised = with_limit("5/h").config_text();
    assert_eq!(reload_with(&kg, &raised).await["event"], "config_reloaded");
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(guess().await);
    }
    assert_eq!(seen, [401, 429, 429], "old code: 401 401 401");

    // Tightened: still throttled, nothing hashed.
    let tight = with_limit("2/h").config_text();
    assert_eq!(reload_with(&kg, &tight).await["event"], "config_reloaded");
    let r = c
        .get(&url, &[("x-api-key", wrong_token("k").as_str())])
        .await;
    assert_eq!(r.status, 429, "{}", r.text());
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (600..=1800).contains(&wait),
        "at most one interval of 2/h: {wait}"
    );
}
