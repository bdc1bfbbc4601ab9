//! Cluster state against the policy it was made under (SPEC §8 reloads, §11), with a real
//! `redis-server` and two real keygate processes: what an instance or Redis keeps of a key must
//! not outlive the policy (rate limit, quota) a reload replaced, nor the data Redis lost.

mod common;

use std::time::{Duration, Instant};

use common::redis::{Redis, cluster_lines, wait_healthy};
use common::reload::reload_with;
use common::*;

fn instance(up: &Upstream, redis: &Redis, name: &str, keys: &[(&str, &str, &str)]) -> Keygate {
    let mut b = Keygate::builder()
        .upstream(up)
        .auth("failed_auth_limit = \"6/h\"");
    for (id, hash, extra) in keys {
        b = b.key(id, hash, extra);
    }
    b.raw(&cluster_lines(redis, name, "")).start()
}

async fn status(kg: &Keygate, token: &str) -> u16 {
    kg.client()
        .get(&kg.url("/"), &[("x-api-key", token)])
        .await
        .status
}

/// `n` sequential requests with `token`: how many got 200 (the others must be 429).
async fn served(kg: &Keygate, token: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        match status(kg, token).await {
            200 => ok += 1,
            429 => {}
            s => panic!("status {s}"),
        }
    }
    ok
}

/// Rewrites `from` to `to` in every instance's config and reloads them.
async fn reload_all(kgs: &[&Keygate], from: &str, to: &str) {
    for kg in kgs {
        let text = std::fs::read_to_string(&kg.config).unwrap();
        assert!(text.contains(from), "{from} not in the config");
        let outcome = reload_with(kg, &text.replace(from, to)).await;
        assert_eq!(outcome["event"], "config_reloaded", "{outcome}");
    }
}

/// How many times Redis ran `command` so far (`INFO commandstats`).
fn calls(redis: &Redis, command: &str) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Fresh user T6-5: the proof that lets the other instances verify an already-verified token
/// uncharged by the shared failed-auth budget was written only when argon2 ran. A token served
/// from an instance's verified cache was never proved again, so after Redis lost its data the
/// client behind the same address as a guesser (a NAT) got 429 again on every instance that had
/// not verified it. Now the instance serving it from its cache writes the proof again once it
/// sees the loss (at most once per key and vouch round; not per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_verified_token_is_vouched_for_again_after_redis_loses_its_data() {
    vouched_again_after(Loss::Flush).await;
}

/// The same through a Redis restarted without persistence: the instances see it as an outage
/// and a recovery (and the epoch marker as new).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_verified_token_is_vouched_for_again_after_redis_restarts_empty() {
    vouched_again_after(Loss::Restart).await;
}

enum Loss {
    Flush,
    Restart,
}

