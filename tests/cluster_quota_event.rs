//! Cluster mode: `quota_exceeded` (once per key and window, cluster-wide) means the quota is
//! used up, as on one instance (fresh user T5-18): a refusal of a request costing more than
//! what is left sets no `qx:` flag and logs `quota_insufficient`; the flag and the one event
//! come with the first refusal that finds nothing left. Real `redis-server`, two keygate
//! processes.

mod common;

use common::redis::{Redis, cluster_lines, wait_healthy};
use common::*;

const COSTS: &str = r#"
[quota_costs]
rules = [
  { methods = ["POST"], path = "/c", cost = 10 },
  { methods = ["POST"], path = "/d", cost = 3 },
]
"#;

fn instance(up: &Upstream, redis: &Redis, name: &str, hash: &str) -> Keygate {
    Keygate::builder()
        .upstream(up)
        .key("q", hash, "quota = \"5/day\"")
        .raw(COSTS)
        .raw(&cluster_lines(redis, name, ""))
        .start()
}

/// The Redis key of `what` (`q` counter, `qx` flag) for key `q`'s current day window.
fn day_key(what: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!("keygate:{what}:q:{}", now - now % 86_400)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_logs_quota_exceeded_when_the_quota_is_used_up() {
    let up = Upstream::start().await;
    let redis = Redis::start();
    let (token, hash) = new_key("q");
    let a = instance(&up, &redis, "a", &hash);
    let b = instance(&up, &redis, "b", &hash);
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    let status = async |kg: &Keygate, method: &str, path: &str| {
        let r = kg.client().send(req(method, &kg.url(path), &token)).await;
        (r.status, r.header("retry-after").map(str::to_string))
    };
    let flag = day_key("qx");

    // Cost 10 on a 5/day key: refused, no Retry-After, no flag.
    assert_eq!(status(&a, "POST", "/c").await, (429, None));
    a.wait_log("quota_insufficient", |v| v["event"] == "quota_insufficient");
    assert_eq!(
        redis.cli(&["EXISTS", &flag]),
        "0",
        "old code: flag set at used 0"
    );
    // 3 of 5 used through a; b asks for 3 with 2 left: refused, still no flag.
    assert_eq!(status(&a, "POST", "/d").await.0, 200);
    let (s, retry) = status(&b, "POST", "/d").await;
    assert_eq!(s, 429);
    assert!(retry.is_some());
    b.wait_log("quota_insufficient", |v| v["event"] == "quota_insufficient");
    assert_eq!(redis.cli(&["EXISTS", &flag]), "0");
    // The last 2 units, then the refusals that find nothing left: one event for the cluster.
    assert_eq!(status(&b, "GET", "/x").await.0, 200);
    assert_eq!(status(&a, "GET", "/x").await.0, 200);
    assert_eq!(redis.cli(&["GET", &day_key("q")]), "5");
    for kg in [&a, &b, &a, &b] {
        assert_eq!(status(kg, "GET", "/x").await.0, 429);
    }
    a.wait_log("quota_exceeded", |v| v["event"] == "quota_exceeded");
    assert_eq!(redis.cli(&["EXISTS", &flag]), "1");
    assert_eq!(
        a.events("quota_exceeded").len() + b.events("quota_exceeded").len(),
        1,
        "once for the cluster:\n{}\n{}",
        a.logs(),
        b.logs()
    );
}
