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
    // Every scheme's id source: JSON field (plain, stripe), X-GitHub-Delivery, webhook-id.
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