async fn vouched_again_after(loss: Loss) {
    let up = Upstream::start().await;
    let mut redis = Redis::start();
    let (token, hash) = new_key("target");
    let wrong: Vec<String> = (0..8).map(|_| new_key("target").0).collect();
    let keys = [("target", hash.as_str(), "")];
    let a = instance(&up, &redis, "a", &keys);
    let b = instance(&up, &redis, "b", &keys);
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    let proof = "keygate:vk:target";
    assert_eq!(status(&a, &token).await, 200, "verified on a");
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.cli(&["EXISTS", proof]) != "1" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(redis.cli(&["EXISTS", proof]), "1", "a vouched for it");

    // Within one vouch round, using the token writes nothing more (not one SET per request).
    let before = calls(&redis, "setex");
    assert_eq!(served(&a, &token, 20).await, 20);
    assert_eq!(
        calls(&redis, "setex"),
        before,
        "no proof written per request"
    );

    // Redis loses its data, after the instances read its epoch marker (every 2 s: wait for
    // the marker, then for two more ticks). The client keeps using its key on a (served from
    // a's cache).
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.cli(&["EXISTS", "keygate:epoch"]) != "1" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    match loss {
        Loss::Flush => {
            redis.cli(&["FLUSHALL"]);
        }
        Loss::Restart => {
            redis.kill();
            for kg in [&a, &b] {
                kg.wait_log("cluster_degraded", |v| v["event"] == "cluster_degraded");
            }
            redis.restart();
            for kg in [&a, &b] {
                kg.wait_log("cluster_recovered", |v| v["event"] == "cluster_recovered");
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert_eq!(status(&a, &token).await, 200);
        if redis.cli(&["EXISTS", proof]) == "1" || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        redis.cli(&["EXISTS", proof]),
        "1",
        "the proof is written again by the instance serving the token from its cache \
         (old code: never, until a restart)"
    );
    a.wait_log("cluster_data_lost", |v| v["event"] == "cluster_data_lost");

    // A guesser behind the same address spends the shared budget on a.
    let mut statuses = Vec::new();
    for w in &wrong {
        statuses.push(status(&a, w).await);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        6,
        "{statuses:?}"
    );
    assert_eq!(statuses[7], 429, "{statuses:?}");
    // The legitimate client's next connection lands on b, which never verified its token.
    assert_eq!(
        status(&b, &token).await,
        200,
        "vouched for again by a (old code: 429)"
    );
    // Guesses are still refused on b.
    assert_eq!(status(&b, &wrong[0]).await, 429);
    let mut secrets: Vec<&str> = wrong.iter().map(String::as_str).collect();
    secrets.push(&token);
    for kg in [&a, &b] {
        assert_no_secrets(&kg.logs(), &secrets);
    }
}

/// Fresh user T5-21: the key's GCRA state in Redis survived a reload that changed its
/// `rate_limit`/`burst`; stored in intervals of the old rate, it held a raised limit back
/// (`1/min, burst 2` raised to `100/s, burst 100`: 429 with Retry-After 118 on every
/// instance), while without cluster mode a changed limit starts a full bucket. Now the bucket
/// is named by its limit: a changed limit starts a new, full bucket on every instance, raised
/// or lowered, and the new limit is shared as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_rate_limit_applies_at_once_on_every_instance() {
    let up = Upstream::start().await;
    let redis = Redis::start();
    let (token, hash) = new_key("rl");
    let slow = "rate_limit = \"1/min\"\nburst = 2";
    let fast = "rate_limit = \"100/s\"\nburst = 100";
    let keys = [("rl", hash.as_str(), slow)];
    let a = instance(&up, &redis, "a", &keys);
    let b = instance(&up, &redis, "b", &keys);
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(status(&a, &token).await);
    }
    assert_eq!(first, [200, 200, 429, 429]);
    assert_eq!(status(&b, &token).await, 429, "one bucket for both");

    // Raised: at once, on both instances.
    reload_all(&[&a, &b], slow, fast).await;
    assert_eq!(
        served(&a, &token, 10).await,
        10,
        "raised limit on a (old code: 429, Retry-After ~118)"
    );
    assert_eq!(served(&b, &token, 10).await, 10, "raised limit on b");

    // Lowered: one full burst of the new limit (3) for the cluster, then its rate (1/min).
    // (Back to `slow` would resume that limit's own bucket, still spent: see rate.rs.)
    let lower = "rate_limit = \"1/min\"\nburst = 3";
    reload_all(&[&a, &b], fast, lower).await;
    let after = served(&a, &token, 5).await + served(&b, &token, 5).await;
    assert_eq!(
        after, 3,
        "the lowered limit's burst, shared by both instances"
    );
    let r = a.client().get(&a.url("/"), &[("x-api-key", &token)]).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    for kg in [&a, &b] {
        assert_no_secrets(&kg.logs(), &[&token]);
    }
}

