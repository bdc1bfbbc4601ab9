//! Cluster mode (SPEC §11), the state beside the limits: webhook delivery ids, last use and
//! network history, `quota_exceeded` once per cluster, `keygate keys` and introspection with
//! cluster-wide figures, and that every key keygate writes in Redis expires. Real
//! `redis-server`, several real keygate processes.

mod common;

use std::time::Duration;

use common::redis::{Redis, cluster_lines, wait_healthy};
use common::webhooks::*;
use common::*;

const ROUTES: &str = r#"
[[webhooks]]
id = "plain"
path = "/hooks/plain"
scheme = "hmac-sha256-hex"
secret = { env = "WH_HEX" }
id_from = { json = "request_id" }

[[webhooks]]
id = "gh"
path = "/hooks/github"
scheme = "github"
secret = { env = "WH_GITHUB" }

[[webhooks]]
id = "pay"
path = "/hooks/stripe/"
scheme = "stripe"
secret = { env = "WH_STRIPE" }

[[webhooks]]
id = "std"
path = "/hooks/std"
scheme = "standard-webhooks"
secret = { env = "WH_STANDARD" }
"#;

struct Secrets {
    hex: String,
    github: String,
    stripe: String,
    standard: String,
}

impl Secrets {
    fn new() -> Self {
        use base64::Engine as _;
        let r = || format!("{:032x}", rand::random::<u128>());
        Secrets {
            hex: format!("hex{}", r()),
            github: format!("gh{}", r()),
            stripe: format!("whsec_stripe{}", r()),
            standard: format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 24]>())
            ),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("WH_HEX", self.hex.clone()),
            ("WH_GITHUB", self.github.clone()),
            ("WH_STRIPE", self.stripe.clone()),
            ("WH_STANDARD", self.standard.clone()),
        ]
    }

    /// Path and headers for `body` on route `scheme`, with delivery id `id` where the scheme
    /// carries it in a header (stripe and plain take it from the body's JSON).
    fn sign(&self, scheme: &str, body: &[u8], id: &str) -> (&'static str, Vec<(String, String)>) {
        match scheme {
            "plain" => ("/hooks/plain", sign_hex(&self.hex, body)),
            "gh" => ("/hooks/github", sign_github(&self.github, body, id)),
            "pay" => ("/hooks/stripe/ev", sign_stripe(&self.stripe, body, now())),
            "std" => ("/hooks/std", sign_standard(&self.standard, body, id, now())),
            _ => unreachable!(),
        }
    }
}

fn webhook_instance(up: &RecordingUpstream, redis: &Redis, s: &Secrets, name: &str) -> Keygate {
    let env = s.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Keygate::builder()
        .upstream_url(&up.url())
        .upstream_line("request_timeout = \"5s\"")
        .admin()
        .key("app", &new_key("app").1, "")
        .raw(ROUTES)
        .raw(&cluster_lines(redis, name, ""))
        .start_with(&env, None)
}

