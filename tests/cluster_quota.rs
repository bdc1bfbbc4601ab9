//! Cluster-mode quotas (SPEC §9 spend limits, §11) when Redis misbehaves, with a real
//! `redis-server` and two real keygate processes: a Redis stall (SIGSTOP) with
//! `on_error = "local"`, and Redis losing its data (FLUSHALL) while instances run.

mod common;

use std::time::{Duration, Instant};

use common::redis::{Redis, cluster_lines, wait_healthy};
use common::*;

fn instance(up: &Upstream, redis: &Redis, name: &str, key: (&str, &str), quota: &str) -> Keygate {
    Keygate::builder()
        .upstream(up)
        .admin()
        .key(key.0, key.1, &format!("quota = \"{quota}\""))
        .raw(&cluster_lines(redis, name, ""))
        .start()
}

/// The Redis counter of `key`'s current day window.
fn day_counter(key: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!("keygate:q:{key}:{}", now - now % 86_400)
}

/// `n` sequential requests with `token`: how many got 200 (the others must be 429).
async fn served(kg: &Keygate, token: &str, n: usize) -> usize {
    served_last(kg, token, n).await.0
}

/// [`served`], and the `RateLimit` header of the last 200.
async fn served_last(kg: &Keygate, token: &str, n: usize) -> (usize, Option<String>) {
    let c = kg.client();
    let (mut ok, mut last) = (0, None);
    for _ in 0..n {
        let r = c.get(&kg.url("/"), &[("x-api-key", token)]).await;
        match r.status {
            200 => {
                ok += 1;
                last = r.header("ratelimit").map(str::to_string);
            }
            429 => {}
            s => panic!("status {s}: {}", r.text()),
        }
    }
    (ok, last)
}

/// Polls `redis` until `key` reads `want` (at most `within`); the last value read.
async fn wait_value(redis: &Redis, key: &str, want: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let v = redis.cli(&["GET", key]);
        if v == want || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fresh user T5-10: while Redis stalled, each instance counted the key's quota from zero, so a
/// `40/day` key with 9 units left was served 50 more times. Now each instance continues from
/// the cluster usage it last saw (at most what was left, per instance), the introspection
/// figures say so, and what was admitted locally reaches the shared counter when Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stall_continues_the_quota_from_the_last_known_usage() {
    let up = Upstream::start().await;
    let redis = Redis::start();
    let (token, hash) = new_key("q");
    let a = instance(&up, &redis, "a", ("q", &hash), "40/day");
    let b = instance(&up, &redis, "b", ("q", &hash), "40/day");
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    let counter = day_counter("q");
    redis.cli(&["SET", &counter, "31", "EX", "200000"]);
    // One request on each: each leases (lease size 1 for a 40/day key) and learns the counter.
    assert_eq!(served(&a, &token, 1).await, 1);
    assert_eq!(served(&b, &token, 1).await, 1);
    assert_eq!(redis.cli(&["GET", &counter]), "33");

    redis.pause();
    // a last saw 32 (7 + its own 1 spent = 8 left for it), b saw 33 (7 left).
    let (during_a, header_a) = served_last(&a, &token, 30).await;
    let during_b = served(&b, &token, 30).await;
    let r = a
        .client()
        .get(&a.url("/.well-known/keygate/key"), &[("x-api-key", &token)])
        .await;
    redis.resume();
    assert_eq!(
        (during_a, during_b),
        (8, 7),
        "during the stall each instance admits what was left when it last heard from Redis \
         (old code: 30 and 30, each counting from zero)"
    );
    // The figures a client paces itself by say what the key really has left.
    let header_a = header_a.expect("RateLimit on a 200");
    assert!(header_a.contains("\"quota\";r=0;"), "{header_a}");
    assert_eq!(r.status, 200, "{}", r.text());
    let q = &r.json()["quota"];
    assert_eq!(
        (&q["used"], &q["remaining"]),
        (&40.into(), &0.into()),
        "{q}"
    );
    assert!(
        !a.events("cluster_degraded").is_empty(),
        "the stall was seen"
    );

    // Back: the units admitted locally are added to the shared counter (33 + 8 + 7), and
    // the key is refused everywhere.
    for kg in [&a, &b] {
        kg.wait_log("cluster_recovered", |v| v["event"] == "cluster_recovered");
    }
    let v = wait_value(&redis, &counter, "48", Duration::from_secs(10)).await;
    assert_eq!(v, "48", "locally admitted units reach the shared counter");
    assert_eq!(served(&a, &token, 3).await, 0);
    assert_eq!(served(&b, &token, 3).await, 0);
    assert_eq!(up.count(), 2 + 15);
    for kg in [&a, &b] {
        assert_no_secrets(&kg.logs(), &[&token]);
    }
}

/// Fresh user T5-2: after Redis lost its data, the first instance to lease reset the counter
/// to what it had seen, and what the other running instances counted was lost until they
/// leased again (a `20/day` key served 30 times). Now every instance re-asserts what it saw
/// (a max-merge, every 2 s): the counter comes back without waiting for a lease, and the
/// window's `quota_exceeded` flag with it (logged once for the cluster, also after a loss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_put_back_their_quota_counts_after_redis_loses_its_data() {
    let up = Upstream::start().await;
    let redis = Redis::start();
    let (token, hash) = new_key("q");
    let a = instance(&up, &redis, "a", ("q", &hash), "20/day");
    let b = instance(&up, &redis, "b", ("q", &hash), "20/day");
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    let counter = day_counter("q");
    assert_eq!(served(&a, &token, 10).await, 10);
    redis.cli(&["FLUSHALL"]);
    // a puts its 10 back on its next sync tick (2 s), without being asked for a lease.
    assert_eq!(
        wait_value(&redis, &counter, "10", Duration::from_secs(10)).await,
        "10",
        "the running instance re-asserts what it saw (old code: the counter stays lost)"
    );
    assert_eq!(
        served(&b, &token, 25).await,
        10,
        "20/day: 10 via a, 10 via b"
    );
    assert_eq!(served(&a, &token, 25).await, 0);
    assert_eq!(up.count(), 20);

    // Lost again once the window is used up: the counter and the exceeded flag come back, so
    // no instance logs `quota_exceeded` a second time.
    redis.cli(&["FLUSHALL"]);
    let flag = counter.replace(":q:", ":qx:");
    assert_eq!(
        wait_value(&redis, &counter, "20", Duration::from_secs(10)).await,
        "20"
    );
    assert_eq!(
        wait_value(&redis, &flag, "1", Duration::from_secs(10)).await,
        "1"
    );
    assert_eq!(served(&b, &token, 3).await, 0);
    assert_eq!(served(&a, &token, 3).await, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let exceeded = a.events("quota_exceeded").len() + b.events("quota_exceeded").len();
    assert_eq!(
        exceeded, 1,
        "quota_exceeded once per key and window, cluster-wide"
    );
    assert_eq!(up.count(), 20);
}