/// Fresh user T5-20: a reload that lowered a key's quota did not touch the block of units an
/// instance had leased under the old one (`100000/day` cut to `5/day`: the instance holding a
/// block of 100 served 98 more; without cluster mode the cut applies at once). Now a lease is
/// bounded by the limit it was granted under: the instance keeps only what the new limit leaves
/// after everything leased anywhere, so the cut holds across the cluster at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lowered_quota_clips_the_block_an_instance_leased() {
    let up = Upstream::start().await;
    let redis = Redis::start();
    let (one, one_hash) = new_key("one");
    let (two, two_hash) = new_key("two");
    let big = "quota = \"100000/day\"";
    let keys = [
        ("one", one_hash.as_str(), big),
        ("two", two_hash.as_str(), big),
    ];
    let a = instance(&up, &redis, "a", &keys);
    let b = instance(&up, &redis, "b", &keys);
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    // `one` is used through a only (a holds a block of 100, 98 unspent); `two` through both
    // (each holds a block: the counter says 200, 4 units spent).
    assert_eq!(served(&a, &one, 2).await, 2);
    assert_eq!(served(&a, &two, 2).await, 2);
    assert_eq!(served(&b, &two, 2).await, 2);
    let day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400
        * 86_400;
    assert_eq!(redis.cli(&["GET", &format!("keygate:q:one:{day}")]), "100");
    assert_eq!(redis.cli(&["GET", &format!("keygate:q:two:{day}")]), "200");

    reload_all(&[&a, &b], big, "quota = \"5/day\"").await;
    // `one`: 2 used, so 3 more, all from a's clipped block; b has none to give.
    assert_eq!(
        served(&a, &one, 20).await,
        3,
        "the lowered limit holds (old code: 20, from the block leased under the old limit)"
    );
    assert_eq!(served(&b, &one, 5).await, 0);
    let r = a
        .client()
        .get(&a.url("/.well-known/keygate/key"), &[("x-api-key", &one)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let q = &r.json()["quota"];
    assert_eq!(
        (&q["limit"], &q["used"], &q["remaining"]),
        (&5.into(), &5.into(), &0.into()),
        "{q}"
    );
    // `two`: 4 used, each instance counts the other's block as spent: never more than the
    // limit over both (under-use is the price: at most the other instances' blocks).
    let more = served(&a, &two, 10).await + served(&b, &two, 10).await;
    assert!(4 + more <= 5, "{more} more after 4 used of 5");
    assert_eq!(up.count(), 2 + 2 + 2 + 3 + more);

    // Raised again: the new limit applies at once, on both.
    reload_all(&[&a, &b], "quota = \"5/day\"", "quota = \"1000/day\"").await;
    assert_eq!(served(&a, &one, 3).await, 3);
    assert_eq!(served(&b, &one, 3).await, 3);
    for kg in [&a, &b] {
        assert_no_secrets(&kg.logs(), &[&one, &two]);
    }
}

/// The same kind for the shared failed-auth budget: its GCRA state, in intervals of the old
/// `failed_auth_limit`, survived a reload that raised the limit, so a client whose budget was
/// spent stayed refused for up to the old period although the new budget allows it. Now a
/// changed limit carries each client's outstanding failures over as a count, capped at the new
/// budget, as the local throttle does (fresh user T8-1): tightened during an attack, the
/// spent budget stays spent; raised, the client gets the difference at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_failed_auth_limit_carries_the_shared_failures_over() {
    let up = Upstream::start().await;
    let redis = Redis::start();
    let (token, hash) = new_key("k");
    let wrong: Vec<String> = (0..2).map(|_| new_key("k").0).collect();
    let keys = [("k", hash.as_str(), "")];
    let a = instance(&up, &redis, "a", &keys);
    let b = instance(&up, &redis, "b", &keys);
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    // Two hashed guesses on a, of a budget of 6/h.
    for w in &wrong {
        assert_eq!(status(&a, w).await, 401);
    }
    // Tightened to 2/h: those two failures are the whole new budget, on every instance (b
    // never saw them: only the shared budget knows). A valid key not verified yet is refused.
    reload_all(&[&a, &b], "\"6/h\"", "\"2/h\"").await;
    assert_eq!(
        status(&b, &token).await,
        429,
        "the shared budget stays spent when the limit is tightened (4f4627c, a fresh bucket per limit: 200)"
    );
    // Raised to 20/h: the client has 18 left at once, on every instance.
    reload_all(&[&a, &b], "\"2/h\"", "\"20/h\"").await;
    assert_eq!(
        status(&b, &token).await,
        200,
        "old code: 429 (the stored state, 2 × 30 min ahead, exceeds the new tolerance)"
    );
    let mut secrets: Vec<&str> = wrong.iter().map(String::as_str).collect();
    secrets.push(&token);
    for kg in [&a, &b] {
        assert_no_secrets(&kg.logs(), &secrets);
    }
}