/// Every key under `keygate:` with its TTL in ms (`PTTL`: -1 = no expiry).
fn redis_keys(redis: &Redis) -> Vec<(String, i64)> {
    let keys = redis.cli(&["KEYS", "keygate:*"]);
    keys.lines()
        .filter(|k| !k.is_empty())
        .map(|k| {
            let ttl = redis.cli(&["PTTL", k]).parse().unwrap_or(-3);
            (k.to_string(), ttl)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_duplicates_are_detected_across_instances_and_retries_after_failure_forwarded() {
    let up = RecordingUpstream::start().await;
    let redis = Redis::start();
    let s = Secrets::new();
    let kgs: Vec<Keygate> = ["a", "b", "c"]
        .iter()
        .map(|n| webhook_instance(&up, &redis, &s, n))
        .collect();
    for kg in &kgs {
        wait_healthy(kg).await;
    }
    let mut ids = Vec::new();
    // Every scheme's duplicate key: JSON field (plain, stripe), the body's digest (github),
    // webhook-id.
    for scheme in ["plain", "gh", "pay", "std"] {
        let id = format!("dlv-{scheme}-{:016x}", rand::random::<u64>());
        ids.push(id.clone());
        let body = format!("{{\"request_id\":\"{id}\",\"id\":\"{id}\",\"n\":1}}").into_bytes();
        let send = |kg: &Keygate, status: u16| {
            let (path, mut h) = s.sign(scheme, &body, &id);
            h.push(("x-upstream-status".into(), status.to_string()));
            let req = post(&kg.url(path), &h, &body);
            let c = kg.client();
            async move { c.send(req).await }
        };
        let before = up.count();
        // A 5xx through a: not an acceptance, so the retry through b is forwarded.
        assert_eq!(send(&kgs[0], 503).await.status, 503, "{scheme}");
        assert_eq!(up.count(), before + 1);
        let got = send(&kgs[1], 200).await;
        assert_eq!(got.status, 200, "{scheme}: retry via b: {}", got.text());
        assert_ne!(got.text(), "", "{scheme}");
        assert_eq!(
            up.count(),
            before + 2,
            "{scheme}: the retry after a 5xx is forwarded"
        );
        // Accepted through b: a duplicate through c or a is answered 200, not forwarded.
        for kg in [&kgs[2], &kgs[0]] {
            let got = send(kg, 200).await;
            assert_eq!(got.status, 200, "{scheme}");
            assert_eq!(
                got.json()["status"],
                "duplicate",
                "{scheme}: {}",
                got.text()
            );
        }
        // GitHub's id header is not signed: a replay through another instance with a fresh
        // one is a duplicate all the same (the key is the body's digest, shared in Redis).
        if scheme == "gh" {
            let (path, h) = s.sign(scheme, &body, "fresh-1");
            let got = kgs[2]
                .client()
                .send(post(&kgs[2].url(path), &h, &body))
                .await;
            assert_eq!(
                got.json()["status"],
                "duplicate",
                "gh replay with a fresh id"
            );
        }
        assert_eq!(
            up.count(),
            before + 2,
            "{scheme}: a duplicate through another instance reached the upstream"
        );
    }

    // In flight through one instance: the same delivery through another is 409, not forwarded.
    let id = format!("slow-{:016x}", rand::random::<u64>());
    let body = format!("{{\"request_id\":\"{id}\"}}").into_bytes();
    let slow = {
        let mut h = sign_hex(&s.hex, &body);
        h.push(("x-upstream-sleep-ms".into(), "1500".into()));
        let req = post(&kgs[0].url("/hooks/plain"), &h, &body);
        let c = kgs[0].client();
        tokio::spawn(async move { c.send(req).await.status })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = up.count();
    let got = kgs[2]
        .client()
        .send(post(
            &kgs[2].url("/hooks/plain"),
            &sign_hex(&s.hex, &body),
            &body,
        ))
        .await;
    assert_eq!(got.status, 409, "{}", got.text());
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(
        up.count(),
        before,
        "the in-flight duplicate was not forwarded"
    );

    // What Redis holds: fixed-size hashed keys that expire, never a delivery id.
    let keys = redis_keys(&redis);
    let wh: Vec<_> = keys
        .iter()
        .filter(|(k, _)| k.starts_with("keygate:wh:"))
        .collect();
    assert_eq!(wh.len(), 5, "{keys:?}");
    for (k, ttl) in &wh {
        assert_eq!(k.len(), "keygate:wh:".len() + 32, "{k}");
        assert!(*ttl > 0, "{k} has no expiry ({ttl})");
        assert!(
            *ttl <= 24 * 3600 * 1000,
            "{k}: the window (dedupe_window, default 24h), got {ttl} ms"
        );
    }
    let dump = redis.cli(&["KEYS", "*"]);
    for id in &ids {
        assert!(
            !dump.contains(id.as_str()),
            "raw delivery id in Redis: {dump}"
        );
    }
    let secrets: Vec<String> = s.env().into_iter().map(|(_, v)| v).collect();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    for kg in &kgs {
        assert!(kg.events("cluster_degraded").is_empty(), "{}", kg.logs());
        assert_no_secrets(&kg.logs(), &secrets);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_ids_fall_back_to_the_instance_when_redis_is_down_and_deny_mode_answers_503() {
    let up = RecordingUpstream::start().await;
    let mut redis = Redis::start();
    let s = Secrets::new();
    let env = s.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let local = webhook_instance(&up, &redis, &s, "a");
    let strict = Keygate::builder()
        .upstream_url(&up.url())
        .admin()
        .key("app", &new_key("app").1, "")
        .raw(ROUTES)
        .raw(&cluster_lines(&redis, "b", "on_error = \"deny\""))
        .start_with(&env, None);
    wait_healthy(&local).await;
    wait_healthy(&strict).await;
    redis.kill();
    let id = format!("down-{:016x}", rand::random::<u64>());
    let body = format!("{{\"request_id\":\"{id}\"}}").into_bytes();
    let send = |kg: &Keygate| {
        let req = post(&kg.url("/hooks/plain"), &sign_hex(&s.hex, &body), &body);
        let c = kg.client();
        async move { c.send(req).await }
    };
    // on_error = "local": forwarded once, then a duplicate on the same instance.
    let t = std::time::Instant::now();
    assert_eq!(send(&local).await.status, 200);
    assert_eq!(send(&local).await.json()["status"], "duplicate");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(up.count(), 1);
    // on_error = "deny": 503 JSON, nothing forwarded, never held past the timeout.
    let got = send(&strict).await;
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(got.json()["error"], "service unavailable");
    assert_eq!(up.count(), 1);
    strict.wait_log("cluster_unavailable", |v| {
        v["event"] == "cluster_unavailable" && v["shared_state"] == "webhook delivery ids"
    });
}

/// `keygate <args> -c <config>`: (exit code, stdout, stderr).
fn keygate_cli(args: &[&str], config: &std::path::Path) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A request for `key` through `kg` from client address `ip` (the test is the trusted proxy).
async fn get_as(kg: &Keygate, ip: &str, token: &str) -> Got {
    kg.client()
        .get(
            &kg.url("/"),
            &[("x-api-key", token), ("x-forwarded-for", ip)],
        )
        .await
}

fn history_instance(up: &Upstream, redis: &Redis, name: &str, hash: &str, extra: &str) -> Keygate {
    Keygate::builder()
        .upstream(up)
        .admin()
        .state()
        .access(r#"trusted_proxies = ["127.0.0.1/32"]"#)
        .raw("[key_networks]\nmax_per_key = 4\n")
        .key("roam", hash, extra)
        .raw(&cluster_lines(redis, name, ""))
        .start()
}

/// Sum over the instances of one event's lines, after the logs settled.
async fn events_settled(kgs: &[Keygate], name: &str) -> Vec<serde_json::Value> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    kgs.iter().flat_map(|kg| kg.events(name)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_use_and_new_networks_are_logged_once_cluster_wide_and_keys_shows_the_cluster() {
    let up = Upstream::start().await;
    let mut redis = Redis::start();
    let (token, hash) = new_key("roam");
    let kgs: Vec<Keygate> = ["a", "b", "c"]
        .iter()
        .map(|n| history_instance(&up, &redis, n, &hash, ""))
        .collect();
    for kg in &kgs {
        wait_healthy(kg).await;
    }
    // (instance, client address, new to the cluster?) — IPv4 /24 and IPv6 /64 networks, each
    // first seen by one instance and then by others that never saw it themselves.
    let steps: [(usize, &str, bool); 9] = [
        (0, "198.51.100.7", true), // first use
        (1, "198.51.100.9", false),
        (2, "198.51.100.200", false),
        (1, "203.0.113.5", true),
        (0, "203.0.113.77", false),
        (2, "2001:db8:aa:1::1", true),
        (0, "2001:db8:aa:1:ffff::2", false),
        (1, "2001:db8:aa:2::1", true),
        (2, "2001:db8:aa:2:1::9", false),
    ];
    for (i, ip, _) in steps {
        let r = get_as(&kgs[i], ip, &token).await;
        assert_eq!(r.status, 200, "{ip} via {i}: {}", r.text());
    }
    let first = events_settled(&kgs, "key_first_use").await;
    assert_eq!(
        first.len(),
        1,
        "key_first_use once for the cluster: {first:?}"
    );
    assert_eq!(first[0]["client_ip"], "198.51.100.7");
    let new = events_settled(&kgs, "key_new_network").await;
    let mut new_ips: Vec<&str> = new
        .iter()
        .map(|v| v["client_ip"].as_str().unwrap())
        .collect();
    new_ips.sort_unstable();
    assert_eq!(
        new_ips,
        ["2001:db8:aa:1::1", "2001:db8:aa:2::1", "203.0.113.5"],
        "key_new_network once per network for the cluster: {new:?}"
    );
    let previous: Vec<u64> = new
        .iter()
        .map(|v| v["previous_networks"].as_u64().unwrap())
        .collect();
    assert!(
        previous.contains(&1) && previous.contains(&3),
        "{previous:?}"
    );

    // A race: one new network reaches the three instances at the same moment. Once.
    let race = kgs.iter().map(|kg| get_as(kg, "192.0.2.10", &token));
    for r in futures_util::future::join_all(race).await {
        assert_eq!(r.status, 200);
    }
    let new = events_settled(&kgs, "key_new_network").await;
    let raced = new
        .iter()
        .filter(|v| v["client_ip"] == "192.0.2.10")
        .count();
    assert_eq!(raced, 1, "{new:?}");

    // Redis holds at most max_per_key = 4 networks (the oldest, 198.51.100.0/24, dropped),
    // with an expiry; the last use too.
    let nets = redis.cli(&["HKEYS", "keygate:net:roam"]);
    let mut nets: Vec<&str> = nets.lines().collect();
    nets.sort_unstable();
    assert_eq!(
        nets,
        [
            "192.0.2.0/24",
            "2001:db8:aa:1::/64",
            "2001:db8:aa:2::/64",
            "203.0.113.0/24"
        ]
    );
    let ttl: i64 = redis.cli(&["TTL", "keygate:net:roam"]).parse().unwrap();
    assert!((1..=30 * 86_400).contains(&ttl), "{ttl}");
    let ttl: i64 = redis.cli(&["TTL", "keygate:lu:roam"]).parse().unwrap();
    assert!(
        ttl > 90 * 86_400,
        "last use outlives the 90-day warning: {ttl}"
    );

    // The last use, through a only, shows in `keygate keys` run on c's host: written behind
    // within seconds. c's own state file never saw that address.
    // (A second later than any other use, so it is the latest whichever instance flushes last.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get_as(&kgs[0], "192.0.2.250", &token).await.status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let row = loop {
        let (code, out, err) = keygate_cli(&["keys"], &kgs[2].config);
        assert_eq!(code, 0, "{err}");
        let row = out
            .lines()
            .find(|l| l.starts_with("roam"))
            .unwrap()
            .to_string();
        if row.contains("192.0.2.250") {
            assert!(out.contains("read from Redis"), "{out}");
            break row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never showed the cluster's last use:\n{out}\n{err}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        row.split_whitespace().any(|w| w == "4"),
        "four networks: {row}"
    );

    // Redis unreachable: `keygate keys` says so and shows the state file, quickly.
    redis.kill();
    let t = std::time::Instant::now();
    let (code, out, err) = keygate_cli(&["keys"], &kgs[2].config);
    assert_eq!(code, 0, "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(err.contains("Redis could not be read"), "{err}");
    assert!(out.contains("come from the state file"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("roam")), "{out}");
    for kg in &kgs {
        assert_no_secrets(&(kg.logs() + &out + &err), &[&token, &hash]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_and_introspection_show_the_clusters_quota_and_rate_figures() {
    let up = Upstream::start().await;
    let redis = Redis::start();
    let (token, hash) = new_key("roam");
    let extra = "quota = \"50/day\"\nrate_limit = \"100/min\"";
    let a = history_instance(&up, &redis, "a", &hash, extra);
    let b = history_instance(&up, &redis, "b", &hash, extra);
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    for _ in 0..10 {
        assert_eq!(get_as(&a, "198.51.100.7", &token).await.status, 200);
    }
    // b has served nothing: its view is the cluster's.
    let r = b
        .client()
        .get(&b.url("/.well-known/keygate/key"), &[("x-api-key", &token)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["quota"]["used"], 10, "{v}");
    assert_eq!(v["quota"]["remaining"], 40, "{v}");
    let remaining = v["rate_limit"]["remaining"].as_u64().unwrap();
    // 100 cells, 11 taken cluster-wide (the introspection request too), a few refilled.
    assert!(remaining <= 92, "shared bucket, not b's own (99): {v}");
    let (code, out, err) = keygate_cli(&["keys"], &b.config);
    assert_eq!(code, 0, "{err}");
    let row = out.lines().find(|l| l.starts_with("roam")).unwrap();
    assert!(row.contains("10/50/day"), "{out}");
    assert!(out.contains("merged with this host's state file"), "{out}");
    // Without a [state] path there is no state file to merge, and the note says so.
    let text = std::fs::read_to_string(&b.config).unwrap();
    let stateless = b.config.with_file_name("stateless.toml");
    let without = text.replace("\n[state]\npath = \"state.json\"\n", "\n");
    assert_ne!(without, text);
    std::fs::write(&stateless, without).unwrap();
    let (code, out2, err2) = keygate_cli(&["keys"], &stateless);
    assert_eq!(code, 0, "{err2}");
    assert!(
        out2.contains("no local state file") && !out2.contains("merged with"),
        "{out2}"
    );
    let row = out2.lines().find(|l| l.starts_with("roam")).unwrap();
    assert!(row.contains("10/50/day"), "{out2}");
    assert_no_secrets(
        &(a.logs() + &b.logs() + &out + &err + &out2),
        &[&token, &hash],
    );
}

/// Kong's redis rate limiting once wrote counters without a TTL (Kong/kong#5763: the EXPIRE
/// was a separate, conditional call), and they piled up in Redis. Every key keygate writes —
/// rate-limit buckets, quota counters and flags, failed-auth buckets, delivery ids, last use,
/// network history — must carry an expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_key_keygate_writes_in_redis_expires() {
    let up = RecordingUpstream::start().await;
    let redis = Redis::start();
    let s = Secrets::new();
    let env = s.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (token, hash) = new_key("metered");
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .admin()
        .auth("failed_auth_limit = \"5/h\"")
        .key(
            "metered",
            &hash,
            "quota = \"3/day\"\nrate_limit = \"10/min\"",
        )
        .raw(ROUTES)
        .raw(&cluster_lines(&redis, "a", ""))
        .start_with(&env, None);
    wait_healthy(&kg).await;
    let c = kg.client();
    for _ in 0..5 {
        let st = c.get(&kg.url("/"), &[("x-api-key", &token)]).await.status;
        assert!(st == 200 || st == 429, "{st}");
    }
    let wrong = new_key("metered").0;
    assert_eq!(
        c.get(&kg.url("/"), &[("x-api-key", &wrong)]).await.status,
        401
    );
    let body = b"{\"request_id\":\"ttl-1\"}".to_vec();
    let got = c
        .send(post(
            &kg.url("/hooks/plain"),
            &sign_hex(&s.hex, &body),
            &body,
        ))
        .await;
    assert_eq!(got.status, 200);
    tokio::time::sleep(Duration::from_secs(3)).await; // one write-behind flush
    assert_eq!(kg.events("quota_exceeded").len(), 1, "{}", kg.logs());
    let keys = redis_keys(&redis);
    let prefixes: std::collections::BTreeSet<&str> = keys
        .iter()
        .map(|(k, _)| k.split(':').nth(1).unwrap())
        .collect();
    for p in ["rl", "q", "qx", "fa", "wh", "lu", "net"] {
        assert!(prefixes.contains(p), "no {p} key written: {keys:?}");
    }
    for (k, ttl) in &keys {
        assert!(*ttl > 0, "{k} has no expiry (PTTL {ttl})");
    }
    assert_no_secrets(&kg.logs(), &[&token, &wrong, &hash]);
}

/// Redis down: uses and new networks are decided and logged by the instance alone (as without
/// cluster mode) and never refused; what it noted meanwhile reaches Redis once it is back
/// (here a Redis restarted empty, as after a crash without persistence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_seen_while_redis_is_down_reach_it_when_it_is_back() {
    let up = Upstream::start().await;
    let mut redis = Redis::start();
    let (token, hash) = new_key("roam");
    let kg = history_instance(&up, &redis, "a", &hash, "rate_limit = \"1000/s\"");
    wait_healthy(&kg).await;
    assert_eq!(get_as(&kg, "198.51.100.7", &token).await.status, 200);
    redis.kill();
    kg.wait_log("cluster_degraded", |v| v["event"] == "cluster_degraded");
    let r = get_as(&kg, "203.0.113.9", &token).await;
    assert_eq!(r.status, 200, "never refused for history: {}", r.text());
    let new = kg.wait_log("key_new_network", |v| v["event"] == "key_new_network");
    assert_eq!(new["client_ip"], "203.0.113.9");
    // At least one write-behind flush (every 2 s) fails while Redis is down.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    redis.restart();
    kg.wait_log("cluster_recovered", |v| v["event"] == "cluster_recovered");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let last = redis.cli(&["GET", "keygate:lu:roam"]);
        let net = redis.cli(&["HEXISTS", "keygate:net:roam", "203.0.113.0/24"]);
        if last.ends_with(" 203.0.113.9") && net == "1" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the use noted while Redis was down never reached it: {last:?} {net:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(kg.events("key_new_network").len(), 1, "{}", kg.logs());
    assert_no_secrets(&kg.logs(), &[&token, &hash]);
}
